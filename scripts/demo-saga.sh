#!/usr/bin/env bash
# `make demo-saga`: the saga example. Two services with their own databases, connected only by SQL and
# Kafka: the order service (Rust, examples/saga/src/main.rs) creates orders with OrderCreated events; the
# customer service (Python, examples/saga/customer_service.py) reserves credit and replies
# CreditReserved or CreditLimitExceeded; the order service approves or cancels. Four relay processes
# move the events: a WAL relay per database and an ingest per inbox.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage.sh
PORT=${PG_OUTBOX_DEMO_PORT:-25452}
KAFKA_PORT=${PG_OUTBOX_DEMO_KAFKA_PORT:-19402}
BROKERS=127.0.0.1:$KAFKA_PORT
N=${ORDERS:-500}

stage_begin
cargo build -q -p pg_outbox_relay -p saga_example
RELAY=target/debug/pg-outbox-relay
sql() { local db=$1; shift; psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d "$db" "$@"; }
dsn() { echo "host=127.0.0.1 port=$PORT user=postgres dbname=$1"; }

scripts/pgcluster.sh start "$root/pg" "$PORT" logical
for db in orders customers; do
    sql postgres -c "CREATE DATABASE $db" -c "ALTER DATABASE $db SET pg_outbox.slot_name = '${db}_outbox'"
    sql "$db" -f "examples/saga/$db.sql"
done
stage_broker "$KAFKA_PORT" orders:3 customers:3

common=(--pg-user postgres --pg-port "$PORT" --brokers "$BROKERS")
"$RELAY" run "${common[@]}" --pg-database orders --slot orders_outbox 2>"$root/relay-orders.log" & pids+=($!)
"$RELAY" run "${common[@]}" --pg-database customers --slot customers_outbox 2>"$root/relay-customers.log" & pids+=($!)
"$RELAY" ingest "${common[@]}" --pg-database customers --consumer customer-service --topics orders \
    2>"$root/ingest-customers.log" & pids+=($!)
"$RELAY" ingest "${common[@]}" --pg-database orders --consumer order-service --topics customers \
    2>"$root/ingest-orders.log" & pids+=($!)
python3 examples/saga/customer_service.py "$(dsn customers)" & pids+=($!)
for _ in $(seq 100); do
    [ "$(sql postgres -tAc "SELECT count(*) FROM pg_stat_replication")" = 2 ] && break
    sleep 0.2
done
echo "saga: 2 relays, 2 ingests and the Python customer service are running"

target/debug/saga-order-service create "$(dsn orders)" "$N"
target/debug/saga-order-service process "$(dsn orders)"

echo
echo "== orders by status (order service database)"
sql orders -c "SELECT status, count(*), sum(amount) FROM orders GROUP BY 1 ORDER BY 1"
echo "== credit per customer (customer service database): reserved = sum of approved orders"
sql customers -c "SELECT id, credit_limit, reserved FROM customers ORDER BY id"
sql orders -c "SELECT customer, sum(amount) AS approved FROM orders WHERE status = 'APPROVED' GROUP BY 1 ORDER BY 1"
echo "== each inbox saw every event once"
sql customers -c "SELECT consumer, status, count(*) FROM inbox.messages GROUP BY 1, 2"
sql orders -c "SELECT consumer, status, count(*) FROM inbox.messages GROUP BY 1, 2"
