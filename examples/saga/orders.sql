-- The order service's database: orders, and the pg_outbox extension for its events and its inbox.
CREATE EXTENSION IF NOT EXISTS pg_outbox;
CREATE TABLE IF NOT EXISTS orders (
    id       bigint PRIMARY KEY,
    customer text    NOT NULL,
    amount   numeric NOT NULL CHECK (amount > 0),
    status   text    NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'APPROVED', 'CANCELLED'))
);
