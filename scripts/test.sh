#!/usr/bin/env bash
# `make test`: install what is missing, lint, build, then for each PostgreSQL version: install the
# extension, start three throwaway clusters (wal_level=logical, wal_level=replica, and one a test
# restarts), run the tests against them, clean up.
#
# Every version also runs the SQL tests and one end-to-end relay test per source against the SQL
# edition (sql-edition/pg_outbox.sql, PG_OUTBOX_EDITION=sql), unless TESTS picks tests, and the
# upgrade from 0.1.0 of both editions (tests/tests/upgrade.rs, in clusters of its own on the
# version's base port + 3 and + 4). scripts/releases.sh fails the run when an install script
# changed without a new version and its upgrade scripts. Then the Debian packages, built from the
# debug builds, installed with dpkg into a private root and used (scripts/package-test.sh, its
# clusters from port 24470 on).
#
#   PG_FULL   versions that run every test (default "15 17"; `PG_FULL=16 make test` runs all on 16)
#   PG_SMOKE  versions that run the SQL tests and one end-to-end relay test per source
#             (`make test-all`: 14 16 18)
#   TESTS     cargo test arguments that pick the integration tests of a full run (`make chaos`:
#             --test chaos)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
source scripts/pgversions.sh

PG_FULL=${PG_FULL-15 17}
PG_SMOKE=${PG_SMOKE-}
export PG_VERSIONS="$PG_FULL $PG_SMOKE"
scripts/setup.sh

echo "test: cargo fmt --check"
cargo fmt --all --check
echo "test: sql-edition/pg_outbox.sql is what scripts/sql-edition.sh writes"
scripts/sql-edition.sh --check
echo "test: the install scripts are the frozen release, and every step between releases has its upgrade scripts"
scripts/releases.sh check
echo "test: cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "test: building the relay and the saga example"
cargo build -q -p pg_outbox_relay -p saga_example
export PG_OUTBOX_RELAY_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/pg-outbox-relay
export PG_OUTBOX_SAGA_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/saga-order-service
echo "test: docs/configuration.md names every setting the relay accepts (and no other); README's and docs/' links resolve"
scripts/check-docs.sh "$PG_OUTBOX_RELAY_BIN"

echo "test: unit tests"
cargo test -q -p pg_outbox_envelope -p pg_outbox_relay
echo "test: the Kubernetes manifests, the systemd unit, the image and compose files (static)"
scripts/check-deploy.sh
echo "test: the Grafana dashboard and the Prometheus alert rules (deploy/; no cluster needed)"
cargo test -q -p pg_outbox_tests --test deploy

root=$(mktemp -d "${TMPDIR:-/tmp}/pg_outbox-test.XXXXXX")
chmod 755 "$root"
clusters=()
cleanup() {
    for c in "${clusters[@]}"; do scripts/pgcluster.sh stop "$c" || true; done
    rm -rf "$root"
}
trap cleanup EXIT
# a CA and a server certificate for localhost (not 127.0.0.1), for the TLS tests
tls=$root/tls
mkdir -p "$tls"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=pg_outbox test CA" \
    -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
printf 'subjectAltName = DNS:localhost\n' >"$tls/san.ext"
openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 2 -extfile "$tls/san.ext" -out "$tls/server.crt" 2>/dev/null
chmod 644 "$tls/ca.crt"
export PG_OUTBOX_TEST_TLS_DIR=$tls

# one end-to-end relay test per source (tests/tests/relay_basics.rs: wal; relay_poll.rs: poll)
relay_smoke() {
    cargo test -p pg_outbox_tests --test relay_basics --test relay_poll -- --show-output --exact \
        committed_events_arrive_with_topic_key_headers_and_payload \
        table_mode_publishes_exactly_the_committed_rows_and_removes_them
}

