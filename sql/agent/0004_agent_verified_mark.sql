-- depends: 0003_agent_verify
-- The daemon's incremental verification (`verify_interval`): how far the keys it applied have
-- been compared with the Site DB. The mark is a Site snapshot, like apply_progress.prev_snapshot:
-- every event whose transaction verified_snapshot sees has had its key compared. While
-- verify_interval is set, the daemon's retention deletes only those events from the Site's
-- sync log, so a restarted daemon reads again every key after the mark.

-- A pass compares the keys of the events committed in target_snapshot and not in
-- verified_snapshot, in seq order: those with seq <= pass_cursor are done (pass_hi: the pass's
-- last seq). verified_seq is the highest seq compared so far, as applied_seq is for the apply.
CREATE TABLE dbsync.verify_mark (
    source            text PRIMARY KEY,
    verified_snapshot pg_snapshot NOT NULL,
    target_snapshot   pg_snapshot,
    pass_cursor       bigint,
    pass_hi           bigint,
    verified_seq      bigint NOT NULL DEFAULT 0,
    keys_verified     bigint NOT NULL DEFAULT 0,
    pass_started_at   timestamptz,
    verified_at       timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON dbsync.verify_mark FROM PUBLIC;
