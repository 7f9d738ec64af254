-- pg_outbox bootstrap: schemas, tables and roles. Runs before the Rust functions are created.

CREATE SCHEMA IF NOT EXISTS outbox;
CREATE SCHEMA IF NOT EXISTS inbox;
COMMENT ON SCHEMA outbox IS 'pg_outbox: events written atomically with the business transaction';
COMMENT ON SCHEMA inbox IS 'pg_outbox: deduplicating inbox, consumer offsets and the ingest queue';

-- Roles are cluster-wide and outlive the extension; create them once, quietly.
-- (PostgreSQL reserves role names starting with pg_, hence outbox_/inbox_.)
-- CREATE EXTENSION may run concurrently in several databases of a fresh cluster: a role created by
-- the other session meanwhile is fine.
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['outbox_writer', 'outbox_relay', 'inbox_consumer', 'inbox_ingest', 'outbox_monitor'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$roles$;

-- table mode: one row per event, removed by the relay once Kafka acknowledged it.
-- xid is the writing transaction; the poll source uses it with the snapshot horizon so that it never
-- skips a row of a transaction still in flight.
CREATE TABLE outbox.events (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              uuid        NOT NULL,
    xid             xid8        NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    topic           text        NOT NULL
                    CONSTRAINT events_topic_check
                    CHECK (topic ~ '^[a-zA-Z0-9._-]{1,249}$' AND topic NOT IN ('.', '..')),
    key             text,
    headers         jsonb       NOT NULL DEFAULT '{}'
                    CONSTRAINT events_headers_check CHECK (pg_catalog.jsonb_typeof(headers) = 'object'),
    payload         bytea       NOT NULL,
    payload_is_json boolean     NOT NULL DEFAULT false,
    trace_context   text,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
COMMENT ON TABLE outbox.events IS 'pg_outbox table mode: events not yet published by the relay';
-- the poll source reads below the snapshot horizon in (xid, seq) order
CREATE INDEX events_xid_seq_idx ON outbox.events (xid, seq);

-- wal mode: the secret that seals every message outbox.enqueue writes (HMAC-SHA256 over the
-- transaction id and the envelope, see the envelope crate), so that the relay publishes no message
-- that another role wrote with pg_logical_emit_message. Keys per database, made from PostgreSQL's
-- strong random source (gen_random_uuid: 2 x 122 random bits): key 1 at CREATE EXTENSION, the next
-- by CALL outbox.rotate_auth_key(). enqueue seals with the newest; the relay accepts every key
-- still here; outbox.retire_auth_key removes an older one once nothing sealed with it can still be
-- in flight. No role but the owner may read them: enqueue reads them as the owner, the relay
-- through outbox.relay_auth_keys().
CREATE TABLE outbox.auth_key (
    key_id     integer     PRIMARY KEY CONSTRAINT auth_key_id_range CHECK (key_id BETWEEN 1 AND 32767),
    key        bytea       NOT NULL CONSTRAINT auth_key_length CHECK (pg_catalog.length(key) = 32),
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
INSERT INTO outbox.auth_key (key_id, key)
SELECT 1, pg_catalog.decode(pg_catalog.substr(pg_catalog.replace(
           pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text, '-', ''), 1, 64), 'hex');
REVOKE ALL ON outbox.auth_key FROM PUBLIC;
-- Row security without a policy: nobody but the owner (and superusers) sees the row, whatever
-- table privilege they hold. That keeps the key from members of pg_read_all_data (which does not
-- bypass row security) and from the initial copy of a FOR ALL TABLES publication by a role without
-- BYPASSRLS, which fails instead of copying it.
ALTER TABLE outbox.auth_key ENABLE ROW LEVEL SECURITY;

-- inbox.try_receive: one row per (consumer, message id) ever received, kept for the dedup window.
CREATE TABLE inbox.received (
    consumer    text        NOT NULL,
    message_id  text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (consumer, message_id)
);

-- A consumer's next Kafka offset per topic/partition, written in the consumer's transaction.
CREATE TABLE inbox.offsets (
    consumer    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL CHECK (partition >= 0),
    next_offset bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (consumer, topic, partition)
);

-- The identity of each topic a consumer stored offsets for: Kafka's topic id (KIP-516). A topic
-- deleted and created again under its name has another id, and the stored offsets mean nothing there.
CREATE TABLE inbox.topics (
    consumer    text        NOT NULL,
    topic       text        NOT NULL,
    topic_id    text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (consumer, topic)
);

-- Messages ingested from Kafka, waiting for a worker. (consumer, topic, message_id) is the dedup key:
-- scoped by topic, so that a record another producer wrote to another ingested topic with a copied
-- `pg_outbox-id` cannot take the place of the real event (the relay writes an event to one topic).
CREATE TABLE inbox.messages (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer     text        NOT NULL,
    message_id   text        NOT NULL,
    topic        text        NOT NULL,
    partition    integer,
    "offset"     bigint,
    key          text,
    headers      jsonb       NOT NULL DEFAULT '{}',
    payload      bytea,
    status       text        NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'processing', 'done', 'dead')),
    attempts     integer     NOT NULL DEFAULT 0,
    -- made by each inbox.claim: only the current claim may complete or fail the message
    claim_token  uuid,
    last_error   text,
    visible_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    received_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    completed_at timestamptz,
    UNIQUE (consumer, topic, message_id)
);
-- Events the relay could never publish (oversized, undecodable), with the reason; exactly one row per
-- source position, so a replay after a crash does not add a second.
CREATE TABLE outbox.dead_letters (
    source     text        NOT NULL,
    position   text        NOT NULL,
    event_id   uuid,
    topic      text,
    key        text,
    headers    jsonb       NOT NULL DEFAULT '{}',
    payload    bytea       NOT NULL,
    reason     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (source, position)
);

CREATE INDEX messages_claim_idx ON inbox.messages (consumer, visible_at, id)
    WHERE status IN ('pending', 'processing');
CREATE INDEX messages_key_idx ON inbox.messages (consumer, key, id)
    WHERE status IN ('pending', 'processing');

-- Who the relay publishes for. The restart dedup matches records in Kafka by source identity:
-- <source_id>/<system identifier>.<database oid>.<incarnation>. The incarnation is made here, once
-- per slot ('slot:<name>') or poll source ('poll:<source_id>'), and changes only by an explicit
-- operator action (outbox.recreate_slot, outbox.new_poll_incarnation): records of another cluster,
-- another database or an earlier incarnation never make the relay skip an event.
-- A row also remembers that a slot existed: a slot that is gone is never created again silently.
CREATE TABLE outbox.sources (
    source      text        PRIMARY KEY,
    incarnation uuid        NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- the slot's first position, and the last position the relay confirmed that we know of
    created_lsn pg_lsn,
    seen_lsn    pg_lsn,
    seen_at     timestamptz,
    -- poll sources: the key of the advisory lock a polling relay holds (outbox._poll_lock_key)
    lock_key    bigint,
    -- the relay found Kafka ahead of the database (records of this incarnation at positions the
    -- database has not reached): why, and when. Every relay refuses this incarnation from then on,
    -- however far the database has moved since, until an operator gives the source a new one
    -- (outbox.recreate_slot, outbox.new_poll_incarnation), which clears it.
    stopped     text,
    stopped_at  timestamptz,
    -- the sealing key (outbox.auth_key) the relay of this source signs its Kafka records with, as it
    -- recorded at the start of its session; outbox.retire_auth_key waits for it to move on
    signing_key_id integer,
    -- the relay session that holds the source now (a token it drew), and the last one that stopped
    -- cleanly (everything it sent acknowledged): a session whose predecessor stopped cleanly has no
    -- produce request of it to wait for, and skips restart_grace_ms
    holder      uuid,
    handover    uuid
);
COMMENT ON TABLE outbox.sources IS
    'pg_outbox: slots and poll sources the relay publishes for, with their incarnation';

-- What an operator accepted as possibly lost (a slot re-created after it was dropped or
-- invalidated) or re-based (a new incarnation), and why. Kept for the record; never read by the relay.
CREATE TABLE outbox.gaps (
    source          text        NOT NULL,
    old_incarnation uuid,
    new_incarnation uuid        NOT NULL,
    from_lsn        pg_lsn,
    to_lsn          pg_lsn,
    reason          text        NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    recorded_by     text        NOT NULL DEFAULT CURRENT_USER
);
COMMENT ON TABLE outbox.gaps IS
    'pg_outbox: slots re-created and incarnations changed by an operator, with the WAL range that may be lost';
