-- pg_outbox, C extension only: what the SQL edition cannot or need not do.

-- 1. pg_dump keeps the extension's state. Tables of an extension are not dumped unless marked: the
-- dump would hold only CREATE EXTENSION, and a restore would forget every received id, stored offset,
-- queued message, source (and with it that a slot existed) and pending table-mode event. The
-- sealing key is not marked: a restored database makes a new one (wal-mode events do not survive a
-- logical restore anyway), and a dump must not carry it. outbox.poller is unlogged state of a running
-- relay. The SQL edition's tables are ordinary tables, dumped as such.
-- (one statement each: each call updates the extension's catalog row)
SELECT pg_catalog.pg_extension_config_dump('outbox.events', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.sources', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.gaps', '');
SELECT pg_catalog.pg_extension_config_dump('inbox.received', '');
SELECT pg_catalog.pg_extension_config_dump('inbox.offsets', '');
SELECT pg_catalog.pg_extension_config_dump('inbox.topics', '');
SELECT pg_catalog.pg_extension_config_dump('inbox.messages', '');
-- the identity sequences, so that restored rows and new ones do not collide
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('outbox.events', 'seq')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('inbox.messages', 'id')::pg_catalog.regclass, '');

-- 2. The role that a writer's call runs as.
-- outbox.enqueue* insert into outbox.events (table mode) and read outbox.auth_key (wal mode) as the
-- owner of these two tables (src/owner.rs). That owner is outbox_owner, a NOLOGIN role without
-- members that owns only these objects: not the superuser that ran CREATE EXTENSION, so that a hole
-- in the owner switch would not be a superuser hole. Roles are cluster-wide: an outbox_owner that
-- exists already is used only if nobody can log in as it or act as it.
DO $owner$
DECLARE
    r pg_catalog.pg_roles;
BEGIN
    SELECT * INTO r FROM pg_catalog.pg_roles WHERE rolname = 'outbox_owner';
    IF NOT FOUND THEN
        BEGIN
            CREATE ROLE outbox_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
        SELECT * INTO r FROM pg_catalog.pg_roles WHERE rolname = 'outbox_owner';
    END IF;
    IF r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls
       OR EXISTS (SELECT FROM pg_catalog.pg_auth_members m WHERE m.roleid OPERATOR(pg_catalog.=) r.oid) THEN
        RAISE EXCEPTION 'pg_outbox: role outbox_owner exists and can log in, has members or has attributes'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'outbox_owner owns the sealing key: it must be NOLOGIN, without members and without '
                         'SUPERUSER, CREATEROLE, REPLICATION or BYPASSRLS. Fix or drop that role, then CREATE EXTENSION again.';
    END IF;
END
$owner$;

GRANT USAGE ON SCHEMA outbox TO outbox_owner;
ALTER TABLE outbox.events OWNER TO outbox_owner;
ALTER TABLE outbox.auth_key OWNER TO outbox_owner;
ALTER FUNCTION outbox.relay_auth_key() OWNER TO outbox_owner;
ALTER FUNCTION outbox.relay_auth_keys() OWNER TO outbox_owner;
ALTER FUNCTION outbox.rotate_auth_key() OWNER TO outbox_owner;
ALTER FUNCTION outbox.retire_auth_key(integer, interval, boolean) OWNER TO outbox_owner;
ALTER VIEW outbox.sealing_keys OWNER TO outbox_owner;
-- outbox.retire_auth_key reads which relays moved to a newer key
GRANT SELECT ON outbox.sources TO outbox_owner;
-- outbox.rotate_auth_key tells the backends to drop their cached key
GRANT EXECUTE ON FUNCTION outbox._auth_keys_changed() TO outbox_owner;
-- ALTER OWNER leaves the key's initial privileges (pg_init_privs, from bootstrap.sql's REVOKE) naming
-- the old owner, and pg_dump would then carry a REVOKE and GRANT for it: record them again
REVOKE ALL ON outbox.auth_key FROM PUBLIC;
-- the events trigger runs as the inserting role and reads whether the poll source is busy
GRANT SELECT ON outbox.poller TO outbox_owner;
