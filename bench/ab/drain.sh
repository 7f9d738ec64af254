#!/usr/bin/env bash
# A/B: seconds for a relay to publish a backlog of N events, with the first event and peak RSS apart.
# Needs a PostgreSQL cluster with wal_level=logical and pg_outbox installed (PGPORT, default 25432),
# and tansu on PATH. Every binary drains the same backlog (a slot each, made before it is written).
# usage: N=300000 RUNS=3 bench/ab/drain.sh relay-before relay-after
set -euo pipefail
N=${N:-300000}; RUNS=${RUNS:-3}; BP=${BROKER_PORT:-29621}; MP=${METRICS_PORT:-29622}; PAY=${PAY:-200}
export PATH="$HOME/.cargo/bin:$PATH"
psql() { command psql -h 127.0.0.1 -p ${PGPORT:-25432} -U postgres -X -q "$@"; }
mkdir -p ${TMPDIR:-/tmp}/dab && cd ${TMPDIR:-/tmp}/dab
psql -d postgres -c "DROP DATABASE IF EXISTS dab WITH (FORCE)" >/dev/null
for s in $(psql -d postgres -Atc "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'dab_%'"); do psql -d postgres -c "SELECT pg_drop_replication_slot('$s')" >/dev/null; done
psql -d postgres -c "CREATE DATABASE dab" >/dev/null
psql -d dab -c "CREATE EXTENSION pg_outbox" >/dev/null
slots=()
for r in $(seq "$RUNS"); do for i in $(seq $#); do slots+=("dab_${r}_$i"); psql -d dab -c "CALL outbox.setup('dab_${r}_$i')" >/dev/null; done; done
psql -d postgres -c "ALTER DATABASE dab SET pg_outbox.slot_name = 'dab_1_1'" >/dev/null
t0=$(date +%s.%N)
for b in $(seq $((N / 1000))); do
  echo "SELECT count(outbox.enqueue('t', 'k' || (n % 1000), jsonb_build_object('n', n, 'pad', repeat('x', $PAY)))) FROM generate_series(1, 1000) n;"
done | psql -d dab >/dev/null
echo "backlog of $N events written in $(echo "$(date +%s.%N) - $t0" | bc) s"
k=0
for r in $(seq "$RUNS"); do
  i=0
  for bin in "$@"; do
    i=$((i + 1)); slot=dab_${r}_$i
    tansu broker --listener-url tcp://127.0.0.1:$BP --advertised-listener-url tcp://127.0.0.1:$BP --storage-engine memory://tansu/ >${TMPDIR:-/tmp}/dab/tansu.log 2>&1 &
    TP=$!
    sleep 1.5
    tansu topic create t --partitions 3 --broker tcp://127.0.0.1:$BP >/dev/null
    t0=$(date +%s.%N)
    "$bin" run --pg-host 127.0.0.1 --pg-port ${PGPORT:-25432} --pg-user postgres --pg-database dab --slot $slot --brokers 127.0.0.1:$BP \
       --metrics-addr 127.0.0.1:$MP --restart-grace-ms 0 >${TMPDIR:-/tmp}/dab/relay.log 2>&1 &
    rp=$!
    until curl -s 127.0.0.1:$MP/metrics 2>/dev/null | grep -qE '^pg_outbox_relay_events_published_total(\{[^}]*\})? [1-9]'; do sleep 0.01; done
    t1=$(date +%s.%N)
    t_lim=$(( $(date +%s) + 120 )); until [ $(date +%s) -gt $t_lim ] || curl -s 127.0.0.1:$MP/metrics 2>/dev/null | awk -v n=$N '/^pg_outbox_relay_events_published_total\{/{s += $2} END{exit !(s >= n)}'; do sleep 0.02; done
    t2=$(date +%s.%N)
    rss=$(awk '/VmHWM/{print $2}' /proc/$rp/status)
    kill -TERM $rp; wait $rp || true
    kill $TP; wait $TP 2>/dev/null || true
    echo "$(basename "$bin") run $r: total $(echo "$t2 - $t0" | bc) s, first event $(echo "$t1 - $t0" | bc) s, drain $(echo "$N / ($t2 - $t1)" | bc) events/s, peak RSS $((rss / 1024)) MB"
  done
done
