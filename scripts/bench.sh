#!/usr/bin/env bash
# `make bench`: measures what pg_outbox costs, side by side in one run, and writes BENCHMARKS.md and
# the curves in bench/charts/*.svg. BENCH_QUICK=1 runs every section with small sizes (a few minutes);
# its figures say so.
#
# Two PostgreSQL 15 clusters: the durable one (fsync, synchronous_commit, full_page_writes on: what
# production runs) carries every section; a fast one (fsync and full_page_writes off, the test
# cluster) repeats the enqueue comparison and the latency, where the commit's flush does not hide
# the cost of the outbox write or the relay's own latency.
#
# Enqueue cost (pgbench, variants interleaved over ROUNDS rounds, median TPS):
#   a  the business transaction alone (one order row)
#   b  a + a hand-rolled Debezium-style outbox INSERT (uuid PK, aggregatetype, aggregateid, type, jsonb)
#   c  a + outbox.enqueue in wal mode
#   d  a + outbox.enqueue in table mode
#   e  a + outbox.enqueue_batch of 100 events
#   f  a + SELECT 1: the floor for any outbox write that is a statement of its own
#   g  a + pg_logical_emit_message of the same payload: PostgreSQL's bare WAL message, no envelope
#   h  g with the payload validated as jsonb ('...'::jsonb::text), as enqueue validates it
#   s  c with the SQL edition (sql-edition/pg_outbox.sql, no C extension), in a database of its own
#   u  d with the SQL edition
# and a curve of TPS against concurrent clients (1 to 64) for a, b, c and d on the durable cluster.
#
# Relay drain: a backlog of EVENTS events (~256-byte payloads, 1,000 keys, 4 topics) published and
# acknowledged, next to the limits measured in the same run on the same backlog: binary decoding
# (binary_decode: the relay's replication client, counting messages only), text decoding
# (pg_recvlogical to /dev/null) and raw produce (rdkafka, relay settings, no PostgreSQL). Curves of
# the drain against payload size and against the number of partitions.
#
# Latency: commit -> acknowledgement and commit -> record received by a consumer, p50/p95/p99, at
# offered rates from 1,000 events/s up to saturation (one event per transaction), wal mode (slot),
# table mode (poll source), and raw produce as the floor.
#
# Memory: the relay's peak RSS for the drain, one transaction of BIG_TXN events, LARGE_EVENTS of 1 MB.
#
# Ingest: INGEST_EVENTS records (256-byte payloads, id headers) from Kafka into the inbox with their
# offsets, next to a raw consumer reading the same topic and writing nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stage.sh
PGBIN=$($PG_CONFIG --bindir)
PORT=${PG_OUTBOX_BENCH_PORT:-25462}            # the durable cluster
FAST_PORT=${PG_OUTBOX_BENCH_FAST_PORT:-57010}  # the fast cluster (enqueue and latency)
KAFKA_PORT=${PG_OUTBOX_BENCH_KAFKA_PORT:-19412}
METRICS_PORT=${PG_OUTBOX_BENCH_METRICS_PORT:-19413}
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
    SECONDS_PER_RUN=${SECONDS_PER_RUN:-2} ROUNDS=${ROUNDS:-1} CURVE_SECONDS=${CURVE_SECONDS:-1}
    CURVE_CLIENTS=${CURVE_CLIENTS:-"1 8 64"}
    EVENTS=${EVENTS:-100000} DRAIN_EVENTS=${DRAIN_EVENTS:-20000} DRAIN_BYTES=${DRAIN_BYTES:-16000000}
    PAYLOADS=${PAYLOADS:-"100 4000 64000"} PARTITIONS=${PARTITIONS:-"3 300 3000"}
    LAT_SECONDS=${LAT_SECONDS:-3} RATES=${RATES:-"1000 5000 20000"}
    INGEST_EVENTS=${INGEST_EVENTS:-20000} BIG_TXN=${BIG_TXN:-100000} LARGE_EVENTS=${LARGE_EVENTS:-50}
else
    SECONDS_PER_RUN=${SECONDS_PER_RUN:-2} ROUNDS=${ROUNDS:-5} CURVE_SECONDS=${CURVE_SECONDS:-2}
    CURVE_CLIENTS=${CURVE_CLIENTS:-"1 2 4 8 16 32 64"}
    EVENTS=${EVENTS:-1000000} DRAIN_EVENTS=${DRAIN_EVENTS:-100000} DRAIN_BYTES=${DRAIN_BYTES:-128000000}
    PAYLOADS=${PAYLOADS:-"100 1000 4000 16000 64000"} PARTITIONS=${PARTITIONS:-"3 30 300 3000"}
    LAT_SECONDS=${LAT_SECONDS:-6} RATES=${RATES:-"1000 2000 5000 10000 20000 40000"}
    INGEST_EVENTS=${INGEST_EVENTS:-200000} BIG_TXN=${BIG_TXN:-1000000} LARGE_EVENTS=${LARGE_EVENTS:-200}
fi
CLIENTS=${CLIENTS:-2}
PROFILE=${BENCH_PROFILE:-1}  # a second, profiled drain: where the time goes (perf, whole machine)
PROFILE_EVENTS=${PROFILE_EVENTS:-$((EVENTS / 4))}
CHARTS=bench/charts
BIN=${CARGO_TARGET_DIR:-target}/release  # where cargo puts the release builds
started_at=$SECONDS
rm -rf "$CHARTS"  # every chart is drawn again by this run

stage_begin --release
trap 'scripts/pgcluster.sh stop "$root/pg-fast" >/dev/null || true; stage_cleanup' EXIT
PGCLUSTER_DURABLE=1 scripts/pgcluster.sh start "$root/pg" "$PORT" logical >/dev/null
scripts/pgcluster.sh start "$root/pg-fast" "$FAST_PORT" logical >/dev/null
loads=""
# The extension's library lives in PostgreSQL's shared folder, where a concurrent make test installs
# its debug build: every section checks that the release build installed above is still the one there.
LIBRARY="$($PG_CONFIG --pkglibdir)/pg_outbox.so"
library_id() { stat -c '%s %Y' "$LIBRARY"; }
installed=$(library_id)
replaced=""
load_mark() {
    loads+="$1 $(cut -d' ' -f1 /proc/loadavg), "
    if [ "$(library_id)" != "$installed" ] && [ -z "$replaced" ]; then
        replaced=$1
        say "WARNING: $LIBRARY was replaced by another process before the $1 section"
    fi
}
say() { printf 'bench: [%4d s] %s\n' "$((SECONDS - started_at))" "$*"; }
sql_at() { local port=$1; shift; psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
sql() { sql_at "$PORT" "$@"; }
# 64 pgbench clients start while the previous run's 64 backends may still be exiting
for dir in pg pg-fast; do
    echo "max_connections = 300" >>"$root/$dir/postgresql.conf"
    scripts/pgcluster.sh restart "$root/$dir" >/dev/null
done
for port in "$PORT" "$FAST_PORT"; do
    sql_at "$port" -c "CREATE EXTENSION pg_outbox" -c "CALL outbox.setup()" >/dev/null
    sql_at "$port" <<'SQL'
CREATE TABLE bench_orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer int NOT NULL,
                           total numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE bench_outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL,
                           type text NOT NULL, payload jsonb NOT NULL);
