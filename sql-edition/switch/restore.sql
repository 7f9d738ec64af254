-- Part of switch-to-extension.sql and switch-to-sql-edition.sql: puts the state saved by save.sql
-- into the new edition's tables (the same columns in the same order: pg_outbox/sql/bootstrap.sql),
-- including the key that sealed the wal-mode messages still in the slot.
DELETE FROM outbox.auth_key;
INSERT INTO outbox.auth_key SELECT * FROM outbox_switch.auth_key;
INSERT INTO outbox.events OVERRIDING SYSTEM VALUE SELECT * FROM outbox_switch.events;
INSERT INTO outbox.sources SELECT * FROM outbox_switch.sources;
INSERT INTO outbox.gaps SELECT * FROM outbox_switch.gaps;
INSERT INTO outbox.dead_letters SELECT * FROM outbox_switch.dead_letters;
INSERT INTO inbox.received SELECT * FROM outbox_switch.received;
INSERT INTO inbox.offsets SELECT * FROM outbox_switch.offsets;
INSERT INTO inbox.topics SELECT * FROM outbox_switch.topics;
INSERT INTO inbox.messages OVERRIDING SYSTEM VALUE SELECT * FROM outbox_switch.messages;
SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence(s.tab, s.col), s.last)
       FROM outbox_switch.sequences s WHERE s.last IS NOT NULL;
DROP SCHEMA outbox_switch CASCADE;
