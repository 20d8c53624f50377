-- depends: 0012_site_small_statements
-- Write-back (issue 12, items 1 and 2): this chain may also run on an Agent DB (`dbsync migrate
-- --two-way`), capturing what the Agent changes so that a second daemon direction applies it to
-- the Site. Then a change dbsync applied must not be captured again where it was applied, or it
-- would travel back: loop prevention.
--
-- * dbsync.appliers: the roles dbsync's daemon applies with on this database (registered by
--   `dbsync migrate --two-way`, or by the DBA, with dbsync.register_applier). A session of one of them that sets
--   dbsync.applying = on logs nothing: its writes are the other side's changes arriving.
--   The setting alone is not enough: any role may set a custom setting, and an application role
--   that could hide its writes from capture would make the two sides differ unseen. It is
--   honoured only for the session's login role (SESSION_USER, which SET ROLE does not change).
-- * The check sits on the log, not in every table's capture function: one BEFORE INSERT trigger
--   whose WHEN clause (a setting lookup) is false for every application session. It covers every
--   way an event is logged (row and statement capture, TRUNCATE, insert-only tables), and is
--   installed only where an applier is registered: one-way capture is unchanged.
-- * replicated_tables.conflict / agent_owns: the table's conflict policy, stored with its
--   registration for the step that enforces it (issue 12 item 3; not enforced yet).

CREATE TABLE dbsync.appliers (
    role_name name PRIMARY KEY,
    added_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE dbsync.appliers IS
    'Login roles whose sessions with dbsync.applying = on are not captured: dbsync''s own apply.';
REVOKE ALL ON dbsync.appliers FROM PUBLIC;

CREATE FUNCTION dbsync.skip_applied() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM dbsync.appliers a WHERE a.role_name OPERATOR(pg_catalog.=) SESSION_USER) THEN
        RETURN NULL;  -- dbsync applying the other side's change: not an event of this side
    END IF;
    RETURN NEW;
END
$fn$;
REVOKE ALL ON FUNCTION dbsync.skip_applied() FROM PUBLIC;

-- Register a login role as one dbsync applies with here, and install the log trigger if it is
-- not yet: only a database dbsync also applies to (two-way) has it, so a one-way Site DB's
-- capture costs what it did (measured with the trigger: some 5-10 us more per captured statement
-- on this project's loaded 2-core machine, from one BEFORE ROW trigger call per log row).
CREATE FUNCTION dbsync.register_applier(p_role name) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    INSERT INTO dbsync.appliers (role_name) VALUES (p_role) ON CONFLICT DO NOTHING;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                    WHERE t.tgrelid OPERATOR(pg_catalog.=) 'dbsync.sync_log'::pg_catalog.regclass
                      AND t.tgname OPERATOR(pg_catalog.=) 'dbsync_skip_applied') THEN
        CREATE TRIGGER dbsync_skip_applied BEFORE INSERT ON dbsync.sync_log
            FOR EACH ROW
            WHEN (pg_catalog.current_setting('dbsync.applying'::text, true) OPERATOR(pg_catalog.=) 'on'::text)
            EXECUTE FUNCTION dbsync.skip_applied();
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION dbsync.register_applier(name) FROM PUBLIC;

ALTER TABLE dbsync.replicated_tables
    ADD COLUMN conflict text NOT NULL DEFAULT 'site-wins'
        CHECK (conflict OPERATOR(pg_catalog.=) ANY (ARRAY['site-wins', 'agent-wins', 'latest']::text[])),
    ADD COLUMN agent_owns text[] NOT NULL DEFAULT '{}';

-- Store a registered table's conflict policy: the columns the Agent owns must be columns of the
-- table and not of its key (a key is what both sides agree a row is).
CREATE FUNCTION dbsync.set_conflict_policy(p_table regclass, p_conflict text, p_agent_owns text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_keys text[];
    v_bad  text;
BEGIN
    SELECT r.key_columns INTO v_keys FROM dbsync.replicated_tables r
     WHERE r.relid OPERATOR(pg_catalog.=) p_table AND r.removed_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dbsync: % is not replicated', p_table USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(c.name), ', ') INTO v_bad
      FROM pg_catalog.unnest(p_agent_owns) AS c(name)
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                        WHERE a.attrelid OPERATOR(pg_catalog.=) p_table AND a.attname OPERATOR(pg_catalog.=) c.name
                          AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped);
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'dbsync: % has no column(s) %', p_table, v_bad USING ERRCODE = 'undefined_column';
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(c.name), ', ') INTO v_bad
      FROM pg_catalog.unnest(p_agent_owns) AS c(name) WHERE c.name OPERATOR(pg_catalog.=) ANY (v_keys);
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'dbsync: % is part of the key of %: the Agent cannot own it', v_bad, p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE dbsync.replicated_tables r SET conflict = p_conflict, agent_owns = COALESCE(p_agent_owns, '{}')
     WHERE r.relid OPERATOR(pg_catalog.=) p_table AND r.removed_at IS NULL;
END
$fn$;
REVOKE ALL ON FUNCTION dbsync.set_conflict_policy(regclass, text, text[]) FROM PUBLIC;
