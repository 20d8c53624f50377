-- Back to 0005: the row-image trigger on every registered table. Refused while the log holds
-- key-only events (an insert or update without a row image): the daemon of 0005 would apply them
-- as nothing. Drain the log first (stop the writers, let the daemon catch up), then roll back.
-- Not refused when dbsync is being uninstalled (`dbsync migrate --rollback` sets dbsync.uninstall):
-- the log goes too.
DO $do$
BEGIN
    IF pg_catalog.current_setting('dbsync.uninstall', true) IS DISTINCT FROM 'on'
       AND EXISTS (SELECT 1 FROM dbsync.sync_log l
                    WHERE (l.op IN ('I', 'U') AND l.row_image IS NULL) OR l.keys IS NOT NULL) THEN
        RAISE EXCEPTION 'dbsync: the sync log holds key-only events that the previous daemon cannot apply; '
            'let the daemon drain the log (with writers stopped) before rolling back 0006_site_key_capture'
            USING ERRCODE = 'object_in_use';
    END IF;
END
$do$;

-- add_table and remove_table as 0005_site_partitions made them.
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


DO $do$
DECLARE
    t record;
    v_args text;
BEGIN
    FOR t IN SELECT r.table_id, r.relid::pg_catalog.regclass AS tab, r.key_columns
               FROM dbsync.replicated_tables r JOIN pg_catalog.pg_class c ON c.oid = r.relid
              WHERE r.removed_at IS NULL LOOP
        PERFORM dbsync.drop_capture(t.tab);
        SELECT pg_catalog.string_agg(pg_catalog.quote_literal(x), ', ') INTO v_args
          FROM pg_catalog.unnest(t.table_id::text OPERATOR(pg_catalog.||) t.key_columns) AS x;
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER dbsync_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
            'FOR EACH ROW EXECUTE FUNCTION dbsync.capture(%s)', t.tab, v_args);
    END LOOP;
END
$do$;

DO $do$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::pg_catalog.regprocedure AS fn FROM pg_catalog.pg_proc p
               JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'dbsync' AND p.proname ~ '^capture_t[0-9]+$' LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION %s', f.fn);
    END LOOP;
END
$do$;

DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    -- As 0001_site_core created it.
    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.image_json(%1$s.hstore) RETURNS json
        LANGUAGE sql IMMUTABLE AS 'SELECT %1$s.hstore_to_json($1)'$sql$, ext);
    EXECUTE pg_catalog.format('DROP FUNCTION dbsync.key_json(%s.hstore)', ext);
END
$do$;

DROP FUNCTION dbsync.read_rows(integer, json);
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format('DROP FUNCTION dbsync.log_keys(%s.hstore, text[], text[])', ext);
END
$do$;
ALTER TABLE dbsync.sync_log DROP COLUMN keys;
DROP FUNCTION dbsync.install_capture(integer);
DROP FUNCTION dbsync.drop_capture(regclass);
DROP FUNCTION dbsync.capture_function(integer);
DROP FUNCTION dbsync.output_is_fixed(oid);
