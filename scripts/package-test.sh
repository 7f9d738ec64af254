#!/usr/bin/env bash
# `make test` (scripts/test.sh): the Debian packages of `make package`, installed and used.
#
#   1. scripts/package.sh --debug 15: the packages from the debug builds `make test` made already
#      (`make package` builds release binaries, minutes more on 2 cores; the packaging is the same);
#   2. their metadata (dpkg-deb -f/-c): names, version, architecture, Depends, paths, conffiles;
#   3. a real `dpkg -i`, into a private root (dpkg --root): a copy of this machine's PostgreSQL 15
#      without pg_outbox, and a dpkg database that holds this machine's entries for the packages
#      they depend on, so that dpkg checks Depends for real (and refuses without postgresql-15).
#      Not into / : other test runs here use /usr/lib/postgresql/15 with their own build of the
#      extension, which the package would replace;
#   4. a throwaway cluster from the private root's PostgreSQL (scripts/pgcluster.sh), then
#      tests/tests/package.rs: CREATE EXTENSION and the packaged relay publishing to Tansu, and
#      ALTER EXTENSION pg_outbox UPDATE from 0.1.0 with the packaged files.
#
#   PG_OUTBOX_PACKAGE_PORT   the cluster's port (default 24470: below the ports of scripts/test.sh's
#                            clusters and the kernel's ephemeral range)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
source scripts/pgversions.sh
say() { printf 'package-test: %s\n' "$*"; }
fail() { printf 'package-test: FAIL %s\n' "$*" >&2; exit 1; }

port=${PG_OUTBOX_PACKAGE_PORT:-24470}
sudo=; [ "$(id -u)" = 0 ] || sudo=sudo  # dpkg installs as root, even into a private root
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
work=$(mktemp -d "${TMPDIR:-/tmp}/pg_outbox-package.XXXXXX")
chmod 755 "$work"
root=$work/root
cleanup() {
    PGBIN=$root/usr/lib/postgresql/15/bin scripts/pgcluster.sh stop "$work/pg" || true
    $sudo rm -rf "$work"
}
trap cleanup EXIT

# --- 1. build ---------------------------------------------------------------------------------------
debs=$work/debs
scripts/package.sh --debug --out "$debs" 15
ext=$debs/postgresql-15-pg-outbox_${version}_$arch.deb
relay=$debs/pg-outbox-relay_${version}_$arch.deb
sql=$debs/pg_outbox-sql-edition-$version.tar.gz
for f in "$ext" "$relay" "$sql"; do [ -f "$f" ] || fail "scripts/package.sh made no ${f##*/}"; done

# --- 2. metadata ------------------------------------------------------------------------------------
field() { dpkg-deb -f "$1" "$2"; }
expect() {  # DEB FIELD PATTERN (an extended regular expression for the whole value)
    local value; value=$(field "$1" "$2")
    [[ $value =~ ^$3$ ]] || fail "${1##*/}: $2 is '$value', expected /$3/"
}
for deb in "$ext" "$relay"; do
    expect "$deb" Version "$version"
    expect "$deb" Architecture "$arch"
    expect "$deb" Maintainer '.+ <.+@.+>'
    expect "$deb" Section database
    [[ $(field "$deb" Description) == *"License: Apache-2.0"* ]] || fail "${deb##*/}: no license in Description"
