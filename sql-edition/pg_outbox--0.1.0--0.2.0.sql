-- pg_outbox 0.1.0 -> 0.2.0, SQL edition (CHANGELOG.md, 0.2.0). Run it once, as the role that owns
-- pg_outbox's tables (the one that ran pg_outbox.sql), in one transaction:
--     psql "$DATABASE_URL" -v ON_ERROR_STOP=1 --single-transaction -f pg_outbox--0.1.0--0.2.0.sql
-- Released: never edited again. tests/tests/upgrade.rs checks that a 0.1.0 database with data in
-- every table, updated by this script, has exactly the schema of a fresh 0.2.0 install.

DO $edition$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_outbox') THEN
        RAISE EXCEPTION 'pg_outbox: the C extension is installed in this database'
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Update the C extension with ALTER EXTENSION pg_outbox UPDATE.';
    END IF;
    IF pg_catalog.to_regprocedure('outbox._edition()') IS NULL THEN
        RAISE EXCEPTION 'pg_outbox: the SQL edition is not installed in this database'
            USING ERRCODE = 'undefined_object',
                  HINT = 'Install sql-edition/pg_outbox.sql instead.';
    END IF;
    IF outbox._edition() OPERATOR(pg_catalog.<>) 'sql 0.1.0' THEN
        RAISE EXCEPTION 'pg_outbox: this script updates the SQL edition 0.1.0, not %', outbox._edition()
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Run the upgrade scripts of sql-edition/ in order, from the installed version on.';
    END IF;
END
$edition$;

-- ---------------------------------------------------------------- roles (sql/bootstrap.sql)
-- the ingest's own role: outbox_relay keeps no right on the inbox
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'inbox_ingest') THEN
        BEGIN
            CREATE ROLE inbox_ingest NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$roles$;

-- the monitoring role: SELECT on the monitoring views only
DO $monitor$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'outbox_monitor') THEN
        BEGIN
            CREATE ROLE outbox_monitor NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$monitor$;

