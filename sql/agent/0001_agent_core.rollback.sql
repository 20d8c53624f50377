-- Drops the Agent chain's tables; the schema with them unless this database also holds the Site
-- chain (`dbsync migrate --two-way`), which is left as it was.
DROP TABLE dbsync.apply_progress, dbsync.parked_events;
DO $$
BEGIN
    IF pg_catalog.to_regclass('dbsync.sync_log') IS NULL THEN
        DROP SCHEMA dbsync CASCADE;
    END IF;
END $$;
