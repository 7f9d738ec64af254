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

-- The relay's copy of the sealing keys (outbox.auth_key), for outbox_relay only: SECURITY DEFINER so
-- that the key table itself needs no grant. relay_auth_key() is the newest key alone (relays of
-- 0.1.0 read it); the relay reads every key with relay_auth_keys().
CREATE FUNCTION outbox.relay_auth_key() RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT key FROM outbox.auth_key ORDER BY key_id DESC LIMIT 1 $$;
COMMENT ON FUNCTION outbox.relay_auth_key() IS
    'The newest key that seals wal-mode messages, for the relay (granted to outbox_relay only)';

CREATE FUNCTION outbox.relay_auth_keys(OUT key_id integer, OUT key bytea) RETURNS SETOF record
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT k.key_id, k.key FROM outbox.auth_key k ORDER BY k.key_id $$;
COMMENT ON FUNCTION outbox.relay_auth_keys() IS
    'Every key a wal-mode message may be sealed with, for the relay (granted to outbox_relay only)';

-- Key rotation (docs/operations.md, "Rotating the sealing key"). A new key: enqueue seals with it in
-- every transaction that starts after this one commits (backends that cached the older key are told
-- by a relation cache invalidation, outbox._auth_keys_changed; the lock only keeps two rotations
-- apart and lets readers of the keys be), relays start a new session with it within 5 s. The older
-- keys stay valid until retired.
CREATE FUNCTION outbox.rotate_auth_key() RETURNS integer
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_id integer;
BEGIN
    LOCK TABLE outbox.auth_key IN SHARE ROW EXCLUSIVE MODE;
    INSERT INTO outbox.auth_key (key_id, key)
    SELECT coalesce(max(k.key_id), 0) + 1,
           decode(substr(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 1, 64), 'hex')
      FROM outbox.auth_key k
    RETURNING key_id INTO new_id;
    PERFORM outbox._auth_keys_changed();
    RETURN new_id;
END
$$;
COMMENT ON FUNCTION outbox.rotate_auth_key() IS
    'Makes a new sealing key, used by every transaction that starts after this one commits; returns its id';

