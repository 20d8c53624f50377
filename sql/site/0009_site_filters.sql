-- depends: 0007_site_stable_read
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

-- The row subquery of a reader: the listed columns (all: NULL) of the row of key k, when it
-- matches the filter. The filter's column names resolve in this innermost query, the table's.
CREATE FUNCTION dbsync.reader_query(p_table regclass, p_keys text[], p_columns text[], p_filter text, p_alias text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_cols text := format('%I.*', p_alias);
BEGIN
    IF p_columns IS NOT NULL THEN
        SELECT string_agg(format('%I.%I', p_alias, c.name), ', ' ORDER BY c.ord) INTO v_cols
          FROM unnest(p_columns) WITH ORDINALITY AS c(name, ord);
    END IF;
    RETURN format('SELECT %s FROM %s %I WHERE %s%s', v_cols, p_table, p_alias,
                  dbsync.key_compare(p_table, p_keys, p_alias, 'k', '='),
                  CASE WHEN p_filter IS NULL THEN '' ELSE format(' AND (%s)', p_filter) END);
END
$fn$;

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

-- The reader of 0007_site_stable_read, reading only the listed columns of matching rows. The
-- body's dollar quote is chosen so that no name or filter text can end it.
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
            v_table  regclass;
            v_keys   text[];
            v_cols   text[];
            v_filter text;
            v_fn     text := dbsync.reader_function(p_table_id);
            v_alias  text := 'dbsync_row';
            v_defs   text;
            v_list   text;
            v_query  text;
            v_tag    text := 'body';
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
            v_query := dbsync.reader_query(v_table, v_keys, v_cols, v_filter, v_alias);
            WHILE strpos(v_query || v_defs || v_list, '$' || v_tag || '$') > 0 LOOP
                v_tag := v_tag || '_';
            END LOOP;
            -- Positional $1 and use_column: a column may have any name, a variable's included.
            EXECUTE format($gen$
                CREATE OR REPLACE FUNCTION %%1$s(json, OUT ord bigint, OUT image json) RETURNS SETOF record
                LANGUAGE plpgsql STABLE
                SET search_path = pg_catalog, pg_temp
                AS $%%5$s$
                #variable_conflict use_column
                BEGIN
                    RETURN QUERY
                    SELECT k.dbsync_ord, %1$s.hstore_to_json(%1$s.hstore(s))
                      FROM ROWS FROM (pg_catalog.json_to_recordset($1) AS (%%2$s)) WITH ORDINALITY AS k(%%3$s, dbsync_ord)
                     CROSS JOIN LATERAL (%%4$s) AS s;
                END
                $%%5$s$$gen$,
                v_fn, v_defs, v_list, v_query, v_tag);
            EXECUTE format('REVOKE ALL ON FUNCTION %%s(json) FROM PUBLIC', v_fn);
            UPDATE dbsync.replicated_tables SET reader_reads = v_table::text WHERE table_id = p_table_id;
        END
        $fn$$sql$, ext);
END
$do$;

-- read_rows of 0007_site_stable_read; its general path (a renamed table) honours both too.
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
            v_cols   text[];
            v_filter text;
            v_reader text;
            v_alias  text := 'dbsync_row';
            v_defs   text;
            v_list   text;
        BEGIN
            SELECT r.relid, r.key_columns, r.column_list, r.row_filter, r.reader_reads
              INTO v_relid, v_keys, v_cols, v_filter, v_reader
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
                'CROSS JOIN LATERAL (%%4$s) AS s',
                %1$L, v_defs, v_list, dbsync.reader_query(v_table, v_keys, v_cols, v_filter, v_alias))
              USING p_keys;
        END
        $fn$$sql$, ext);
END
$do$;

REVOKE ALL ON FUNCTION dbsync.check_row_filter(regclass, text),
    dbsync.reader_query(regclass, text[], text[], text, text),
    dbsync.set_table_filter(regclass, text[], text) FROM PUBLIC;

-- Regenerate the readers of registered tables (the same query until a filter is set).
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