done
expect "$ext" Package postgresql-15-pg-outbox
expect "$ext" Depends 'postgresql-15, libc6 \(>= [0-9.]+\).*'
expect "$relay" Package pg-outbox-relay
# what the binary links: libc, libssl (and libcrypto with it), zlib
for lib in libc6 libssl3 zlib1g; do
    [[ $(field "$relay" Depends) =~ (^|, )$lib\ \( ]] || fail "pg-outbox-relay does not depend on $lib"
done
# every file, with its mode: exactly these (directories aside)
files() { dpkg-deb -c "$1" | awk '$1 !~ /^d/ { print $1, $6 }' | sed 's|^\(\S*\) \./|\1 /|' | sort; }
releases=$(for f in pg_outbox/sql/releases/pg_outbox--*.sql; do
    [ "${f##*/}" = "pg_outbox--$version.sql" ] || echo "-rw-r--r-- /usr/share/postgresql/15/extension/${f##*/}"
done)
upgrades=$(for f in pg_outbox/sql/pg_outbox--*--*.sql; do
    echo "-rw-r--r-- /usr/share/postgresql/15/extension/${f##*/}"; done)
doc() { printf -- '-rw-r--r-- /usr/share/doc/%s/%s\n' "$1" changelog.Debian.gz "$1" changelog.gz "$1" copyright; }
diff <(files "$ext") <(sort <<EOF
-rw-r--r-- /usr/lib/postgresql/15/lib/pg_outbox.so
-rw-r--r-- /usr/share/postgresql/15/extension/pg_outbox--$version.sql
-rw-r--r-- /usr/share/postgresql/15/extension/pg_outbox.control
$releases
$upgrades
$(doc postgresql-15-pg-outbox)
EOF
) || fail "postgresql-15-pg-outbox: the files above differ (< the package, > expected)"
sql_files=$(cd sql-edition && ls pg_outbox.sql pg_outbox--*--*.sql switch-to-*.sql switch/*.sql)
diff <(files "$relay") <(sort <<EOF
-rwxr-xr-x /usr/bin/pg-outbox-relay
-rw-r--r-- /lib/systemd/system/pg-outbox-relay.service
-rw-r--r-- /etc/pg-outbox-relay/relay.toml.example
-rw-r--r-- /usr/share/man/man1/pg-outbox-relay.1.gz
-rw-r--r-- /usr/share/doc/pg-outbox-relay/README.Debian
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
# this machine's PostgreSQL 15, less whatever pg_outbox another run installed into it
mkdir -p "$root/usr/lib/postgresql" "$root/usr/share/postgresql"
cp -a "$(pg_home 15)" "$root/usr/lib/postgresql/"
cp -a "$(/usr/lib/postgresql/15/bin/pg_config --sharedir)" "$root/usr/share/postgresql/"
rm -f "$root/usr/lib/postgresql/15/lib/pg_outbox.so" "$root"/usr/share/postgresql/15/extension/pg_outbox[.-]*
# a dpkg database with this machine's entries (status and file lists) for what the packages depend on
admin=$root/var/lib/dpkg
mkdir -p "$admin/info" "$admin/updates" "$admin/triggers"
touch "$admin/available" "$admin/status"
depends() { field "$1" Depends | tr ',' '\n' | sed 's/^ *//; s/[ (].*//'; }
for p in $( { depends "$ext"; depends "$relay"; } | sed '/^$/d' | sort -u); do
    dpkg-query -s "$p" >>"$admin/status" 2>/dev/null || fail "$p (a Depends) is not installed on this machine"
    echo >>"$admin/status"
    for list in "/var/lib/dpkg/info/$p.list" "/var/lib/dpkg/info/$p:$arch.list"; do
        [ -f "$list" ] && cp "$list" "$admin/info/"
    done
done
# Depends is real: where postgresql-15 is not installed, dpkg leaves the extension unconfigured
# (in a root of its own: what dpkg unpacked there stays)
bare=$work/bare
mkdir -p "$bare/var/lib/dpkg"
cp -a "$admin/." "$bare/var/lib/dpkg/"
sed -i '/^Package: postgresql-15$/,/^$/d' "$bare/var/lib/dpkg/status"
if $sudo dpkg --root="$bare" -i "$ext" >"$work/bare.log" 2>&1 || ! grep -q "depends on postgresql-15" "$work/bare.log"; then
    cat "$work/bare.log"
    fail "dpkg installed postgresql-15-pg-outbox where postgresql-15 is not installed"
fi
$sudo rm -rf "$bare"
$sudo dpkg --root="$root" -i "$ext" "$relay" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i"; }
for p in postgresql-15-pg-outbox pg-outbox-relay; do
    [ "$(dpkg-query --root="$root" -W -f='${Status} ${Version}' "$p")" = "install ok installed $version" ] \
        || fail "$p is not installed in the private root"
done
$sudo dpkg --root="$root" --verify postgresql-15-pg-outbox pg-outbox-relay || fail "dpkg --verify: files differ from the packages'"
# the extension folder holds the package's files and nothing else of pg_outbox
diff <(ls "$root"/usr/share/postgresql/15/extension/pg_outbox*) \
    <(dpkg-query --root="$root" -L postgresql-15-pg-outbox | grep '/extension/pg_outbox' | sed "s|^|$root|" | sort) \
    || fail "pg_outbox files in the extension folder that the package does not own"
# the unit is packaging/'s, running the packaged binary
unit=$root/lib/systemd/system/pg-outbox-relay.service
diff <(sed -n '/^\[Unit\]/,$p' packaging/pg-outbox-relay.service | sed 's|/usr/local/bin/|/usr/bin/|') \
    <(sed -n '/^\[Unit\]/,$p' "$unit") || fail "the packaged unit is not packaging/pg-outbox-relay.service"
exec_start=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit")
[ -x "$root$exec_start" ] || fail "the unit's ExecStart $exec_start is not in the package"
"$root/usr/bin/pg-outbox-relay" --version | grep -x "pg-outbox-relay $version" >/dev/null || fail "pg-outbox-relay --version"
zcat "$root/usr/share/man/man1/pg-outbox-relay.1.gz" | grep '^\.SS healthcheck$' >/dev/null \
    || fail "the man page has no section for healthcheck"
say "ok: dpkg -i into $root (Depends checked), dpkg --verify, the unit, the binary, the man page"

# --- 4. use them ------------------------------------------------------------------------------------
PGBIN=$root/usr/lib/postgresql/15/bin scripts/pgcluster.sh start "$work/pg" "$port" logical
PG_OUTBOX_TEST_PORT=$port PG_OUTBOX_PACKAGE_ROOT=$root PG_OUTBOX_RELAY_BIN=$root/usr/bin/pg-outbox-relay \
    cargo test -p pg_outbox_tests --test package -- --ignored --test-threads=1 --show-output
say "passed"