-- Removes an older key once nothing sealed or signed with it can still be in flight, waiting (up to
-- `timeout`) for: every transaction of this database that was open when the call started, and every
-- transaction prepared before it, to end (they may have sealed with the older key); every relay
-- source to sign with a newer key (unless `force`: a source whose relay no longer runs); then each
-- slot source's relay to confirm the WAL written until then, and each poll source's relay to
-- publish the rows enqueued until then. From then on a message sealed with that key is passed over
-- as forged.
CREATE FUNCTION outbox.retire_auth_key(retired integer, timeout interval DEFAULT '5 minutes',
                                       force boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    started timestamptz := clock_timestamp();
    deadline timestamptz := clock_timestamp() + timeout;
    newest integer;
    older text[];
    waiting text;
    written pg_lsn;
    published timestamptz;
BEGIN
    SELECT max(k.key_id) INTO newest FROM outbox.auth_key k;
    IF NOT EXISTS (SELECT FROM outbox.auth_key k WHERE k.key_id = retired) THEN
        RAISE EXCEPTION 'pg_outbox: there is no sealing key %', retired
            USING ERRCODE = '22023', HINT = 'SELECT key_id, created_at FROM outbox.sealing_keys lists them.';
    END IF;
    IF retired = newest THEN
        RAISE EXCEPTION 'pg_outbox: sealing key % is the newest: enqueue seals with it', retired
            USING ERRCODE = '55000', HINT = 'SELECT outbox.rotate_auth_key() first.';
    END IF;
    -- the transactions open now, by their virtual transaction id (as CREATE INDEX CONCURRENTLY
    -- waits for older snapshots): any of them may have read the older key
    SELECT array_agg(l.virtualxid) INTO older
      FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'virtualxid' AND l.granted AND l.pid <> pg_backend_pid()
       AND a.datname = current_database();
    LOOP
        SELECT string_agg(x, ', ') INTO waiting FROM (
            SELECT 'pid ' || l.pid AS x FROM pg_locks l
             WHERE l.locktype = 'virtualxid' AND l.granted AND l.virtualxid = ANY (older)
            UNION ALL
            SELECT 'prepared transaction ' || quote_literal(p.gid) FROM pg_prepared_xacts p
             WHERE p.database = current_database() AND p.prepared < started) w;
        EXIT WHEN waiting IS NULL;
        IF clock_timestamp() > deadline THEN
            RAISE EXCEPTION 'pg_outbox: transactions that began before the call are still open: %', waiting
                USING ERRCODE = '55000',
                      HINT = 'They may seal with the older key. Let them end (or terminate them), then call again.';
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    -- every relay signs its records with a newer key: what a restart reads back is never signed
    -- with the retired one
    LOOP
        SELECT string_agg(quote_literal(o.source), ', ') INTO waiting FROM outbox.sources o
         WHERE o.stopped IS NULL AND coalesce(o.signing_key_id, 1) <= retired;
        EXIT WHEN waiting IS NULL OR force;
        IF clock_timestamp() > deadline THEN
            RAISE EXCEPTION 'pg_outbox: the relay of % still signs with key % or older', waiting, retired
                USING ERRCODE = '55000',
                      HINT = 'A running relay moves to the newest key within 5 s: start the relay of each such source. '
                             'For a source no relay serves any more, call again with force => true.';
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    -- everything sealed or signed with the retired key is behind the relays
    written := pg_current_wal_insert_lsn();
    published := clock_timestamp();
    LOOP
        SELECT string_agg(x, ', ') INTO waiting FROM (
            SELECT format('slot %I (confirmed %s of %s)', s.slot_name, s.confirmed_flush_lsn, written) AS x
              FROM outbox.sources o JOIN pg_replication_slots s ON o.source = 'slot:' || s.slot_name
             WHERE o.stopped IS NULL AND s.database = current_database()
               AND (s.confirmed_flush_lsn IS NULL OR s.confirmed_flush_lsn < written)
            UNION ALL
            SELECT 'outbox.events rows enqueued before the call'
             WHERE EXISTS (SELECT FROM outbox.sources o WHERE o.source LIKE 'poll:%' AND o.stopped IS NULL)
               AND EXISTS (SELECT FROM outbox.events e WHERE e.created_at < published)) w;
        EXIT WHEN waiting IS NULL OR force;
        IF clock_timestamp() > deadline THEN
            RAISE EXCEPTION 'pg_outbox: the relays have not yet published what was enqueued before the call: %', waiting
                USING ERRCODE = '55000',
                      HINT = 'Events sealed with the older key may still be on their way. Check that the relays run, then call again.';
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    DELETE FROM outbox.auth_key k WHERE k.key_id = retired;
END
$$;
COMMENT ON FUNCTION outbox.retire_auth_key(integer, interval, boolean) IS
    'Removes an older sealing key once nothing sealed or signed with it can still be in flight (waits up to timeout)';

-- The sealing keys without the secret: their ids and ages.
CREATE VIEW outbox.sealing_keys AS
    SELECT k.key_id, k.created_at, k.key_id = max(k.key_id) OVER () AS newest FROM outbox.auth_key k;
COMMENT ON VIEW outbox.sealing_keys IS 'pg_outbox: the sealing keys (ids and ages, never the keys)';

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
-- Whether the relay's poll source waits for a NOTIFY (idle), or is polling anyway (busy). A
-- transaction that NOTIFYs holds a database-wide lock from its commit until the commit is flushed,
-- which serialises every committing writer behind one WAL flush after another: so while the relay
-- polls anyway, writers leave the NOTIFY out. Unlogged: after a crash it is empty, which means idle.
CREATE UNLOGGED TABLE outbox.poller (
    id   integer PRIMARY KEY CHECK (id = 1),
    idle boolean NOT NULL
);
COMMENT ON TABLE outbox.poller IS
    'Set by the relay''s poll source: while it polls anyway (idle = false), table-mode writers do not NOTIFY';

-- The events trigger: NOTIFY pg_outbox_events unless the relay's poll source is busy.
CREATE FUNCTION outbox._notify_poller() RETURNS trigger
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF coalesce((SELECT p.idle FROM outbox.poller p WHERE p.id = 1), true) THEN
        PERFORM pg_notify('pg_outbox_events', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER events_notify AFTER INSERT ON outbox.events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox._notify_poller();

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

-- A slot that is gone or invalidated: what may be lost, and the way out. Raised by create_slot (so
-- by setup) and called by the relay, `check` and `status`, so that all say the same.
CREATE FUNCTION outbox._slot_lost(sn text, what text) RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    known outbox.sources;
BEGIN
    SELECT * INTO known FROM outbox.sources s WHERE s.source = 'slot:' || sn;
    RAISE EXCEPTION 'pg_outbox: replication slot "%" %: events committed from % up to % may never have been published',
                    sn, what, coalesce(known.seen_lsn, known.created_lsn, '0/0'::pg_lsn),
                    pg_catalog.pg_current_wal_lsn()
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = pg_catalog.format(
                  'pg_outbox never re-creates a slot silently. Reconcile what Kafka lacks from that range, '
                  'then SELECT * FROM outbox.recreate_slot(''<why>''%s); the gap is kept in outbox.gaps.',
                  CASE WHEN sn = outbox._slot_name() THEN '' ELSE pg_catalog.format(', %L', sn) END);
END
$$;

-- A slot of that name that pg_outbox cannot use: another plugin, kind or database.
CREATE FUNCTION outbox._foreign_slot(sn text) RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'pg_outbox: slot "%" exists but is not a pgoutput logical slot of database "%"',
                    sn, current_database()
        USING ERRCODE = 'duplicate_object',
              HINT = 'Pick another name with pg_outbox.slot_name, or drop the other slot.';
END
$$;

-- Creates the pg_outbox slot: a failover slot where the server has them (PostgreSQL 17+), so that
-- a standby with sync_replication_slots = on keeps a copy that a relay goes on from after a
-- promotion (docs/operations.md, "Failover and a standby relay").
CREATE FUNCTION outbox._new_slot(sn text) RETURNS pg_lsn
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lsn pg_lsn;
BEGIN
    IF pg_catalog.current_setting('server_version_num')::int >= 170000 THEN
        -- (name, plugin, temporary, twophase, failover): the fifth argument exists from 17 on
        EXECUTE 'SELECT c.lsn FROM pg_catalog.pg_create_logical_replication_slot($1, ''pgoutput'', false, false, true) c'
           INTO lsn USING sn;
    ELSE
        SELECT c.lsn INTO lsn FROM pg_catalog.pg_create_logical_replication_slot(sn, 'pgoutput') c;
    END IF;
    RETURN lsn;
END
$$;

CREATE FUNCTION outbox.create_slot(slot_name text DEFAULT NULL)
RETURNS TABLE (object text, name text, action text)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    sn text := coalesce(slot_name, outbox._slot_name());
    existing record;
    has_slot boolean;
    known boolean;
    lsn pg_lsn;
BEGIN
    PERFORM outbox._check_slot_name(sn);
    IF current_setting('wal_level') <> 'logical' THEN
        RAISE EXCEPTION 'pg_outbox: wal mode needs wal_level = logical (it is %)', current_setting('wal_level')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Set wal_level = logical in postgresql.conf and restart PostgreSQL, or use table mode.';
    END IF;
    SELECT s.database, s.plugin, s.slot_type, s.wal_status, s.confirmed_flush_lsn INTO existing
      FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = sn;
    has_slot := FOUND;
    known := EXISTS (SELECT FROM outbox.sources o WHERE o.source = 'slot:' || sn);
    IF NOT has_slot THEN
        IF known THEN
            PERFORM outbox._slot_lost(sn, 'was dropped');
        END IF;
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_publication p WHERE p.pubname = sn) THEN
            RAISE EXCEPTION 'pg_outbox: publication "%" must exist before the slot is created', sn
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'CALL outbox.setup(); or SELECT * FROM outbox.create_publication(); then create the slot in a new transaction.';
        END IF;
        -- the slot first: PostgreSQL creates no logical slot in a transaction that has written
        lsn := outbox._new_slot(sn);
        INSERT INTO outbox.sources (source, created_lsn, seen_lsn, seen_at)
        VALUES ('slot:' || sn, lsn, lsn, pg_catalog.now());
        RETURN QUERY SELECT 'slot', sn, 'created';
    ELSIF existing.slot_type <> 'logical' OR existing.plugin <> 'pgoutput'
          OR existing.database <> current_database() THEN
        PERFORM outbox._foreign_slot(sn);
    ELSIF existing.wal_status = 'lost' THEN
        PERFORM outbox._slot_lost(sn, 'was invalidated (wal_status = lost)');
    ELSIF NOT known THEN
        -- made by hand or by an earlier version: from now on it is remembered
        INSERT INTO outbox.sources (source, created_lsn, seen_lsn, seen_at)
        VALUES ('slot:' || sn, existing.confirmed_flush_lsn, existing.confirmed_flush_lsn, pg_catalog.now());
        RETURN QUERY SELECT 'slot', sn, 'adopted';
    ELSE
        RETURN QUERY SELECT 'slot', sn, 'exists';
    END IF;
END
$$;
COMMENT ON FUNCTION outbox.create_slot(text) IS
    'Create the pg_outbox logical replication slot if it never existed (step 2 of outbox.setup; needs the publication)';

CREATE FUNCTION outbox._check_reason(reason text) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF reason IS NULL OR pg_catalog.btrim(reason) = '' THEN
        RAISE EXCEPTION 'pg_outbox: a reason is required'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Say why (for example the incident or ticket): it is kept in outbox.gaps.';
    END IF;
END
$$;

-- The operator's way out of a lost slot, or of a slot whose records Kafka holds beyond anything
-- the database committed (a point-in-time recovery): a slot that is gone or invalidated is created
-- again ('recreated'), one that works is kept ('kept'); either way the source gets a new
-- incarnation, so that no record in Kafka makes the relay skip a new event, and the WAL range that
-- may be lost is recorded in outbox.gaps with the reason.
CREATE FUNCTION outbox.recreate_slot(reason text, slot_name text DEFAULT NULL)
RETURNS TABLE (slot text, action text, incarnation uuid, lost_from pg_lsn, lost_to pg_lsn)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    sn text := coalesce(slot_name, outbox._slot_name());
    existing record;
    has_slot boolean;
    known outbox.sources;
    fresh uuid := pg_catalog.gen_random_uuid();
    from_lsn pg_lsn;
    to_lsn pg_lsn;
    act text;
BEGIN
    PERFORM outbox._check_slot_name(sn);
    PERFORM outbox._check_reason(reason);
    SELECT s.database, s.plugin, s.slot_type, s.wal_status, s.confirmed_flush_lsn, s.active, s.active_pid
      INTO existing
      FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = sn;
    has_slot := FOUND;
    IF has_slot AND existing.active THEN
        -- a relay streaming meanwhile would go on writing under the old incarnation
        RAISE EXCEPTION 'pg_outbox: slot "%" is in use (pid %)', sn, existing.active_pid
            USING ERRCODE = 'object_in_use',
                  HINT = 'Stop the relay first, then call outbox.recreate_slot again.';
    END IF;
    SELECT * INTO known FROM outbox.sources o WHERE o.source = 'slot:' || sn;
    IF has_slot AND (existing.slot_type <> 'logical' OR existing.plugin <> 'pgoutput'
                     OR existing.database <> current_database()) THEN
        PERFORM outbox._foreign_slot(sn);
    END IF;
    IF has_slot AND existing.wal_status IS DISTINCT FROM 'lost' THEN
        act := 'kept';
        to_lsn := existing.confirmed_flush_lsn;
    ELSE
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_publication p WHERE p.pubname = sn) THEN
            RAISE EXCEPTION 'pg_outbox: publication "%" must exist before the slot is created', sn
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'SELECT * FROM outbox.create_publication(); then call outbox.recreate_slot again.';
        END IF;
        IF has_slot THEN
            PERFORM pg_catalog.pg_drop_replication_slot(sn);
        END IF;
        to_lsn := outbox._new_slot(sn);
        from_lsn := coalesce(known.seen_lsn, known.created_lsn, '0/0'::pg_lsn);
        act := 'recreated';
    END IF;
    INSERT INTO outbox.sources AS o (source, incarnation, created_lsn, seen_lsn, seen_at)
    VALUES ('slot:' || sn, fresh, to_lsn, to_lsn, pg_catalog.now())
    ON CONFLICT (source) DO UPDATE
        SET incarnation = excluded.incarnation, created_at = pg_catalog.now(),
            created_lsn = excluded.created_lsn, seen_lsn = excluded.seen_lsn, seen_at = excluded.seen_at,
            stopped = NULL, stopped_at = NULL;
    INSERT INTO outbox.gaps (source, old_incarnation, new_incarnation, from_lsn, to_lsn, reason)
    VALUES ('slot:' || sn, known.incarnation, fresh, from_lsn, CASE WHEN act = 'recreated' THEN to_lsn END, reason);
    RETURN QUERY SELECT sn, act, fresh, from_lsn, CASE WHEN act = 'recreated' THEN to_lsn END;
