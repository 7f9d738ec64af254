#!/usr/bin/env bash
# `make test` (scripts/test.sh): the Debian packages of `make package`, installed and used.
#
#   scripts/package-test.sh [MAJOR...]    (default: 15 and 17, those installed; test.sh passes its own)
#
#   1. scripts/package.sh --debug MAJOR...: the packages from the debug builds `make test` made
#      already (`make package` builds release binaries, minutes more on 2 cores; the packaging is
#      the same);
#   2. their metadata (dpkg-deb -f/-c): names, version, architecture, Depends, every file and its
#      mode, conffiles, the SQL edition's tarball;
#   3. per MAJOR, a real `dpkg -i` into a private root (dpkg --root): a copy of this machine's
#      PostgreSQL MAJOR in Debian's layout without pg_outbox (a relocatable build under /opt is
#      laid out as Debian's), and a dpkg database holding this machine's entries for the packages
#      they depend on, so that dpkg checks Depends for real (and refuses without postgresql-MAJOR).
#      Not into / : other test runs here use /usr/lib/postgresql/15 with their own build of the
#      extension, which the package would replace (and 17 is not Debian's here);
#   4. a throwaway cluster from the private root's PostgreSQL (scripts/pgcluster.sh), then
#      tests/tests/package.rs: CREATE EXTENSION and the packaged relay publishing to Tansu, and
#      ALTER EXTENSION pg_outbox UPDATE from 0.1.0 with the packaged files.
#
#   PG_OUTBOX_PACKAGE_PORT   the first cluster's port, the next major's one above (default 24470:
#                            below the ports of scripts/test.sh's clusters and the ephemeral range)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
source scripts/pgversions.sh
say() { printf 'package-test: %s\n' "$*"; }
fail() { printf 'package-test: FAIL %s\n' "$*" >&2; exit 1; }

