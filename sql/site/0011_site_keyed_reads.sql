-- depends: 0010_site_consumers
-- A reader looks every key up through the table's key index, whatever the table's size.
--
-- The daemon's sessions plan once (plan_cache_mode = force_generic_plan), and a generic plan
-- takes json_to_recordset for 100 keys. On a table of a few thousand rows the planner then
-- judged a hash join with a scan of the whole table cheaper than 100 index lookups, and kept
-- that plan for the session: every small batch read the table whole to find one row (seen in
-- the incremental verification's cost bench as the Site's rows read). OFFSET 0 keeps the
-- per-key subquery a subquery, so each key is looked up on its own, by index once the table
-- has more than a page or so; on large tables the plan is the same as before.

DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.reader_statement(p_table_id integer) RETURNS text
        LANGUAGE plpgsql STABLE
        SET search_path = pg_catalog, pg_temp
        AS $fn$
        DECLARE
            v_table  regclass;
            v_keys   text[];
            v_cols   text[];
            v_filter text;
            v_alias  text := 'dbsync_row';
            v_defs   text;
            v_list   text;
            v_select text;
        BEGIN
            SELECT c.oid::regclass, r.key_columns, r.column_list, r.row_filter INTO v_table, v_keys, v_cols, v_filter
              FROM dbsync.replicated_tables r JOIN pg_class c ON c.oid = r.relid
             WHERE r.table_id = p_table_id;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'dbsync: table id %% is not a table dbsync can read', p_table_id
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            WHILE EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = v_table AND a.attname = v_alias) LOOP
                v_alias := v_alias || '_';
            END LOOP;
            SELECT string_agg(format('%%I %%s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord),
                   string_agg(format('%%I', a.attname), ', ' ORDER BY k.ord)
              INTO v_defs, v_list
              FROM unnest(v_keys) WITH ORDINALITY AS k(name, ord)
              JOIN pg_attribute a ON a.attrelid = v_table AND a.attname = k.name AND NOT a.attisdropped;
            v_select := format('%%I.*', v_alias);
            IF v_cols IS NOT NULL THEN
                SELECT string_agg(format('%%I.%%I', v_alias, c.name), ', ' ORDER BY c.ord) INTO v_select
                  FROM unnest(v_cols) WITH ORDINALITY AS c(name, ord);
            END IF;
            RETURN format(
                'SELECT k.dbsync_ord, %1$s.hstore_to_json(%1$s.hstore(s)) '
                'FROM ROWS FROM (pg_catalog.json_to_recordset($1) AS (%%1$s)) WITH ORDINALITY AS k(%%2$s, dbsync_ord) '
                'CROSS JOIN LATERAL (SELECT %%3$s FROM %%4$s %%5$I WHERE %%6$s%%7$s OFFSET 0) AS s',
                v_defs, v_list, v_select, v_table, v_alias, dbsync.key_compare(v_table, v_keys, v_alias, 'k', '='),
                CASE WHEN v_filter IS NULL THEN '' ELSE format(' AND (%%s)', v_filter) END);
        END
        $fn$$sql$, ext);
END
$do$;

-- Readers of the tables registered before this migration, regenerated with the new statement.
DO $do$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT r.table_id FROM dbsync.replicated_tables r JOIN pg_catalog.pg_class c ON c.oid = r.relid
              WHERE r.removed_at IS NULL AND NOT r.insert_only ORDER BY r.table_id LOOP
        PERFORM dbsync.install_reader(t.table_id);
    END LOOP;
END
$do$;
