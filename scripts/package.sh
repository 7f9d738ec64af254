#!/usr/bin/env bash
# `make package`: Debian packages of pg_outbox, built with dpkg-deb alone (no network, no debhelper),
# into target/package/ (docs/install.md says what each holds and how to install it):
#
#   postgresql-<major>-pg-outbox_<version>_amd64.deb   the extension for each PostgreSQL major installed
#                                                      here (scripts/pgversions.sh), in Debian's layout
#                                                      (/usr/lib/postgresql/<major>/lib,
#                                                      /usr/share/postgresql/<major>/extension) whatever
#                                                      the layout of the build's PostgreSQL, with the
#                                                      earlier releases' install scripts (upgrades)
#   pg-outbox-relay_<version>_amd64.deb                the relay: binary, systemd unit, example config,
#                                                      man page (from --help), the SQL edition's files
#   pg_outbox-sql-edition-<version>.tar.gz             the SQL edition alone, for a database reached from
#                                                      a machine that is not Debian
#
#   scripts/package.sh [--debug] [--out DIR] [MAJOR...]
#     --debug   package the debug builds that `make test` made already (the relay: PG_OUTBOX_RELAY_BIN
#               when set), compressed fast: for the package test (scripts/package-test.sh); never
#               for a release
#     --out     where the packages go (default target/package); its stage/ is removed at the end
#     MAJOR     only these PostgreSQL majors (default: every one installed)
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022
export PATH="$HOME/.cargo/bin:$PATH"
source scripts/pgversions.sh
say() { printf 'package: %s\n' "$*"; }

MAINTAINER=${PG_OUTBOX_MAINTAINER:-"pg_outbox maintainers <maintainers@pg-outbox.invalid>"}
target=${CARGO_TARGET_DIR:-$PWD/target}
profile=release
out=$target/package
majors=()
while [ $# -gt 0 ]; do
    case "$1" in
    --debug) profile=debug ;;
    --out) out=${2:?--out DIR}; shift ;;
    [0-9]*) majors+=("$1") ;;
    *) echo "usage: $0 [--debug] [--out DIR] [MAJOR...]" >&2; exit 2 ;;
    esac
    shift
