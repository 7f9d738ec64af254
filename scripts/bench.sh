#!/usr/bin/env bash
# `make bench`: measures what pg_outbox costs, side by side in one run, and writes BENCHMARKS.md.
#
# Enqueue cost (pgbench, same database, variants interleaved over ROUNDS rounds, median TPS):
#   a  the business transaction alone (one order row)
#   b  a + a hand-rolled Debezium-style outbox INSERT (uuid PK, aggregatetype, aggregateid, type, jsonb)
#   c  a + outbox.enqueue in wal mode
#   d  a + outbox.enqueue in table mode
#   e  a + outbox.enqueue_batch of 100 events
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage.sh
PGBIN=$($PG_CONFIG --bindir)
PORT=${PG_OUTBOX_BENCH_PORT:-55462}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-2}

stage_begin --release
scripts/pgcluster.sh start "$root/pg" "$PORT" logical >/dev/null
sql() { psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"; }
sql -c "CREATE EXTENSION pg_outbox" -c "CALL outbox.setup()" >/dev/null
sql <<'SQL'
CREATE TABLE bench_orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer int NOT NULL,
                           total numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE bench_outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL,
                           type text NOT NULL, payload jsonb NOT NULL);
SQL

run() { # variant script mode -> tps
    local out
    out=$(PGOPTIONS="-c pg_outbox.mode=$3" "$PGBIN/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres \
          -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_PER_RUN" -f "$2" postgres 2>&1)
    echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1
}
declare -A tps
for round in $(seq "$ROUNDS"); do
    for v in a b c d e; do
        case $v in
            a) t=$(run a bench/a_business.sql wal) ;;
            b) t=$(run b bench/b_handrolled.sql wal) ;;
            c) t=$(run c bench/c_enqueue.sql wal) ;;
            d) t=$(run d bench/c_enqueue.sql table) ;;
            e) t=$(run e bench/e_batch.sql wal) ;;
        esac
        tps[$v]="${tps[$v]:-} $t"
        printf 'bench: round %s/%s %s %8.0f tps\n' "$round" "$ROUNDS" "$v" "$t"
        # keep the slot from retaining the whole run: consume what wal mode wrote
        sql -c "SELECT count(*) FROM pg_logical_slot_get_binary_changes('pg_outbox', NULL, NULL, 'proto_version', '1', 'publication_names', 'pg_outbox', 'messages', 'true')" >/dev/null
        sql -c "TRUNCATE outbox.events, bench_outbox" >/dev/null
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {printf "%.0f", (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
declare -A med
for v in a b c d e; do med[$v]=$(echo "${tps[$v]}" | median); done
ratio() { awk -v x="$1" -v y="$2" 'BEGIN {printf "%.2f", x / y}'; }

table=$(cat <<TABLE
| variant | what the transaction does | TPS (median of $ROUNDS) | events/s |
|---|---|---:|---:|
| a | business INSERT alone | ${med[a]} | — |
| b | a + hand-rolled outbox INSERT | ${med[b]} | ${med[b]} |
| c | a + \`outbox.enqueue\`, wal mode | ${med[c]} | ${med[c]} |
| d | a + \`outbox.enqueue\`, table mode | ${med[d]} | ${med[d]} |
| e | a + \`outbox.enqueue_batch\` of 100, wal mode | ${med[e]} | $(awk -v t="${med[e]}" 'BEGIN {printf "%.0f", t * 100}') |

| ratio | value | goal |
|---|---:|---|
| c / b (wal enqueue vs hand-rolled outbox) | $(ratio "${med[c]}" "${med[b]}") | ≥ 1.15 |
| d / b (table enqueue vs hand-rolled outbox) | $(ratio "${med[d]}" "${med[b]}") | — |
| c / a (wal enqueue vs business alone) | $(ratio "${med[c]}" "${med[a]}") | ≥ 0.90 |
TABLE
)
echo
echo "$table"
machine="$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $($PGBIN/postgres --version)"
cat > BENCHMARKS.md <<DOC
# Benchmarks

Command: \`make bench\` (scripts/bench.sh; SECONDS_PER_RUN=$SECONDS_PER_RUN ROUNDS=$ROUNDS CLIENTS=$CLIENTS)
Machine: $machine. The cluster is the test cluster of scripts/pgcluster.sh (fsync off, synchronous_commit on),
so the figures compare variants with each other; they are not absolute production numbers.
Date: $(date -u +%Y-%m-%d)

## Enqueue cost on the business transaction

pgbench, one database, the variants interleaved round by round so drift on a shared machine hits them alike.

$table

Every variant but (a) sends one more statement per transaction, so with pgbench's one round trip per
statement (b), (c) and (d) share that fixed cost; compare (c) with (b) for the price of the mechanism itself.

## Not measured yet

Relay drain throughput against raw logical decoding and raw produce, commit-to-ack latency, ingest throughput
and relay memory (issue "Benchmarks", items 2 to 5).
DOC
echo
echo "bench: wrote BENCHMARKS.md"
