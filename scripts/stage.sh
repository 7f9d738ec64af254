# Sourced by the demo and bench scripts: installs what is missing, builds and installs the extension,
# and sets the stage in a throwaway folder that is removed on exit, with the processes it started.
#   stage_begin [--release]     setup, install the extension, make $root, arrange cleanup
#   stage_broker PORT TOPIC:PARTITIONS...   start a Tansu broker (memory storage) with those topics
export PATH="$HOME/.cargo/bin:$PATH"
source scripts/progress.sh
source scripts/pgversions.sh
PG_CONFIG=${PG_CONFIG:-$(pg_config_of 15)}
pids=()

stage_cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    scripts/pgcluster.sh stop "$root/pg" >/dev/null || true
    rm -rf "$root"
}

stage_begin() {
    # the demo and the benchmarks run on Debian's PostgreSQL 15 only
    PG_VERSIONS=15 scripts/setup.sh
    local sudo=; [ "$(id -u)" = 0 ] || sudo=--sudo
    with_progress "building and installing the extension" \
        bash -c "cd pg_outbox && cargo pgrx install $* $sudo --pg-config '$PG_CONFIG'"
    root=$(mktemp -d "${TMPDIR:-/tmp}/pg_outbox-$(basename "$0" .sh).XXXXXX")
    chmod 755 "$root"
    trap stage_cleanup EXIT
}

stage_broker() {
    local port=$1; shift
    tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine memory://tansu/ >"$root/tansu.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    for t in "$@"; do
        tansu topic create "${t%%:*}" --partitions "${t##*:}" --broker "tcp://127.0.0.1:$port" >/dev/null
    done
}
