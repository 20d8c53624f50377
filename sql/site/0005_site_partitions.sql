-- depends: 0004_site_safe_calls
-- Partitioned tables. The row trigger on a partitioned table is cloned by PostgreSQL to every
-- partition, present and attached later, so inserts, updates, deletes and rows moving between
-- partitions (a delete in one, an insert in the other) are captured as for any table. TRUNCATE
-- is not: a statement trigger stays on its own table, and truncating one partition fires only
-- that partition's triggers. So every member of the tree gets two TRUNCATE triggers:
--   * BEFORE: truncating a partition logs a 'D' for each of its rows (the Agent table need not
--     be partitioned, or partitioned alike, so "truncate that partition" would mean nothing
--     there), unless an ancestor's truncation in the same statement already covers it;
--     truncating the registered table itself only marks itself (its AFTER trigger logs 'T').
--   * AFTER: removes the mark.
-- The marks live in dbsync.truncating, which only these SECURITY DEFINER functions write: a
-- writer cannot forge one to make a partition's truncation go unlogged.
-- ATTACH and DETACH PARTITION fire no trigger at all: dbsync.partitions records the members
-- capture was installed on, `dbsync status` reports a tree that no longer matches, and
-- `dbsync tables refresh` installs the triggers on new members and resyncs the rows that
-- came or went (dbsync.refresh_partitions below, then resync_keys).

CREATE TABLE dbsync.partitions (
    table_id integer NOT NULL REFERENCES dbsync.replicated_tables (table_id),
    relid    oid NOT NULL,
    -- As it was when recorded, for messages about a member that has been dropped since.
    name     text NOT NULL,
    PRIMARY KEY (table_id, relid)
);
REVOKE ALL ON dbsync.partitions FROM PUBLIC;

CREATE UNLOGGED TABLE dbsync.truncating (
    txid  xid8 NOT NULL,
    relid oid NOT NULL,
    PRIMARY KEY (txid, relid)
);
REVOKE ALL ON dbsync.truncating FROM PUBLIC;

DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    -- TG_ARGV: [0] table_id, [1] the registered table's oid, [2..] primary-key column names.
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.capture_truncate_before() RETURNS trigger
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        SET extra_float_digits = 3
        SET IntervalStyle = postgres
        SET DateStyle = 'ISO, YMD'
        SET TimeZone = 'UTC'
        SET bytea_output = hex
        SET row_security = off
        AS $fn$
        DECLARE
            v_table integer := TG_ARGV[0]::integer;
            v_root  oid := TG_ARGV[1]::oid;
            v_keys  text[] := TG_ARGV[2:TG_NARGS - 1];
            v_txid  xid8 := pg_current_xact_id();
            v_rows  bigint;
        BEGIN
            IF EXISTS (SELECT 1 FROM dbsync.truncating t
                        WHERE t.txid OPERATOR(pg_catalog.=) v_txid
                          AND t.relid OPERATOR(pg_catalog.=) ANY (
                              SELECT a.relid::oid FROM pg_partition_ancestors(TG_RELID) AS a(relid))) THEN
                RETURN NULL;  -- an ancestor being truncated in this statement covers it
            END IF;
            INSERT INTO dbsync.truncating (txid, relid) VALUES (v_txid, TG_RELID);
            IF TG_RELID OPERATOR(pg_catalog.<>) v_root THEN
                EXECUTE format(
                    'INSERT INTO dbsync.sync_log (table_id, op, pk) '
                    'SELECT $1, ''D'', dbsync.key_image(%%1$s.hstore(s), $2) FROM (SELECT %%2$s FROM %%3$s) AS s',
                    %1$L,
                    (SELECT string_agg(quote_ident(k), ', ') FROM unnest(v_keys) AS k),
                    TG_RELID::regclass)
                   USING v_table, v_keys;
                GET DIAGNOSTICS v_rows = ROW_COUNT;
                IF v_rows > 0 AND dbsync.doorbell_armed() THEN
                    PERFORM pg_catalog.pg_notify('dbsync', '');
                END IF;
            END IF;
            RETURN NULL;
        END
        $fn$$sql$, ext);
