-- pg_outbox SQL edition: the functions the C extension implements in Rust (src/outbox.rs,
-- src/inbox.rs, src/gucs.rs), in PL/pgSQL, for PostgreSQL where no C extension can be installed.
-- scripts/sql-edition.sh puts it between bootstrap.sql and outbox.sql into sql-edition/pg_outbox.sql.
--
-- Invariants (the same as the C extension's; tests/tests/outbox.rs, inbox.rs and trust.rs run
-- against both editions):
-- - The envelope is byte for byte the C extension's (envelope/src/lib.rs), sealed with the same
--   key (outbox.auth_key) and the same HMAC-SHA256 over the top-level transaction id and the
--   envelope, so the relay cannot tell the editions apart.
-- - The entry points are SECURITY DEFINER, owned by the role that installed the edition (which
--   need not be a superuser), with a pinned search_path: a caller needs EXECUTE (outbox_writer)
--   and gets no other way to write an event; it can read neither outbox.auth_key nor
--   outbox.events. The helpers below are not granted to anyone (grants.sql revokes every function
--   of the schema from PUBLIC and grants only the entry points).
-- - Validation comes before any write, with the C extension's SQLSTATEs and checks in the same
--   order: payload NULL (22004), headers (22023), topic (22004, 22023), record size (54000),
--   envelope limits (22023), then the wal-mode prerequisites (55000).
-- - Settings: pg_outbox.mode and pg_outbox.trace_context as in the C extension; the others
--   (max_payload_bytes, slot_name, inbox_dedup_window, inbox_max_attempts) are read the same way,
--   but without the library PostgreSQL cannot restrict who sets them (docs/sql-edition.md).

-- Settings read inline, with the C extension's default when not set (inbox_consumer has no USAGE
-- on schema outbox, so the inbox's helpers cannot call one in it).
CREATE FUNCTION outbox._slot_name() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT coalesce(nullif(pg_catalog.current_setting('pg_outbox.slot_name', true), ''), 'pg_outbox') $$;

CREATE FUNCTION inbox._dedup_window_seconds() RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.floor(pg_catalog.date_part('epoch',
              (coalesce(nullif(pg_catalog.current_setting('pg_outbox.inbox_dedup_window', true), ''),
                        '604800') COLLATE "C")::interval))::integer $$;

CREATE FUNCTION inbox._max_attempts() RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT coalesce(nullif(pg_catalog.current_setting('pg_outbox.inbox_max_attempts', true), ''),
                      '5')::integer $$;

CREATE FUNCTION outbox._refuse(code text, message text, hint text) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = 'pg_outbox: ' || message, HINT = hint;
END
$$;

-- The helpers of the hot path below have no SET clause: they run only inside the entry points
-- (outbox.enqueue*, SECURITY DEFINER), which pin search_path, and nobody else may call them. A SET
-- clause on each would cost every enqueue a setting save and restore per call.

-- Header pairs as the envelope carries them: names in byte order, values as bytes (a string's
-- UTF-8, a number's or boolean's jsonb text). Refuses what the C extension refuses, in its order.
CREATE FUNCTION outbox._header_pairs(headers jsonb, OUT names text[], OUT vals bytea[])
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
DECLARE
    reserved text;
    bad text;
    bad_kind text;
