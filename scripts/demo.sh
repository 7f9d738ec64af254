#!/usr/bin/env bash
# `make demo`: a throwaway PostgreSQL cluster with the extension, the SQL walkthrough (scripts/demo.sql),
# and the events the replication slot now holds, decoded from WAL.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PORT=${PG_OUTBOX_DEMO_PORT:-55442}

scripts/setup.sh >/dev/null
echo "demo: building and installing the extension"
SUDO=; [ "$(id -u)" = 0 ] || SUDO=--sudo
(cd pg_outbox && cargo pgrx install $SUDO --pg-config "$PG_CONFIG" >/dev/null 2>&1)
cargo build -q -p pg_outbox_tests --bin peek_events

root=$(mktemp -d "${TMPDIR:-/tmp}/pg_outbox-demo.XXXXXX")
chmod 755 "$root"
trap 'scripts/pgcluster.sh stop "$root/pg" >/dev/null || true; rm -rf "$root"' EXIT
scripts/pgcluster.sh start "$root/pg" "$PORT" logical

psql -X -q -e -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -f scripts/demo.sql

echo
echo "== 10. What the relay will read: the slot holds exactly the committed events, in commit order"
target/debug/peek_events "$PORT" postgres pg_outbox
