#!/usr/bin/env bash
# Released install scripts are frozen, and every step between releases has its upgrade script
# (docs/operations.md, "Upgrade"; CHANGELOG.md). `make test` runs the checks.
#
#   pg_outbox/sql/releases/pg_outbox--V.sql   the C extension's install script of release V, as
#                                             `cargo pgrx` generated it (never edited)
#   sql-edition/releases/pg_outbox--V.sql     the SQL edition's file of release V (never edited)
#   pg_outbox/sql/pg_outbox--A--B.sql         ALTER EXTENSION pg_outbox UPDATE from A to B
#   sql-edition/pg_outbox--A--B.sql           the SQL edition's upgrade from A to B
#
#   scripts/releases.sh check                 the SQL edition is its frozen release; an upgrade script
#                                             in both places for each step between releases
#   scripts/releases.sh check-extension PG_CONFIG
#                                             after `cargo pgrx install`: the installed install script is
#                                             the frozen one, and the library exports every C symbol
#                                             that any release's script names
#   scripts/releases.sh install PG_CONFIG     copy the earlier releases' install scripts into the
#                                             extension folder (tests/tests/upgrade.rs installs them)
#   scripts/releases.sh install-into DIR      the same into DIR (scripts/package.sh: a package's
#                                             extension folder)
#   scripts/releases.sh freeze PG_CONFIG      pin the current version's install scripts (a new version
#                                             only: a released script is never written again)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ext_releases=pg_outbox/sql/releases
sql_releases=sql-edition/releases

# The versions with a frozen install script, oldest first.
releases() {
    for f in "$ext_releases"/pg_outbox--*.sql; do
        f=${f##*/pg_outbox--}
        echo "${f%.sql}"
    done | sort -V
}

# A script with what does not change its effect taken out: comment lines and blank lines, and the
# order of cargo pgrx's blocks (`/* <begin connected objects> */`), which is not stable between builds.
normalise() {
    awk '
        /^\/\* <begin connected objects> \*\/$/ { inblock = 1; block = ""; next }
        /^\/\* <\/end connected objects> \*\/$/ { print block; inblock = 0; next }
        /^[ \t]*--/ || /^[ \t]*$/ { next }
        inblock { block = block $0 "\\n"; next }
        { rest = rest $0 "\\n" }
        END { if (rest != "") print rest }
    ' "$1" | sort
}

fail() {
    echo "releases: $*" >&2
    exit 1
}

changed() {
    local what=$1 script=$2 frozen=$3
    fail "$what ($script) is not the install script of release $version ($frozen), which is frozen.
A released install script is never edited: a schema change ships as a new version with its upgrade script.
  1. bump [workspace.package] version in Cargo.toml (say to NEXT);
  2. write pg_outbox/sql/pg_outbox--$version--NEXT.sql and sql-edition/pg_outbox--$version--NEXT.sql, which
     bring a $version database to what a fresh NEXT install is (tests/tests/upgrade.rs compares them);
  3. scripts/sql-edition.sh, cargo pgrx install, then scripts/releases.sh freeze PG_CONFIG;
  4. a CHANGELOG.md entry.
If $version is not released yet, scripts/releases.sh freeze --unreleased PG_CONFIG pins the change instead."
}

# The installed extension's install script and library.
extension_files() {
    local config=$1
    script="$("$config" --sharedir)/extension/pg_outbox--$version.sql"
    library="$("$config" --pkglibdir)/pg_outbox.so"
    [ -f "$script" ] && [ -f "$library" ] || fail "pg_outbox $version is not installed for $config (cargo pgrx install)"
}

case "${1:-}" in
check)
    sql_frozen=$sql_releases/pg_outbox--$version.sql
    [ -f "$sql_frozen" ] || fail "no frozen SQL edition for $version ($sql_frozen): run scripts/releases.sh freeze PG_CONFIG"
    [ -f "$ext_releases/pg_outbox--$version.sql" ] \
        || fail "no frozen install script for $version ($ext_releases/pg_outbox--$version.sql): run scripts/releases.sh freeze PG_CONFIG"
    diff -q <(normalise sql-edition/pg_outbox.sql) <(normalise "$sql_frozen") >/dev/null \
        || changed "the SQL edition" sql-edition/pg_outbox.sql "$sql_frozen"
    previous=
    for v in $(releases); do
        [ -f "$sql_releases/pg_outbox--$v.sql" ] || fail "release $v has no frozen SQL edition ($sql_releases/pg_outbox--$v.sql)"
        if [ -n "$previous" ]; then
            for up in "pg_outbox/sql/pg_outbox--$previous--$v.sql" "sql-edition/pg_outbox--$previous--$v.sql"; do
                [ -f "$up" ] || fail "no upgrade script from $previous to $v: write $up"
            done
        fi
        previous=$v
    done
    [ "$previous" = "$version" ] || fail "the newest frozen release is $previous, the version is $version"
    ;;
