-- dbsync Agent DB core: how far the Agent DB has applied the Site DB's sync log, and the events
-- it could not apply.

-- The schema is new, or (`dbsync migrate --two-way`: this database is also a Site DB) the one
-- the Site chain created: refused unless the installing role owns it, nobody else may create in
-- it and it holds the Site chain's mark table, so a schema planted by another role is never used.
DO $do$
DECLARE
    v_owner oid;
BEGIN
    SELECT n.nspowner INTO v_owner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'dbsync';
    IF NOT FOUND THEN
        CREATE SCHEMA dbsync;
    ELSIF v_owner OPERATOR(pg_catalog.<>) (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER)
          OR pg_catalog.to_regclass('dbsync.sync_log') IS NULL
          OR EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
                      WHERE n.nspname OPERATOR(pg_catalog.=) 'dbsync' AND a.privilege_type OPERATOR(pg_catalog.=) 'CREATE'
                        AND a.grantee OPERATOR(pg_catalog.<>) v_owner) THEN
        RAISE EXCEPTION 'dbsync: a schema dbsync already exists that dbsync''s Site chain did not create for this role; refusing to install into it'
            USING ERRCODE = 'duplicate_schema';
    END IF;
END
$do$;
REVOKE ALL ON SCHEMA dbsync FROM PUBLIC;

-- Consumption state, written in the same transaction as the rows it describes.
-- Everything whose transaction is visible in prev_snapshot has been applied. While a batch is
-- open (batch_snapshot not null), its events with seq <= batch_cursor have been applied too.
CREATE TABLE dbsync.apply_progress (
    source           text PRIMARY KEY,
    prev_snapshot    pg_snapshot NOT NULL,
    batch_snapshot   pg_snapshot,
    batch_hi         bigint,
    batch_cursor     bigint,
    applied_seq      bigint NOT NULL DEFAULT 0,
    events_applied   bigint NOT NULL DEFAULT 0,
    last_captured_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- The daemon holding the source's advisory lock, and the error it is stuck on, if any.
    active_holder    text,
    active_since     timestamptz,
    last_error       text,
    last_error_at    timestamptz,
    CHECK ((batch_snapshot IS NULL) = (batch_hi IS NULL)
           AND (batch_snapshot IS NULL) = (batch_cursor IS NULL))
);

-- Dead letters (policy "park"): events the Agent DB rejected, and every later event for the
-- same key, kept in order until `dbsync retry` re-applies them.
CREATE TABLE dbsync.parked_events (
    source          text NOT NULL,
    seq             bigint NOT NULL,
    table_id        integer NOT NULL,
    table_name      text NOT NULL,
    op              text NOT NULL,
    pk              json,
    row_image       json,
    captured_at     timestamptz,
    error           text NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now(),
    retry_requested boolean NOT NULL DEFAULT false,
    PRIMARY KEY (source, seq)
);
CREATE INDEX parked_events_key_idx ON dbsync.parked_events (source, table_id, (pk::text));

REVOKE ALL ON dbsync.apply_progress, dbsync.parked_events FROM PUBLIC;
