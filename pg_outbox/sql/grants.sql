-- pg_outbox grants: nothing for PUBLIC; each role gets exactly what its job needs.
-- Runs last (finalize), after every function of both schemas exists: the ALL FUNCTIONS IN SCHEMA
-- statements below cover exactly the functions created before them.

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA inbox FROM PUBLIC;
-- procedures are not functions to GRANT/REVOKE ... ALL FUNCTIONS (outbox.setup)
REVOKE ALL ON ALL PROCEDURES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA inbox FROM PUBLIC;

GRANT USAGE ON SCHEMA outbox TO outbox_writer, outbox_relay;
GRANT EXECUTE ON FUNCTION outbox.enqueue(text, text, jsonb, jsonb),
                          outbox.enqueue(text, text, jsonb),
                          outbox.enqueue_bytes(text, text, bytea, jsonb),
                          outbox.enqueue_batch(text, text[], jsonb[], jsonb),
                          outbox._enqueue_batch_json(text, text[], text[], jsonb)
      TO outbox_writer;
-- no privilege on outbox.events: enqueue inserts as the table's owner, after validating (owner.rs)

GRANT SELECT, DELETE ON outbox.events TO outbox_relay;
GRANT SELECT, INSERT, UPDATE ON outbox.poller TO outbox_relay;
GRANT SELECT, INSERT ON outbox.dead_letters TO outbox_relay;
GRANT EXECUTE ON FUNCTION outbox.create_slot(text), outbox.create_publication(text), outbox._slot_name(),
                          outbox._check_slot_name(text), outbox.relay_auth_key(),
                          outbox.relay_auth_keys() TO outbox_relay;
GRANT EXECUTE ON PROCEDURE outbox.setup(text) TO outbox_relay;
-- the relay records its sources and what it confirmed; the operator actions below need REPLICATION
-- (or superuser) as well, to drop and create the slot
GRANT SELECT, INSERT, UPDATE ON outbox.sources TO outbox_relay;
GRANT SELECT, INSERT ON outbox.gaps TO outbox_relay;
GRANT EXECUTE ON FUNCTION outbox._slot_lost(text, text), outbox._foreign_slot(text), outbox._check_reason(text),
                          outbox._new_slot(text),
                          outbox.recreate_slot(text, text), outbox.new_poll_incarnation(text, text),
                          outbox._poll_lock_key(text, bigint)
      TO outbox_relay;

GRANT USAGE ON SCHEMA inbox TO inbox_ingest, inbox_consumer;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA inbox TO inbox_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON inbox.received, inbox.messages TO inbox_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON inbox.offsets TO inbox_consumer;  -- DELETE: inbox.forget_topic
GRANT SELECT, INSERT, DELETE ON inbox.topics TO inbox_consumer;
-- The relay's ingest (`pg-outbox-relay ingest`) logs in with inbox_ingest: it queues messages and
-- stores offsets and topic ids, and can do nothing on the outbox side (it never sees the sealing
-- key). outbox_relay, the publishing side, has no right on the inbox.
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

-- Monitoring: the views only (docs/operations.md, "The same numbers in SQL"); no table, payload or
-- key.
GRANT USAGE ON SCHEMA outbox, inbox TO outbox_monitor;
GRANT SELECT ON outbox.source_status, outbox.table_backlog, outbox.dead_letter_summary,
                inbox.offset_status, inbox.queue_status, outbox.sealing_keys
      TO outbox_monitor;
-- outbox.rotate_auth_key and outbox.retire_auth_key: superusers only, or whom they grant them to