END
$$;
COMMENT ON FUNCTION outbox.recreate_slot(text, text) IS
    'Operator action: re-create a lost pg_outbox slot (or keep a working one) under a new incarnation; records the gap in outbox.gaps';

-- The key of the session-level advisory lock that makes one relay the poller of a source
-- (relay/src/source/poll.rs). It is random and kept in outbox.sources, which only outbox_relay reads:
-- a role without grants cannot compute it, as it could a hash of a name the docs give. While a relay
-- holds it, it shows in pg_locks, so a role that saw it can take it while no relay runs; a relay that
-- finds it held by a role that is no member of outbox_relay calls this again with rotate_from = the
-- key it found taken, and only the first such call (of several relays) makes a new key.
CREATE FUNCTION outbox._poll_lock_key(source_id text, rotate_from bigint DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    src text := 'poll:' || source_id;
    k bigint;
BEGIN
    INSERT INTO outbox.sources AS o (source) VALUES (src) ON CONFLICT (source) DO NOTHING;
    UPDATE outbox.sources o
       SET lock_key = ('x' || pg_catalog.encode(pg_catalog.substr(
                          pg_catalog.uuid_send(pg_catalog.gen_random_uuid()), 9, 8), 'hex'))::bit(64)::bigint
     WHERE o.source = src AND (o.lock_key IS NULL OR o.lock_key = rotate_from);
    SELECT o.lock_key INTO k FROM outbox.sources o WHERE o.source = src;
    RETURN k;
END
$$;

-- The same way out for the poll source (table mode), whose incarnation the relay makes on its first
-- poll: after a restore, Kafka may hold records of this source beyond the database's transactions.
CREATE FUNCTION outbox.new_poll_incarnation(reason text, source_id text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    sid text := coalesce(source_id, 'poll.' || current_database());
    src text := 'poll:' || sid;
    old uuid;
    fresh uuid := pg_catalog.gen_random_uuid();
BEGIN
    PERFORM outbox._check_reason(reason);
    -- the lock a polling relay holds (relay/src/source/poll.rs)
    IF NOT pg_catalog.pg_try_advisory_xact_lock(outbox._poll_lock_key(sid)) THEN
        RAISE EXCEPTION 'pg_outbox: a relay polls as "%"', sid
            USING ERRCODE = 'object_in_use',
                  HINT = 'Stop the relay first, then call outbox.new_poll_incarnation again.';
    END IF;
    SELECT o.incarnation INTO old FROM outbox.sources o WHERE o.source = src;
    INSERT INTO outbox.sources AS o (source, incarnation) VALUES (src, fresh)
    ON CONFLICT (source) DO UPDATE SET incarnation = excluded.incarnation, created_at = pg_catalog.now(),
                                       stopped = NULL, stopped_at = NULL;
    INSERT INTO outbox.gaps (source, old_incarnation, new_incarnation, reason) VALUES (src, old, fresh, reason);
    RETURN fresh;
END
$$;
COMMENT ON FUNCTION outbox.new_poll_incarnation(text, text) IS
    'Operator action: give a poll source (table mode) a new incarnation; records it in outbox.gaps';

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

-- Monitoring views (docs/operations.md, "The same numbers in SQL"): the numbers of the relay's
-- /metrics, for users without Prometheus, read by outbox_monitor. No payload, key, secret or host
-- name. Function calls in a view run as the caller, so they use only functions PUBLIC may execute;
-- tables and catalog views are read as the view's owner.

-- One row per source a relay has used: its slot (wal) and how far behind it is, whether a relay
-- holds it, the stored stop verdict, and the operator's gaps.
CREATE VIEW outbox.source_status AS
SELECT o.source,
       CASE WHEN o.source LIKE 'slot:%' THEN 'wal' ELSE 'poll' END AS kind,
       o.incarnation,
       o.created_at,
       s.slot_name,
       CASE WHEN o.source LIKE 'slot:%' THEN s.slot_name IS NOT NULL END AS slot_exists,
       COALESCE(s.active,
                EXISTS (SELECT FROM pg_catalog.pg_locks l
                         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                           AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                              WHERE d.datname = pg_catalog.current_database())
                           AND ((l.classid::bigint OPERATOR(pg_catalog.<<) 32)
                                OPERATOR(pg_catalog.|) l.objid::bigint) OPERATOR(pg_catalog.=) o.lock_key))
           AS relay_active,
       s.active_pid AS relay_pid,
       s.confirmed_flush_lsn,
       pg_catalog.pg_wal_lsn_diff(w.lsn, s.confirmed_flush_lsn)::bigint AS lag_bytes,
       pg_catalog.pg_wal_lsn_diff(w.lsn, s.restart_lsn)::bigint AS retained_wal_bytes,
       s.wal_status,
       o.seen_lsn,
       o.seen_at,
       o.stopped,
       o.stopped_at,
       (SELECT pg_catalog.count(*) FROM outbox.gaps g WHERE g.source OPERATOR(pg_catalog.=) o.source) AS gaps
  FROM outbox.sources o
  CROSS JOIN LATERAL (SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
                                  ELSE pg_catalog.pg_current_wal_lsn() END AS lsn) w
  LEFT JOIN pg_catalog.pg_replication_slots s
         ON o.source OPERATOR(pg_catalog.=) ('slot:' OPERATOR(pg_catalog.||) s.slot_name)
        AND s.database OPERATOR(pg_catalog.=) pg_catalog.current_database();
COMMENT ON VIEW outbox.source_status IS
    'pg_outbox: each source, its slot lag and retained WAL (wal), whether a relay holds it, its stop verdict and gaps';

-- Table mode: the events not published yet, and how old the oldest is.
CREATE VIEW outbox.table_backlog AS
SELECT pg_catalog.count(*) AS events,
       pg_catalog.min(e.created_at) AS oldest_at,
       pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) pg_catalog.min(e.created_at))
           AS oldest_age_seconds
  FROM outbox.events e;
COMMENT ON VIEW outbox.table_backlog IS
    'pg_outbox: table-mode events waiting for the relay (a count: a scan of outbox.events)';

-- Dead letters per source and topic: how many, the first and the last (their reasons are in
-- outbox.dead_letters).
CREATE VIEW outbox.dead_letter_summary AS
SELECT d.source, d.topic, pg_catalog.count(*) AS dead_letters,
       pg_catalog.min(d.created_at) AS first_at, pg_catalog.max(d.created_at) AS last_at
  FROM outbox.dead_letters d
 GROUP BY d.source, d.topic;
COMMENT ON VIEW outbox.dead_letter_summary IS 'pg_outbox: dead letters per source and topic';