SQL
done
# the SQL edition (docs/sql-edition.md) in a database of its own on each cluster, installed by
# a role that is not a superuser, with the same business table: variants s and u
for port in "$PORT" "$FAST_PORT"; do
    sql_at "$port" -c "CREATE ROLE outbox_installer LOGIN CREATEROLE REPLICATION" \
        -c "CREATE DATABASE bench_sql OWNER outbox_installer" \
        -c "ALTER DATABASE bench_sql SET pg_outbox.slot_name = 'bench_sql'" >/dev/null
    psql -X -q -h 127.0.0.1 -p "$port" -U outbox_installer -d bench_sql -v ON_ERROR_STOP=1 \
        --single-transaction -f sql-edition/pg_outbox.sql >/dev/null
    PGOPTIONS="-c client_min_messages=warning" psql -X -q -h 127.0.0.1 -p "$port" -U outbox_installer \
        -d bench_sql -v ON_ERROR_STOP=1 -c "CALL outbox.setup()" \
        -c "CREATE TABLE bench_orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer int NOT NULL,
                                       total numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now())" >/dev/null
done
durable_settings=$(sql -tAc "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes')")
fast_settings=$(sql_at "$FAST_PORT" -tAc "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes')")
say "durable cluster: $durable_settings; fast cluster: $fast_settings"

ratio() { awk -v x="$1" -v y="$2" 'BEGIN {printf "%.2f", x / y}'; }
events() { awk -v t="$1" -v n="$2" 'BEGIN {printf "%.0f", t * n}'; }
median() { tr ' ' '\n' | grep -v '^$' | grep -v nan | sort -g | awk '{a[NR]=$1} END {printf "%.0f", (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }
# goals: each row of the goals table, with its verdict, printed as it is judged
goals=""
goal() { # what value op target unit
    local verdict
    verdict=$(awk -v v="$2" -v t="$4" -v op="$3" 'BEGIN {
        if (v == "" || v == "nan") { print "not measured"; exit }
        ok = (op == "≥") ? (v + 0 >= t + 0) : (v + 0 <= t + 0); print ok ? "met" : "**missed**" }')
    goals+="| $1 | $2$5 | $3 $4$5 | $verdict |"$'\n'
    say "goal: $1: $2$5 ($3 $4$5): $verdict"
}
chart() { # name title x_label y_label [logx] [logy] < csv
    local name=$1; shift
    mkdir -p "$CHARTS"
    "$BIN"/chart "$CHARTS/$name.svg" "$@"
}

# perf, for the sections whose goal may be missed: where the time goes
can_profile() { [ "$PROFILE" = 1 ] && command -v perf >/dev/null; }
perf_start() { perf record -a -F 499 -o "$root/perf-$1.data" >/dev/null 2>&1 & perf_pid=$!; }
perf_stop() { kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; }
perf_share() { # data pids -> their share of every sample taken (both CPUs)
    perf report -i "$root/perf-$1.data" --stdio --pid "$2" --sort pid 2>/dev/null \
        | awk '/^ +[0-9.]+%/ {s += $1} END {printf "%.1f", s}'
}
perf_dsos() { # data pids -> "name share%, ..." : where those processes' samples fall, by library
    perf report -i "$root/perf-$1.data" --stdio --pid "$2" --percentage relative --sort dso 2>/dev/null \
        | awk '/^ +[0-9.]+%/ && n < 6 {printf "%s`%s` %s", (n ? ", " : ""), $2, $1; n++}'
}
perf_symbols() { # data pids rows -> markdown rows: the hottest symbols of those processes
    perf report -i "$root/perf-$1.data" --stdio --pid "$2" --percentage relative --sort symbol 2>/dev/null \
        | awk -v max="$3" '/^ +[0-9.]+%/ && n < max {p = $1; $1 = ""; $2 = ""; sub(/^ +/, ""); sub(/ +- -$/, ""); printf "| %s | `%s` |\n", p, substr($0, 1, 90); n++}'
}

say "building the relay and the bench tools (release)"
cargo build -q --release -p pg_outbox_relay -p pg_outbox_bench --bin pg-outbox-relay --bin raw_produce \
    --bin raw_consume --bin latency --bin binary_decode --bin chart

# --- enqueue cost -------------------------------------------------------------------------------------
run() { # port script mode clients seconds [database] -> tps ("nan" if pgbench failed twice)
    local out
    for _ in 1 2; do
        out=$(PGOPTIONS="-c pg_outbox.mode=$3" "$PGBIN/pgbench" -n -h 127.0.0.1 -p "$1" -U postgres \
              -c "$4" -j "$(( $4 < 2 ? $4 : 2 ))" -T "$5" -f "$2" "${6:-postgres}" 2>&1)
        if grep -q '^tps = ' <<<"$out"; then
            echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1
            return
        fi
        echo "$out" | tail -3 | sed 's/^/bench: pgbench failed: /' >&2
    done
    echo nan
}
# style s: one round trip per statement (pgbench's default); style t: the whole transaction in one
# round trip (statements joined by \;), which leaves only the server-side cost of each variant
script() { # variant style -> file
    local f
    case $1 in
        a) f=a_business ;; b) f=b_handrolled ;; c | d | s | u) f=c_enqueue ;; e) f=e_batch ;;
        f) f=f_statement ;; g) f=g_emit_message ;; h) f=h_emit_jsonb ;;
    esac
    if [ "$2" = t ]; then
        # the same transaction in one round trip: every statement but the final COMMIT ends in \;
        sed -e '/^COMMIT;$/!s/;$/ \\;/' "bench/$f.sql" >"$root/${f}_1rt.sql"
        echo "$root/${f}_1rt.sql"
    else
        echo "bench/$f.sql"
    fi
}
reset_enqueue() { # port: keep the slot from retaining the whole run, and the tables small
    sql_at "$1" -c "SELECT count(*) FROM pg_logical_slot_get_binary_changes('pg_outbox', NULL, NULL, 'proto_version', '1', 'publication_names', 'pg_outbox', 'messages', 'true')" \
        -c "TRUNCATE outbox.events, bench_outbox" >/dev/null
    psql -X -q -h 127.0.0.1 -p "$1" -U postgres -d bench_sql \
        -c "SELECT count(*) FROM pg_logical_slot_get_binary_changes('bench_sql', NULL, NULL, 'proto_version', '1', 'publication_names', 'bench_sql', 'messages', 'true')" \
        -c "TRUNCATE outbox.events, bench_orders" >/dev/null
}
mode_of() { case $1 in d | u) echo table ;; *) echo wal ;; esac; }
db_of() { case $1 in s | u) echo bench_sql ;; *) echo postgres ;; esac; }
declare -A tps
load_mark enqueue
# durable cluster: every variant in one round trip, the main ones also a round trip per statement;
# fast cluster: every variant in one round trip
runs=(D:t:a D:t:b D:t:c D:t:d D:t:e D:t:f D:t:g D:t:h D:t:s D:t:u D:s:a D:s:b D:s:c D:s:d D:s:g
      F:t:a F:t:b F:t:c F:t:d F:t:e F:t:f F:t:g F:t:h F:t:s F:t:u)
