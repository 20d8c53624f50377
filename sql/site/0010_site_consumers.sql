-- depends: 0009_site_filters
-- Fan-out (issue 12): several Agent DBs, each with its own daemon, consume one Site log. The log
-- is kept until every registered consumer has applied it.
--
-- * dbsync.consumers: one row per consumer (a name; the daemon's default is
--   "<source>@<Agent database>/<Agent cluster id>", docs/operations.md "Topologies"), the
--   snapshot it has applied (its Agent DB's apply_progress.prev_snapshot, reported after that is
--   durable there), when it was last seen, and the Site role allowed to move its position.
-- * dbsync.register_consumer / dbsync.consumer_applied / dbsync.prune_log: what the daemon's
--   Site role calls (SECURITY DEFINER). A role moves only the positions of consumers bound to it,
--   and the prune deletes only events visible in every consumer's recorded snapshot: no Site
--   role needs DELETE on dbsync.sync_log any more.
-- * dbsync.log_horizon: the newest transaction whose events were pruned, so that a consumer that
--   registers later is told it may have missed events (it needs `dbsync backfill`).
--
-- Registration and pruning exclude each other (a SHARE ROW EXCLUSIVE lock on dbsync.consumers):
-- a prune never deletes an event for a consumer whose registration it could not see, and a
-- registration always sees the horizon of every prune before it.

