-- Back to 0007: readers of every column and row; no column lists or row filters.
DROP FUNCTION dbsync.set_table_filter(regclass, text[], text);
DROP FUNCTION dbsync.check_row_filter(regclass, text);

-- install_reader and read_rows as 0007_site_stable_read wrote them (the same functions, so their
-- grants stay).
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.install_reader(p_table_id integer) RETURNS void
        LANGUAGE plpgsql
        SET search_path = pg_catalog, pg_temp
        AS $fn$
        DECLARE
            v_table regclass;
            v_keys  text[];
            v_fn    text := dbsync.reader_function(p_table_id);
            v_alias text := 'dbsync_row';
            v_defs  text;
            v_list  text;
        BEGIN
            SELECT c.oid::regclass, r.key_columns INTO v_table, v_keys
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
            -- Positional $1 and use_column: a key column may have any name, a variable's included.
            EXECUTE format($gen$
                CREATE OR REPLACE FUNCTION %%1$s(json, OUT ord bigint, OUT image json) RETURNS SETOF record
                LANGUAGE plpgsql STABLE
                SET search_path = pg_catalog, pg_temp
                AS $body$
                #variable_conflict use_column
                BEGIN
                    RETURN QUERY
                    SELECT k.dbsync_ord, %1$s.hstore_to_json(%1$s.hstore(s))
                      FROM ROWS FROM (pg_catalog.json_to_recordset($1) AS (%%2$s)) WITH ORDINALITY AS k(%%3$s, dbsync_ord)
                     CROSS JOIN LATERAL (SELECT %%4$I.* FROM %%5$s %%4$I WHERE %%6$s) AS s;
                END
                $body$$gen$,
                v_fn, v_defs, v_list, v_alias, v_table, dbsync.key_compare(v_table, v_keys, v_alias, 'k', '='));
            EXECUTE format('REVOKE ALL ON FUNCTION %%s(json) FROM PUBLIC', v_fn);
            UPDATE dbsync.replicated_tables SET reader_reads = v_table::text WHERE table_id = p_table_id;
        END
        $fn$$sql$, ext);
END
$do$;
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.read_rows(p_table_id integer, p_keys json, OUT ord bigint, OUT image json)
        RETURNS SETOF record
        LANGUAGE plpgsql
        STABLE
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
            v_relid  oid;
            v_table  regclass;
            v_keys   text[];
            v_reader text;
            v_alias  text := 'dbsync_row';
            v_defs   text;
            v_list   text;
        BEGIN
            SELECT r.relid, r.key_columns, r.reader_reads INTO v_relid, v_keys, v_reader
              FROM dbsync.replicated_tables r WHERE r.table_id = p_table_id;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'dbsync: the sync log names table id %%, which dbsync.replicated_tables does not know',
                    p_table_id USING ERRCODE = 'invalid_parameter_value';
            END IF;
            v_table := (SELECT c.oid::regclass FROM pg_class c WHERE c.oid = v_relid);
            IF v_table IS NULL THEN
                RAISE EXCEPTION 'dbsync: table id %% was dropped on the Site DB while events for it were waiting; '
                    'its rows can no longer be read', p_table_id USING ERRCODE = 'undefined_table';
            END IF;
            IF v_reader OPERATOR(pg_catalog.=) v_table::text THEN
                RETURN QUERY EXECUTE format('SELECT * FROM %%s($1)', dbsync.reader_function(p_table_id)) USING p_keys;
                RETURN;
            END IF;
            WHILE EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = v_relid AND a.attname = v_alias) LOOP
                v_alias := v_alias || '_';
            END LOOP;
            SELECT string_agg(format('%%I %%s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord),
                   string_agg(format('%%I', a.attname), ', ' ORDER BY k.ord)
              INTO v_defs, v_list
              FROM unnest(v_keys) WITH ORDINALITY AS k(name, ord)
              JOIN pg_attribute a ON a.attrelid = v_relid AND a.attname = k.name AND NOT a.attisdropped;
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
DROP FUNCTION dbsync.reader_query(regclass, text[], text[], text, text);
ALTER TABLE dbsync.replicated_tables DROP COLUMN column_list, DROP COLUMN row_filter;

DO $do$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT r.table_id FROM dbsync.replicated_tables r JOIN pg_catalog.pg_class c ON c.oid = r.relid
              WHERE r.removed_at IS NULL ORDER BY r.table_id LOOP
        PERFORM dbsync.install_reader(t.table_id);
    END LOOP;
END
$do$;
