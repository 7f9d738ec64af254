-- the same transaction as c_enqueue.sql, sent in one round trip (statements joined by \;)
\set c random(1, 1000)
BEGIN \;
INSERT INTO bench_orders (customer, total) VALUES (:c, 42) \;
SELECT outbox.enqueue('orders', :c::text,
        '{"customer": 1, "total": 42, "note": "a typical small event payload of about one hundred bytes"}') \;
COMMIT;
