-- Back to 0007: readers of every column and row; no column lists or row filters.
DROP FUNCTION dbsync.set_table_filter(regclass, text[], text);
DROP FUNCTION dbsync.check_row_filter(regclass, text);

-- resync_keys and resync_range as 0004_site_safe_calls wrote them.
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    -- As in 0002_site_resync, but: images and chunk positions from records typed `record`
    -- (exact-match hstore calls, never a cast), keys compared through key_compare, row_security off.
    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.resync_keys(p_table regclass, p_keys json) RETURNS json
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
            t         record;
            v_null    text;
            v_absent  bigint;
            v_deleted bigint := 0;
            v_updated bigint := 0;
        BEGIN
            PERFORM dbsync.resync_require_read_committed();
            SELECT * INTO t FROM dbsync.resync_target(p_table);
            SELECT string_agg(format('k.%%I IS NULL', c), ' OR ') INTO v_null FROM unnest(t.key_columns) AS c;

            EXECUTE format('SELECT count(*) FILTER (WHERE %%s) FROM pg_catalog.json_to_recordset($1) AS k(%%s)',
                           v_null, t.key_defs)
               INTO v_absent USING p_keys;
            IF v_absent > 0 THEN
                RAISE EXCEPTION 'dbsync: %% key(s) lack a key column of %% (%%)', v_absent, p_table, t.key_list
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;

            -- %%1$s table, %%2$I alias, %%3$s key list, %%4$s key defs, %%5$s alias.key = k.key, %%6$s pk,
            -- %%7$s alias.keys, %%8$s the hstore schema
            EXECUTE format(
                'SELECT count(*) FROM (SELECT DISTINCT %%3$s FROM pg_catalog.json_to_recordset($1) AS k(%%4$s)) k '
                'WHERE NOT EXISTS (SELECT 1 FROM %%1$s %%2$I WHERE %%5$s)',
                p_table, t.alias, t.key_list, t.key_defs, t.key_match)
               INTO v_absent USING p_keys;

            IF v_absent > 0 THEN
                -- Waits for the table's writers in progress; blocks new ones until commit (keep it short).
                EXECUTE format('LOCK TABLE %%s IN SHARE MODE', p_table);
                EXECUTE format(
                    'WITH k AS (SELECT DISTINCT %%3$s FROM pg_catalog.json_to_recordset($1) AS k(%%4$s)), '
                    '     gone AS (SELECT * FROM k WHERE NOT EXISTS (SELECT 1 FROM %%1$s %%2$I WHERE %%5$s)), '
                    '     i AS (SELECT %%8$s.hstore(%%2$I) AS img FROM gone AS %%2$I) '
                    'INSERT INTO dbsync.sync_log (table_id, op, pk) SELECT $2, ''D'', %%6$s FROM i',
                    p_table, t.alias, t.key_list, t.key_defs, t.key_match, t.pk_expr, NULL, %1$L)
                   USING p_keys, t.table_id;
                GET DIAGNOSTICS v_deleted = ROW_COUNT;
            END IF;

            EXECUTE format(
                'WITH k AS (SELECT DISTINCT %%3$s FROM pg_catalog.json_to_recordset($1) AS k(%%4$s)), '
                '     r AS (SELECT %%2$I AS rec FROM %%1$s %%2$I JOIN k ON %%5$s ORDER BY %%7$s FOR SHARE OF %%2$I), '
                '     i AS (SELECT %%8$s.hstore(s) AS img FROM (SELECT (r.rec).* FROM r) AS s) '
                'INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) SELECT $2, ''U'', %%6$s, i.img FROM i',
                p_table, t.alias, t.key_list, t.key_defs, t.key_match, t.pk_expr, t.key_order, %1$L)
               USING p_keys, t.table_id;
            GET DIAGNOSTICS v_updated = ROW_COUNT;

            -- The doorbell as dbsync.capture() rings it: only while the daemon is idle (armed), read
            -- after the events are written, so the daemon's xid fence covers this transaction.
            IF v_deleted + v_updated > 0 AND dbsync.doorbell_armed() THEN
                PERFORM pg_catalog.pg_notify('dbsync', '');
            END IF;
            RETURN pg_catalog.json_build_object('updated', v_updated, 'deleted', v_deleted);
        END
        $fn$$sql$, ext);

    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.resync_range(p_table regclass, p_after json, p_limit integer) RETURNS json
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
            t       record;
            v_tcols text;
            v_lower text := 'true';
            v_upper text := 'true';
            v_hi    json;
            v_rows  bigint;
        BEGIN
            PERFORM dbsync.resync_require_read_committed();
            IF p_limit IS NULL OR p_limit < 1 THEN
                RAISE EXCEPTION 'dbsync: resync_range needs a positive limit' USING ERRCODE = 'invalid_parameter_value';
            END IF;
            SELECT * INTO t FROM dbsync.resync_target(p_table);
            v_tcols := t.key_order;
            IF p_after IS NOT NULL THEN
                v_lower := dbsync.key_compare(p_table, t.key_columns, t.alias, 'a', '>');
            END IF;

            -- The chunk's last key as text values, as capture writes keys: not to_json(), which
            -- would call a cast to json that a key type's owner may have created.
            EXECUTE format(
                'SELECT %%6$s.hstore_to_json(%%6$s.hstore(%%5$I)) FROM (SELECT %%2$s FROM %%1$s %%5$I, '
                'pg_catalog.json_to_record($1) AS a(%%3$s) WHERE %%4$s ORDER BY %%2$s OFFSET $2 - 1 LIMIT 1) %%5$I',
                p_table, v_tcols, t.key_defs, v_lower, t.alias, %1$L)
               INTO v_hi USING coalesce(p_after, '{}'::json), p_limit;
            IF v_hi IS NOT NULL THEN
                v_upper := dbsync.key_compare(p_table, t.key_columns, t.alias, 'h', '<=');
            END IF;

            EXECUTE format(
                'WITH r AS (SELECT %%7$I AS rec FROM %%1$s %%7$I, pg_catalog.json_to_record($1) AS a(%%3$s), '
                '                  pg_catalog.json_to_record($2) AS h(%%3$s) '
                '           WHERE %%4$s AND %%5$s ORDER BY %%2$s FOR SHARE OF %%7$I), '
                '     i AS (SELECT %%8$s.hstore(s) AS img FROM (SELECT (r.rec).* FROM r) AS s) '
                'INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) SELECT $3, ''U'', %%6$s, i.img FROM i',
                p_table, v_tcols, t.key_defs, v_lower, v_upper, t.pk_expr, t.alias, %1$L)
               USING coalesce(p_after, '{}'::json), coalesce(v_hi, '{}'::json), t.table_id;
            GET DIAGNOSTICS v_rows = ROW_COUNT;
            IF v_rows > 0 AND dbsync.doorbell_armed() THEN
                PERFORM pg_catalog.pg_notify('dbsync', '');
            END IF;
            RETURN pg_catalog.json_build_object('rows', v_rows, 'last', v_hi);
        END
        $fn$$sql$, ext);
END
$do$;
DROP FUNCTION dbsync.resync_image_columns(regclass);

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
DROP FUNCTION dbsync.reader_statement(integer);
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
