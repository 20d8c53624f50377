-- Back to 0004: capture only on the registered table, no partition bookkeeping.
DO $do$
DECLARE
    m record;
BEGIN
    FOR m IN SELECT p.relid::pg_catalog.regclass AS member FROM dbsync.partitions p
               JOIN pg_catalog.pg_class c ON c.oid = p.relid LOOP
        PERFORM dbsync.drop_truncate_capture(m.member);
    END LOOP;
END
$do$;

DO $do$
DECLARE
    v_new text := $new$INSERT INTO dbsync.sync_log (table_id, op) VALUES (v_table, 'T');
                -- A partitioned table's mark (0005_site_partitions); other tables have none.
                DELETE FROM dbsync.truncating t
                 WHERE t.txid OPERATOR(pg_catalog.=) pg_current_xact_id() AND t.relid OPERATOR(pg_catalog.=) TG_RELID;$new$;
    v_old text := $old$INSERT INTO dbsync.sync_log (table_id, op) VALUES (v_table, 'T');$old$;
BEGIN
    EXECUTE pg_catalog.replace(pg_catalog.pg_get_functiondef('dbsync.capture()'::pg_catalog.regprocedure), v_new, v_old);
END
$do$;
REVOKE ALL ON FUNCTION dbsync.capture() FROM PUBLIC;

CREATE OR REPLACE FUNCTION dbsync.add_table(p_table regclass) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_schema text;
    v_name   text;
    v_keys   text[];
    v_id     integer;
    v_args   text;
BEGIN
    SELECT n.nspname, c.relname INTO v_schema, v_name
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
    RETURN v_id;
END
$fn$;

CREATE OR REPLACE FUNCTION dbsync.remove_table(p_table regclass) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM dbsync.replicated_tables WHERE relid = p_table AND removed_at IS NULL) THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_truncate ON %s', p_table);
    UPDATE dbsync.replicated_tables SET removed_at = now() WHERE relid = p_table;
    RETURN true;
END
$fn$;

DROP FUNCTION dbsync.refresh_partitions(regclass);
DROP FUNCTION dbsync.member_keys(regclass, text[]);
DROP FUNCTION dbsync.partition_changes(integer);
DROP FUNCTION dbsync.drop_truncate_capture(regclass);
DROP FUNCTION dbsync.install_truncate_capture(integer, regclass);
DROP FUNCTION dbsync.capture_truncate_after();
DROP FUNCTION dbsync.capture_truncate_before();
DROP TABLE dbsync.truncating;
DROP TABLE dbsync.partitions;