done
if [ ${#majors[@]} -eq 0 ]; then
    for v in 14 15 16 17 18; do [ -x "$(pg_config_of "$v")" ] && majors+=("$v"); done
fi
[ ${#majors[@]} -gt 0 ] || { echo "package: no PostgreSQL installed (scripts/setup.sh)" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
homepage=$(sed -n 's/^repository = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
# reproducible: every date and file time is the last commit's (not exported: cargo would rebuild
# the crates whose build scripts watch SOURCE_DATE_EPOCH, librdkafka's among them)
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
first=$(git log --reverse --format=%ad --date=format:%Y | head -1) last=$(date -u -d "@$epoch" +%Y)
years=$first; [ "$first" = "$last" ] || years=$first-$last
if [ "$profile" = release ]; then compress=(-Zxz); else compress=(-Zgzip -z1); fi
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage"
trap 'rm -rf "$stage"' EXIT

# /usr/share/doc/PKG: the copyright file (machine-readable), the upstream and the Debian changelog
docs() {
    local pkg=$1 root=$2 also=${3:-}
    local doc=$root/usr/share/doc/$pkg comment=
    [ -z "$also" ] || comment="Comment: $also
"
    install -d "$doc"
    cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pg_outbox
Source: $homepage

Files: *
Copyright: $years the pg_outbox authors
License: Apache-2.0
${comment}
License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not use this
 file except in compliance with the License. You may obtain a copy of the License at
 http://www.apache.org/licenses/LICENSE-2.0
 .
 Unless required by applicable law or agreed to in writing, software distributed under
 the License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY
 KIND, either express or implied. See the License for the specific language governing
 permissions and limitations under the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0 can be found
 in /usr/share/common-licenses/Apache-2.0.
EOF
    gzip -9n <CHANGELOG.md >"$doc/changelog.gz"
    printf '%s (%s) stable; urgency=medium\n\n  * pg_outbox %s: see changelog.gz.\n\n -- %s  %s\n' \
        "$pkg" "$version" "$version" "$MAINTAINER" "$(date -R -u -d "@$epoch")" \
        | gzip -9n >"$doc/changelog.Debian.gz"
}

# What the ELF files given link, as Depends (dpkg-shlibdeps wants a debian/control to stand in)
shlib_depends() {
    local dir; dir=$(mktemp -d "$stage/shlibs.XXXXXX")
    mkdir "$dir/debian"
    printf 'Source: pg-outbox\n\nPackage: pg-outbox\nArchitecture: any\n' >"$dir/debian/control"
    local files=()
    for f in "$@"; do files+=("$(realpath "$f")"); done
    # undefined symbols of an extension are PostgreSQL's own: no warning for them
    (cd "$dir" && dpkg-shlibdeps -O --warnings=0 "${files[@]}" 2>/dev/null) | sed -n 's/^shlibs:Depends=//p'
    rm -rf "$dir"
}

# DEBIAN/control (Installed-Size from the tree), DEBIAN/md5sums, then dpkg-deb --build
build_deb() {
    local root=$1 control=$2
    local pkg; pkg=$(sed -n 's/^Package: //p' <<<"$control")
    install -d -m 755 "$root/DEBIAN"
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0r md5sum) \
        >"$root/DEBIAN/md5sums"
    local size; size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    printf '%s\nInstalled-Size: %s\n' "$control" "$size" >"$root/DEBIAN/control"
    find "$root" -exec touch -h -d "@$epoch" {} +
    local deb=$out/${pkg}_${version}_${arch}.deb
    SOURCE_DATE_EPOCH=$epoch dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >/dev/null
    say "built ${deb#"$PWD"/}"
    if [ "$profile" = release ] && command -v lintian >/dev/null; then
        # advisory: what Debian's own checks say (not a failure of the build)
        lintian --tag-display-limit 0 --suppress-tags no-manual-page "$deb" 2>&1 \
            | grep -v 'running with root privileges' | sed 's/^/package: lintian: /' || true
    fi
}

# --- the extension, one package per PostgreSQL major ----------------------------------------------
cargo_profile=(); [ "$profile" = debug ] && cargo_profile=(--debug)
for major in "${majors[@]}"; do
    config=$(pg_config_of "$major")
    pkg=postgresql-$major-pg-outbox
    say "$pkg: cargo pgrx package ($profile) for $($config --version)"
    pgrx=$stage/pgrx-$major
    (cd pg_outbox && cargo pgrx package "${cargo_profile[@]}" --pg-config "$config" --out-dir "$pgrx") \
        >"$stage/pgrx-$major.log" 2>&1 || { cat "$stage/pgrx-$major.log"; exit 1; }
    # Debian's layout whatever the build's (a relocatable PostgreSQL under /opt has the same files)
    root=$stage/$pkg
    lib=$root/usr/lib/postgresql/$major/lib
    ext=$root/usr/share/postgresql/$major/extension
    install -d "$lib" "$ext"
    install -m 644 "$pgrx$("$config" --pkglibdir)/pg_outbox.so" "$lib/"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$lib/pg_outbox.so"
    install -m 644 "$pgrx$("$config" --sharedir)"/extension/pg_outbox* "$ext/"
    # earlier releases' install scripts: CREATE EXTENSION ... VERSION and the upgrade path from them
    scripts/releases.sh install-into "$ext"
    docs "$pkg" "$root"
    build_deb "$root" "Package: $pkg
Source: pg-outbox
Version: $version
Architecture: $arch
Maintainer: $MAINTAINER
Depends: postgresql-$major, $(shlib_depends "$lib/pg_outbox.so")
Suggests: pg-outbox-relay
Section: database
Priority: optional
Homepage: $homepage
Description: transactional outbox and deduplicating inbox for Kafka, PostgreSQL $major
 pg_outbox enqueues events in the same transaction as the business write (as a
 WAL message or a table row) and deduplicates consumed messages in an inbox;
 the relay (package pg-outbox-relay) publishes the events to Kafka exactly once.
 .
 This package holds the extension for PostgreSQL $major: CREATE EXTENSION
 pg_outbox installs $version; ALTER EXTENSION pg_outbox UPDATE upgrades from
 every earlier release.
 .
 License: Apache-2.0 (/usr/share/doc/$pkg/copyright)."
    rm -rf "$root" "$pgrx"
done

# --- the relay ------------------------------------------------------------------------------------
pkg=pg-outbox-relay
if [ "$profile" = debug ] && [ -x "${PG_OUTBOX_RELAY_BIN:-}" ]; then
    # the binary scripts/test.sh built (a build of this package alone may unify features otherwise)
    bin=$PG_OUTBOX_RELAY_BIN
else
    say "$pkg: cargo build ($profile)"
    cargo_release=(); [ "$profile" = release ] && cargo_release=(--release)
    cargo build -q "${cargo_release[@]}" -p pg_outbox_relay
    bin=$target/$profile/pg-outbox-relay
fi
root=$stage/$pkg
install -d "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/pg-outbox-relay" \
    "$root/usr/share/man/man1" "$root/usr/share/$pkg/sql-edition"
install -m 755 "$bin" "$root/usr/bin/"
strip --strip-all --remove-section=.comment --remove-section=.note "$root/usr/bin/pg-outbox-relay"
# the unit as packaging/ has it, less its manual-install notes, with the packaged binary's path
{
    printf '# pg_outbox relay under systemd (package %s; %s).\n' "$pkg" "/usr/share/doc/$pkg/README.Debian"
    sed -n '/^\[Unit\]/,$p' packaging/pg-outbox-relay.service | sed 's|/usr/local/bin/pg-outbox-relay|/usr/bin/pg-outbox-relay|'
} >"$root/lib/systemd/system/pg-outbox-relay.service"
chmod 644 "$root/lib/systemd/system/pg-outbox-relay.service"
# the example, a conffile: copied to relay.toml and edited (never started with these values)
install -m 644 relay/pg-outbox-relay.example.toml "$root/etc/pg-outbox-relay/relay.toml.example"
install -d -m 700 "$root/etc/pg-outbox-relay/credentials"
install -d "$root/usr/share/lintian/overrides"
echo "$pkg: non-standard-dir-perm 0700 != 0755 [etc/pg-outbox-relay/credentials/]" \
    >"$root/usr/share/lintian/overrides/$pkg"  # the secrets' folder is root's alone on purpose
# the SQL edition at hand for a managed database (the relay is what every SQL-edition user runs)
sql_files=(sql-edition/pg_outbox.sql sql-edition/pg_outbox--*--*.sql sql-edition/switch-to-*.sql)
install -m 644 "${sql_files[@]}" "$root/usr/share/$pkg/sql-edition/"
install -d "$root/usr/share/$pkg/sql-edition/switch"
install -m 644 sql-edition/switch/*.sql "$root/usr/share/$pkg/sql-edition/switch/"

# the man page: the top-level --help and every subcommand's, as roff
roff() { sed -e 's/\\/\\e/g' -e "s/^\([.']\)/\\\\\&\1/"; }
{
    printf '.TH PG-OUTBOX-RELAY 1 "%s" "pg-outbox-relay %s" "User Commands"\n' \
        "$(date -u -d "@$epoch" +%Y-%m-%d)" "$version"
    printf '.SH NAME\npg-outbox-relay \\- publishes pg_outbox events from PostgreSQL to Kafka, exactly once\n'
    printf '.SH SYNOPSIS\n.B pg-outbox-relay\n.I command\n[\\fIoptions\\fR]\n'
    printf '.SH DESCRIPTION\n.nf\n'
    "$bin" --help | roff
    printf '.fi\n.SH COMMANDS\n'
    for sub in $("$bin" --help | sed -n '/^Commands:/,/^$/s/^  \([a-z-]*\) .*/\1/p' | grep -vx help); do
        printf '.SS %s\n.nf\n' "$sub"
        "$bin" "$sub" --help | roff
        printf '.fi\n'
    done
    cat <<'EOF'
.SH FILES
.TP
.I /etc/pg-outbox-relay/relay.toml
the configuration the systemd unit runs with; copy it from relay.toml.example, which names every setting
.TP
.I /etc/pg-outbox-relay/credentials/
pg_password and kafka_password, root-only, handed to the service through LoadCredential=
.TP
.I /lib/systemd/system/pg-outbox-relay.service
the unit: systemctl enable --now pg-outbox-relay
.TP
.I /usr/share/pg-outbox-relay/sql-edition/
the SQL edition (pg_outbox.sql) and its upgrade scripts, for a database where no C extension installs
.SH SEE ALSO
.BR systemd.exec (5),
.BR systemd-creds (1)
EOF
} | gzip -9n >"$root/usr/share/man/man1/pg-outbox-relay.1.gz"

docs "$pkg" "$root" "The binary links Rust crates (MIT or Apache-2.0) and librdkafka (BSD-2-Clause) statically."
cat >"$root/usr/share/doc/$pkg/README.Debian" <<EOF
pg-outbox-relay for Debian
--------------------------

The unit is installed but not enabled: the relay needs its configuration first.

  cp /etc/pg-outbox-relay/relay.toml.example /etc/pg-outbox-relay/relay.toml   # then edit
  install -m 0600 /dev/stdin /etc/pg-outbox-relay/credentials/pg_password <<<'the password'
  install -m 0600 /dev/stdin /etc/pg-outbox-relay/credentials/kafka_password <<<'the password'
  pg-outbox-relay check --config /etc/pg-outbox-relay/relay.toml
  systemctl enable --now pg-outbox-relay

The database needs pg_outbox: the package postgresql-<major>-pg-outbox (CREATE EXTENSION pg_outbox),
or where no C extension installs, the SQL edition in /usr/share/$pkg/sql-edition/:

  psql "\$DATABASE_URL" -v ON_ERROR_STOP=1 --single-transaction -f /usr/share/$pkg/sql-edition/pg_outbox.sql

man pg-outbox-relay lists every command and setting.
EOF
printf '/etc/pg-outbox-relay/relay.toml.example\n' >"$stage/conffiles"
install -d "$root/DEBIAN"
install -m 644 "$stage/conffiles" "$root/DEBIAN/conffiles"
build_deb "$root" "Package: $pkg
Source: pg-outbox
Version: $version
Architecture: $arch
Maintainer: $MAINTAINER
Depends: $(shlib_depends "$root/usr/bin/pg-outbox-relay")
Recommends: ca-certificates
Suggests: postgresql-client
Section: database
Priority: optional
Homepage: $homepage
Description: publishes pg_outbox events from PostgreSQL to Kafka, exactly once
 The relay reads the events that the pg_outbox extension (package
 postgresql-<major>-pg-outbox) or its SQL edition enqueues, from a logical
 replication slot or the outbox table, and publishes them to Kafka with
 idempotent, transactional producers; it also ingests Kafka topics into the
 deduplicating inbox. Several relays for one database are safe: one streams,
 the others stand by.
 .
 This package holds the binary, a systemd unit (Type=notify, secrets through
 LoadCredential=), an example configuration naming every setting, a man page,
 and the SQL edition's files for databases where no C extension installs.
 .
 License: Apache-2.0 (/usr/share/doc/$pkg/copyright)."
rm -rf "$root"

# --- the SQL edition, alone ------------------------------------------------------------------------
name=pg_outbox-sql-edition-$version
mkdir -p "$stage/$name/switch"
install -m 644 "${sql_files[@]}" LICENSE "$stage/$name/"
install -m 644 sql-edition/switch/*.sql "$stage/$name/switch/"
tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
    -C "$stage" -czf "$out/$name.tar.gz" "$name"
say "built ${out#"$PWD"/}/$name.tar.gz"