base_port=${PG_OUTBOX_PACKAGE_PORT:-24470}
sudo=; [ "$(id -u)" = 0 ] || sudo=sudo  # dpkg installs as root, even into a private root
majors=("$@")
if [ ${#majors[@]} -eq 0 ]; then
    for v in 15 17; do [ -x "$(pg_config_of "$v")" ] && majors+=("$v"); done
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
work=$(mktemp -d "${TMPDIR:-/tmp}/pg_outbox-package.XXXXXX")
chmod 755 "$work"
clusters=()
cleanup() {
    local c
    for c in "${clusters[@]}"; do
        PGBIN=$work/root-${c%%:*}/usr/lib/postgresql/${c%%:*}/bin scripts/pgcluster.sh stop "${c#*:}" || true
    done
    $sudo rm -rf "$work"
}
trap cleanup EXIT

# --- 1. build ---------------------------------------------------------------------------------------
debs=$work/debs
scripts/package.sh --debug --out "$debs" "${majors[@]}"
relay=$debs/pg-outbox-relay_${version}_$arch.deb
sql=$debs/pg_outbox-sql-edition-$version.tar.gz
ext_deb() { echo "$debs/postgresql-$1-pg-outbox_${version}_$arch.deb"; }
for f in "$relay" "$sql" $(for m in "${majors[@]}"; do ext_deb "$m"; done); do
    [ -f "$f" ] || fail "scripts/package.sh made no ${f##*/}"
done

# --- 2. metadata ------------------------------------------------------------------------------------
field() { dpkg-deb -f "$1" "$2"; }
expect() {  # DEB FIELD PATTERN (an extended regular expression for the whole value)
    local value; value=$(field "$1" "$2")
    [[ $value =~ ^$3$ ]] || fail "${1##*/}: $2 is '$value', expected /$3/"
}
# every file, with its mode: exactly these (directories aside)
files() { dpkg-deb -c "$1" | awk '$1 !~ /^d/ { print $1, $6 }' | sed 's|^\(\S*\) \./|\1 /|' | sort; }
doc() { printf -- '-rw-r--r-- /usr/share/doc/%s/%s\n' "$1" changelog.Debian.gz "$1" changelog.gz "$1" copyright; }
for deb in "$relay" $(for m in "${majors[@]}"; do ext_deb "$m"; done); do
    expect "$deb" Version "$version"
    expect "$deb" Architecture "$arch"
    expect "$deb" Maintainer '.+ <.+@.+>'
    expect "$deb" Section database
    [[ $(field "$deb" Description) == *"License: Apache-2.0"* ]] || fail "${deb##*/}: no license in Description"
done
for major in "${majors[@]}"; do
    ext=$(ext_deb "$major")
    expect "$ext" Package "postgresql-$major-pg-outbox"
    expect "$ext" Depends "postgresql-$major, libc6 \(>= [0-9.]+\).*"
    dir=/usr/share/postgresql/$major/extension
    releases=$(for f in pg_outbox/sql/releases/pg_outbox--*.sql; do
        [ "${f##*/}" = "pg_outbox--$version.sql" ] || echo "-rw-r--r-- $dir/${f##*/}"
    done)
    upgrades=$(for f in pg_outbox/sql/pg_outbox--*--*.sql; do echo "-rw-r--r-- $dir/${f##*/}"; done)
    diff <(files "$ext") <(sort <<EOF
-rw-r--r-- /usr/lib/postgresql/$major/lib/pg_outbox.so
-rw-r--r-- $dir/pg_outbox--$version.sql
-rw-r--r-- $dir/pg_outbox.control
$releases
$upgrades
$(doc "postgresql-$major-pg-outbox")
EOF
    ) || fail "postgresql-$major-pg-outbox: the files above differ (< the package, > expected)"
done
expect "$relay" Package pg-outbox-relay
# what the binary links: libc, libssl (and libcrypto with it), zlib
for lib in libc6 libssl3 zlib1g; do
    [[ $(field "$relay" Depends) =~ (^|, )$lib\ \( ]] || fail "pg-outbox-relay does not depend on $lib"
done
sql_files=$(cd sql-edition && ls pg_outbox.sql pg_outbox--*--*.sql switch-to-*.sql switch/*.sql)
diff <(files "$relay") <(sort <<EOF
-rwxr-xr-x /usr/bin/pg-outbox-relay
-rw-r--r-- /lib/systemd/system/pg-outbox-relay.service
-rw-r--r-- /etc/pg-outbox-relay/relay.toml.example
-rw-r--r-- /usr/share/man/man1/pg-outbox-relay.1.gz
-rw-r--r-- /usr/share/doc/pg-outbox-relay/README.Debian
-rw-r--r-- /usr/share/lintian/overrides/pg-outbox-relay
$(doc pg-outbox-relay)
$(sed 's|^|-rw-r--r-- /usr/share/pg-outbox-relay/sql-edition/|' <<<"$sql_files")
EOF
) || fail "pg-outbox-relay: the files above differ (< the package, > expected)"
dpkg-deb -c "$relay" | grep '^drwx------ root/root .* ./etc/pg-outbox-relay/credentials/$' >/dev/null \
    || fail "pg-outbox-relay: /etc/pg-outbox-relay/credentials is not root's, mode 0700"
[ "$(dpkg-deb --ctrl-tarfile "$relay" | tar -xO ./conffiles)" = /etc/pg-outbox-relay/relay.toml.example ] \
    || fail "pg-outbox-relay: relay.toml.example is not its only conffile"
# the SQL edition's tarball: the files, and the same bytes as the repository's
tar -xzf "$sql" -C "$work"
for f in $sql_files; do
    cmp -s "sql-edition/$f" "$work/pg_outbox-sql-edition-$version/$f" || fail "the tarball's $f is not sql-edition/$f"
done
cmp -s LICENSE "$work/pg_outbox-sql-edition-$version/LICENSE" || fail "the tarball has no LICENSE"
say "ok: names, version, architecture, Depends, files and modes, conffiles, the SQL edition's tarball"

# --- 3. dpkg -i into a private root -----------------------------------------------------------------
# This machine's PostgreSQL MAJOR in Debian's layout under ROOT, less whatever pg_outbox another run
# installed into it. A relocatable build (bin, lib, share under one folder) finds its share folder
# next to bin: a link from there to /usr/share/postgresql/MAJOR, where the package puts its files.
lay_out_postgresql() {
    local major=$1 root=$2 config home; config=$(pg_config_of "$1"); home=$(pg_home "$1")
    mkdir -p "$root/usr/lib/postgresql/$major" "$root/usr/share/postgresql"
    if [ "$("$config" --sharedir)" = "/usr/share/postgresql/$major" ]; then
        cp -a "$home/." "$root/usr/lib/postgresql/$major/"
        cp -a "/usr/share/postgresql/$major" "$root/usr/share/postgresql/"
    else
        [ "$("$config" --pkglibdir)" = "$home/lib" ] && [ "$("$config" --sharedir)" = "$home/share" ] \
            || fail "PostgreSQL $major in $home is neither Debian's layout nor bin, lib and share in one folder"
        cp -a "$home/bin" "$home/lib" "$root/usr/lib/postgresql/$major/"
        cp -a "$home/share" "$root/usr/share/postgresql/$major"
        ln -s "../../../share/postgresql/$major" "$root/usr/lib/postgresql/$major/share"
    fi
    rm -f "$root/usr/lib/postgresql/$major/lib/pg_outbox.so" "$root/usr/share/postgresql/$major/extension"/pg_outbox[.-]*
}

# A dpkg database under ROOT with this machine's entries (status, file lists) for the packages that
# DEBs depend on; postgresql-MAJOR, where this machine has it from elsewhere than Debian, is entered
# as what the root holds.
dpkg_database() {
    local major=$1 root=$2; shift 2
    local admin=$root/var/lib/dpkg p list
    mkdir -p "$admin/info" "$admin/updates" "$admin/triggers"
    touch "$admin/available" "$admin/status"
    for p in $(for deb in "$@"; do field "$deb" Depends | tr ',' '\n' | sed 's/^ *//; s/[ (].*//'; done | sort -u); do
        if dpkg-query -s "$p" >>"$admin/status" 2>/dev/null; then
            for list in "/var/lib/dpkg/info/$p.list" "/var/lib/dpkg/info/$p:$arch.list"; do
                [ -f "$list" ] && cp "$list" "$admin/info/"
            done
        elif [ "$p" = "postgresql-$major" ]; then
            printf 'Package: %s\nStatus: install ok installed\nPriority: optional\nSection: database\nMaintainer: %s\nArchitecture: %s\nVersion: %s\nDescription: PostgreSQL %s laid out as Debian'"'"'s (scripts/package-test.sh)\n' \
                "$p" "scripts/setup.sh <root@localhost>" "$arch" "$("$(pg_config_of "$major")" --version | awk '{print $2}')" "$major" \
                >>"$admin/status"
        else
            fail "$p (a Depends) is not installed on this machine"
        fi
        echo >>"$admin/status"
    done
}

install_packages() {
    local major=$1 root=$2 ext; ext=$(ext_deb "$1")
    lay_out_postgresql "$major" "$root"
    dpkg_database "$major" "$root" "$ext" "$relay"
    # Depends is real: where postgresql-MAJOR is not installed, dpkg leaves the extension
    # unconfigured (in a root of its own: what dpkg unpacked there stays)
    local bare=$work/bare
    mkdir -p "$bare/var/lib/dpkg"
    cp -a "$root/var/lib/dpkg/." "$bare/var/lib/dpkg/"
    sed -i "/^Package: postgresql-$major\$/,/^\$/d" "$bare/var/lib/dpkg/status"
    if $sudo dpkg --root="$bare" -i "$ext" >"$work/bare.log" 2>&1 || ! grep -q "depends on postgresql-$major" "$work/bare.log"; then
        cat "$work/bare.log"
        fail "dpkg installed postgresql-$major-pg-outbox where postgresql-$major is not installed"
    fi
    $sudo rm -rf "$bare"
    $sudo dpkg --root="$root" -i "$ext" "$relay" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i"; }
    local p
    for p in "postgresql-$major-pg-outbox" pg-outbox-relay; do
        [ "$(dpkg-query --root="$root" -W -f='${Status} ${Version}' "$p")" = "install ok installed $version" ] \
            || fail "$p is not installed in the private root"
    done
    $sudo dpkg --root="$root" --verify "postgresql-$major-pg-outbox" pg-outbox-relay \
        || fail "dpkg --verify: files differ from the packages'"
    # the extension folder holds the package's files and nothing else of pg_outbox
    diff <(ls "$root/usr/share/postgresql/$major/extension"/pg_outbox*) \
        <(dpkg-query --root="$root" -L "postgresql-$major-pg-outbox" | grep '/extension/pg_outbox' | sed "s|^|$root|" | sort) \
        || fail "pg_outbox files in the extension folder that the package does not own"
    # the unit is packaging/'s, running the packaged binary
    local unit=$root/lib/systemd/system/pg-outbox-relay.service exec_start
    diff <(sed -n '/^\[Unit\]/,$p' packaging/pg-outbox-relay.service | sed 's|/usr/local/bin/|/usr/bin/|') \
        <(sed -n '/^\[Unit\]/,$p' "$unit") || fail "the packaged unit is not packaging/pg-outbox-relay.service"
    exec_start=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit")
    [ -x "$root$exec_start" ] || fail "the unit's ExecStart $exec_start is not in the package"
    "$root/usr/bin/pg-outbox-relay" --version | grep -x "pg-outbox-relay $version" >/dev/null || fail "pg-outbox-relay --version"
    zcat "$root/usr/share/man/man1/pg-outbox-relay.1.gz" | grep '^\.SS healthcheck$' >/dev/null \
        || fail "the man page has no section for healthcheck"
    say "ok: PostgreSQL $major: dpkg -i into $root (Depends checked), dpkg --verify, the unit, the binary, the man page"
}

# --- 4. use them ------------------------------------------------------------------------------------
port=$base_port
for major in "${majors[@]}"; do
    root=$work/root-$major
    install_packages "$major" "$root"
    clusters+=("$major:$work/pg$major")
    PGBIN=$root/usr/lib/postgresql/$major/bin scripts/pgcluster.sh start "$work/pg$major" "$port" logical
    PG_OUTBOX_TEST_PORT=$port PG_OUTBOX_TEST_PG_VERSION=$major PG_OUTBOX_PACKAGE_ROOT=$root \
        PG_OUTBOX_RELAY_BIN=$root/usr/bin/pg-outbox-relay \
        cargo test -q -p pg_outbox_tests --test package -- --ignored --test-threads=1
    PGBIN=$root/usr/lib/postgresql/$major/bin scripts/pgcluster.sh stop "$work/pg$major"
    say "ok: PostgreSQL $major: CREATE EXTENSION and the packaged relay, ALTER EXTENSION UPDATE from 0.1.0"
    port=$((port + 1))
done
say "passed (PostgreSQL ${majors[*]})"
