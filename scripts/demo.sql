-- The pg_outbox walkthrough run by `make demo`. Every statement is echoed before it runs.
\set ON_ERROR_STOP on
\pset footer off

\echo
\echo '== 1. The extension is installed; the slot that retains wal-mode events exists (the relay created it)'
CREATE EXTENSION IF NOT EXISTS pg_outbox;
CALL outbox.setup();

\echo
\echo '== 2. A business transaction: the order row and its event commit together'
CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL);
BEGIN;
INSERT INTO orders VALUES (1, 'alice', 42.00);
SELECT outbox.enqueue('orders', 'alice', '{"order_id": 1, "total": 42.00}',
                      '{"type": "OrderCreated"}') AS event_id;
COMMIT;

\echo
\echo '== 3. A transaction that rolls back: neither the row nor the event exist'
BEGIN;
INSERT INTO orders VALUES (2, 'bob', 7.00);
SELECT outbox.enqueue('orders', 'bob', '{"order_id": 2}', '{"type": "OrderCreated"}') AS ghost_id;
ROLLBACK;

\echo
\echo '== 4. A savepoint rolled back drops only its own events; a batch enqueues several at once'
BEGIN;
INSERT INTO orders VALUES (3, 'carol', 10.00);
SELECT outbox.enqueue('orders', 'carol', '{"order_id": 3}', '{"type": "OrderCreated"}') AS kept_id;
SAVEPOINT try_discount;
SELECT outbox.enqueue('discounts', 'carol', '{"order_id": 3, "pct": 50}') AS discarded_id;
ROLLBACK TO SAVEPOINT try_discount;
SELECT * FROM outbox.enqueue_batch('shipments', ARRAY['alice', 'carol'],
                                   ARRAY['{"order_id": 1}', '{"order_id": 3}']::jsonb[]);
COMMIT;

\echo
\echo '== 5. Bad input is refused with a SQLSTATE and a hint, and loses nothing else'
\set ON_ERROR_STOP off
\set VERBOSITY verbose
SELECT outbox.enqueue('orders and more', 'k', '{}');
\set VERBOSITY default
\set ON_ERROR_STOP on

\echo
\echo '== 6. table mode: the same API writes rows to outbox.events (works without logical WAL)'
SET pg_outbox.mode = 'table';
BEGIN;
SELECT outbox.enqueue('orders', 'dave', '{"order_id": 4}') AS event_id;
COMMIT;
SELECT seq, id, topic, key, convert_from(payload, 'UTF8') AS payload FROM outbox.events;
RESET pg_outbox.mode;

\echo
\echo '== 7. The inbox: a consumer records each message id in its own transaction, once'
SELECT inbox.try_receive('billing', 'evt-0001') AS first_delivery;
SELECT inbox.try_receive('billing', 'evt-0001') AS redelivery;

\echo
\echo '== 8. Offsets are stored with the work, and never go backwards by accident'
SELECT inbox.store_offset('billing', 'orders', 0, 10) AS previous;
SELECT inbox.store_offset('billing', 'orders', 0, 11) AS previous;
\set ON_ERROR_STOP off
SELECT inbox.store_offset('billing', 'orders', 0, 3);
\set ON_ERROR_STOP on
SELECT * FROM inbox.get_offsets('billing', 'orders');

\echo
\echo '== 9. The work queue: messages are claimed with a lease, completed, or failed and retried'
SELECT inbox.deliver('billing', 'evt-0002', 'orders', 0, 11, 'alice', convert_to('{"order_id": 1}', 'UTF8'));
SELECT inbox.deliver('billing', 'evt-0002', 'orders', 0, 11, 'alice', convert_to('{"order_id": 1}', 'UTF8')) AS duplicate_delivered;
SELECT id, message_id, status, attempts FROM inbox.claim('billing', 10, '30 seconds');
SELECT inbox.complete(id, claim_token) FROM inbox.messages WHERE message_id = 'evt-0002';
SELECT message_id, status, attempts FROM inbox.messages;
