-- the same transaction as a_business.sql, sent in one round trip (statements joined by \;)
\set c random(1, 1000)
BEGIN \;
INSERT INTO bench_orders (customer, total) VALUES (:c, 42) \;
COMMIT;
