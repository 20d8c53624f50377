-- depends: 0006_site_key_capture
-- Reading a small batch in one round trip, and each table's rows through a reader generated for
-- it (issue 10: commit -> visible in milliseconds).
--
-- * dbsync.read_rows only reads. Marked STABLE, it reads at the snapshot of the statement that
--   calls it, where a VOLATILE function takes a new snapshot for each query it runs (in READ
--   COMMITTED). So one statement can open a batch and read its rows at the batch's snapshot
--   without a REPEATABLE READ transaction around it (dbsync.daemon.consume.read_small_batch).
--   The daemon checks the marking and reads the old way until this migration is applied.
-- * read_rows built its query on every call: registry and catalog lookups, the key operators,
--   then planning a dynamic statement; about 1.5 ms a call here. install_capture now also
--   generates dbsync.read_t<table id>(json), that query as static SQL, which PL/pgSQL plans once
--   a session; read_rows calls it while the table still has the name the reader was written for
--   (replicated_tables.reader_reads), and builds the query itself otherwise (a renamed table, a
--   table registered by an older dbsync).

ALTER TABLE dbsync.replicated_tables ADD COLUMN reader_reads text;
COMMENT ON COLUMN dbsync.replicated_tables.reader_reads IS
    'The table name (regclass text) dbsync.read_t<table_id> was generated for; NULL: no reader.';

-- The name of a table's generated reader.
CREATE FUNCTION dbsync.reader_function(p_table_id integer) RETURNS text
LANGUAGE sql IMMUTABLE
AS $fn$ SELECT 'dbsync.read_t' OPERATOR(pg_catalog.||) p_table_id::text $fn$;

-- Generate a registered table's reader: for each key of $1 (a JSON array of key objects, as
-- read_rows takes it) present in the table, its position and the row image. Not SECURITY
-- DEFINER and callable by nobody else: read_rows calls it with its own rights and settings.
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.install_reader(p_table_id integer) RETURNS void
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

-- install_capture (0006) installs the capture; under its old name it is one half of the new one.
ALTER FUNCTION dbsync.install_capture(integer) RENAME TO install_key_capture;
CREATE FUNCTION dbsync.install_capture(p_table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM dbsync.install_key_capture(p_table_id);
    PERFORM dbsync.install_reader(p_table_id);
END
$fn$;

-- And drop_capture, which remove_table calls, drops the reader: events of a removed table still
-- waiting are read the general way, and a table dropped after its removal leaves nothing behind.
ALTER FUNCTION dbsync.drop_capture(regclass) RENAME TO drop_key_capture;
CREATE FUNCTION dbsync.drop_capture(p_table regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_id integer;
BEGIN
    PERFORM dbsync.drop_key_capture(p_table);
    FOR v_id IN SELECT r.table_id FROM dbsync.replicated_tables r WHERE r.relid = p_table LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS %s(json)', dbsync.reader_function(v_id));
        UPDATE dbsync.replicated_tables SET reader_reads = NULL WHERE table_id = v_id;
    END LOOP;
END
$fn$;

-- The rows of the given keys of a replicated table, as in 0006_site_key_capture; STABLE, and
-- through the table's reader when it has one for its current name.
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

-- Readers for the tables registered before this migration (and not dropped since).
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

REVOKE ALL ON FUNCTION dbsync.reader_function(integer), dbsync.install_reader(integer),
    dbsync.install_capture(integer), dbsync.install_key_capture(integer), dbsync.drop_capture(regclass),
    dbsync.drop_key_capture(regclass) FROM PUBLIC;
