-- pg_outbox: switch a database from the C extension to the SQL edition, keeping every event in
-- flight (docs/sql-edition.md, "Switching editions"). Run it as the extension's owner (a
-- superuser), in the database, relay running or not; the SQL edition then belongs to that role:
-- psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql-edition/switch-to-sql-edition.sql One transaction:
-- it waits for the transactions that use pg_outbox's tables, then keeps enqueue, the relay and
-- inbox workers waiting until it commits (a transaction that was waiting in enqueue then fails and
-- rolls back: retry it). The relay's session starts again by itself.
\set ON_ERROR_STOP on
BEGIN;
SET LOCAL client_min_messages = warning;
DO $edition$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_outbox') THEN
        RAISE EXCEPTION 'pg_outbox: the C extension is not installed in this database' USING ERRCODE = 'undefined_object';
    END IF;
END
$edition$;
\ir switch/save.sql
DROP EXTENSION pg_outbox;
\ir pg_outbox.sql
\ir switch/restore.sql
COMMIT;