END
$do$;

-- Removes the mark; on the registered table capture() does (it logs the 'T' first).
CREATE FUNCTION dbsync.capture_truncate_after() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    DELETE FROM dbsync.truncating t
     WHERE t.txid OPERATOR(pg_catalog.=) pg_current_xact_id() AND t.relid OPERATOR(pg_catalog.=) TG_RELID;
    RETURN NULL;
END
$fn$;

DO $do$
DECLARE
    v_old text := $old$INSERT INTO dbsync.sync_log (table_id, op) VALUES (v_table, 'T');$old$;
    v_new text := $new$INSERT INTO dbsync.sync_log (table_id, op) VALUES (v_table, 'T');
                -- A partitioned table's mark (0005_site_partitions); other tables have none.
                DELETE FROM dbsync.truncating t
                 WHERE t.txid OPERATOR(pg_catalog.=) pg_current_xact_id() AND t.relid OPERATOR(pg_catalog.=) TG_RELID;$new$;
    v_def text := pg_catalog.pg_get_functiondef('dbsync.capture()'::pg_catalog.regprocedure);
BEGIN
    -- capture() as 0004_site_safe_calls left it, with the mark removed after a 'T'.
    IF (pg_catalog.length(v_def) - pg_catalog.length(pg_catalog.replace(v_def, v_old, ''))) / pg_catalog.length(v_old) <> 1 THEN
        RAISE EXCEPTION 'dbsync: dbsync.capture() is not the function 0004_site_safe_calls installed';
    END IF;
    EXECUTE pg_catalog.replace(v_def, v_old, v_new);
END
$do$;
REVOKE ALL ON FUNCTION dbsync.capture(), dbsync.capture_truncate_before(), dbsync.capture_truncate_after() FROM PUBLIC;

-- The TRUNCATE triggers of one member of a replicated table's partition tree.
CREATE FUNCTION dbsync.install_truncate_capture(p_table_id integer, p_member regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_root oid;
    v_keys text[];
    v_args text;
BEGIN
    SELECT r.relid, r.key_columns INTO v_root, v_keys FROM dbsync.replicated_tables r WHERE r.table_id = p_table_id;
    SELECT string_agg(quote_literal(x), ', ') INTO v_args
      FROM unnest(ARRAY[p_table_id::text, v_root::text] || v_keys) AS x;
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_truncate_before ON %s', p_member);
    EXECUTE format(
        'CREATE TRIGGER dbsync_capture_truncate_before BEFORE TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION dbsync.capture_truncate_before(%s)', p_member, v_args);
    IF p_member::oid <> v_root THEN
        EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_truncate_after ON %s', p_member);
        EXECUTE format(
            'CREATE TRIGGER dbsync_capture_truncate_after AFTER TRUNCATE ON %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION dbsync.capture_truncate_after()', p_member);
    END IF;
    INSERT INTO dbsync.partitions (table_id, relid, name) VALUES (p_table_id, p_member, p_member::text)
    ON CONFLICT (table_id, relid) DO UPDATE SET name = EXCLUDED.name;
END
$fn$;

CREATE FUNCTION dbsync.drop_truncate_capture(p_member regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_truncate_before ON %s', p_member);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_truncate_after ON %s', p_member);
END
$fn$;

-- How a replicated table's partition tree differs from the members capture is installed on:
-- one row per member attached since (in the tree, not recorded), detached (recorded, exists,
-- no longer in the tree) or dropped (recorded, gone).
CREATE FUNCTION dbsync.partition_changes(p_table_id integer, OUT member text, OUT relid oid, OUT change text)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH r AS (SELECT relid FROM dbsync.replicated_tables WHERE table_id = p_table_id AND removed_at IS NULL),
         tree AS (SELECT t.relid::oid AS relid FROM r, pg_partition_tree(r.relid) AS t
                   WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = r.relid AND c.relkind = 'p')),
         seen AS (SELECT p.relid, p.name FROM dbsync.partitions p WHERE p.table_id = p_table_id)
    SELECT t.relid::regclass::text, t.relid, 'attached' FROM tree t WHERE t.relid NOT IN (SELECT relid FROM seen)
    UNION ALL
    SELECT CASE WHEN c.oid IS NULL THEN s.name ELSE c.oid::regclass::text END, s.relid,
           CASE WHEN c.oid IS NULL THEN 'dropped' ELSE 'detached' END
      FROM seen s LEFT JOIN pg_class c ON c.oid = s.relid
     WHERE s.relid NOT IN (SELECT relid FROM tree)
    ORDER BY 1