check-extension)
    extension_files "${2:?PG_CONFIG required}"
    frozen=$ext_releases/pg_outbox--$version.sql
    diff -q <(normalise "$script") <(normalise "$frozen") >/dev/null \
        || changed "the extension's install script" "$script" "$frozen"
    # A database still on an earlier release calls the new library through that release's functions
    # until ALTER EXTENSION UPDATE, and CREATE EXTENSION VERSION needs them: every symbol that any
    # release names must stay exported (a thin compatibility function where a Rust function goes).
    exported=$(nm -D --defined-only "$library" | awk '{print $NF}')
    for f in "$ext_releases"/pg_outbox--*.sql; do
        for symbol in $(grep -o "'MODULE_PATHNAME', '[A-Za-z0-9_]*'" "$f" | sed "s/.*, '\(.*\)'/\1/" | sort -u); do
            grep -qx "$symbol" <<<"$exported" \
                || fail "$library does not export $symbol, which ${f##*/} names: keep a compatibility function by that name"
            grep -qx "pg_finfo_$symbol" <<<"$exported" \
                || fail "$library does not export pg_finfo_$symbol, which ${f##*/} needs"
        done
    done
    ;;
install | install-into)
    if [ "$1" = install ]; then
        config=${2:?PG_CONFIG required}
        dir="$("$config" --sharedir)/extension"
        sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    else
        dir=${2:?DIR required}
        sudo=
    fi
    for v in $(releases); do
        [ "$v" = "$version" ] && continue  # cargo pgrx install wrote the current one
        $sudo install -m 644 "$ext_releases/pg_outbox--$v.sql" "$dir/"
    done
    ;;
freeze)
    shift
    unreleased=0
    if [ "${1:-}" = --unreleased ]; then unreleased=1; shift; fi
    extension_files "${1:?PG_CONFIG required}"
    for f in "$ext_releases/pg_outbox--$version.sql" "$sql_releases/pg_outbox--$version.sql"; do
        [ ! -e "$f" ] || [ "$unreleased" = 1 ] || fail "$f exists: $version is released, and its scripts are never written again"
    done
    if [ "$unreleased" = 1 ] && git rev-parse -q --verify "refs/tags/v$version" >/dev/null; then
        fail "v$version is tagged: it is released, and its scripts are never written again"
    fi
    cp "$script" "$ext_releases/pg_outbox--$version.sql"
    cp sql-edition/pg_outbox.sql "$sql_releases/pg_outbox--$version.sql"
    echo "releases: pinned $ext_releases/pg_outbox--$version.sql and $sql_releases/pg_outbox--$version.sql"
    ;;
*)
    echo "usage: $0 check | check-extension PG_CONFIG | install PG_CONFIG | install-into DIR | freeze [--unreleased] PG_CONFIG" >&2
    exit 2
    ;;
esac
