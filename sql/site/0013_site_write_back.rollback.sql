DROP FUNCTION dbsync.set_conflict_policy(regclass, text, text[]);
ALTER TABLE dbsync.replicated_tables DROP COLUMN agent_owns, DROP COLUMN conflict;
DROP FUNCTION dbsync.register_applier(name);
DROP TRIGGER IF EXISTS dbsync_skip_applied ON dbsync.sync_log;
DROP FUNCTION dbsync.skip_applied();
DROP TABLE dbsync.appliers;
