#!/usr/bin/env bash
# Init script (/docker-entrypoint-initdb.d, runs once on an empty data directory, after
# 10-pg_outbox.sql has created the extension and its roles): the relay's login role `relay`,
# member of outbox_relay, with REPLICATION (attributes are not inherited through roles) and CREATE
# on the database (for the publication). Its password is the one in the relay's password file
# (secret relay_pgpass, libpq .pgpass format), so both sides read the same secret.
# The password never appears on a command line or in the server log.
set -Eeo pipefail

pgpass=/run/secrets/relay_pgpass
# the first line for user relay: host:port:database:relay:password (`\` escapes `:` and `\`)
line=$(grep -m 1 -E '^[^#:]*:[^:]*:[^:]*:relay:' "$pgpass") || {
    echo "relay-role.sh: $pgpass has no line host:port:database:relay:password (run docker/make-secrets.sh)" >&2
    exit 1
}
password=$(printf '%s' "${line#*:*:*:*:}" | sed 's/\\\(.\)/\1/g')
if [ -z "$password" ]; then
    echo "relay-role.sh: the password for relay in $pgpass is empty" >&2
    exit 1
fi

# an SQL literal (standard_conforming_strings is on): only ' needs doubling. Sent on stdin; the
# session logs no statement, not even one that fails.
q="'"
literal="$q${password//$q/$q$q}$q"
psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<EOSQL
SET log_statement = 'none';
SET log_min_error_statement = 'panic';
CREATE ROLE relay LOGIN REPLICATION IN ROLE outbox_relay PASSWORD $literal;
GRANT CREATE ON DATABASE :"DBNAME" TO relay;
EOSQL
echo "relay-role.sh: created role relay (LOGIN REPLICATION, member of outbox_relay, CREATE on database $POSTGRES_DB)"
