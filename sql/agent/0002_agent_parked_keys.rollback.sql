-- Back to one parked event per seq. Refused while two parked keys share a log row (they could not
-- both be kept): retry or drop them first (`dbsync retry`). Not refused when dbsync is being
-- uninstalled (`dbsync migrate --rollback` sets dbsync.uninstall): the table goes too.
DO $do$
BEGIN
    IF pg_catalog.current_setting('dbsync.uninstall', true) IS DISTINCT FROM 'on'
       AND EXISTS (SELECT 1 FROM dbsync.parked_events WHERE key_no <> 0) THEN
        RAISE EXCEPTION 'dbsync: parked events of multi-key log rows are waiting; retry them before rolling back 0002_agent_parked_keys'
            USING ERRCODE = 'object_in_use';
    END IF;
END
$do$;
ALTER TABLE dbsync.parked_events DROP CONSTRAINT parked_events_pkey;
ALTER TABLE dbsync.parked_events ADD CONSTRAINT parked_events_pkey PRIMARY KEY (source, seq);
ALTER TABLE dbsync.parked_events DROP COLUMN key_no;
