-- The customer service's database: credit per customer, and the pg_outbox extension.
CREATE EXTENSION IF NOT EXISTS pg_outbox;
CREATE TABLE IF NOT EXISTS customers (
    id           text    PRIMARY KEY,
    credit_limit numeric NOT NULL,
    reserved     numeric NOT NULL DEFAULT 0 CHECK (reserved <= credit_limit)
);
INSERT INTO customers SELECT 'customer-' || i, 10000 + 5000 * (i % 4), 0 FROM generate_series(0, 9) i
ON CONFLICT DO NOTHING;