BEGIN
    IF headers IS NULL OR headers = '{}'::jsonb OR jsonb_typeof(headers) = 'null' THEN
        names := '{}';
        vals := '{}';
        RETURN;
    END IF;
    IF jsonb_typeof(headers) <> 'object' THEN
        PERFORM outbox._refuse('22023', 'headers must be a JSON object, got '
                || CASE jsonb_typeof(headers) WHEN 'array' THEN 'an array' WHEN 'string' THEN 'a string'
                                              WHEN 'boolean' THEN 'a boolean' ELSE 'a number' END,
            'Pass headers as ''{"name": "value"}''::jsonb.');
    END IF;
    SELECT array_agg(h.key ORDER BY h.key COLLATE "C"),
           array_agg(convert_to(h.value #>> '{}', 'UTF8') ORDER BY h.key COLLATE "C"),
           min(h.key COLLATE "C") FILTER (WHERE lower(substr(h.key, 1, 10) COLLATE "C") = 'pg_outbox-'),
           min(h.key COLLATE "C") FILTER (WHERE jsonb_typeof(h.value) NOT IN ('string', 'number', 'boolean'))
      INTO names, vals, reserved, bad
      FROM jsonb_each(headers) h;
    IF reserved IS NOT NULL THEN
        PERFORM outbox._refuse('22023', format('header "%s" is reserved for the relay', reserved),
            'Header names beginning with pg_outbox- are written by the relay only; '
            'rename the header (for example x-original-id when forwarding one).');
    END IF;
    IF bad IS NOT NULL THEN
        bad_kind := jsonb_typeof(headers -> bad);
        PERFORM outbox._refuse('22023', format('header "%s" is %s; header values must be strings, numbers or booleans',
                bad, CASE bad_kind WHEN 'array' THEN 'an array' WHEN 'object' THEN 'an object' ELSE 'null' END),
            'Encode structured values as a JSON string.');
    END IF;
END
$$;

-- The topic, or the C extension's refusal of it (envelope crate, validate_topic).
CREATE FUNCTION outbox._check_topic(topic text) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    why text;
    bad text;
BEGIN
    -- (a bounded repetition in the pattern would cost every call more than the rest of the check)
    IF topic ~ '^[a-zA-Z0-9._-]+$' AND octet_length(topic) <= 249 AND topic NOT IN ('.', '..') THEN
        RETURN;
    END IF;
    IF topic IS NULL THEN
        PERFORM outbox._refuse('22004', 'topic must not be NULL', 'Pass the Kafka topic the event belongs to, e.g. ''orders''.');
    END IF;
    bad := substring(topic from '[^a-zA-Z0-9._-]');
    IF topic = '' THEN
        why := 'topic must not be empty';
    ELSIF bad IS NOT NULL THEN
        why := format('topic contains %L at byte %s; Kafka allows only ASCII letters, digits, ''.'', ''_'' and ''-''',
                      bad, octet_length(split_part(topic, bad, 1)));
    ELSIF octet_length(topic) > 249 THEN
        why := format('topic is %s bytes long, Kafka allows at most 249', octet_length(topic));
    ELSE
        why := 'topic must not be "." or ".."';
    END IF;
    PERFORM outbox._refuse('22023', 'invalid topic: ' || why,
        'Topic names are 1 to 249 characters of [a-zA-Z0-9._-], as Kafka requires.');
END
$$;

-- pg_outbox.max_payload_bytes bounds the whole record, then the envelope's own limits.
CREATE FUNCTION outbox._check_event(max bigint, payload_len bigint, key_len bigint, names text[],
                                    header_bytes bigint, trace text) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    len bigint := payload_len + key_len + header_bytes;
    n text;
    why text;
BEGIN
    IF len > max THEN
        PERFORM outbox._refuse('54000', format('event is %s bytes (payload %s, key %s, headers %s), '
                'pg_outbox.max_payload_bytes allows %s', len, payload_len, key_len, header_bytes, max),
            'Send a smaller payload (e.g. a reference to the data), or have a superuser raise '
            'pg_outbox.max_payload_bytes together with the broker''s message.max.bytes.');
    END IF;
    IF key_len > 1048576 THEN
        why := format('key is %s bytes long, the envelope allows at most 1048576', key_len);
    ELSIF cardinality(names) > 1024 THEN
        why := format('%s headers given, the envelope allows at most 1024', cardinality(names));
    ELSE
        FOREACH n IN ARRAY names LOOP
            IF n = '' THEN
                why := 'header name must not be empty';
            ELSIF octet_length(convert_to(n, 'UTF8')) > 1024 THEN
                why := format('header name is %s bytes long, the envelope allows at most 1024',
                              octet_length(convert_to(n, 'UTF8')));
            END IF;
            EXIT WHEN why IS NOT NULL;
        END LOOP;
    END IF;
    IF why IS NULL AND octet_length(convert_to(trace, 'UTF8')) > 1024 THEN
        why := format('trace context is %s bytes long, the envelope allows at most 1024',
                      octet_length(convert_to(trace, 'UTF8')));
    ELSIF why IS NULL AND payload_len > 1073741823 THEN
        why := format('payload is %s bytes long, the envelope allows at most 1073741823', payload_len);
    END IF;
    IF why IS NOT NULL THEN
        PERFORM outbox._refuse('22023', 'event cannot be encoded: ' || why,
            'See README.md, "Envelope format", for the limits.');
    END IF;
END
$$;

-- wal mode writes nothing that a slot would not retain (as src/outbox.rs, check_wal_ready).
-- The C extension's cached sealing key is dropped when a rotation commits; this edition reads the
-- key in every call and caches nothing.
CREATE FUNCTION outbox._auth_keys_changed() RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT $$;

CREATE FUNCTION outbox._check_wal_ready(sn text) RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
AS $$
DECLARE
    s record;
    db text;
BEGIN
    IF current_setting('wal_level') <> 'logical' THEN
        PERFORM outbox._refuse('55000', 'wal mode needs wal_level = logical',
            'Set wal_level = logical in postgresql.conf and restart PostgreSQL, or use SET pg_outbox.mode = ''table''.');
    END IF;
    -- this database's oid, looked up once per session (pg_outbox._database: 'name oid')
    db := current_setting('pg_outbox._database', true);
    IF db IS NULL OR NOT starts_with(db, current_database() || ' ') THEN
        SELECT current_database() || ' ' || d.oid INTO db FROM pg_database d WHERE d.datname = current_database();
        PERFORM set_config('pg_outbox._database', db, false);
    END IF;
    SELECT r.restart_lsn, r.confirmed_flush_lsn, r.wal_status INTO s
      FROM pg_get_replication_slots() r
     WHERE r.slot_name = sn AND r.datoid = substr(db, length(current_database()) + 2)::oid;
    IF NOT FOUND THEN
        PERFORM outbox._refuse('55000', format('replication slot "%s" does not exist in this database, '
                'so a wal-mode event would not be retained', sn),
            'Run CALL outbox.setup(); (or start the relay, which sets it up), or use SET pg_outbox.mode = ''table''. '
            'A slot that existed before and was dropped is re-created only by SELECT * FROM outbox.recreate_slot(''<why>'').');
    END IF;
    IF s.restart_lsn IS NULL OR s.confirmed_flush_lsn IS NULL OR s.wal_status = 'lost' THEN
        PERFORM outbox._refuse('55000', format('replication slot "%s" is not usable (being created or invalidated)', sn),
            'Wait for slot creation to finish. An invalidated slot: check which events were not '
            'yet published, then SELECT * FROM outbox.recreate_slot(''<why>'').');
    END IF;
END
$$;

-- Validates every event (the same rules in both modes), then writes them all where pg_outbox.mode
-- says; returns the new ids in input order. The body of every entry point below.
--
-- wal mode: the envelope (version 1, envelope/src/lib.rs) of each event, sealed: flag bit 3 set
-- (and, for a key after the first, flag bit 4 and the key id) and the tag appended, HMAC-SHA256 (RFC 2104, with PostgreSQL's sha256: no pgcrypto) under
-- outbox.auth_key of the full top-level transaction id (8 bytes: epoch and xid) and the envelope.
--
-- Event ids are UUIDv7 (RFC 9562): the Unix time in milliseconds, then 74 random bits; within one
-- millisecond (or if the clock steps back) the session's previous id is counted up instead, so a
-- session's ids increase, as the C extension's do. The last id is kept in pg_outbox.last_event_id,
-- which the writer can set: so it is counted up only while its time is at most one second ahead of
-- the clock (a clock that stepped back). Any other value is ignored, so a writer can never make
-- an id that exists already (every existing id is older than the clock) nor run its ids ahead.
CREATE FUNCTION outbox._enqueue(topic text, keys text[], payloads bytea[], payload_is_json boolean,
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

CREATE FUNCTION outbox._null_payload() RETURNS void
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT outbox._refuse('22004', 'payload must not be NULL',
                            'Pass an empty object ''{}'' (or '''' for bytes) for an event without data.') $$;

CREATE FUNCTION outbox.enqueue(topic text, key text, payload jsonb, headers jsonb) RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF payload IS NULL THEN
        PERFORM outbox._null_payload();
    END IF;
    RETURN (outbox._enqueue(topic, ARRAY[key], ARRAY[convert_to(payload::text, 'UTF8')], true, headers))[1];
END
$$;

CREATE FUNCTION outbox.enqueue(topic text, key text, payload jsonb) RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF payload IS NULL THEN
        PERFORM outbox._null_payload();
    END IF;
    RETURN (outbox._enqueue(topic, ARRAY[key], ARRAY[convert_to(payload::text, 'UTF8')], true, NULL))[1];
END
$$;

CREATE FUNCTION outbox.enqueue_bytes(topic text, key text, payload bytea, headers jsonb DEFAULT '{}')
RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF payload IS NULL THEN
        PERFORM outbox._null_payload();
    END IF;
    RETURN (outbox._enqueue(topic, ARRAY[key], ARRAY[payload], false, headers))[1];
END
$$;
COMMENT ON FUNCTION outbox.enqueue_bytes(text, text, bytea, jsonb) IS
    'Enqueue an opaque-bytes event in the current transaction; returns its UUIDv7 event id';

CREATE FUNCTION outbox._enqueue_batch_json(topic text, keys text[], payloads text[], headers jsonb)
RETURNS uuid[]
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer := coalesce(cardinality(payloads), 0);
BEGIN
    IF payloads IS NULL THEN
        PERFORM outbox._null_payload();
    END IF;
    IF keys IS NOT NULL AND cardinality(keys) <> n THEN
        PERFORM outbox._refuse('22023', format('%s keys but %s payloads', cardinality(keys), n),
            'keys and payloads are matched by position; pass arrays of the same length (keys may be NULL).');
    END IF;
    IF array_position(payloads, NULL) IS NOT NULL THEN
        PERFORM outbox._null_payload();
    END IF;
    RETURN outbox._enqueue(topic,
                           coalesce(ARRAY(SELECT unnest(keys)), array_fill(NULL::text, ARRAY[n])),
                           ARRAY(SELECT convert_to(p, 'UTF8') FROM unnest(payloads) WITH ORDINALITY AS u(p, o) ORDER BY o),
                           true, headers);
END
$$;
