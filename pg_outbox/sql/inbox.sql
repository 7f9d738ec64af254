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

-- The operator's way on after a topic was deleted and created again (the ingest stops then): forgets
-- the consumer's offsets and the topic's recorded identity, so the next ingest reads the topic from its
-- beginning (message ids keep what was recorded before from being recorded twice). Returns the number
-- of partitions whose offset was forgotten.
CREATE FUNCTION inbox.forget_topic(consumer text, topic text) RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    forgotten bigint;
BEGIN
    PERFORM inbox._check_consumer(consumer);
    IF topic IS NULL OR topic = '' THEN
        RAISE EXCEPTION 'pg_outbox: topic must not be empty'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Name the topic whose offsets to forget.';
    END IF;
    DELETE FROM inbox.topics t WHERE t.consumer = forget_topic.consumer AND t.topic = forget_topic.topic;
    DELETE FROM inbox.offsets o WHERE o.consumer = forget_topic.consumer AND o.topic = forget_topic.topic;
    GET DIAGNOSTICS forgotten = ROW_COUNT;
    RETURN forgotten;
END
$$;

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

-- The one rule for putting Kafka messages into a consumer's queue, behind inbox.deliver (one message)
-- and inbox.deliver_batch (many). The arrays are matched by position; keys, headers, payloads and
-- dead_reasons may be NULL, meaning NULL for every message. A message whose (consumer, topic, message
-- id) is already queued, also earlier in the same arrays, is skipped; one with a dead reason goes straight
-- into the dead-letter state with that reason as last_error. Returns how many messages were new.
CREATE FUNCTION inbox._queue_messages(consumer text, message_ids text[], topics text[],
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

-- Puts one Kafka message into the consumer's queue; false if that message id was already there.
-- With dead_reason, the message is recorded straight in the dead-letter state (poison input).
CREATE FUNCTION inbox.deliver(consumer text, message_id text, topic text, partition integer,
                              "offset" bigint, key text, payload bytea, headers jsonb DEFAULT '{}',
                              dead_reason text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT inbox._queue_messages(deliver.consumer, ARRAY[deliver.message_id], ARRAY[deliver.topic],
                                 ARRAY[deliver.partition], ARRAY[deliver."offset"], ARRAY[deliver.key],
                                 ARRAY[deliver.headers], ARRAY[deliver.payload],
                                 ARRAY[deliver.dead_reason]) = 1
$$;

-- The ingest's write, one call per batch: queues the messages like inbox.deliver and stores each
-- topic/partition's next offset (its highest offset + 1) with inbox.store_offset, so an offset never
-- goes backwards; both in the caller's transaction, so they commit together. The arrays are matched
-- by position; keys, headers, payloads and dead_reasons may be NULL (NULL for every message).
-- Returns how many messages were new (duplicates are not counted).
CREATE FUNCTION inbox.deliver_batch(consumer text, message_ids text[], topics text[],
                                    partitions integer[], offsets bigint[], keys text[],
                                    headers jsonb[], payloads bytea[], dead_reasons text[])
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    queued bigint;
    p record;
BEGIN
    IF partitions IS NULL OR offsets IS NULL
       OR array_position(partitions, NULL) IS NOT NULL OR array_position(offsets, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'pg_outbox: partitions and offsets must not be or contain NULL'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'deliver_batch stores each partition''s next offset: pass the Kafka partition and offset of every message (inbox.deliver queues a message without them).';
    END IF;
    queued := inbox._queue_messages(consumer, message_ids, topics, partitions, offsets, keys, headers,
                                    payloads, dead_reasons);
    -- in a fixed order, so that two writers of one consumer lock the offset rows alike
    FOR p IN SELECT m.topic, m.partition, max(m.off) + 1 AS next_offset
               FROM unnest(deliver_batch.topics, deliver_batch.partitions, deliver_batch.offsets)
                    AS m(topic, partition, off)
              GROUP BY m.topic, m.partition
              ORDER BY m.topic COLLATE "C", m.partition LOOP
        PERFORM inbox.store_offset(consumer, p.topic, p.partition, p.next_offset);
    END LOOP;
    RETURN queued;
END
$$;
COMMENT ON FUNCTION inbox.deliver_batch(text, text[], text[], integer[], bigint[], text[], jsonb[], bytea[], text[]) IS
    'Queue a batch of Kafka messages for a consumer and store each partition''s next offset, in the caller''s transaction; returns how many messages were new';

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
       SET status = 'processing', attempts = m.attempts + 1, visible_at = now() + lease,
           claim_token = pg_catalog.gen_random_uuid()
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

-- Only the current claim may finish a message: a worker whose lease expired, and whose message another
-- worker claimed since, gets an error, so that its transaction (business writes included) rolls back.
CREATE FUNCTION inbox._not_claimed(id bigint) RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'pg_outbox: inbox message % is not held by this claim', id
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'Its lease expired and another worker claimed it, or it was never claimed, or it is '
                     'finished: roll back this transaction. Pass the claim_token that inbox.claim returned.';
END
$$;

CREATE FUNCTION inbox.complete(id bigint, claim_token uuid)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    UPDATE inbox.messages m SET status = 'done', completed_at = now(), last_error = NULL, claim_token = NULL
     WHERE m.id = complete.id AND m.status = 'processing' AND m.claim_token = complete.claim_token;
    IF NOT FOUND THEN
        PERFORM inbox._not_claimed(id);
    END IF;
    RETURN true;
END
$$;

-- Records a failed attempt: back to pending after retry_in, or dead once attempts are used up.
CREATE FUNCTION inbox.fail(id bigint, claim_token uuid, reason text, retry_in interval DEFAULT '10 seconds')
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
           last_error = coalesce(reason, 'failed'), claim_token = NULL,
           visible_at = now() + greatest(coalesce(retry_in, interval '0'), interval '0')
     WHERE m.id = fail.id AND m.status = 'processing' AND m.claim_token = fail.claim_token
    RETURNING m.status INTO new_status;
    IF NOT FOUND THEN
        PERFORM inbox._not_claimed(id);
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
