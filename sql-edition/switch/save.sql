-- Part of switch-to-extension.sql and switch-to-sql-edition.sql: waits for every transaction that
-- holds one of pg_outbox's tables (writers, the relay, inbox workers) and keeps everyone out until
-- the switch commits, then copies the state of both schemas into schema outbox_switch.
LOCK TABLE outbox.events, outbox.auth_key, outbox.sources, outbox.gaps, outbox.dead_letters,
           inbox.received, inbox.offsets, inbox.topics, inbox.messages IN ACCESS EXCLUSIVE MODE;
DO $check$
DECLARE
    dependent text;
BEGIN
    -- the old edition's tables are dropped: refuse if a view of the user's reads one of them
    SELECT pg_catalog.string_agg(DISTINCT r.ev_class::regclass::text, ', ') INTO dependent
      FROM pg_catalog.pg_depend d
      JOIN pg_catalog.pg_rewrite r ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
      JOIN pg_catalog.pg_class t ON t.oid = d.refobjid AND d.refclassid = 'pg_catalog.pg_class'::regclass
      JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
     WHERE t.relnamespace IN ('outbox'::regnamespace, 'inbox'::regnamespace)
       AND v.relnamespace NOT IN ('outbox'::regnamespace, 'inbox'::regnamespace);
    IF dependent IS NOT NULL THEN
        RAISE EXCEPTION 'pg_outbox: % read pg_outbox''s tables, which the switch replaces', dependent
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Drop those views, switch, and create them again.';
    END IF;
END
$check$;
CREATE SCHEMA outbox_switch;
CREATE TABLE outbox_switch.events AS TABLE outbox.events;
CREATE TABLE outbox_switch.auth_key AS TABLE outbox.auth_key;
CREATE TABLE outbox_switch.sources AS TABLE outbox.sources;
CREATE TABLE outbox_switch.gaps AS TABLE outbox.gaps;
CREATE TABLE outbox_switch.dead_letters AS TABLE outbox.dead_letters;
CREATE TABLE outbox_switch.received AS TABLE inbox.received;
CREATE TABLE outbox_switch.offsets AS TABLE inbox.offsets;
CREATE TABLE outbox_switch.topics AS TABLE inbox.topics;
CREATE TABLE outbox_switch.messages AS TABLE inbox.messages;
-- identity columns go on from where they were, never back
CREATE TABLE outbox_switch.sequences AS
SELECT 'outbox.events' AS tab, 'seq' AS col,
       pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence('outbox.events', 'seq')::regclass) AS last
UNION ALL
SELECT 'inbox.messages', 'id',
       pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence('inbox.messages', 'id')::regclass);
