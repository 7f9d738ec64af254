-- pg_outbox: switch a database from the SQL edition to the C extension, keeping every event in
-- flight (docs/sql-edition.md, "Switching editions"). Run it as a superuser, in the database, relay
-- running or not: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql-edition/switch-to-extension.sql
-- One transaction: it waits for the transactions that use pg_outbox's tables, then keeps enqueue,
-- the relay and inbox workers waiting until it commits (a transaction that was waiting in enqueue
-- then fails and rolls back: retry it). The relay's session starts again by itself.
\set ON_ERROR_STOP on
BEGIN;
SET LOCAL client_min_messages = warning;
DO $edition$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_outbox') THEN
        RAISE EXCEPTION 'pg_outbox: the C extension is installed already' USING ERRCODE = 'duplicate_object';
    END IF;
    IF pg_catalog.to_regprocedure('outbox._edition()') IS NULL THEN
        RAISE EXCEPTION 'pg_outbox: the SQL edition is not installed in this database'
            USING ERRCODE = 'undefined_object', HINT = 'CREATE EXTENSION pg_outbox is all a new database needs.';
    END IF;
END
$edition$;
\ir switch/save.sql
DROP SCHEMA outbox, inbox CASCADE;
CREATE EXTENSION pg_outbox;
\ir switch/restore.sql
COMMIT;
