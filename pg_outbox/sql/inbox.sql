-- pg_outbox inbox: SQL functions of schema inbox (dedup, offsets, the ingest queue and its workers).
-- Runs after outbox.sql (its NOTIFY trigger function) and the Rust settings functions it calls.
-- Every function pins search_path and names every object with its schema; nothing here builds
-- dynamic SQL.

CREATE TRIGGER messages_notify AFTER INSERT ON inbox.messages
    FOR EACH STATEMENT EXECUTE FUNCTION outbox._notify('pg_outbox_inbox');

CREATE FUNCTION inbox._check_consumer(consumer text) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF consumer IS NULL THEN
        RAISE EXCEPTION 'pg_outbox: consumer must not be NULL'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Name the consuming service, e.g. ''billing''.';
    ELSIF consumer = '' OR length(consumer) > 200 THEN
        RAISE EXCEPTION 'pg_outbox: consumer must be 1 to 200 characters'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Name the consuming service, e.g. ''billing''.';
    END IF;
END
$$;

-- True exactly once per (consumer, message_id) among committed transactions: a concurrent caller
-- with the same pair waits on the unique index and then sees false (or true if the first rolled back).
CREATE FUNCTION inbox.try_receive(consumer text, message_id text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    inserted boolean;
BEGIN
    PERFORM inbox._check_consumer(consumer);
    IF message_id IS NULL OR message_id = '' THEN
        RAISE EXCEPTION 'pg_outbox: message_id must not be NULL or empty'
            USING ERRCODE = CASE WHEN message_id IS NULL THEN 'null_value_not_allowed'
                                 ELSE 'invalid_parameter_value' END,
                  HINT = 'Pass the event id (the pg_outbox-id header), or topic/partition/offset.';
    END IF;
    INSERT INTO inbox.received AS r (consumer, message_id)
    VALUES (try_receive.consumer, try_receive.message_id)
    ON CONFLICT DO NOTHING
    RETURNING true INTO inserted;
    RETURN coalesce(inserted, false);
END
$$;

CREATE FUNCTION inbox.try_receive(consumer text, message_id uuid)
RETURNS boolean
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT inbox.try_receive(consumer, message_id::text) $$;

-- Stores the next offset to read; refuses to move backwards unless forced (a rewind is deliberate).
CREATE FUNCTION inbox.store_offset(consumer text, topic text, partition integer, next_offset bigint,
                                   force boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    previous bigint;
BEGIN
    PERFORM inbox._check_consumer(consumer);
    IF topic IS NULL OR partition IS NULL OR next_offset IS NULL THEN
        RAISE EXCEPTION 'pg_outbox: topic, partition and next_offset must not be NULL'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass the Kafka coordinates of the next message to read.';
    END IF;
    IF partition < 0 OR next_offset < 0 THEN
        RAISE EXCEPTION 'pg_outbox: partition and next_offset must not be negative'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Store the offset of the next message to read.';
    END IF;
    SELECT o.next_offset INTO previous FROM inbox.offsets o
     WHERE o.consumer = store_offset.consumer AND o.topic = store_offset.topic
       AND o.partition = store_offset.partition
       FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO inbox.offsets (consumer, topic, partition, next_offset)
        VALUES (store_offset.consumer, store_offset.topic, store_offset.partition, store_offset.next_offset)
        ON CONFLICT ON CONSTRAINT offsets_pkey DO NOTHING;
        IF FOUND THEN
            RETURN NULL;
        END IF;
        -- a concurrent first store won the insert: lock its row and compare like any update
        SELECT o.next_offset INTO previous FROM inbox.offsets o
         WHERE o.consumer = store_offset.consumer AND o.topic = store_offset.topic
           AND o.partition = store_offset.partition
           FOR UPDATE;
    END IF;
    IF next_offset < previous AND NOT force THEN
        RAISE EXCEPTION 'pg_outbox: offset for consumer "%" on %[%] would go backwards from % to %',
                        consumer, topic, partition, previous, next_offset
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Offsets only move forward; pass force => true to rewind deliberately.';
    END IF;
    UPDATE inbox.offsets o SET next_offset = store_offset.next_offset, updated_at = now()
     WHERE o.consumer = store_offset.consumer AND o.topic = store_offset.topic
       AND o.partition = store_offset.partition;
    RETURN previous;
END
$$;
COMMENT ON FUNCTION inbox.store_offset(text, text, integer, bigint, boolean) IS
    'Store a consumer''s next offset for a partition in the caller''s transaction; returns the previous one';

CREATE FUNCTION inbox.get_offset(consumer text, topic text, partition integer)
RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT o.next_offset FROM inbox.offsets o
     WHERE o.consumer = get_offset.consumer AND o.topic = get_offset.topic
       AND o.partition = get_offset.partition
$$;

CREATE FUNCTION inbox.get_offsets(consumer text, topic text)
RETURNS TABLE (partition integer, next_offset bigint)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT o.partition, o.next_offset FROM inbox.offsets o
     WHERE o.consumer = get_offsets.consumer AND o.topic = get_offsets.topic
     ORDER BY o.partition
$$;

-- Puts one Kafka message into the consumer's queue; false if that message id was already there.
-- With dead_reason, the message is recorded straight in the dead-letter state (poison input).
CREATE FUNCTION inbox.deliver(consumer text, message_id text, topic text, partition integer,
                              "offset" bigint, key text, payload bytea, headers jsonb DEFAULT '{}',
                              dead_reason text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    inserted boolean;
BEGIN
    PERFORM inbox._check_consumer(consumer);
    IF message_id IS NULL OR message_id = '' OR topic IS NULL THEN
        RAISE EXCEPTION 'pg_outbox: message_id and topic must be given'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Use topic/partition/offset as the id when the message has none.';
    END IF;
    INSERT INTO inbox.messages (consumer, message_id, topic, partition, "offset", key, headers, payload,
                                status, last_error)
    VALUES (deliver.consumer, deliver.message_id, deliver.topic, deliver.partition, deliver."offset",
            deliver.key, coalesce(deliver.headers, '{}'), deliver.payload,
            CASE WHEN dead_reason IS NULL THEN 'pending' ELSE 'dead' END, dead_reason)
    ON CONFLICT (consumer, message_id) DO NOTHING
    RETURNING true INTO inserted;
    RETURN coalesce(inserted, false);
END
$$;

-- Hands up to n visible messages to the caller and hides them for the lease. A message whose lease
-- expired (its worker died) becomes visible again; one that used up its attempts is dead-lettered.
-- With per_key, only the oldest unfinished message of each key can be claimed, so a key is never
-- handed to two workers at once and its messages are processed in order.
CREATE FUNCTION inbox.claim(consumer text, n integer DEFAULT 10, lease interval DEFAULT '30 seconds',
                            per_key boolean DEFAULT false)
RETURNS SETOF inbox.messages
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    max_attempts integer := inbox._max_attempts();
BEGIN
    PERFORM inbox._check_consumer(consumer);
    IF n IS NULL OR n < 1 OR lease IS NULL OR lease <= interval '0' THEN
        RAISE EXCEPTION 'pg_outbox: n must be at least 1 and lease positive'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'e.g. inbox.claim(''billing'', 10, ''30 seconds'')';
    END IF;
    UPDATE inbox.messages m
       SET status = 'dead', last_error = 'lease expired after ' || m.attempts || ' attempts'
     WHERE m.id IN (SELECT c.id FROM inbox.messages c
                     WHERE c.consumer = claim.consumer AND c.status = 'processing'
                       AND c.visible_at <= now() AND c.attempts >= max_attempts
                       FOR UPDATE SKIP LOCKED);
    RETURN QUERY
    UPDATE inbox.messages m
       SET status = 'processing', attempts = m.attempts + 1, visible_at = now() + lease
     WHERE m.id IN (SELECT c.id FROM inbox.messages c
                     WHERE c.consumer = claim.consumer AND c.status IN ('pending', 'processing')
                       AND c.visible_at <= now()
                       AND (NOT per_key OR c.key IS NULL OR NOT EXISTS (
                             SELECT FROM inbox.messages e
                              WHERE e.consumer = c.consumer AND e.key = c.key AND e.id < c.id
                                AND e.status IN ('pending', 'processing')))
                     ORDER BY c.id
                     LIMIT n
                       FOR UPDATE SKIP LOCKED)
    RETURNING m.*;
END
$$;

CREATE FUNCTION inbox.complete(id bigint)
RETURNS boolean
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE inbox.messages m SET status = 'done', completed_at = now(), last_error = NULL
     WHERE m.id = complete.id AND m.status = 'processing'
    RETURNING true
$$;

-- Records a failed attempt: back to pending after retry_in, or dead once attempts are used up.
CREATE FUNCTION inbox.fail(id bigint, reason text, retry_in interval DEFAULT '10 seconds')
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_status text;
BEGIN
    UPDATE inbox.messages m
       SET status = CASE WHEN m.attempts >= inbox._max_attempts() THEN 'dead' ELSE 'pending' END,
           last_error = coalesce(reason, 'failed'),
           visible_at = now() + greatest(coalesce(retry_in, interval '0'), interval '0')
     WHERE m.id = fail.id AND m.status = 'processing'
    RETURNING m.status INTO new_status;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pg_outbox: inbox message % is not being processed', id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only a claimed message can fail; claim it with inbox.claim first.';
    END IF;
    RETURN new_status;
END
$$;

-- Deletes dedup records that can no longer be needed: older than the window, and, for ingested
-- messages, below the consumer's stored offset (so the ingest cannot read them again). Pending,
-- processing and dead messages are never purged. Returns the number of rows removed.
CREATE FUNCTION inbox.purge(consumer text, older_than interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    min_window interval := make_interval(secs => inbox._dedup_window_seconds());
    keep interval := coalesce(older_than, min_window);
    removed bigint;
    more bigint;
BEGIN
    PERFORM inbox._check_consumer(consumer);
    IF keep < min_window THEN
        RAISE EXCEPTION 'pg_outbox: older_than % is shorter than pg_outbox.inbox_dedup_window (%)', keep, min_window
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Dedup records younger than the window may still be needed; lower pg_outbox.inbox_dedup_window if you are sure.';
    END IF;
    DELETE FROM inbox.received r
     WHERE r.consumer = purge.consumer AND r.received_at < now() - keep;
    GET DIAGNOSTICS removed = ROW_COUNT;
    DELETE FROM inbox.messages m
     WHERE m.consumer = purge.consumer AND m.status = 'done' AND m.received_at < now() - keep
       AND (m."offset" IS NULL
            OR EXISTS (SELECT FROM inbox.offsets o
                        WHERE o.consumer = m.consumer AND o.topic = m.topic
                          AND o.partition = m.partition AND o.next_offset > m."offset"));
    GET DIAGNOSTICS more = ROW_COUNT;
    RETURN removed + more;
END
$$;
