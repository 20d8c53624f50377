-- Back to one consumer: the daemon deletes what its own Agent DB has applied (DELETE on
-- dbsync.sync_log, docs/dba.md before 0010).
DROP FUNCTION dbsync.prune_log(integer);
DROP FUNCTION dbsync.consumer_applied(text, text);
DROP FUNCTION dbsync.register_consumer(text, text, name);
DROP TABLE dbsync.log_horizon;
DROP TABLE dbsync.consumers;