$fn$;

-- The keys of every row of one member, as JSON objects of text values (the form resync_keys
-- takes), read from an anonymous record so only exact-match hstore calls run.
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.member_keys(p_member regclass, p_keys text[]) RETURNS SETOF json
        LANGUAGE plpgsql STABLE
        SET search_path = pg_catalog, pg_temp
        SET extra_float_digits = 3
        SET IntervalStyle = postgres
        SET DateStyle = 'ISO, YMD'
        SET TimeZone = 'UTC'
        SET bytea_output = hex
        SET row_security = off
        AS $fn$
        BEGIN
            RETURN QUERY EXECUTE format('SELECT %%1$s.hstore_to_json(%%1$s.hstore(s)) FROM (SELECT %%2$s FROM %%3$s) AS s',
                %1$L, (SELECT string_agg(quote_ident(k), ', ') FROM unnest(p_keys) AS k), p_member);
        END
        $fn$$sql$, ext);
END
$do$;

-- Register a table, as in 0001_site_core, and for a partitioned table every member of its tree.
CREATE OR REPLACE FUNCTION dbsync.add_table(p_table regclass) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_schema text;
    v_name   text;
    v_kind   "char";
    v_keys   text[];
    v_id     integer;
    v_args   text;
    v_other  text;
    v_member regclass;
BEGIN
    SELECT n.nspname, c.relname, c.relkind INTO v_schema, v_name, v_kind
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table AND c.relkind IN ('r', 'p');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dbsync: % is not a table', p_table USING ERRCODE = 'wrong_object_type';
    END IF;
    IF v_schema = 'dbsync' THEN
        RAISE EXCEPTION 'dbsync: cannot replicate dbsync''s own table %', p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO v_keys
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = p_table AND i.indisprimary;
    IF v_keys IS NULL THEN
        RAISE EXCEPTION 'dbsync: table %.% has no primary key', quote_ident(v_schema), quote_ident(v_name)
            USING ERRCODE = 'invalid_table_definition';
    END IF;
    IF EXISTS (SELECT 1 FROM dbsync.replicated_tables WHERE relid = p_table AND removed_at IS NULL) THEN
        RAISE EXCEPTION 'dbsync: table %.% is already replicated', quote_ident(v_schema), quote_ident(v_name)
            USING ERRCODE = 'duplicate_object';
    END IF;
    -- One capture per row: neither an ancestor nor a member of this table may be replicated too.
    SELECT r.relid::regclass::text INTO v_other
      FROM dbsync.replicated_tables r
     WHERE r.removed_at IS NULL
       AND (r.relid IN (SELECT a.relid FROM pg_partition_ancestors(p_table) AS a WHERE a.relid <> p_table)
            OR r.relid IN (SELECT t.relid FROM pg_partition_tree(p_table) AS t WHERE t.relid <> p_table))
     LIMIT 1;
    IF v_other IS NOT NULL THEN
        RAISE EXCEPTION 'dbsync: table %.% is in the partition tree of %, which is replicated; replicate the tree once, at its root',
            quote_ident(v_schema), quote_ident(v_name), v_other USING ERRCODE = 'invalid_table_definition';
    END IF;

    INSERT INTO dbsync.replicated_tables (relid, schema_name, table_name, key_columns)
    VALUES (p_table, v_schema, v_name, v_keys)
    ON CONFLICT (relid) DO UPDATE
        SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
            key_columns = EXCLUDED.key_columns, added_at = now(), removed_at = NULL
    RETURNING table_id INTO v_id;

    SELECT string_agg(quote_literal(x), ', ') INTO v_args FROM unnest(v_id::text || v_keys) AS x;
    EXECUTE format(
        'CREATE TRIGGER dbsync_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION dbsync.capture(%s)', p_table, v_args);
    EXECUTE format(
        'CREATE TRIGGER dbsync_capture_truncate AFTER TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION dbsync.capture(%s)', p_table, v_args);
    DELETE FROM dbsync.partitions WHERE table_id = v_id;
    IF v_kind = 'p' THEN
        FOR v_member IN SELECT t.relid FROM pg_partition_tree(p_table) AS t LOOP
            PERFORM dbsync.install_truncate_capture(v_id, v_member);
        END LOOP;
    END IF;
    RETURN v_id;