for round in $(seq "$ROUNDS"); do
    for r in "${runs[@]}"; do
        IFS=: read -r cl style v <<<"$r"
        port=$PORT; [ "$cl" = F ] && port=$FAST_PORT
        t=$(run "$port" "$(script "$v" "$style")" "$(mode_of "$v")" "$CLIENTS" "$SECONDS_PER_RUN" "$(db_of "$v")")
        tps[$cl$style$v]="${tps[$cl$style$v]:-} $t"
        say "enqueue round $round/$ROUNDS, cluster $cl, $v$style: $(printf '%.0f' "$t") tps"
        reset_enqueue "$port"
    done
done
declare -A med
# the spread of a ratio over the rounds (each round's x / y): on a shared machine a median can hide
# a lot, and the reader should see how much
spread() { awk -v x="$1" -v y="$2" 'BEGIN {n = split(x, a, " "); split(y, b, " "); lo = 1e9; hi = 0
    for (i = 1; i <= n; i++) { if (a[i] + 0 == 0 || b[i] + 0 == 0) continue
        r = a[i] / b[i]; if (r < lo) lo = r; if (r > hi) hi = r }
    printf "%.2f–%.2f", lo, hi}'; }
for r in "${runs[@]}"; do
    IFS=: read -r cl style v <<<"$r"
    med[$cl$style$v]=$(echo "${tps[$cl$style$v]}" | median)
