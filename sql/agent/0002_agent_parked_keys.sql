-- depends: 0001_agent_core
-- Since Site migration 0006_site_key_capture one sync-log row can carry many keys (a statement's
-- keys, in chunks), so a parked event is a (seq, key_no) pair: key_no is the key's position in
-- its log row, 0 for a row that carries one key.
ALTER TABLE dbsync.parked_events ADD COLUMN key_no integer NOT NULL DEFAULT 0;
ALTER TABLE dbsync.parked_events DROP CONSTRAINT parked_events_pkey;
ALTER TABLE dbsync.parked_events ADD CONSTRAINT parked_events_pkey PRIMARY KEY (source, seq, key_no);