END
$fn$;

-- Stop capturing a table, as in 0001_site_core, and on every member capture was installed on.
CREATE OR REPLACE FUNCTION dbsync.remove_table(p_table regclass) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_id     integer;
    v_member regclass;
BEGIN
    SELECT table_id INTO v_id FROM dbsync.replicated_tables WHERE relid = p_table AND removed_at IS NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_truncate ON %s', p_table);
    FOR v_member IN SELECT p.relid FROM dbsync.partitions p JOIN pg_class c ON c.oid = p.relid WHERE p.table_id = v_id LOOP
        PERFORM dbsync.drop_truncate_capture(v_member);
    END LOOP;
    DELETE FROM dbsync.partitions WHERE table_id = v_id;
    UPDATE dbsync.replicated_tables SET removed_at = now() WHERE relid = p_table;
    RETURN true;
END
$fn$;

-- Bring capture in line with the tree after ATTACH / DETACH PARTITION: triggers on attached
-- members, none left on detached ones. Returns the changes; the rows that came with an attached
-- member or went with a detached one are the caller's to resync (dbsync tables refresh).
CREATE FUNCTION dbsync.refresh_partitions(p_table regclass, OUT member text, OUT relid oid, OUT change text)
RETURNS SETOF record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_id integer;
    c    record;
BEGIN
    SELECT r.table_id INTO v_id FROM dbsync.replicated_tables r WHERE r.relid = p_table AND r.removed_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dbsync: table % is not replicated', p_table USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR c IN SELECT * FROM dbsync.partition_changes(v_id) LOOP
        IF c.change = 'attached' THEN
            PERFORM dbsync.install_truncate_capture(v_id, c.relid::regclass);
        ELSE
            IF c.change = 'detached' THEN
                PERFORM dbsync.drop_truncate_capture(c.relid::regclass);
            END IF;
            DELETE FROM dbsync.partitions p WHERE p.table_id = v_id AND p.relid = c.relid;
        END IF;
        member := c.member;
        relid := c.relid;
        change := c.change;
        RETURN NEXT;
    END LOOP;
END
$fn$;

-- Tables added before this migration: record and equip their trees.
DO $do$
DECLARE
    t record;
    m regclass;
BEGIN
    FOR t IN SELECT r.table_id, r.relid FROM dbsync.replicated_tables r JOIN pg_catalog.pg_class c ON c.oid = r.relid
              WHERE r.removed_at IS NULL AND c.relkind = 'p' LOOP
        FOR m IN SELECT p.relid FROM pg_catalog.pg_partition_tree(t.relid) AS p LOOP
            PERFORM dbsync.install_truncate_capture(t.table_id, m);
        END LOOP;
    END LOOP;
END
$do$;

REVOKE ALL ON FUNCTION dbsync.install_truncate_capture(integer, regclass), dbsync.drop_truncate_capture(regclass),
    dbsync.partition_changes(integer), dbsync.member_keys(regclass, text[]),
    dbsync.refresh_partitions(regclass) FROM PUBLIC;
