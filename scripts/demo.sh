#!/usr/bin/env bash
# `make demo`: PostgreSQL with the extension, a Tansu broker, two relays (WAL source and poll source),
# the SQL walkthrough (scripts/demo.sql), a small order-service workload, a consumer printing what
# reached Kafka, and `relay status`. Everything runs on 127.0.0.1 and is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage.sh
PORT=${PG_OUTBOX_DEMO_PORT:-25442}
KAFKA_PORT=${PG_OUTBOX_DEMO_KAFKA_PORT:-19392}
METRICS=127.0.0.1:${PG_OUTBOX_DEMO_METRICS_PORT:-19393}
BROKERS=127.0.0.1:$KAFKA_PORT

stage_begin
cargo build -q -p pg_outbox_relay -p pg_outbox_bench --bins
RELAY=target/debug/pg-outbox-relay
psql_() { psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"; }

scripts/pgcluster.sh start "$root/pg" "$PORT" logical
stage_broker "$KAFKA_PORT" orders:3 shipments:1
echo "demo: Tansu broker on $BROKERS with topics orders (3 partitions) and shipments (1)"

psql_ -c "CREATE EXTENSION pg_outbox"
"$RELAY" run --pg-user postgres --pg-port "$PORT" --brokers "$BROKERS" --metrics-addr "$METRICS" 2>"$root/relay-wal.log" &
pids+=($!)
"$RELAY" run --pg-user postgres --pg-port "$PORT" --brokers "$BROKERS" --source poll 2>"$root/relay-poll.log" &
pids+=($!)
for _ in $(seq 100); do
    [ "$(psql_ -tAc "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = 'pg_outbox'")" = 1 ] && break
    sleep 0.2
done
echo "demo: relays running (WAL source and poll source); their logs: $root/relay-*.log"

psql_ -e -f scripts/demo.sql

echo
echo "== 10. An order service at work: 20 orders, every 5th transaction fails and rolls back"
psql_ <<'SQL'
DO $$
BEGIN
    FOR i IN 100..119 LOOP
        BEGIN
            INSERT INTO orders VALUES (i, 'customer-' || (i % 4), i * 1.5);
            PERFORM outbox.enqueue('orders', 'customer-' || (i % 4),
                                   jsonb_build_object('order_id', i, 'total', i * 1.5),
                                   '{"type": "OrderCreated"}');
            IF i % 5 = 0 THEN
                RAISE EXCEPTION 'payment declined';  -- rolls back the row and its event
            END IF;
        EXCEPTION WHEN raise_exception THEN
            NULL;
        END;
    END LOOP;
END
$$;
SELECT count(*) AS orders_committed FROM orders WHERE id >= 100;
SQL

echo
echo "== 11. A consumer reads Kafka: each committed event exactly once, none of the rolled-back ones"
# 4 wal events and 1 table event from the walkthrough, 16 from the workload
target/debug/consume_events "$BROKERS" 21 orders:3 shipments:1

echo
echo "== 12. pg-outbox-relay status"
"$RELAY" status --pg-user postgres --pg-port "$PORT" --brokers "$BROKERS"
echo
echo "== 13. /metrics"
exec 3<>"/dev/tcp/${METRICS%:*}/${METRICS##*:}"
printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
grep -E '^pg_outbox_relay_(events|restarts)' <&3 || true
exec 3<&-
