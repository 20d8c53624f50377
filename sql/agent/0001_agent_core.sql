-- dbsync Agent DB core: how far the Agent DB has applied the Site DB's sync log.

CREATE SCHEMA dbsync;
REVOKE ALL ON SCHEMA dbsync FROM PUBLIC;

-- Consumption state, written in the same transaction as the rows it describes.
-- Everything whose transaction is visible in prev_snapshot has been applied. While a batch is
-- open (batch_snapshot not null), its events with seq <= batch_cursor have been applied too.
CREATE TABLE dbsync.apply_progress (
    source          text PRIMARY KEY,
    prev_snapshot   pg_snapshot NOT NULL,
    batch_snapshot  pg_snapshot,
    batch_hi        bigint,
    batch_cursor    bigint,
    applied_seq     bigint NOT NULL DEFAULT 0,
    events_applied  bigint NOT NULL DEFAULT 0,
    last_captured_at timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((batch_snapshot IS NULL) = (batch_hi IS NULL) AND (batch_snapshot IS NULL) = (batch_cursor IS NULL))
);
REVOKE ALL ON dbsync.apply_progress FROM PUBLIC;
