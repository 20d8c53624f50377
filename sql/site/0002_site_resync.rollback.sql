-- Removes the resync functions and the backfill positions; the sync log keeps its events.
DROP FUNCTION dbsync.backfill_reset(regclass);
DROP FUNCTION dbsync.backfill_step(regclass, integer);
DROP FUNCTION dbsync.resync_range(regclass, json, integer);
DROP FUNCTION dbsync.resync_keys(regclass, json);
DROP FUNCTION dbsync.resync_require_read_committed();
DROP FUNCTION dbsync.resync_target(regclass);
DROP TABLE dbsync.backfill_state;
