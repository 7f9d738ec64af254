-- pg_outbox outbox: SQL functions of schema outbox (batch enqueue, NOTIFY, wal-mode setup).
-- Runs after the Rust functions it names exist (see the extension_sql_file! requires in src/lib.rs).
-- Every function pins search_path and names every object with its schema; user input never reaches
-- dynamic SQL except slot/publication names, which are validated and quoted with %I.

COMMENT ON FUNCTION outbox.enqueue(text, text, jsonb, jsonb) IS
    'Enqueue a JSON event in the current transaction; returns its UUIDv7 event id';
COMMENT ON FUNCTION outbox.enqueue(text, text, jsonb) IS
    'Enqueue a JSON event without headers in the current transaction; returns its UUIDv7 event id';

CREATE FUNCTION outbox.enqueue_batch(topic text, keys text[], payloads jsonb[], headers jsonb DEFAULT '{}')
RETURNS SETOF uuid
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT unnest(outbox._enqueue_batch_json(topic, keys, payloads::text[], headers)) $$;
COMMENT ON FUNCTION outbox.enqueue_batch(text, text[], jsonb[], jsonb) IS
    'Enqueue many JSON events to one topic (keys[i] goes with payloads[i]); returns their ids in order';

-- The relay's copy of the sealing key (outbox.auth_key), for outbox_relay only: SECURITY DEFINER so
-- that the key table itself needs no grant.
CREATE FUNCTION outbox.relay_auth_key() RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT key FROM outbox.auth_key $$;
COMMENT ON FUNCTION outbox.relay_auth_key() IS
    'The key that seals wal-mode messages, for the relay (granted to outbox_relay only)';

-- Wakes whoever LISTENs on the channel named by the trigger's argument when a transaction that
-- inserted rows commits (notifications are delivered at commit, one per transaction is enough):
-- pg_outbox_events for the relay's poll source, pg_outbox_inbox for inbox workers (trigger in inbox.sql).
CREATE FUNCTION outbox._notify() RETURNS trigger
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;
CREATE TRIGGER events_notify AFTER INSERT ON outbox.events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox._notify('pg_outbox_events');

-- Setup for wal mode, in two steps that must commit separately and in this order: the publication
-- first, then the slot. pgoutput looks the publication up as of each decoded transaction, so a slot
-- that is older than its publication fails on every transaction committed in between.
-- CALL outbox.setup() does both; the functions below are its steps, each idempotent, each saying
-- what it did.
CREATE FUNCTION outbox._check_slot_name(sn text) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF sn IS NULL OR sn !~ '^[a-z0-9_]{1,63}$' THEN
        RAISE EXCEPTION 'pg_outbox: invalid slot name "%"', sn
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Slot names are 1 to 63 characters of lower-case letters, digits and underscores.';
    END IF;
END
$$;

CREATE FUNCTION outbox.create_publication(publication_name text DEFAULT NULL)
RETURNS TABLE (object text, name text, action text)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    pn text := coalesce(publication_name, outbox._slot_name());
BEGIN
    PERFORM outbox._check_slot_name(pn);
    IF EXISTS (SELECT FROM pg_catalog.pg_publication p WHERE p.pubname = pn) THEN
        RETURN QUERY SELECT 'publication', pn, 'exists';
    ELSE
        -- an empty publication: pgoutput sends pg_outbox messages whatever tables it lists
        EXECUTE format('CREATE PUBLICATION %I', pn);
        RETURN QUERY SELECT 'publication', pn, 'created';
    END IF;
END
$$;
COMMENT ON FUNCTION outbox.create_publication(text) IS
    'Create the pg_outbox publication if missing (step 1 of outbox.setup; commit before creating the slot)';

CREATE FUNCTION outbox.create_slot(slot_name text DEFAULT NULL)
RETURNS TABLE (object text, name text, action text)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    sn text := coalesce(slot_name, outbox._slot_name());
    existing record;
BEGIN
    PERFORM outbox._check_slot_name(sn);
    IF current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'pg_outbox: wal mode needs wal_level = logical (it is %)', current_setting('wal_level')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Set wal_level = logical in postgresql.conf and restart PostgreSQL, or use table mode.';
    END IF;
    SELECT s.database, s.plugin, s.slot_type INTO existing
      FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = sn;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_publication p WHERE p.pubname = sn) THEN
            RAISE EXCEPTION 'pg_outbox: publication "%" must exist before the slot is created', sn
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'CALL outbox.setup(); or SELECT * FROM outbox.create_publication(); then create the slot in a new transaction.';
        END IF;
        PERFORM pg_catalog.pg_create_logical_replication_slot(sn, 'pgoutput');
        RETURN QUERY SELECT 'slot', sn, 'created';
    ELSIF existing.slot_type <> 'logical' OR existing.plugin <> 'pgoutput'
          OR existing.database <> current_database() THEN
        RAISE EXCEPTION 'pg_outbox: slot "%" exists but is not a pgoutput logical slot of database "%"',
                        sn, current_database()
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Pick another name with pg_outbox.slot_name, or drop the other slot.';
    ELSE
        RETURN QUERY SELECT 'slot', sn, 'exists';
    END IF;
END
$$;
COMMENT ON FUNCTION outbox.create_slot(text) IS
    'Create the pg_outbox logical replication slot if missing (step 2 of outbox.setup; needs the publication)';

-- (no SET clause: PostgreSQL forbids COMMIT in a procedure that has one; every name is qualified)
CREATE PROCEDURE outbox.setup(slot_name text DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM outbox.create_publication(slot_name) LOOP
        RAISE NOTICE 'pg_outbox: % % %', r.object, r.name, r.action;
    END LOOP;
    COMMIT;
    FOR r IN SELECT * FROM outbox.create_slot(slot_name) LOOP
        RAISE NOTICE 'pg_outbox: % % %', r.object, r.name, r.action;
    END LOOP;
END
$$;
COMMENT ON PROCEDURE outbox.setup(text) IS
    'Set up wal mode: the publication, committed, then the slot; idempotent (CALL it outside a transaction block)';
