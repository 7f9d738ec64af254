# Sourced by setup.sh and stage.sh: long steps that show they are alive.
say_progress() { printf '%s: %s\n' "$(basename "$0" .sh)" "$*"; }

# Runs a long command with its output in a log; every 30 s prints how long it has run and the
# log's last line (cargo's "Compiling x"), and the log's tail if it fails.
with_progress() {
    local what=$1; shift
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/pg_outbox-setup.XXXXXX")
    "$@" >"$log" 2>&1 &
    local pid=$! start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null && sleep 1; done
        if kill -0 "$pid" 2>/dev/null; then
            say_progress "  $what: $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s, $(tail -c 2000 "$log" | tr '\r' '\n' | grep -v '^ *$' | tail -1 | cut -c1-100)"
        fi
    done
    if ! wait "$pid"; then
        tail -30 "$log" >&2
        rm -f "$log"
        say_progress "$what failed"
        return 1
    fi
    rm -f "$log"
    say_progress "  $what: done in $(( SECONDS - start )) s"
}