-- ---------------------------------------------------------------- tables (sql/bootstrap.sql)
-- sealing keys by id, for rotation (outbox.rotate_auth_key): the one key of 0.1.0 becomes key 1.
-- A new table, so that its columns are a fresh install's
CREATE TABLE outbox.auth_key_by_id (
    key_id     integer     PRIMARY KEY CONSTRAINT auth_key_id_range CHECK (key_id BETWEEN 1 AND 32767),
    key        bytea       NOT NULL CONSTRAINT auth_key_length CHECK (pg_catalog.length(key) = 32),
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
INSERT INTO outbox.auth_key_by_id (key_id, key) SELECT 1, k.key FROM outbox.auth_key k;
DROP TABLE outbox.auth_key;
ALTER TABLE outbox.auth_key_by_id RENAME TO auth_key;
ALTER INDEX outbox.auth_key_by_id_pkey RENAME TO auth_key_pkey;
REVOKE ALL ON outbox.auth_key FROM PUBLIC;
-- the sealing key: row security without a policy hides it from pg_read_all_data and publications
ALTER TABLE outbox.auth_key ENABLE ROW LEVEL SECURITY;

-- the inbox's dedup key is scoped by topic; every row that was unique by (consumer, message_id) is
-- unique by (consumer, topic, message_id)
ALTER TABLE inbox.messages DROP CONSTRAINT messages_consumer_message_id_key;
ALTER TABLE inbox.messages ADD CONSTRAINT messages_consumer_topic_message_id_key UNIQUE (consumer, topic, message_id);

-- poll sources' lock key (outbox._poll_lock_key), and an incarnation stopped because Kafka was ahead
ALTER TABLE outbox.sources ADD COLUMN lock_key bigint;
ALTER TABLE outbox.sources ADD COLUMN stopped text;
ALTER TABLE outbox.sources ADD COLUMN stopped_at timestamptz;
-- the key the relay of each source signs with (outbox.retire_auth_key waits for it to move on)
ALTER TABLE outbox.sources ADD COLUMN signing_key_id integer;
-- the session holding the source, and the last one that stopped cleanly (restart_grace_ms is skipped after it)
ALTER TABLE outbox.sources ADD COLUMN holder uuid;
ALTER TABLE outbox.sources ADD COLUMN handover uuid;

-- ---------------------------------------------------------------- functions (sql/outbox.sql, sql/inbox.sql)
CREATE OR REPLACE FUNCTION outbox.recreate_slot(reason text, slot_name text DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION outbox.new_poll_incarnation(reason text, source_id text DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION inbox._queue_messages(consumer text, message_ids text[], topics text[],
                                      partitions integer[], offsets bigint[], keys text[],
                                      headers jsonb[], payloads bytea[], dead_reasons text[])
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n integer := cardinality(message_ids);
    queued bigint;
BEGIN
    PERFORM inbox._check_consumer(consumer);
    IF message_ids IS NULL OR topics IS NULL THEN
        RAISE EXCEPTION 'pg_outbox: message_ids and topics must not be NULL'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass one message id and one topic per message.';
    END IF;
    IF cardinality(topics) <> n
       OR cardinality(partitions) <> n OR cardinality(offsets) <> n OR cardinality(keys) <> n
       OR cardinality(headers) <> n OR cardinality(payloads) <> n OR cardinality(dead_reasons) <> n THEN
        RAISE EXCEPTION 'pg_outbox: the arrays differ in length (message_ids %, topics %, partitions %, offsets %, keys %, headers %, payloads %, dead_reasons %)',
                        n, cardinality(topics), cardinality(partitions), cardinality(offsets),
                        cardinality(keys), cardinality(headers), cardinality(payloads),
                        cardinality(dead_reasons)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The arrays are matched by position: pass one element per message in each (a NULL element where a message has no key, payload or dead reason).';
    END IF;
    IF EXISTS (SELECT FROM unnest(message_ids, topics) AS m(id, topic)
                WHERE m.id IS NULL OR m.id = '' OR m.topic IS NULL) THEN
        RAISE EXCEPTION 'pg_outbox: message_id and topic must be given'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Use topic/partition/offset as the id when the message has none.';
    END IF;
    INSERT INTO inbox.messages (consumer, message_id, topic, partition, "offset", key, headers, payload,
                                status, last_error)
    -- a key longer than the key index can hold (see inbox.messages' messages_key_idx) would fail
    -- the whole batch, again and again: such a message is kept in the dead state without its key
    SELECT _queue_messages.consumer, m.id, m.topic, m.partition, m.off,
           CASE WHEN m.key_too_long THEN NULL ELSE m.key END,
           coalesce(m.headers, '{}'), m.payload,
           CASE WHEN m.reason IS NULL AND NOT m.key_too_long THEN 'pending' ELSE 'dead' END,
           coalesce(m.reason,
                    CASE WHEN m.key_too_long
                         THEN format('key of %s bytes exceeds the inbox''s limit of 2048 bytes', octet_length(m.key))
                    END)
      FROM (SELECT u.*, coalesce(octet_length(u.key) > 2048, false) AS key_too_long
              FROM unnest(_queue_messages.message_ids, _queue_messages.topics, _queue_messages.partitions,
                          _queue_messages.offsets, _queue_messages.keys, _queue_messages.headers,
                          _queue_messages.payloads, _queue_messages.dead_reasons)
                   AS u(id, topic, partition, off, key, headers, payload, reason)) AS m
    ON CONFLICT (consumer, topic, message_id) DO NOTHING;
    GET DIAGNOSTICS queued = ROW_COUNT;
    RETURN queued;
END
$$;


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

-- Monitoring views (docs/operations.md, "The same numbers in SQL"), read by outbox_monitor: the
-- ingest's stored offsets per partition, and the queue of each consumer.
CREATE VIEW inbox.offset_status AS
SELECT o.consumer, o.topic, o.partition, o.next_offset, o.updated_at,
       pg_catalog.date_part('epoch', pg_catalog.now() OPERATOR(pg_catalog.-) o.updated_at) AS age_seconds
  FROM inbox.offsets o;
COMMENT ON VIEW inbox.offset_status IS
    'pg_outbox: the next offset stored per consumer and partition, and how long ago it moved';

CREATE VIEW inbox.queue_status AS
SELECT m.consumer, m.status, pg_catalog.count(*) AS messages,
       pg_catalog.min(m.received_at) AS oldest_received_at,
       pg_catalog.max(m.attempts) AS max_attempts
  FROM inbox.messages m
 GROUP BY m.consumer, m.status;
COMMENT ON VIEW inbox.queue_status IS
    'pg_outbox: inbox messages per consumer and status (pending, processing, done, dead)';

-- ---------------------------------------------------------------- sealing keys (sql/outbox.sql)
-- The C extension's cached sealing key is dropped when a rotation commits; this edition reads the
-- key in every call and caches nothing.
CREATE FUNCTION outbox._auth_keys_changed() RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT $$;
-- The relay's copy of the sealing keys (outbox.auth_key), for outbox_relay only: SECURITY DEFINER so
-- that the key table itself needs no grant. relay_auth_key() is the newest key alone (relays of
-- 0.1.0 read it); the relay reads every key with relay_auth_keys().
CREATE OR REPLACE FUNCTION outbox.relay_auth_key() RETURNS bytea
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

-- ---------------------------------------------------------------- the SQL edition's functions (pg_outbox/sql/edition.sql)
-- settings are read inline: inbox_consumer has no USAGE on schema outbox
DROP FUNCTION outbox._setting(text, text);
CREATE OR REPLACE FUNCTION outbox._slot_name() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT coalesce(nullif(pg_catalog.current_setting('pg_outbox.slot_name', true), ''), 'pg_outbox') $$;

CREATE OR REPLACE FUNCTION inbox._dedup_window_seconds() RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.floor(pg_catalog.date_part('epoch',
              (coalesce(nullif(pg_catalog.current_setting('pg_outbox.inbox_dedup_window', true), ''),
                        '604800') COLLATE "C")::interval))::integer $$;

CREATE OR REPLACE FUNCTION inbox._max_attempts() RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT coalesce(nullif(pg_catalog.current_setting('pg_outbox.inbox_max_attempts', true), ''),
                      '5')::integer $$;

CREATE OR REPLACE FUNCTION outbox._enqueue(topic text, keys text[], payloads bytea[], payload_is_json boolean,
                                headers jsonb) RETURNS uuid[]
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
AS $$
DECLARE
    h record;
    trace text := nullif(current_setting('pg_outbox.trace_context', true), '');
    trace_bytes bytea := convert_to(trace, 'UTF8');
    header_bytes bigint := 0;
    header_block bytea := ''::bytea;
    max bigint := pg_size_bytes(coalesce(nullif(current_setting('pg_outbox.max_payload_bytes', true), ''), '998976'));
    mode text := lower(coalesce(nullif(current_setting('pg_outbox.mode', true), ''), 'wal'));
    n integer := coalesce(cardinality(payloads), 0);
    headers_ok boolean;
    key_len bigint;
    name_bytes bytea;
    ipad bytea;
    opad bytea;
    seal_key bytea;
    seal_key_id integer;
    seal_suffix bytea;
    xid bytea;
    flags integer;
    at timestamptz;
    ms bigint;
    last bytea := decode(nullif(current_setting('pg_outbox.last_event_id', true), ''), 'hex');
    id bytea;
    key_bytes bytea;
    env bytea;
    ids uuid[] := '{}';
BEGIN
    SELECT * INTO h FROM outbox._header_pairs(headers);
    FOR i IN 1 .. cardinality(h.names) LOOP
        name_bytes := convert_to(h.names[i], 'UTF8');
        header_bytes := header_bytes + octet_length(name_bytes) + octet_length(h.vals[i]);
        header_block := header_block || int2send(least(octet_length(name_bytes), 32767)::int2) || name_bytes
                        || int4send(octet_length(h.vals[i])) || h.vals[i];
    END LOOP;
    IF trace IS NOT NULL THEN
        header_bytes := header_bytes + 11 + octet_length(trace_bytes);  -- 'traceparent'
    END IF;
    -- every event of a call has the same topic and headers; the checks are called only where the
    -- fast test below fails, to raise the C extension's refusal
    IF n > 0 THEN
        PERFORM outbox._check_topic(topic);
    END IF;
    headers_ok := coalesce(octet_length(trace_bytes), 0) <= 1024
                  AND (cardinality(h.names) = 0
                       OR cardinality(h.names) <= 1024
                          AND NOT EXISTS (SELECT FROM unnest(h.names) x
                                           WHERE x = '' OR octet_length(convert_to(x, 'UTF8')) > 1024));
    FOR i IN 1 .. n LOOP
        key_len := coalesce(octet_length(convert_to(keys[i], 'UTF8')), 0);
        IF NOT headers_ok OR key_len > 1048576 OR octet_length(payloads[i]) > 1073741823
           OR octet_length(payloads[i]) + key_len + header_bytes > max THEN
            PERFORM outbox._check_event(max, octet_length(payloads[i]), key_len, h.names, header_bytes, trace);
        END IF;
    END LOOP;
    IF mode = 'wal' THEN
        PERFORM outbox._check_wal_ready(coalesce(nullif(current_setting('pg_outbox.slot_name', true), ''), 'pg_outbox'));
        -- the newest key; a key after the first is named between the envelope and the tag
        SELECT k.key_id, k.key INTO seal_key_id, seal_key FROM outbox.auth_key k ORDER BY k.key_id DESC LIMIT 1;
        seal_suffix := CASE WHEN seal_key_id = 1 THEN ''::bytea ELSE int2send(seal_key_id::int2) END;
        ipad := decode(repeat('36', 64), 'hex');
        opad := decode(repeat('5c', 64), 'hex');
        FOR i IN 0 .. octet_length(seal_key) - 1 LOOP
            ipad := set_byte(ipad, i, get_byte(seal_key, i) # 54);
            opad := set_byte(opad, i, get_byte(seal_key, i) # 92);
        END LOOP;
        xid := int8send(pg_current_xact_id()::text::bigint);  -- the full 64-bit id, as the C extension
        flags := 8 | CASE WHEN payload_is_json THEN 2 ELSE 0 END | CASE WHEN trace IS NULL THEN 0 ELSE 4 END
                 | CASE WHEN seal_key_id = 1 THEN 0 ELSE 16 END;
    ELSIF mode <> 'table' THEN
        PERFORM outbox._refuse('22023', format('pg_outbox.mode is %L', mode),
            'Set pg_outbox.mode to ''wal'' (a logical decoding message) or ''table'' (a row of outbox.events).');
    END IF;
    FOR i IN 1 .. n LOOP
        at := clock_timestamp();
        ms := floor(extract(epoch FROM at) * 1000)::bigint;
        IF octet_length(last) = 16
           AND ('x' || encode(substr(last, 1, 6), 'hex'))::bit(48)::bigint BETWEEN ms AND ms + 1000 THEN
            id := overlay(last placing
                          substr(int8send(('x' || encode(substr(last, 13, 4), 'hex'))::bit(32)::bigint + 1), 5, 4)
                          from 13 for 4);
        ELSE
            id := substr(int8send(ms), 3, 6) || substr(uuid_send(gen_random_uuid()), 7, 10);
            id := set_byte(id, 6, (get_byte(id, 6) & 15) | 112);   -- version 7
            id := set_byte(id, 8, (get_byte(id, 8) & 63) | 128);   -- variant 10
            id := set_byte(id, 12, get_byte(id, 12) & 127);        -- room to count up
        END IF;
        last := id;
        IF mode = 'wal' THEN
            key_bytes := convert_to(keys[i], 'UTF8');
            env := set_byte('\x0100'::bytea, 1, flags | CASE WHEN key_bytes IS NULL THEN 0 ELSE 1 END)
                || id || int8send((extract(epoch FROM at) * 1000000)::bigint)
                || set_byte('\x00'::bytea, 0, octet_length(topic)) || convert_to(topic, 'UTF8')
                || coalesce(int4send(octet_length(key_bytes)) || key_bytes, ''::bytea)
                || int2send(cardinality(h.names)::int2) || header_block
                || coalesce(int2send(octet_length(trace_bytes)::int2) || trace_bytes, ''::bytea)
                || int4send(octet_length(payloads[i])) || payloads[i] || seal_suffix;
            PERFORM pg_logical_emit_message(true, 'pg_outbox',
                                            env || sha256(opad || sha256(ipad || xid || env)));
        ELSE
            INSERT INTO outbox.events (id, topic, key, headers, payload, payload_is_json, trace_context, created_at)
            VALUES (encode(id, 'hex')::uuid, topic, keys[i], coalesce(nullif(headers, 'null'::jsonb), '{}'),
                    payloads[i], payload_is_json, trace, at);
        END IF;
        ids := ids || encode(id, 'hex')::uuid;
    END LOOP;
    IF last IS NOT NULL THEN
        PERFORM set_config('pg_outbox.last_event_id', encode(last, 'hex'), false);
    END IF;
    RETURN ids;
END
$$;

-- ---------------------------------------------------------------- grants (sql/grants.sql)
REVOKE ALL ON FUNCTION outbox.relay_auth_keys(), outbox.rotate_auth_key(),
                       outbox.retire_auth_key(integer, interval, boolean), outbox._auth_keys_changed() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.relay_auth_keys() TO outbox_relay;
-- outbox.setup was executable by PUBLIC (procedures are not in ALL FUNCTIONS)
REVOKE ALL ON ALL PROCEDURES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA inbox FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox._poll_lock_key(text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox._poll_lock_key(text, bigint) TO outbox_relay;

-- the ingest's rights move from outbox_relay to inbox_ingest
REVOKE ALL ON SCHEMA inbox FROM outbox_relay, inbox_consumer;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA inbox FROM outbox_relay;
REVOKE ALL ON ALL TABLES IN SCHEMA inbox FROM outbox_relay;
GRANT USAGE ON SCHEMA inbox TO inbox_ingest, inbox_consumer;
GRANT EXECUTE ON FUNCTION inbox._check_consumer(text),
                          inbox.deliver(text, text, text, integer, bigint, text, bytea, jsonb, text),
                          inbox.deliver_batch(text, text[], text[], integer[], bigint[], text[], jsonb[],
                                              bytea[], text[]),
                          inbox._queue_messages(text, text[], text[], integer[], bigint[], text[], jsonb[],
                                                bytea[], text[]),
                          inbox.store_offset(text, text, integer, bigint, boolean),
                          inbox.get_offset(text, text, integer),
                          inbox.get_offsets(text, text)
      TO inbox_ingest;
GRANT SELECT, INSERT ON inbox.messages TO inbox_ingest;
GRANT SELECT, INSERT, UPDATE ON inbox.offsets TO inbox_ingest;
GRANT SELECT, INSERT ON inbox.topics TO inbox_ingest;
-- inbox.forget_topic
GRANT DELETE ON inbox.offsets TO inbox_consumer;

-- Monitoring: the views only (docs/operations.md, "The same numbers in SQL"); no table, payload or
-- key.
GRANT USAGE ON SCHEMA outbox, inbox TO outbox_monitor;
GRANT SELECT ON outbox.source_status, outbox.table_backlog, outbox.dead_letter_summary,
                inbox.offset_status, inbox.queue_status, outbox.sealing_keys
      TO outbox_monitor;

-- ---------------------------------------------------------------- edition marker
CREATE OR REPLACE FUNCTION outbox._edition() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'sql 0.2.0' $$;
COMMENT ON FUNCTION outbox._edition() IS 'pg_outbox SQL edition 0.2.0';
REVOKE ALL ON FUNCTION outbox._edition() FROM PUBLIC;
