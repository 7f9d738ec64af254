-- the same transaction as b_handrolled.sql, sent in one round trip (statements joined by \;)
\set c random(1, 1000)
BEGIN \;
INSERT INTO bench_orders (customer, total) VALUES (:c, 42) \;
INSERT INTO bench_outbox (id, aggregatetype, aggregateid, type, payload)
VALUES (gen_random_uuid(), 'order', :c, 'OrderCreated',
        '{"customer": 1, "total": 42, "note": "a typical small event payload of about one hundred bytes"}') \;
COMMIT;
