-- Removes capture from every registered table, then the Site chain's objects: with the schema
-- when this database holds nothing else of dbsync's, one by one when it also holds the Agent
-- chain (`dbsync migrate --two-way`), which is left as it was.
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT relid::regclass AS t FROM dbsync.replicated_tables WHERE removed_at IS NULL LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture ON %s', r.t);
        EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_truncate ON %s', r.t);
    END LOOP;
    IF pg_catalog.to_regclass('dbsync.apply_progress') IS NULL THEN
        DROP SCHEMA dbsync CASCADE;
        RETURN;
    END IF;
    DROP FUNCTION dbsync.add_table(regclass), dbsync.remove_table(regclass), dbsync.capture(),
        dbsync.row_image, dbsync.key_image, dbsync.image_json, dbsync.with_key;
    DROP TABLE dbsync.doorbell, dbsync.sync_log, dbsync.replicated_tables;
END $$;
