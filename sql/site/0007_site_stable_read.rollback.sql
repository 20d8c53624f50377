-- Back to 0006: no generated readers; read_rows VOLATILE, building its query on every call (the
-- daemon then reads every batch in a REPEATABLE READ transaction).
DO $do$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT r.table_id FROM dbsync.replicated_tables r LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %s(json)', dbsync.reader_function(t.table_id));
    END LOOP;
END
$do$;
DROP FUNCTION dbsync.install_capture(integer);
DROP FUNCTION dbsync.drop_capture(regclass);
ALTER FUNCTION dbsync.drop_key_capture(regclass) RENAME TO drop_capture;
ALTER FUNCTION dbsync.install_key_capture(integer) RENAME TO install_capture;
DROP FUNCTION dbsync.install_reader(integer);
DROP FUNCTION dbsync.reader_function(integer);
ALTER TABLE dbsync.replicated_tables DROP COLUMN reader_reads;

-- read_rows as 0006_site_key_capture wrote it (the same function, so its grants stay).
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.read_rows(p_table_id integer, p_keys json, OUT ord bigint, OUT image json)
        RETURNS SETOF record
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        SET extra_float_digits = 3
        SET IntervalStyle = postgres
        SET DateStyle = 'ISO, YMD'
        SET TimeZone = 'UTC'
        SET bytea_output = hex
        SET lc_monetary = 'C'
        SET row_security = off
        AS $fn$
        DECLARE
            v_relid oid;
            v_table regclass;
            v_keys  text[];
            v_alias text := 'dbsync_row';
            v_defs  text;
            v_list  text;
        BEGIN
            SELECT r.relid, r.key_columns INTO v_relid, v_keys FROM dbsync.replicated_tables r WHERE r.table_id = p_table_id;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'dbsync: the sync log names table id %%, which dbsync.replicated_tables does not know',
                    p_table_id USING ERRCODE = 'invalid_parameter_value';
            END IF;
            v_table := (SELECT c.oid::regclass FROM pg_class c WHERE c.oid = v_relid);
            IF v_table IS NULL THEN
                RAISE EXCEPTION 'dbsync: table id %% was dropped on the Site DB while events for it were waiting; '
                    'its rows can no longer be read', p_table_id USING ERRCODE = 'undefined_table';
            END IF;
            WHILE EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = v_relid AND a.attname = v_alias) LOOP
                v_alias := v_alias || '_';
            END LOOP;
            SELECT string_agg(format('%%I %%s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord),
                   string_agg(format('%%I', a.attname), ', ' ORDER BY k.ord)
              INTO v_defs, v_list
              FROM unnest(v_keys) WITH ORDINALITY AS k(name, ord)
              JOIN pg_attribute a ON a.attrelid = v_relid AND a.attname = k.name AND NOT a.attisdropped;
            -- The whole-row value of a subquery is typed `record`: the extension's exact hstore(record).
            RETURN QUERY EXECUTE format(
                'SELECT k.dbsync_ord, %%1$s.hstore_to_json(%%1$s.hstore(s)) '
                'FROM ROWS FROM (pg_catalog.json_to_recordset($1) AS (%%2$s)) WITH ORDINALITY AS k(%%3$s, dbsync_ord) '
                'CROSS JOIN LATERAL (SELECT %%4$I.* FROM %%5$s %%4$I WHERE %%6$s) AS s',
                %1$L, v_defs, v_list, v_alias, v_table, dbsync.key_compare(v_table, v_keys, v_alias, 'k', '='))
              USING p_keys;
        END
        $fn$$sql$, ext);
END
$do$;
ALTER FUNCTION dbsync.read_rows(integer, json) VOLATILE;
