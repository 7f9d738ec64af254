#!/usr/bin/env bash
# A/B: seconds from a relay's start to its first published event, on a topic of PARTS partitions.
# Needs a PostgreSQL cluster with wal_level=logical and pg_outbox installed (PGPORT, default 25432),
# and tansu on PATH. usage: PARTS=3 RUNS=5 bench/ab/startup.sh relay-before relay-after
set -euo pipefail
PARTS=${PARTS:-3000}; RUNS=${RUNS:-3}; BP=${BROKER_PORT:-29611}; MP=${METRICS_PORT:-29612}
export PATH="$HOME/.cargo/bin:$PATH"

psql() { command psql -h 127.0.0.1 -p ${PGPORT:-25432} -U postgres -X -q "$@"; }
mkdir -p ${TMPDIR:-/tmp}/ab && cd ${TMPDIR:-/tmp}/ab
tansu broker --listener-url tcp://127.0.0.1:$BP --advertised-listener-url tcp://127.0.0.1:$BP --storage-engine memory://tansu/ >${TMPDIR:-/tmp}/ab/tansu.log 2>&1 &
TP=$!; trap 'kill $TP 2>/dev/null' EXIT
sleep 2
tansu topic create p$PARTS --partitions $PARTS --broker tcp://127.0.0.1:$BP >/dev/null
psql -d postgres -c "DROP DATABASE IF EXISTS su_ab WITH (FORCE)" -c "CREATE DATABASE su_ab" -c "ALTER DATABASE su_ab SET pg_outbox.slot_name = 'su_ab'" >/dev/null 2>&1 || true
psql -d postgres -c "SELECT pg_drop_replication_slot('su_ab')" >/dev/null 2>&1 || true
psql -d su_ab -c "CREATE EXTENSION pg_outbox" -c "CALL outbox.setup()" >/dev/null 2>&1
for r in $(seq "$RUNS"); do
  for b in "$@"; do
    psql -d su_ab -c "SELECT outbox.enqueue('p$PARTS', 'k$r', '{}')" >/dev/null
    t0=$(date +%s.%N)
    "$b" run --pg-host 127.0.0.1 --pg-port ${PGPORT:-25432} --pg-user postgres --pg-database su_ab --slot su_ab --brokers 127.0.0.1:$BP \
       --metrics-addr 127.0.0.1:$MP --restart-grace-ms 0 >${TMPDIR:-/tmp}/ab/relay.log 2>&1 &
    rp=$!
    until curl -s 127.0.0.1:$MP/metrics 2>/dev/null | grep -qE '^pg_outbox_relay_events_published_total(\{[^}]*\})? [1-9]'; do sleep 0.02; done
    t1=$(date +%s.%N)
    kill -TERM $rp; wait $rp || true
    echo "$(basename "$b") run $r: $(echo "$t1 - $t0" | bc) s"
  done
done