CREATE TABLE dbsync.consumers (
    name text PRIMARY KEY CHECK (name OPERATOR(pg_catalog.<>) ''),
    reporter name NOT NULL,
    applied_snapshot pg_catalog.pg_snapshot NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    seen_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    missed_history boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE dbsync.consumers IS
    'Consumers of the sync log (one per Agent DB and source): what each has applied. The log is kept until all have.';
COMMENT ON COLUMN dbsync.consumers.reporter IS 'The Site role (or a member of it) that may move this position.';
COMMENT ON COLUMN dbsync.consumers.missed_history IS
    'Registered after events it may not have applied were pruned: copy the tables with `dbsync backfill`.';
REVOKE ALL ON dbsync.consumers FROM PUBLIC;

CREATE TABLE dbsync.log_horizon (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    pruned_txid xid8
);
INSERT INTO dbsync.log_horizon (one, pruned_txid) VALUES (true, NULL);
REVOKE ALL ON dbsync.log_horizon FROM PUBLIC;

-- Register a consumer at `p_snapshot` (what it has applied), bound to `p_reporter` (default: the
-- calling session's role); nothing changes when it is registered already. Only a member of the
-- owner of dbsync.consumers (the role that ran the migrations) may bind another role. Returns
-- the consumer's missed_history.
CREATE FUNCTION dbsync.register_consumer(p_name text, p_snapshot text, p_reporter name DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_snap pg_catalog.pg_snapshot := p_snapshot::pg_catalog.pg_snapshot;
    v_reporter name := COALESCE(p_reporter, SESSION_USER);
    v_owner oid;
    v_missed boolean;
BEGIN
    SELECT c.relowner INTO v_owner FROM pg_catalog.pg_class c WHERE c.oid = 'dbsync.consumers'::pg_catalog.regclass;
    IF v_reporter OPERATOR(pg_catalog.<>) SESSION_USER
       AND NOT pg_catalog.pg_has_role(SESSION_USER, v_owner, 'MEMBER') THEN
        RAISE EXCEPTION 'only the owner of dbsync.consumers may register a consumer for another role'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    LOCK TABLE dbsync.consumers IN SHARE ROW EXCLUSIVE MODE;
    SELECT c.missed_history INTO v_missed FROM dbsync.consumers c WHERE c.name OPERATOR(pg_catalog.=) p_name;
    IF FOUND THEN
        RETURN v_missed;
    END IF;
    -- Everything pruned so far must be visible in what the consumer has applied; known for sure
    -- only when the newest pruned transaction is below the snapshot's xmin.
    SELECT h.pruned_txid IS NOT NULL
           AND h.pruned_txid OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmin(v_snap)
      INTO v_missed FROM dbsync.log_horizon h;
    INSERT INTO dbsync.consumers (name, reporter, applied_snapshot, missed_history)
    VALUES (p_name, v_reporter, v_snap, COALESCE(v_missed, false));
    RETURN COALESCE(v_missed, false);
END
$fn$;

-- Record that consumer `p_name` has applied everything visible in `p_snapshot`, and that it is
-- alive. False when no such consumer is registered (dropped: the daemon registers again). A
-- position that goes back (it does not see a transaction the recorded one saw: an Agent DB
-- restored from a backup, a position once reported ahead of what was applied) is judged like a
-- registration: if events it has not applied may have been pruned, the consumer is flagged as
-- having missed history. Forward reports never are.
CREATE FUNCTION dbsync.consumer_applied(p_name text, p_snapshot text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_reporter name;
BEGIN
    SELECT c.reporter INTO v_reporter FROM dbsync.consumers c WHERE c.name OPERATOR(pg_catalog.=) p_name;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) v_reporter)
       OR NOT pg_catalog.pg_has_role(SESSION_USER, v_reporter, 'MEMBER') THEN
        RAISE EXCEPTION 'consumer % reports as Site role %, not %', p_name, v_reporter, SESSION_USER
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    UPDATE dbsync.consumers c
    SET applied_snapshot = p_snapshot::pg_catalog.pg_snapshot, seen_at = pg_catalog.now(),
        missed_history = c.missed_history OR (
            (pg_catalog.pg_snapshot_xmax(p_snapshot::pg_catalog.pg_snapshot)
                 OPERATOR(pg_catalog.<) pg_catalog.pg_snapshot_xmax(c.applied_snapshot)
             OR EXISTS (SELECT FROM pg_catalog.pg_snapshot_xip(p_snapshot::pg_catalog.pg_snapshot) AS x(txid)
                         WHERE pg_catalog.pg_visible_in_snapshot(x.txid, c.applied_snapshot)))
            AND COALESCE((SELECT h.pruned_txid OPERATOR(pg_catalog.>=)
                                 pg_catalog.pg_snapshot_xmin(p_snapshot::pg_catalog.pg_snapshot)
                            FROM dbsync.log_horizon h), false))
    WHERE c.name OPERATOR(pg_catalog.=) p_name;
    RETURN true;
END
$fn$;

-- Delete up to `p_chunk` events that every registered consumer has applied; with no consumer
-- registered, none. Returns how many went.
CREATE FUNCTION dbsync.prune_log(p_chunk integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_bound xid8;
    v_newest xid8;
    v_n bigint;
BEGIN
    LOCK TABLE dbsync.consumers IN SHARE ROW EXCLUSIVE MODE;
    -- Nothing at or above the lowest xmax is visible in every snapshot: the txid index bounds the scan.
    SELECT pg_catalog.pg_snapshot_xmax(c.applied_snapshot) INTO v_bound
    FROM dbsync.consumers c ORDER BY 1 LIMIT 1;
    IF v_bound IS NULL THEN
        RETURN 0;
    END IF;
    WITH doomed AS (
        SELECT l.seq FROM dbsync.sync_log l
        WHERE l.txid OPERATOR(pg_catalog.<) v_bound
          AND NOT EXISTS (
              SELECT FROM dbsync.consumers c
              WHERE NOT pg_catalog.pg_visible_in_snapshot(l.txid, c.applied_snapshot))
        ORDER BY l.seq
        LIMIT p_chunk
    ), gone AS (
        DELETE FROM dbsync.sync_log l USING doomed d WHERE l.seq OPERATOR(pg_catalog.=) d.seq RETURNING l.txid
    )
    SELECT pg_catalog.count(*), (SELECT g.txid FROM gone g ORDER BY g.txid DESC LIMIT 1) INTO v_n, v_newest FROM gone;
    IF v_newest IS NOT NULL THEN
        UPDATE dbsync.log_horizon h SET pruned_txid = v_newest
        WHERE h.pruned_txid IS NULL OR h.pruned_txid OPERATOR(pg_catalog.<) v_newest;
    END IF;
    RETURN v_n;
END
$fn$;

REVOKE ALL ON FUNCTION dbsync.register_consumer(text, text, name), dbsync.consumer_applied(text, text),
    dbsync.prune_log(integer) FROM PUBLIC;

-- A daemon that ran before this migration deleted from the log itself: each role that may still
-- do so (the daemon's, per docs/dba.md) gets what the daemon calls now, so an upgrade keeps it
-- running. Revoke its DELETE on dbsync.sync_log afterwards: it no longer needs it.
DO $do$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::pg_catalog.regrole AS role
        FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
        WHERE c.oid = 'dbsync.sync_log'::pg_catalog.regclass
          AND a.privilege_type OPERATOR(pg_catalog.=) 'DELETE'
          AND a.grantee OPERATOR(pg_catalog.<>) 0
          AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
    LOOP
        EXECUTE pg_catalog.format(
            'GRANT EXECUTE ON FUNCTION dbsync.register_consumer(text, text, name), dbsync.consumer_applied(text, text), '
            'dbsync.prune_log(integer) TO %s; GRANT SELECT ON dbsync.consumers TO %s', r.role, r.role);
    END LOOP;
END
$do$;
