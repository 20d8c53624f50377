-- Back to 0007: every replicated table has a primary key. Refused while a table registered by
-- identity index or insert-only is replicated (remove it first); removed ones are forgotten.
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM dbsync.replicated_tables r
                WHERE (r.insert_only OR r.identity_index IS NOT NULL) AND r.removed_at IS NULL) THEN
        RAISE EXCEPTION 'dbsync: tables registered by --identity or --insert-only are replicated: '
            'remove them (dbsync tables remove) before rolling back 0008_site_identity';
    END IF;
    IF EXISTS (SELECT 1 FROM dbsync.sync_log l JOIN dbsync.replicated_tables r USING (table_id) WHERE r.insert_only) THEN
        RAISE EXCEPTION 'dbsync: events of an insert-only table are still in the sync log: let the daemon apply them first';
    END IF;
    DELETE FROM dbsync.replicated_tables WHERE insert_only;
END
$do$;

DROP FUNCTION dbsync.add_table(regclass, regclass, boolean);
DROP FUNCTION dbsync.copy_insert_only(integer);
DROP FUNCTION dbsync.install_insert_capture(integer);
DROP FUNCTION dbsync.insert_only_table(integer);
DROP FUNCTION dbsync.identity_problem(regclass, regclass);

CREATE OR REPLACE FUNCTION dbsync.install_capture(p_table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM dbsync.install_key_capture(p_table_id);
    PERFORM dbsync.install_reader(p_table_id);
END
$fn$;

-- key_operator as 0004_site_safe_calls made it: the primary key's operator classes.
CREATE OR REPLACE FUNCTION dbsync.key_operator(
    p_table regclass, p_column text, p_strategy integer, OUT cast_to text, OUT operator text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_type oid;
    v_base oid;
    v_class oid;
BEGIN
    SELECT a.atttypid, i.indclass[k.pos - 1] INTO v_type, v_class
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = p_table AND i.indisprimary AND a.attname = p_column;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dbsync: % is not a primary key column of %', p_column, p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_base := v_type;
    WHILE (SELECT t.typtype = 'd' FROM pg_type t WHERE t.oid = v_base) LOOP
        v_base := (SELECT t.typbasetype FROM pg_type t WHERE t.oid = v_base);
    END LOOP;
    SELECT CASE WHEN it.typtype = 'p' THEN v_base::regtype::text ELSE c.opcintype::regtype::text END,
           format('OPERATOR(%I.%s)', n.nspname, o.oprname)
      INTO cast_to, operator
      FROM pg_opclass c
      JOIN pg_type it ON it.oid = c.opcintype
      JOIN pg_amop ao ON ao.amopfamily = c.opcfamily AND ao.amopstrategy = p_strategy
                     AND ao.amoplefttype = c.opcintype AND ao.amoprighttype = c.opcintype
      JOIN pg_operator o ON o.oid = ao.amopopr
      JOIN pg_namespace n ON n.oid = o.oprnamespace
     WHERE c.oid = v_class;
    IF operator IS NULL THEN
        RAISE EXCEPTION 'dbsync: the primary key operator class of %.% has no btree strategy %',
            p_table, quote_ident(p_column), p_strategy USING ERRCODE = 'feature_not_supported';
    END IF;
END
$fn$;

-- add_table as 0006_site_key_capture made it (the same function, so its grants stay).
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

    PERFORM dbsync.install_capture(v_id);
    SELECT string_agg(quote_literal(x), ', ') INTO v_args FROM unnest(v_id::text || v_keys) AS x;
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


ALTER TABLE dbsync.replicated_tables DROP CONSTRAINT replicated_tables_key_columns_check;
ALTER TABLE dbsync.replicated_tables DROP COLUMN identity_index;
ALTER TABLE dbsync.replicated_tables DROP COLUMN insert_only;
ALTER TABLE dbsync.replicated_tables ADD CONSTRAINT replicated_tables_key_columns_check
    CHECK (cardinality(key_columns) > 0);
