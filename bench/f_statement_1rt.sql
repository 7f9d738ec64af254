-- the same transaction as f_statement.sql, sent in one round trip (statements joined by \;)
\set c random(1, 1000)
BEGIN \;
INSERT INTO bench_orders (customer, total) VALUES (:c, 42) \;
SELECT 1 \;
COMMIT;
