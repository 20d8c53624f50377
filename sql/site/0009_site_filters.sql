-- depends: 0008_site_identity
-- Column lists and row filters (issue 13): a replicated table may leave columns and rows out.
--
-- * replicated_tables.column_list: the columns replicated (NULL: all), in the table's order and
--   always with the key columns. The readers select only these, so the other columns never leave
--   the Site DB, not even into the daemon's session.
-- * replicated_tables.row_filter: a boolean expression over the table's columns (NULL: every row).
--   Capture still logs every changed key; the reader returns "no row" for a key whose row does not
--   match, so the daemon deletes it on the Agent, and a row that starts matching is upserted.
-- * The filter runs inside read_rows, which is SECURITY DEFINER. dbsync.set_table_filter (callable
--   only by those who may register tables) therefore accepts only what check_row_filter proves:
--   one expression over the table's own columns, immutable, calling only built-in functions and
--   operators; it stores the server's own deparse of it, never the text as typed.

ALTER TABLE dbsync.replicated_tables ADD COLUMN column_list text[], ADD COLUMN row_filter text;
COMMENT ON COLUMN dbsync.replicated_tables.column_list IS
    'The columns replicated, key columns included, in the table''s order; NULL: all of them.';
COMMENT ON COLUMN dbsync.replicated_tables.row_filter IS
    'The rows replicated: a boolean expression as dbsync.check_row_filter returned it; NULL: all.';

-- A row filter proven safe to run with dbsync's rights, as the server deparses it; an error
-- (one line, invalid_parameter_value) otherwise. The rule, checked by PostgreSQL itself:
--   * it is the expression of one CHECK constraint on a throwaway copy of the table's columns:
--     so it is one boolean expression over those columns, without subqueries, aggregates, window
--     or set-returning functions, parameters or other tables;
--   * it is the predicate of a partial index on that copy: so every function it calls is
--     IMMUTABLE (its result depends on the row alone; now() or random() would let rows enter and
--     leave the filter without any change being logged);
--   * every function and operator it depends on is built in (oid below 16384, created by initdb;
--     names resolve in pg_catalog only, as in the readers), every type is built in or an enum, so
--     nothing a role can create (an overload in public, a domain's CHECK) is ever called;
--   * no semicolon anywhere in the text (conservative: also inside string literals).
-- Literals are read with the output settings the readers use (a timestamptz without an offset
-- is UTC), so the deparse stored means the same value wherever it is compiled.
CREATE FUNCTION dbsync.check_row_filter(p_table regclass, p_where text) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
SET extra_float_digits = 3
SET IntervalStyle = postgres
SET DateStyle = 'ISO, YMD'
SET TimeZone = 'UTC'
AS $fn$
DECLARE
    v_probe regclass;
    v_con   oid;
    v_n     integer;
    v_expr  text;
    v_bad   text;
BEGIN
    IF p_where IS NULL OR btrim(p_where) = '' THEN
        RAISE EXCEPTION 'dbsync: the row filter of % is empty', p_table USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF strpos(p_where, ';') > 0 THEN
        RAISE EXCEPTION 'dbsync: the row filter of % contains a semicolon; it must be one boolean expression', p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE 'DROP TABLE IF EXISTS pg_temp.dbsync_filter_probe';
    BEGIN
        EXECUTE format('CREATE TEMPORARY TABLE dbsync_filter_probe (LIKE %s, CONSTRAINT dbsync_filter CHECK (%s))',
                       p_table, p_where);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'dbsync: the row filter of % is not a boolean expression over its columns: %',
            p_table, SQLERRM USING ERRCODE = 'invalid_parameter_value';
    END;
    v_probe := to_regclass('pg_temp.dbsync_filter_probe');
    -- Text that closed the CHECK's parenthesis early could have added constraints, columns or
    -- table options: the probe must be exactly the table's columns and the one constraint.
    SELECT count(*) INTO v_n FROM pg_constraint c WHERE c.conrelid = v_probe AND c.contype <> 'n';
    IF v_n <> 1
       OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = v_probe)
       OR (SELECT c.relkind <> 'r' OR c.reloptions IS NOT NULL FROM pg_class c WHERE c.oid = v_probe)
       OR (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_attribute a
            WHERE a.attrelid = v_probe AND a.attnum > 0 AND NOT a.attisdropped)
          IS DISTINCT FROM
          (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_attribute a
            WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped) THEN
        EXECUTE 'DROP TABLE pg_temp.dbsync_filter_probe';
        RAISE EXCEPTION 'dbsync: the row filter of % is not one boolean expression', p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT c.oid, pg_get_expr(c.conbin, c.conrelid) INTO v_con, v_expr
      FROM pg_constraint c WHERE c.conrelid = v_probe AND c.contype = 'c' AND c.conname = 'dbsync_filter';
    IF v_con IS NULL THEN
        EXECUTE 'DROP TABLE pg_temp.dbsync_filter_probe';
        RAISE EXCEPTION 'dbsync: the row filter of % is not one boolean expression', p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Built-in objects are pinned and get no pg_depend row; everything else does.
    SELECT pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid) INTO v_bad
      FROM pg_depend d
     WHERE d.classid = 'pg_constraint'::regclass AND d.objid = v_con
       AND NOT ((d.refclassid = 'pg_class'::regclass AND d.refobjid = v_probe::oid)
                OR (d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass) AND d.refobjid < 16384::oid)
                OR (d.refclassid = 'pg_type'::regclass
                    AND (d.refobjid < 16384::oid
                         OR EXISTS (SELECT 1 FROM pg_type t WHERE t.oid = d.refobjid AND t.typtype = 'e')))
                OR d.refclassid = 'pg_collation'::regclass)
     ORDER BY 1 LIMIT 1;
    IF v_bad IS NOT NULL THEN
        EXECUTE 'DROP TABLE pg_temp.dbsync_filter_probe';
        RAISE EXCEPTION 'dbsync: the row filter of % uses %; a filter may call only built-in functions and operators',
            p_table, v_bad USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        EXECUTE format('CREATE INDEX dbsync_filter_probe_i ON pg_temp.dbsync_filter_probe ((1)) WHERE %s', v_expr);
    EXCEPTION WHEN OTHERS THEN
        EXECUTE 'DROP TABLE pg_temp.dbsync_filter_probe';
        RAISE EXCEPTION 'dbsync: the row filter of % may only call immutable functions: %', p_table, SQLERRM
            USING ERRCODE = 'invalid_parameter_value';
    END;
    EXECUTE 'DROP TABLE pg_temp.dbsync_filter_probe';
    RETURN v_expr;
