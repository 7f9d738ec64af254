\set c random(1, 1000)
BEGIN;
INSERT INTO bench_orders (customer, total) VALUES (:c, 42);
SELECT pg_logical_emit_message(true, 'bench',
        '{"customer": 1, "total": 42, "note": "a typical small event payload of about one hundred bytes"}'::jsonb::text);
COMMIT;
