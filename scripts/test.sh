#!/usr/bin/env bash
# `make test`: install what is missing, lint, build and install the extension, start two throwaway
# PostgreSQL clusters (wal_level=logical and wal_level=replica), run every test, clean up.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

scripts/setup.sh

echo "test: cargo fmt --check"
cargo fmt --all --check
echo "test: cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "test: installing the extension into $($PG_CONFIG --sharedir)/extension"
SUDO=; [ "$(id -u)" = 0 ] || SUDO=--sudo
(cd pg_outbox && cargo pgrx install $SUDO --pg-config "$PG_CONFIG" >/dev/null)

echo "test: building the relay and the saga example"
cargo build -q -p pg_outbox_relay -p saga_example
export PG_OUTBOX_RELAY_BIN=$PWD/target/debug/pg-outbox-relay
export PG_OUTBOX_SAGA_BIN=$PWD/target/debug/saga-order-service

# the same defaults as the fixtures' (tests/src/postgres.rs)
export PG_OUTBOX_TEST_PORT=${PG_OUTBOX_TEST_PORT:-55432}
export PG_OUTBOX_TEST_REPLICA_PORT=${PG_OUTBOX_TEST_REPLICA_PORT:-55433}
export PG_OUTBOX_TEST_RESTART_PORT=${PG_OUTBOX_TEST_RESTART_PORT:-55434}
root=$(mktemp -d "${TMPDIR:-/tmp}/pg_outbox-test.XXXXXX")
chmod 755 "$root"
cleanup() {
    scripts/pgcluster.sh stop "$root/logical" || true
    scripts/pgcluster.sh stop "$root/replica" || true
    scripts/pgcluster.sh stop "$root/restart" || true
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
PGCLUSTER_TLS_DIR=$tls scripts/pgcluster.sh start "$root/logical" "$PG_OUTBOX_TEST_PORT" logical
scripts/pgcluster.sh start "$root/replica" "$PG_OUTBOX_TEST_REPLICA_PORT" replica
scripts/pgcluster.sh start "$root/restart" "$PG_OUTBOX_TEST_RESTART_PORT" logical
export PG_OUTBOX_TEST_RESTART_PGDATA=$root/restart

echo "test: cargo test"
cargo test -p pg_outbox_envelope -p pg_outbox_relay -p pg_outbox_tests -- --show-output