END
$fn$;

-- The one statement every read of a table's rows goes through: for each key of $1 (a JSON array
-- of key objects, as read_rows takes it) whose row is there and matches the row filter, its
-- position in $1 and the listed columns (all: NULL) as JSON of text values. The table is named
-- by its current name, so this also reads a renamed table. The filter's column names resolve in
-- the innermost query, the table's; the hstore calls are exact matches of the extension's own.
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.reader_statement(p_table_id integer) RETURNS text
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
                'CROSS JOIN LATERAL (SELECT %%3$s FROM %%4$s %%5$I WHERE %%6$s%%7$s) AS s',
                v_defs, v_list, v_select, v_table, v_alias, dbsync.key_compare(v_table, v_keys, v_alias, 'k', '='),
                CASE WHEN v_filter IS NULL THEN '' ELSE format(' AND (%%s)', v_filter) END);
        END
        $fn$$sql$, ext);
END
$do$;



-- Set (or clear: NULL) a replicated table's column list and row filter, and regenerate its
-- reader. What this does to rows already on the Agent is the caller's part: `dbsync tables
-- alter` resyncs the table through the sync log.
CREATE FUNCTION dbsync.set_table_filter(p_table regclass, p_columns text[], p_where text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_id      integer;
    v_keys    text[];
    v_cols    text[];
    v_filter  text;
    v_problem text;
BEGIN
    SELECT r.table_id, r.key_columns INTO v_id, v_keys
      FROM dbsync.replicated_tables r WHERE r.relid = p_table AND r.removed_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dbsync: table % is not replicated', p_table USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- An insert-only table (0008_site_identity) logs whole rows as they are inserted, read by no reader.
    IF (SELECT r.insert_only FROM dbsync.replicated_tables r WHERE r.table_id = v_id) THEN
        IF p_columns IS NOT NULL OR p_where IS NOT NULL THEN
            RAISE EXCEPTION 'dbsync: table % is replicated insert-only: a column list or row filter does not apply',
                p_table USING ERRCODE = 'feature_not_supported';
        END IF;
        UPDATE dbsync.replicated_tables SET column_list = NULL, row_filter = NULL WHERE table_id = v_id;
        RETURN;
    END IF;
    IF p_columns IS NOT NULL THEN
        SELECT string_agg(quote_ident(c), ', ') INTO v_problem FROM unnest(p_columns) AS c
         WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                            WHERE a.attrelid = p_table AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped);
        IF v_problem IS NOT NULL THEN
            RAISE EXCEPTION 'dbsync: table % has no column(s) %', p_table, v_problem
                USING ERRCODE = 'undefined_column';
        END IF;
        SELECT string_agg(quote_ident(k), ', ') INTO v_problem FROM unnest(v_keys) AS k WHERE k <> ALL (p_columns);
        IF v_problem IS NOT NULL THEN
            RAISE EXCEPTION 'dbsync: the column list of % must include its key column(s) %', p_table, v_problem
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO v_cols
          FROM pg_attribute a
         WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped AND a.attname::text = ANY (p_columns);
    END IF;
    IF p_where IS NOT NULL THEN
        v_filter := dbsync.check_row_filter(p_table, p_where);
    END IF;
    UPDATE dbsync.replicated_tables SET column_list = v_cols, row_filter = v_filter WHERE table_id = v_id;
    PERFORM dbsync.install_reader(v_id);
END
$fn$;

-- The reader of 0007_site_stable_read: reader_statement as static SQL, which PL/pgSQL plans once
-- a session. Its body's dollar quote is chosen so that no name or filter text can end it.
CREATE OR REPLACE FUNCTION dbsync.install_reader(p_table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_fn    text := dbsync.reader_function(p_table_id);
    v_query text := dbsync.reader_statement(p_table_id);
    v_tag   text := 'body';
BEGIN
    WHILE strpos(v_query, '$' || v_tag || '$') > 0 LOOP
        v_tag := v_tag || '_';
    END LOOP;
    -- Positional $1 and use_column: a column may have any name, a variable's included.
    EXECUTE format($gen$
        CREATE OR REPLACE FUNCTION %1$s(json, OUT ord bigint, OUT image json) RETURNS SETOF record
        LANGUAGE plpgsql STABLE
        SET search_path = pg_catalog, pg_temp
        AS $%3$s$
        #variable_conflict use_column
        BEGIN
            RETURN QUERY %2$s;
        END
        $%3$s$$gen$,
        v_fn, v_query, v_tag);
    EXECUTE format('REVOKE ALL ON FUNCTION %s(json) FROM PUBLIC', v_fn);
    UPDATE dbsync.replicated_tables r SET reader_reads = c.oid::regclass::text
      FROM pg_class c WHERE c.oid = r.relid AND r.table_id = p_table_id;
END
$fn$;

-- read_rows of 0007_site_stable_read, its general path (a renamed table) through reader_statement.
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
    v_reader text;
BEGIN
    SELECT r.relid, r.reader_reads INTO v_relid, v_reader FROM dbsync.replicated_tables r WHERE r.table_id = p_table_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dbsync: the sync log names table id %, which dbsync.replicated_tables does not know',
            p_table_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_table := (SELECT c.oid::regclass FROM pg_class c WHERE c.oid = v_relid);
    IF v_table IS NULL THEN
        RAISE EXCEPTION 'dbsync: table id % was dropped on the Site DB while events for it were waiting; '
            'its rows can no longer be read', p_table_id USING ERRCODE = 'undefined_table';
    END IF;
    IF v_reader OPERATOR(pg_catalog.=) v_table::text THEN
        RETURN QUERY EXECUTE format('SELECT * FROM %s($1)', dbsync.reader_function(p_table_id)) USING p_keys;
    ELSE
        RETURN QUERY EXECUTE dbsync.reader_statement(p_table_id) USING p_keys;
    END IF;
END
$fn$;


-- Backfill, repair and `tables alter` log each row's image too (the daemon reads the row itself,
-- through the reader): only its listed columns, so the others are not copied into the log.
CREATE FUNCTION dbsync.resync_image_columns(p_table regclass) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT coalesce((SELECT string_agg(format('(r.rec).%I', c.name), ', ' ORDER BY c.ord)
                       FROM dbsync.replicated_tables t
                      CROSS JOIN LATERAL unnest(t.column_list) WITH ORDINALITY AS c(name, ord)
                      WHERE t.relid = p_table AND t.removed_at IS NULL),
                    '(r.rec).*')
$fn$;

DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    -- As in 0004_site_safe_calls, but the image logged holds only the listed columns. 0004 said:
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
                '     i AS (SELECT %%8$s.hstore(s) AS img FROM (SELECT %%9$s FROM r) AS s) '
                'INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) SELECT $2, ''U'', %%6$s, i.img FROM i',
                p_table, t.alias, t.key_list, t.key_defs, t.key_match, t.pk_expr, t.key_order, %1$L, dbsync.resync_image_columns(p_table))
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
                '     i AS (SELECT %%8$s.hstore(s) AS img FROM (SELECT %%9$s FROM r) AS s) '
                'INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) SELECT $3, ''U'', %%6$s, i.img FROM i',
                p_table, v_tcols, t.key_defs, v_lower, v_upper, t.pk_expr, t.alias, %1$L, dbsync.resync_image_columns(p_table))
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

REVOKE ALL ON FUNCTION dbsync.check_row_filter(regclass, text), dbsync.resync_image_columns(regclass),
    dbsync.reader_statement(integer),
    dbsync.set_table_filter(regclass, text[], text) FROM PUBLIC;

-- Regenerate the readers of registered tables (the same query until a filter is set).
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
