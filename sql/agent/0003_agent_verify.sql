-- depends: 0002_agent_parked_keys
-- The daemon's full verification (`full_verify_interval`): where its pass stands, so that a
-- restarted daemon resumes it, and the rows it found differing from the Site DB, so that
-- `dbsync status` shows them until a recheck finds them equal again.

-- One row per source. A pass walks the replicated tables in (schema, name) order and each table
-- in key order: everything up to (table_name, last_key) has been checked in the pass that
-- started at pass_started_at (last_key NULL: the table's first rows are next).
CREATE TABLE dbsync.verify_progress (
    source                text PRIMARY KEY,
    pass_started_at       timestamptz,
    schema_name           text,
    table_name            text,
    last_key              text,
    rows_checked          bigint NOT NULL DEFAULT 0,
    last_pass_started_at  timestamptz,
    last_pass_finished_at timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- Rows proven to differ (the key as a JSON object of the key columns' text, never the row):
-- missing on the Agent DB, extra there, or changed.
CREATE TABLE dbsync.verify_mismatches (
    source     text NOT NULL,
    table_id   integer NOT NULL,
    table_name text NOT NULL,
    key        text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('missing', 'extra', 'changed')),
    found_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, table_id, key)
);

REVOKE ALL ON dbsync.verify_progress, dbsync.verify_mismatches FROM PUBLIC;