done
enqueue_table=$(cat <<TABLE
| variant | what the transaction does | durable: TPS, one round trip | durable: TPS, a round trip per statement | fast: TPS, one round trip | events/s (durable, one round trip) |
|---|---|---:|---:|---:|---:|
| a | business INSERT alone | ${med[Dta]} | ${med[Dsa]} | ${med[Fta]} | — |
| b | a + hand-rolled outbox INSERT | ${med[Dtb]} | ${med[Dsb]} | ${med[Ftb]} | ${med[Dtb]} |
| c | a + \`outbox.enqueue\`, wal mode | ${med[Dtc]} | ${med[Dsc]} | ${med[Ftc]} | ${med[Dtc]} |
| d | a + \`outbox.enqueue\`, table mode | ${med[Dtd]} | ${med[Dsd]} | ${med[Ftd]} | ${med[Dtd]} |
| e | a + \`outbox.enqueue_batch\` of 100, wal mode | ${med[Dte]} | — | ${med[Fte]} | $(events "${med[Dte]}" 100) |
| f | a + \`SELECT 1\` (floor: any extra statement) | ${med[Dtf]} | — | ${med[Ftf]} | — |
| g | a + \`pg_logical_emit_message\` (PostgreSQL's bare WAL message) | ${med[Dtg]} | ${med[Dsg]} | ${med[Ftg]} | ${med[Dtg]} |
| h | a + \`pg_logical_emit_message\` of the payload validated as jsonb | ${med[Dth]} | — | ${med[Fth]} | ${med[Dth]} |
| s | c with the SQL edition (PL/pgSQL, no C extension), wal mode | ${med[Dts]} | — | ${med[Fts]} | ${med[Dts]} |
| u | d with the SQL edition, table mode | ${med[Dtu]} | — | ${med[Ftu]} | ${med[Dtu]} |

| ratio (one round trip; medians, and each round's ratio from lowest to highest) | durable | fast |
|---|---:|---:|
| c / b (wal enqueue vs hand-rolled outbox) | **$(ratio "${med[Dtc]}" "${med[Dtb]}")** ($(spread "${tps[Dtc]}" "${tps[Dtb]}")) | $(ratio "${med[Ftc]}" "${med[Ftb]}") ($(spread "${tps[Ftc]}" "${tps[Ftb]}")) |
| c / h (wal enqueue vs the bare WAL message of validated jsonb) | $(ratio "${med[Dtc]}" "${med[Dth]}") ($(spread "${tps[Dtc]}" "${tps[Dth]}")) | **$(ratio "${med[Ftc]}" "${med[Fth]}")** ($(spread "${tps[Ftc]}" "${tps[Fth]}")) |
| c / g (wal enqueue vs the bare WAL message) | $(ratio "${med[Dtc]}" "${med[Dtg]}") | $(ratio "${med[Ftc]}" "${med[Ftg]}") |
| d / b (table enqueue vs hand-rolled outbox) | $(ratio "${med[Dtd]}" "${med[Dtb]}") | $(ratio "${med[Ftd]}" "${med[Ftb]}") |
| c / a (wal enqueue vs business alone) | $(ratio "${med[Dtc]}" "${med[Dta]}") | $(ratio "${med[Ftc]}" "${med[Fta]}") |
| f / a (any extra statement vs business alone: the ceiling of c / a) | $(ratio "${med[Dtf]}" "${med[Dta]}") | $(ratio "${med[Ftf]}" "${med[Fta]}") |
| s / c (SQL edition vs C extension, wal mode: what the C extension buys) | $(ratio "${med[Dts]}" "${med[Dtc]}") | $(ratio "${med[Fts]}" "${med[Ftc]}") |
| u / d (SQL edition vs C extension, table mode) | $(ratio "${med[Dtu]}" "${med[Dtd]}") | $(ratio "${med[Ftu]}" "${med[Ftd]}") |
TABLE
)
echo "$enqueue_table"
goal "wal enqueue / \`pg_logical_emit_message\` of the payload validated as jsonb, one round trip (fast cluster: c / h; rounds $(spread "${tps[Ftc]}" "${tps[Fth]}"))" \
    "$(ratio "${med[Ftc]}" "${med[Fth]}")" "≥" 0.95 ""
goal "wal enqueue / hand-rolled outbox INSERT, one round trip, durable cluster (c / b; rounds $(spread "${tps[Dtc]}" "${tps[Dtb]}"))" \
    "$(ratio "${med[Dtc]}" "${med[Dtb]}")" "≥" 1.15 ""

# Where an enqueue's server time goes: pgbench with variant c and then h on the fast cluster (no
# commit waits for the disk) under perf, 4 clients; the backends' hottest symbols side by side.
enqueue_profile_md=""
if can_profile; then
    for v in c h; do
        perf_start "enqueue-$v"
        PGOPTIONS="-c pg_outbox.mode=wal" "$PGBIN/pgbench" -n -h 127.0.0.1 -p "$FAST_PORT" -U postgres \
            -c 4 -j 2 -T "$SECONDS_PER_RUN" -f "$(script "$v" t)" postgres >"$root/pgbench-profile-$v.log" 2>&1 &
        bench_pid=$!
        sleep 0.5
        backends=$(sql_at "$FAST_PORT" -tAc "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE application_name = 'pgbench'")
        wait "$bench_pid" || true
        perf_stop
        printf -v "share_$v" '%s' "$(perf_share "enqueue-$v" "$backends")"
        printf -v "dsos_$v" '%s' "$(perf_dsos "enqueue-$v" "$backends")"
        printf -v "symbols_$v" '%s' "$(perf_symbols "enqueue-$v" "$backends" 12)"
        reset_enqueue "$FAST_PORT"
    done
    enqueue_profile_md=$(cat <<PROFILE
### Where an enqueue's time goes

pgbench, 4 clients, one round trip, on the fast cluster, under \`perf record -a\` (499 Hz); the
pgbench backends took $share_c% of every sample with variant c (\`outbox.enqueue\`) and $share_h%
with variant h (\`pg_logical_emit_message\` of validated jsonb). By library, the backends' samples
fall in: c: $dsos_c; h: $dsos_h. Their hottest symbols (share of the backends' samples):

c, \`outbox.enqueue\`:

| share | symbol |
|---:|---|
$symbols_c

h, \`pg_logical_emit_message('…'::jsonb::text)\`:

| share | symbol |
|---:|---|
$symbols_h
PROFILE
)
    say "profiled enqueue (c and h)"
    echo "$enqueue_profile_md"
fi

# TPS against concurrent clients, durable cluster, one round trip, one pgbench run per point
: >"$root/clients.csv"
for n in $CURVE_CLIENTS; do
    for v in a b c d; do
        case $v in
            a) name="a: business alone" ;; b) name="b: + hand-rolled outbox" ;;
            c) name="c: + enqueue (wal)" ;; d) name="d: + enqueue (table)" ;;
        esac
        t=$(run "$PORT" "$(script "$v" t)" "$(mode_of "$v")" "$n" "$CURVE_SECONDS")
        echo "$name,$n,$t" >>"$root/clients.csv"
        say "enqueue curve: $n clients, $v: $(printf '%.0f' "$t") tps"
        reset_enqueue "$PORT"
    done
done
chart enqueue-clients "Enqueue: TPS against concurrent clients (durable)" "concurrent clients" \
    "transactions/s" logx <"$root/clients.csv"
clients_table=$(awk -F, '{v[$1","$2]=$3; if (!($2 in seen)) {seen[$2]=1; xs[++nx]=$2} if (!($1 in sn)) {sn[$1]=1; ss[++ns]=$1}}
    END {printf "| clients |"; for (i=1;i<=ns;i++) printf " %s |", ss[i]; printf "\n|---:|"; for (i=1;i<=ns;i++) printf "---:|";
         for (j=1;j<=nx;j++) {printf "\n| %s |", xs[j]; for (i=1;i<=ns;i++) printf " %.0f |", v[ss[i]","xs[j]]}; printf "\n"}' "$root/clients.csv")

# --- relay drain ------------------------------------------------------------------------------------
stage_broker "$KAFKA_PORT" b0:3 b1:3 b2:3 b3:3 r0:3 r1:3 r2:3 r3:3 i0:3 m0:3 m1:3
tansu_pid=${pids[-1]}
BROKERS=127.0.0.1:$KAFKA_PORT
RELAY_PORT=$PORT  # the cluster the next relay reads
relay() { # start a relay in the background (its log in $root/relay-$1.log), remember its pid
    local name=$1; shift
    "$BIN"/pg-outbox-relay "$@" --pg-user postgres --pg-port "$RELAY_PORT" --brokers "$BROKERS" \
        --metrics-addr "127.0.0.1:$METRICS_PORT" >"$root/relay-$name.log" 2>&1 &
    relay_pid=$!
    pids+=("$relay_pid")
}
metric() { # the value of one counter from /metrics, 0 while the endpoint is not up yet
    local v
    v=$({ exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT" && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 \
        && sed -n "s/^$1 //p" <&3; } 2>/dev/null | head -1)
    echo "${v:-0}"
}
wait_metric() { # name target log: until the counter reaches the target (the relay must stay up)
    while (( $(metric "$1") < $2 )); do
        sleep 0.02
        kill -0 "$relay_pid" || { tail "$3"; exit 1; }
    done
}
stop_relay() { kill "$relay_pid"; wait "$relay_pid" 2>/dev/null || true; }
# A clean stop of a wal relay waits for its last confirmation to reach the server (relay/src/source/
# wal.rs, close); that the slot holds what the relay confirmed is also checked here before the stop
# (5 s at most), so that the next relay never replays the tail and reads Kafka back for it.
settle_relay() {
    local want server
    for _ in $(seq 100); do
        want=$(metric pg_outbox_relay_confirmed_lsn)
        server=$(sql_at "$RELAY_PORT" -tAc "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots WHERE slot_name = 'pg_outbox'")
        awk -v w="$want" -v s="${server:-0}" 'BEGIN {exit !(w > 0 && s >= w)}' && break
        sleep 0.05
    done
}
# drains: the time to the first published event (the relay's start-up) and to the last
drain_wait() { # events log: sets s (seconds from $t0 to the last event), first (to the first), rss
    wait_metric pg_outbox_relay_events_published_total 1 "$2"
    first=$(elapsed "$t0" "$(now)")
    wait_metric pg_outbox_relay_events_published_total "$1" "$2"
    s=$(elapsed "$t0" "$(now)")
    rss=$(peak_rss_mb)
    settle_relay
    stop_relay
}
peak_rss_mb() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$relay_pid/status"; }
backlog() { # topics events payload_bytes keys: enqueue_batch in transactions of up to 1,000 events
    local topics=$1 n=$2 size=$3 keys=$4
    local per=$(( 4000000 / size )); (( per > 1000 )) && per=1000; (( per < 1 )) && per=1
    local pad=$(( size > 12 ? size - 12 : 1 ))  # {"pad": "..."} is 12 bytes around the padding
    local i=0 t=0
    IFS=, read -ra tl <<<"$topics"
    while (( i < n )); do
        local m=$(( n - i < per ? n - i : per ))
        echo "SELECT count(*) FROM outbox.enqueue_batch('${tl[t % ${#tl[@]}]}', (SELECT array_agg('key-' || (($i + g) % $keys)) FROM generate_series(1, $m) g), (SELECT array_agg(jsonb_build_object('pad', repeat('x', $pad))) FROM generate_series(1, $m)));"
        i=$(( i + m )); t=$(( t + 1 ))
    done | sql -o /dev/null
}
# two more slots for the decoding limits, created before the backlog so every slot holds all of it
sql -c "SELECT pg_create_logical_replication_slot('bench_raw', 'pgoutput')" \
    -c "SELECT pg_create_logical_replication_slot('bench_bin', 'pgoutput')" >/dev/null
reset_enqueue "$PORT"
load_mark drain
say "writing a backlog of $EVENTS events"
backlog b0,b1,b2,b3 "$EVENTS" 256 1000
end_lsn=$(sql -tAc "SELECT pg_current_wal_lsn()")

t0=$(now)
"$PGBIN/pg_recvlogical" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres --slot bench_raw --start \
    --endpos "$end_lsn" -o proto_version=1 -o publication_names=pg_outbox -o messages=true -f /dev/null
text_s=$(elapsed "$t0" "$(now)")
say "text decode (pg_recvlogical) ${text_s}s"
binary_s=$("$BIN"/binary_decode 127.0.0.1 "$PORT" postgres postgres bench_bin pg_outbox "$end_lsn")
say "binary decode ${binary_s}s"
sql -c "SELECT pg_drop_replication_slot('bench_raw')" -c "SELECT pg_drop_replication_slot('bench_bin')" >/dev/null
produce_s=$("$BIN"/raw_produce "$BROKERS" r0,r1,r2,r3 "$EVENTS" 256 1000)
say "raw produce ${produce_s}s"
t0=$(now)
relay drain run --restart-grace-ms 0
drain_wait "$EVENTS" "$root/relay-drain.log"
relay_s=$s relay_first=$first drain_rss=$rss
say "relay ${relay_s}s (first event after ${relay_first}s), peak RSS ${drain_rss} MB"

rate() { awk -v n="$1" -v s="$2" 'BEGIN {printf "%.0f", n / s}'; }
mbs() { awk -v n="$1" -v b="$2" -v s="$3" 'BEGIN {printf "%.1f", n * b / s / 1e6}'; }
limit_s=$(awk -v a="$binary_s" -v b="$produce_s" 'BEGIN {print (a > b) ? a : b}')
drain_ratio=$(awk -v r="$relay_s" -v l="$limit_s" 'BEGIN {printf "%.2f", l / r}')
drain_table=$(cat <<TABLE
| what | seconds | events/s | payload MB/s |
|---|---:|---:|---:|
| binary decoding (pgwire-replication, counts the messages) | $binary_s | $(rate "$EVENTS" "$binary_s") | $(mbs "$EVENTS" 256 "$binary_s") |
| text decoding (pg_recvlogical to /dev/null) | $text_s | $(rate "$EVENTS" "$text_s") | $(mbs "$EVENTS" 256 "$text_s") |
| raw produce (rdkafka, relay settings, no PostgreSQL) | $produce_s | $(rate "$EVENTS" "$produce_s") | $(mbs "$EVENTS" 256 "$produce_s") |
| **relay** (slot to acknowledged records, its start-up included) | $relay_s | $(rate "$EVENTS" "$relay_s") | $(mbs "$EVENTS" 256 "$relay_s") |
| relay from its first published event ($relay_first s of start-up before it) | $(elapsed "$relay_first" "$relay_s") | $(rate "$EVENTS" "$(elapsed "$relay_first" "$relay_s")") | $(mbs "$EVENTS" 256 "$(elapsed "$relay_first" "$relay_s")") |

| ratio | value |
|---|---:|
| relay / min(binary decoding, raw produce) | **$drain_ratio** |
| relay / text decoding | $(awk -v r="$relay_s" -v l="$text_s" 'BEGIN {printf "%.2f", l / r}') |
TABLE
)
echo "$drain_table"
goal "relay drain / min(binary decoding, raw produce), $EVENTS events" "$drain_ratio" "≥" 0.90 ""

# Where the drain's time goes: a second backlog drained under perf (sampling every CPU, so the
# walsender, the broker and the relay's threads are seen side by side). Not timed: perf slows it.
profile_md=""
if can_profile; then
    backlog b0,b1,b2,b3 "$PROFILE_EVENTS" 256 1000
    t0=$(now)
    relay profile run --restart-grace-ms 0
    perf_start drain
    wait_metric pg_outbox_relay_events_published_total 1 "$root/relay-profile.log"
    walsender_pid=$(sql -tAc "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'pg_outbox'")
    drain_wait "$PROFILE_EVENTS" "$root/relay-profile.log"
    perf_stop
    # the three processes of the pipeline only (the machine is shared); a thread's name says whose
    # it is: the relay's tokio-rt-worker and pgwire-replication, librdkafka's rdk:* threads
    by_process=""
    for who in "walsender (PostgreSQL decoding the slot):$walsender_pid" "Tansu (the broker):$tansu_pid" \
               "relay:$relay_pid"; do
        by_process+="| ${who%%:*} | $(perf_share drain "${who##*:}")% |"$'\n'
    done
    relay_symbols=$(perf_symbols drain "$relay_pid" 15)
    profile_md=$(cat <<PROFILE
### Where the time goes

A second backlog of $PROFILE_EVENTS events drained under \`perf record -a\` (every CPU, 499 Hz;
slower than the timed drain, so its time is not reported). The pipeline's three processes, as
shares of every sample taken on the machine in that time (2 CPUs: 100% = both busy all along; the
rest is idle time and other work on the shared machine):

| process | share of samples |
|---|---:|
${by_process%$'\n'}

The relay process's hottest symbols (share of the relay's samples):

| share | symbol |
|---:|---|
$relay_symbols
PROFILE
)
    say "profiled drain of $PROFILE_EVENTS events"
    echo "$profile_md"
fi

drain_point() { # name topic events size keys: sets s, first and rss (see drain_wait)
    local name=$1 topic=$2 n=$3 size=$4 keys=$5
    backlog "$topic" "$n" "$size" "$keys"
    t0=$(now)
    relay "$name" run --restart-grace-ms 0
    drain_wait "$n" "$root/relay-$name.log"
}
: >"$root/payload-rate.csv"; : >"$root/payload-mbs.csv"
payload_rows=""
for size in $PAYLOADS; do
    n=$(( DRAIN_BYTES / size )); (( n > DRAIN_EVENTS )) && n=$DRAIN_EVENTS
    tansu topic create "s$size" --partitions 3 --broker "tcp://$BROKERS" >/dev/null
    drain_point "size$size" "s$size" "$n" "$size" 1000
    echo "relay,$size,$(rate "$n" "$s")" >>"$root/payload-rate.csv"
    echo "relay,$size,$(mbs "$n" "$size" "$s")" >>"$root/payload-mbs.csv"
    payload_rows+="| $size | $n | $s | $first | $(rate "$n" "$s") | $(mbs "$n" "$size" "$s") | $rss MB |"$'\n'
    say "drain curve: $n events of $size bytes in ${s}s (first after ${first}s), peak RSS $rss MB"
done
chart drain-payload-events "Relay drain against payload size" "payload bytes" "events/s" logx <"$root/payload-rate.csv"
chart drain-payload-mbs "Relay drain against payload size" "payload bytes" "payload MB/s" logx <"$root/payload-mbs.csv"
: >"$root/partitions.csv"
partition_rows=""
for p in $PARTITIONS; do
    tansu topic create "p$p" --partitions "$p" --broker "tcp://$BROKERS" >/dev/null
    drain_point "part$p" "p$p" "$DRAIN_EVENTS" 256 10000
    echo "relay,$p,$(rate "$DRAIN_EVENTS" "$s")" >>"$root/partitions.csv"
    partition_rows+="| $p | $DRAIN_EVENTS | $s | $first | $(rate "$DRAIN_EVENTS" "$s") | $(mbs "$DRAIN_EVENTS" 256 "$s") | $rss MB |"$'\n'
    say "drain curve: $DRAIN_EVENTS events over $p partitions in ${s}s (first after ${first}s), peak RSS $rss MB"
done
chart drain-partitions "Relay drain against partitions (~256-byte payloads)" "partitions of the topic" \
    "events/s" logx <"$root/partitions.csv"

# --- latency ------------------------------------------------------------------------------------------
# on the durable cluster (judged) and on the fast one, where no commit waits for the disk
declare -A lat
load_mark latency
latency() { # cluster mode rate [relay] -> "events achieved ack_p50 ack_p95 ack_p99 recv_p50 recv_p95 recv_p99 recv_max"
    local topic="lat_$1_$2_$3" port=$PORT  # a fresh topic per run: Tansu's memory storage slows down as a topic grows
    [ "$1" = F ] && port=$FAST_PORT
    tansu topic create "$topic" --partitions 3 --broker "tcp://$BROKERS" >/dev/null
    # past saturation events may still be missing after the grace: the line is printed all the same
    "$BIN"/latency "host=127.0.0.1 port=$port user=postgres dbname=postgres" "$BROKERS" "$topic" 3 \
        "$2" "$3" "$LAT_SECONDS" ${4:+"127.0.0.1:$METRICS_PORT"} 2>>"$root/latency.log" || true
}
field() { echo "$1" | awk -v f="$2" '{print $f}'; }
GOAL_RATE=5000  # the latency goals' rate: always offered, saturated or not
sweep() { # cluster mode [relay]: every rate until one past GOAL_RATE is not achieved (90% of it)
    for r in $RATES; do
        lat[$1,$2,$r]=$(latency "$1" "$2" "$r" "${3:-}")
        say "latency $1 $2 $r/s: ${lat[$1,$2,$r]}"
        local achieved; achieved=$(field "${lat[$1,$2,$r]}" 2)
        if (( r >= GOAL_RATE )) && { [ -z "$achieved" ] \
                || awk -v a="$achieved" -v r="$r" 'BEGIN {exit !(a < 0.9 * r)}'; }; then
            break
        fi
    done
}
sweep - raw
for cl in D F; do
    RELAY_PORT=$PORT; [ "$cl" = F ] && RELAY_PORT=$FAST_PORT
    relay "latency-wal-$cl" run --restart-grace-ms 0
    sweep "$cl" wal relay
    settle_relay
    stop_relay
    relay "latency-table-$cl" run --source poll
    sweep "$cl" table relay
    stop_relay
done
RELAY_PORT=$PORT
scripts/pgcluster.sh stop "$root/pg-fast" >/dev/null
lat_rows=""
for cl in D F -; do
    : >"$root/latency-$cl.csv"
    for mode in wal table raw; do
        for r in $RATES; do
            l=${lat[$cl,$mode,$r]:-}
            [ -n "$l" ] || continue
            case $cl in D) where=durable ;; F) where=fast ;; -) where="" ;; esac
            case $mode in
                raw) what="raw produce (no PostgreSQL, no relay)"; le="" ;;
                *) what="relay, $mode mode, $where cluster"; le="≤ " ;;
            esac
            lat_rows+="| $what | $r | $(field "$l" 2) | $le$(field "$l" 3) | $le$(field "$l" 4) | **$le$(field "$l" 5)** | $(field "$l" 6) | $(field "$l" 8) | $(field "$l" 9) |"$'\n'
            [ "$mode" = raw ] && continue
            echo "$mode ack p50,$r,$(field "$l" 3)" >>"$root/latency-$cl.csv"
            echo "$mode ack p99,$r,$(field "$l" 5)" >>"$root/latency-$cl.csv"
        done
    done
done
for cl in D F; do
    for r in $RATES; do
        l=${lat[-,raw,$r]:-}
        [ -n "$l" ] && echo "raw produce ack p99,$r,$(field "$l" 5)" >>"$root/latency-$cl.csv"
    done
done
chart latency-durable "Commit to ack against the offered rate (durable)" "events/s offered" \
    "ms (wal/table: bucket upper bound)" logx logy <"$root/latency-D.csv"
chart latency-fast "Commit to ack against the offered rate (fast cluster)" "events/s offered" \
    "ms (wal/table: bucket upper bound)" logx logy <"$root/latency-F.csv"
latency_table=$(cat <<TABLE
| path | offered events/s | achieved | ack p50 ms | ack p95 ms | ack p99 ms | receipt p50 ms | receipt p99 ms | receipt max ms |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
${lat_rows%$'\n'}
TABLE
)
echo "$latency_table"
for mode in table wal; do
    limit=25; [ "$mode" = wal ] && limit=10
    goal "commit→ack p99 at 5,000 events/s offered ($(field "${lat[D,$mode,5000]:-}" 2) achieved), $mode mode, durable cluster" \
        "$(field "${lat[D,$mode,5000]:-}" 5)" "≤" "$limit" " ms"
done

# --- memory under large inputs: one huge transaction, 1 MB events ---------------------------------------
# A fresh relay per input (nothing else in the slot), its peak RSS when all is acknowledged.
load_mark memory
say "one transaction of $BIG_TXN events"
{
    echo "BEGIN;"
    for i in $(seq 0 $((BIG_TXN / 1000 - 1))); do
        echo "SELECT count(*) FROM outbox.enqueue_batch('m0', (SELECT array_agg('key-' || g) FROM generate_series(1, 1000) g), (SELECT array_agg(jsonb_build_object('n', $i * 1000 + g)) FROM generate_series(1, 1000) g));"
    done
    echo "COMMIT;"
} | sql -o /dev/null
t0=$(now)
relay bigtxn run --restart-grace-ms 0
drain_wait "$BIG_TXN" "$root/relay-bigtxn.log"
bigtxn_s=$s bigtxn_rss=$rss
say "one transaction of $BIG_TXN events: ${bigtxn_s}s, peak RSS ${bigtxn_rss} MB"
say "$LARGE_EVENTS events of 1 MB"
for i in $(seq 1 "$LARGE_EVENTS"); do
    echo "SELECT outbox.enqueue_bytes('m1', 'key-$i', convert_to(repeat('x', 1000000), 'UTF8'));"
done | PGOPTIONS="-c pg_outbox.max_payload_bytes=2000000" sql -o /dev/null
t0=$(now)
relay large run --restart-grace-ms 0 --max-record-bytes 1100000
drain_wait "$LARGE_EVENTS" "$root/relay-large.log"
large_s=$s large_rss=$rss
say "$LARGE_EVENTS events of 1 MB: ${large_s}s, peak RSS ${large_rss} MB"
memory_table=$(cat <<TABLE
| input | seconds | events/s | relay peak RSS |
|---|---:|---:|---:|
| the drain above ($EVENTS events of ~256 bytes) | $relay_s | $(rate "$EVENTS" "$relay_s") | $drain_rss MB |
| one transaction of $BIG_TXN events (~10-byte payloads) | $bigtxn_s | $(rate "$BIG_TXN" "$bigtxn_s") | $bigtxn_rss MB |
| $LARGE_EVENTS events of 1 MB | $large_s | $(rate "$LARGE_EVENTS" "$large_s") | $large_rss MB |
TABLE
)
echo "$memory_table"
goal "relay peak RSS, $EVENTS-event drain" "$drain_rss" "≤" 64 " MB"
goal "relay peak RSS, one transaction of $BIG_TXN events" "$bigtxn_rss" "≤" 64 " MB"

# --- ingest -------------------------------------------------------------------------------------------
load_mark ingest
say "producing $INGEST_EVENTS records to ingest"
"$BIN"/raw_produce "$BROKERS" i0 "$INGEST_EVENTS" 256 1000 >/dev/null
consume_s=$("$BIN"/raw_consume "$BROKERS" i0 3 "$INGEST_EVENTS" 2>/dev/null)
say "raw consume ${consume_s}s"
t0=$(now)
relay ingest ingest --consumer bench --topics i0
wait_metric pg_outbox_relay_messages_ingested_total "$INGEST_EVENTS" "$root/relay-ingest.log"
ingest_s=$(elapsed "$t0" "$(now)")
ingest_rss=$(peak_rss_mb)
stop_relay
stored=$(sql -tAc "SELECT count(*) FROM inbox.messages WHERE consumer = 'bench'")
[ "$stored" = "$INGEST_EVENTS" ] || { say "the inbox holds $stored of $INGEST_EVENTS messages"; exit 1; }
say "ingest ${ingest_s}s, peak RSS ${ingest_rss} MB"
ingest_ratio=$(awk -v r="$ingest_s" -v c="$consume_s" 'BEGIN {printf "%.2f", c / r}')
ingest_table=$(cat <<TABLE
| what | seconds | events/s |
|---|---:|---:|
| raw consumer (rdkafka, reads and drops) | $consume_s | $(rate "$INGEST_EVENTS" "$consume_s") |
| **relay ingest** (inbox rows + offsets, one transaction per batch; peak RSS $ingest_rss MB) | $ingest_s | $(rate "$INGEST_EVENTS" "$ingest_s") |
TABLE
)
echo "$ingest_table"
goal "ingest / raw consume, $INGEST_EVENTS records" "$ingest_ratio" "≥" 0.80 ""

# Where the ingest's time goes: the same records ingested again for another consumer under perf.
ingest_profile_md=""
if can_profile; then
    relay ingest-profile ingest --consumer bench_profile --topics i0
    perf_start ingest
    wait_metric pg_outbox_relay_messages_ingested_total 1 "$root/relay-ingest-profile.log"
    backend=$(sql -tAc "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE application_name LIKE 'pg_outbox%' AND backend_type = 'client backend'")
    wait_metric pg_outbox_relay_messages_ingested_total "$INGEST_EVENTS" "$root/relay-ingest-profile.log"
    perf_stop
    stop_relay
    walwriter=$(sql -tAc "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE backend_type IN ('walwriter', 'checkpointer', 'background writer')")
    ingest_profile_md=$(cat <<PROFILE
### Where the ingest's time goes

The same $INGEST_EVENTS records ingested again (another consumer) under \`perf record -a\` (499 Hz;
slower than the timed run). Shares of every sample taken on the machine in that time (2 CPUs):

| process | share of samples |
|---|---:|
| the ingest's PostgreSQL backend (\`inbox.deliver_batch\`) | $(perf_share ingest "$backend")% |
| PostgreSQL's WAL writer, checkpointer, background writer | $(perf_share ingest "$walwriter")% |
| Tansu (the broker) | $(perf_share ingest "$tansu_pid")% |
| relay (ingest) | $(perf_share ingest "$relay_pid")% |

The backend's hottest symbols (share of its samples):

| share | symbol |
|---:|---|
$(perf_symbols ingest "$backend" 15)

The relay's hottest symbols:

| share | symbol |
|---:|---|
$(perf_symbols ingest "$relay_pid" 10)
PROFILE
)
    say "profiled ingest"
    echo "$ingest_profile_md"
fi

# --- BENCHMARKS.md ------------------------------------------------------------------------------------
load_mark end
if [ -n "$replaced" ]; then
    library_note="**Warning:** another process replaced the extension's library ($LIBRARY, e.g. a \`make test\` installing its debug build) during this run, noticed before the $replaced section: figures from there on (and PostgreSQL sessions that loaded it) may come from that build. Run \`make bench\` when no test suite runs."
else
    library_note="The release build of the extension installed at the start stayed in place for the whole run."
fi
machine="$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $($PGBIN/postgres --version)"
if [ "$QUICK" = 1 ]; then
    kind="**Quick figures** (\`BENCH_QUICK=1 make bench\`): every section at small sizes and short runs, noisier than a full \`make bench\`."
else
    kind="Full run (\`make bench\`)."
fi
cat >BENCHMARKS.md <<DOC
# Benchmarks

$kind It took $(( (SECONDS - started_at) / 60 )) min $(( (SECONDS - started_at) % 60 )) s, builds included.
Settings: SECONDS_PER_RUN=$SECONDS_PER_RUN ROUNDS=$ROUNDS CLIENTS=$CLIENTS EVENTS=$EVENTS DRAIN_EVENTS=$DRAIN_EVENTS LAT_SECONDS=$LAT_SECONDS INGEST_EVENTS=$INGEST_EVENTS BIG_TXN=$BIG_TXN LARGE_EVENTS=$LARGE_EVENTS.
Machine: $machine; Tansu (Kafka-compatible, in-memory storage) on the same machine. Date: $(date -u +%Y-%m-%d).
The machine is shared with other work: the 1-minute load average as each section began was
${loads%, } (2 cores). Variants compared in a ratio run interleaved or back to back, so they share its noise.
$library_note

Every section runs on a **durable cluster** ($durable_settings), as production does, and the
goals are judged there unless a goal says otherwise. The enqueue comparison and the latency also run
on the **fast** test cluster ($fast_settings), where no commit waits for the disk: the server-side
cost of the outbox write is not hidden behind the flush, and the relay's own latency shows.
All figures, ratios and verdicts below are computed by scripts/bench.sh in this run; the curves are
drawn by it (bench/src/bin/chart.rs) into bench/charts/.

## Goals

| goal | measured | target | verdict |
|---|---:|---:|---|
${goals%$'\n'}

## Enqueue cost on the business transaction

pgbench, one database, the variants interleaved round by round so drift on a shared machine hits them
alike, $CLIENTS clients, $SECONDS_PER_RUN s per run, the median of $ROUNDS rounds (short runs, many rounds: a burst of
disk traffic from elsewhere spoils one round, not the median). "One round trip" joins the
statements with \`\\;\`, as an application that pipelines or uses a procedure would: it measures the
cost of the outbox write itself and is what the goals are judged on. "A round trip per statement" is
pgbench's default (BEGIN, the INSERT, the outbox write, COMMIT each wait for the server).

$enqueue_table

$enqueue_profile_md

### TPS against concurrent clients

Durable cluster, one round trip, $CURVE_SECONDS s per point.

![enqueue TPS against clients](bench/charts/enqueue-clients.svg)

$clients_table

## Relay drain: a backlog of $EVENTS events

~256-byte payloads, 1,000 keys, 4 topics of 3 partitions. The limits read the same backlog from slots
of their own: binary decoding streams it with the relay's replication client (pgwire-replication,
pgoutput with messages) and only counts the pg_outbox messages; text decoding is pg_recvlogical
writing to /dev/null. The relay is judged against the slower of binary decoding and raw produce.

$drain_table

$profile_md

### Against payload size and partitions

A fresh relay per point drains a backlog written while it was stopped (its start-up included):
up to $DRAIN_EVENTS events and $DRAIN_BYTES payload bytes per payload size over 3 partitions; $DRAIN_EVENTS events
of ~256 bytes over 10,000 keys per partition count.

![drain events/s against payload size](bench/charts/drain-payload-events.svg)
![drain MB/s against payload size](bench/charts/drain-payload-mbs.svg)

| payload bytes | events | seconds | of which start-up | events/s | payload MB/s | relay peak RSS |
|---:|---:|---:|---:|---:|---:|---:|
${payload_rows%$'\n'}

![drain against partitions](bench/charts/drain-partitions.svg)

| partitions | events | seconds | of which start-up | events/s | payload MB/s | relay peak RSS |
|---:|---:|---:|---:|---:|---:|---:|
${partition_rows%$'\n'}

## Latency: commit to Kafka against the offered rate

One event per transaction (\`SELECT outbox.enqueue(...)\` in autocommit) from 8 connections on a fixed
schedule (an open loop) for $LAT_SECONDS s per row, after one event through the whole path and a 1 s
warm-up; the rates go up ($RATES events/s).
- **ack**: commit to Kafka's acknowledgement, from the relay's \`pg_outbox_relay_event_latency_seconds\`
  histogram (its change over the run; "≤ x" is the upper bound of the bucket holding the percentile).
  wal mode counts from the commit timestamp in the WAL; table mode from the transaction's start
  (\`created_at\`), a little earlier. The raw row times the producer's own delivery reports.
- **receipt**: from the COMMIT returning to the client to a consumer (\`fetch.wait.max.ms=1\`) receiving the
  record: what a downstream service sees, the consumer's fetch included.
- **raw produce** is the floor: the same records produced straight to Kafka at the same rate with the
  relay's producer settings (\`linger.ms=5\`, idempotent, acks=all).

![commit to ack against the rate, durable](bench/charts/latency-durable.svg)
![commit to ack against the rate, fast cluster](bench/charts/latency-fast.svg)

Every rate up to 5,000 events/s (the goals' rate) is offered; past it, the first rate not achieved
(below 90% of it: the writers' commits or the relay fell behind) ends the sweep. A goal is judged
at 5,000 events/s offered, whatever was achieved.

$latency_table

Where the time goes above raw produce ("Across runs", at the end, has the A/B runs behind each):
- **wal mode**: the walsender sends a transaction only once its commit is flushed (the durable cluster waits
  for the disk here); the replication client's buffer holds at most \`max_in_flight_bytes / max_record_bytes\`
  messages (33 by default), so under load the pipeline gets small batches; each one-event transaction is
  three replication messages and one checkpoint step. The writers, PostgreSQL, Tansu and the relay share two
  CPUs, so past about 3,000–5,000 events/s they slow each other down.
- **table mode**: a row is read only once every older transaction has finished (the snapshot horizon); while
  busy the poll source polls every 5 ms, and each poll is confirmed by a DELETE of its rows. At 5,000
  events/s on this machine the poll source, not the writers' commits, is the limit.

## Memory: a large drain, a huge transaction and 1 MB events

A fresh relay for each input, with nothing else in the slot; peak RSS is the process's \`VmHWM\`. The
relay never holds a transaction whole: it publishes a transaction's events as they are decoded, at
most \`max_in_flight\` (20,000) and \`max_in_flight_bytes\` (32 MiB) unacknowledged.

$memory_table

## Ingest: $INGEST_EVENTS records from Kafka into the inbox

256-byte payloads with an id header, 3 partitions, read from the beginning.

$ingest_table

$ingest_profile_md
DOC
# the analysis across runs, kept by hand (README links to it)
{ echo; cat bench/analysis.md; } >>BENCHMARKS.md
say "wrote BENCHMARKS.md and $CHARTS/*.svg"
