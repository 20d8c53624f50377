-- Removes capture from every registered table, then the dbsync schema with its log.
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT relid::regclass AS t FROM dbsync.replicated_tables WHERE removed_at IS NULL LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture ON %s', r.t);
        EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_truncate ON %s', r.t);
    END LOOP;
END $$;
DROP SCHEMA dbsync CASCADE;
