-- dbsync Agent DB core: how far the Agent DB has applied the Site DB's sync log, and the events
-- it could not apply.

CREATE SCHEMA dbsync;
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
