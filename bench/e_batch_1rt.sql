-- the same transaction as e_batch.sql, sent in one round trip (statements joined by \;)
\set c random(1, 1000)
BEGIN \;
INSERT INTO bench_orders (customer, total) VALUES (:c, 42) \;
SELECT count(*) FROM outbox.enqueue_batch('orders',
        (SELECT array_agg((:c + i)::text) FROM generate_series(1, 100) i),
        (SELECT array_agg('{"customer": 1, "total": 42, "note": "a typical small event payload of about one hundred bytes"}'::jsonb)
           FROM generate_series(1, 100))) \;
COMMIT;
