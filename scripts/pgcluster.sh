#!/usr/bin/env bash
# Throwaway PostgreSQL clusters (15 unless PGBIN names another version's bin folder) for tests and the demo.
#
#   scripts/pgcluster.sh start  DIR PORT [WAL_LEVEL]   initdb (once) and start; wal_level defaults to logical
#   scripts/pgcluster.sh stop   DIR                    stop fast (ignores a cluster that is not running)
#   scripts/pgcluster.sh restart DIR                   stop and start again with the same settings
#   scripts/pgcluster.sh standby DIR PORT PRIMARY_PORT DB SLOT
#                                                      a streaming standby of the cluster on PRIMARY_PORT
#                                                      (pg_basebackup over the physical slot SLOT), which
#                                                      syncs failover slots of database DB (PostgreSQL 17+)
#   scripts/pgcluster.sh crash  DIR                    stop immediately, as a crash would
#   scripts/pgcluster.sh promote DIR                   promote a standby and wait until it accepts writes
#
# PostgreSQL refuses to run as root, so when run as root the cluster belongs to the `postgres` OS user.
# It listens on 127.0.0.1:PORT only, with trust authentication: it is for this machine's tests.
# With PGCLUSTER_TLS_DIR (server.crt, server.key), a new cluster also accepts TLS, and the role
# tls_only may log in over TLS only (hostssl), as on a server that requires it, and pw_only with a
# password only (scram-sha-256).
# A new cluster runs with fsync and full_page_writes off (fast, and enough for tests); with
# PGCLUSTER_DURABLE=1 it has production durability instead (fsync, full_page_writes on), for benchmarks.
set -euo pipefail

source "$(dirname "$0")/pgversions.sh"
PGBIN=${PGBIN:-$(pg_home 15)/bin}  # another version: PGBIN=/opt/pg_outbox/pg17/bin
cmd=${1:?usage: pgcluster.sh start|stop|restart|standby|crash|promote DIR [...]}
dir=${2:?data directory required}

# a relocatable build (scripts/setup.sh) brings its own libpq, which its walreceiver and
# pg_basebackup need (the system's may be older); its RUNPATH names the build machine's folder
if [ -e "$PGBIN/../lib/libpq.so.5" ]; then
    export LD_LIBRARY_PATH="$PGBIN/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    port=${3:?port required}
    wal_level=${4:-logical}
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir" && chmod 700 "$dir"
    if [ ! -f "$dir/PG_VERSION" ]; then
        durability=off
        [ "${PGCLUSTER_DURABLE:-0}" = 1 ] && durability=on
        as_owner "$PGBIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir.initdb.log" 2>&1 \
            || { cat "$dir.initdb.log"; exit 1; }
        cat >>"$dir/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
wal_level = $wal_level
max_wal_senders = 40
# each test database keeps its slot until the next run: room for every test of a run
max_replication_slots = 200
fsync = $durability
synchronous_commit = on
full_page_writes = $durability
shared_buffers = 128MB
max_connections = 100
log_min_messages = warning
CONF
        if [ -n "${PGCLUSTER_TLS_DIR:-}" ]; then
            cp "$PGCLUSTER_TLS_DIR/server.crt" "$PGCLUSTER_TLS_DIR/server.key" "$dir/"
            [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir/server.crt" "$dir/server.key"
            chmod 600 "$dir/server.key"
            printf "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n" >>"$dir/postgresql.conf"
            # first match wins: these lines go before initdb's
            { printf 'hostssl all tls_only 127.0.0.1/32 trust\nhostnossl all tls_only 127.0.0.1/32 reject\n'
              printf 'host all pw_only 127.0.0.1/32 scram-sha-256\n'
              cat "$dir/pg_hba.conf"; } >"$dir/pg_hba.conf.new"
            mv "$dir/pg_hba.conf.new" "$dir/pg_hba.conf"
            [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir/pg_hba.conf"
        fi
    fi
    if as_owner "$PGBIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        echo "pgcluster: $dir already running"
        exit 0
    fi
    for attempt in 1 2 3 4 5; do
        as_owner "$PGBIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null && break
        # the port lies in the kernel's ephemeral range, so another process's outgoing connection
        # may hold it for a moment: try again; any other failure ends here
        if [ "$attempt" = 5 ] || ! tail -5 "$dir/server.log" | grep -q "Address already in use"; then
            tail -20 "$dir/server.log"
            exit 1
        fi
        echo "pgcluster: port $port is in use for now; trying again"
        sleep 2
    done
    echo "pgcluster: started $dir on 127.0.0.1:$port (wal_level=$wal_level)"
    ;;
stop)
    if [ -f "$dir/PG_VERSION" ] && as_owner "$PGBIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        as_owner "$PGBIN/pg_ctl" -D "$dir" -m fast -w -t 60 stop >/dev/null
        echo "pgcluster: stopped $dir"
    fi
    ;;
standby)
    port=${3:?port required}
    primary=${4:?primary port required}
    db=${5:?database required}
    slot=${6:?physical slot required}
    rm -rf "$dir"
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir" && chmod 700 "$dir"
    as_owner "$PGBIN/pg_basebackup" -D "$dir" -d "host=127.0.0.1 port=$primary user=postgres dbname=$db" \
        -X stream -c fast -R -S "$slot" >"$dir.basebackup.log" 2>&1 || { cat "$dir.basebackup.log"; exit 1; }
    cat >>"$dir/postgresql.conf" <<CONF
port = $port
unix_socket_directories = '$dir'
hot_standby_feedback = on
CONF
    if [ "$("$PGBIN/pg_config" --version | sed 's/[^0-9]*\([0-9]*\).*/\1/')" -ge 17 ]; then
        echo "sync_replication_slots = on" >>"$dir/postgresql.conf"
    fi
    as_owner "$PGBIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null \
        || { tail -20 "$dir/server.log"; exit 1; }
    echo "pgcluster: standby $dir on 127.0.0.1:$port of 127.0.0.1:$primary"
    ;;
crash)
    as_owner "$PGBIN/pg_ctl" -D "$dir" -m immediate -w -t 60 stop >/dev/null
    echo "pgcluster: crashed $dir"
    ;;
promote)
    as_owner "$PGBIN/pg_ctl" -D "$dir" -w -t 60 promote >/dev/null
    echo "pgcluster: promoted $dir"
    ;;
restart)
    as_owner "$PGBIN/pg_ctl" -D "$dir" -m fast -w -t 60 restart -l "$dir/server.log" >/dev/null
    echo "pgcluster: restarted $dir"
    ;;
*)
    echo "usage: pgcluster.sh start|stop|restart|standby|crash|promote DIR [...]" >&2
    exit 2
    ;;
esac