# Runs the integration tests against PostgreSQL $1: all ($2 = full) or the SQL tests and two
# end-to-end relay tests, one per source (smoke).
run_version() {
    local v=$1 what=$2
    local config; config=$(pg_config_of "$v")
    export PGBIN; PGBIN=$(pg_home "$v")/bin
    echo "test: PostgreSQL $v: installing the extension into $($config --sharedir)/extension"
    local sudo=; [ "$(id -u)" = 0 ] || sudo=--sudo
    (cd pg_outbox && cargo pgrx install $sudo --pg-config "$config" >/dev/null)
    # the generated install script is the frozen one, the library exports every symbol a release
    # names, and the earlier releases' install scripts are there for tests/tests/upgrade.rs
    scripts/releases.sh check-extension "$config"
    scripts/releases.sh install "$config"
    # the fixtures' defaults (tests/src/postgres.rs) for 15, other ports for the others; all below
    # the kernel's ephemeral range (32768-60999), where an outgoing connection can hold a port
    local base=25432
    [ "$v" = 15 ] || base=$((25002 + v * 10))
    export PG_OUTBOX_TEST_PORT=$base
    export PG_OUTBOX_TEST_REPLICA_PORT=$((base + 1))
    export PG_OUTBOX_TEST_RESTART_PORT=$((base + 2))
    export PG_OUTBOX_TEST_RESTART_PGDATA=$root/pg$v-restart
    export PG_OUTBOX_TEST_PG_VERSION=$v
    clusters+=("$root/pg$v-logical" "$root/pg$v-replica" "$root/pg$v-restart")
    PGCLUSTER_TLS_DIR=$tls scripts/pgcluster.sh start "$root/pg$v-logical" "$PG_OUTBOX_TEST_PORT" logical
    scripts/pgcluster.sh start "$root/pg$v-replica" "$PG_OUTBOX_TEST_REPLICA_PORT" replica
    scripts/pgcluster.sh start "$root/pg$v-restart" "$PG_OUTBOX_TEST_RESTART_PORT" logical
    if [ "$what" = full ]; then
        # a logical slot fails over from PostgreSQL 17 on (tests/tests/failover.rs)
        local skip=()
        [ "$v" -ge 17 ] || skip=(--skip the_relay_follows_a_promoted_standby)
        echo "test: PostgreSQL $v: cargo test (every test${skip:+ but the failover test, 17+})"
        # shellcheck disable=SC2086
        cargo test -p pg_outbox_tests ${TESTS:-} -- --show-output "${skip[@]}"
    else
        echo "test: PostgreSQL $v: cargo test (SQL tests, one relay test per source)"
        cargo test -p pg_outbox_tests --test outbox --test inbox --test trust --test hijack --test backup --test observe \
            --test upgrade -- --show-output
        relay_smoke
    fi
    if [ -z "${TESTS:-}" ]; then
        echo "test: PostgreSQL $v: the SQL edition, installed by a role that is not a superuser"
        PG_OUTBOX_EDITION=sql cargo test -p pg_outbox_tests --test outbox --test inbox --test trust --test keys \
            --test hijack --test backup --test observe -- --show-output
        PG_OUTBOX_EDITION=sql relay_smoke
    fi
    scripts/pgcluster.sh stop "$root/pg$v-logical"
    scripts/pgcluster.sh stop "$root/pg$v-replica"
    scripts/pgcluster.sh stop "$root/pg$v-restart"
}

for v in $PG_FULL; do run_version "$v" full; done
for v in $PG_SMOKE; do run_version "$v" smoke; done
if [ -z "${TESTS:-}" ]; then
    echo "test: the Debian packages (make package, from the debug builds): metadata, dpkg -i into a private root, used"
    # shellcheck disable=SC2086
    scripts/package-test.sh $PG_FULL $PG_SMOKE
fi
echo "test: passed on PostgreSQL $PG_FULL${PG_SMOKE:+ (and the SQL tests plus one end-to-end test on $PG_SMOKE)}"
