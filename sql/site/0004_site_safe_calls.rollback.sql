-- Back to 0003: the image helpers of 0001_site_core, the capture trigger of
-- 0003_site_lean_capture and the resync functions of 0002_site_resync, as they were.
DROP FUNCTION dbsync.row_image(anyelement);
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.row_image(anyelement) RETURNS %1$s.hstore
        LANGUAGE sql STABLE AS 'SELECT %1$s.hstore($1)'$sql$, ext);
    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.with_key(anyelement, %1$s.hstore) RETURNS anyelement
        LANGUAGE sql STABLE AS 'SELECT %1$s.populate_record($1, $2)'$sql$, ext);
END
$do$;

CREATE OR REPLACE FUNCTION dbsync.capture() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET extra_float_digits = 3
SET IntervalStyle = postgres
SET DateStyle = 'ISO, YMD'
SET TimeZone = 'UTC'
SET bytea_output = hex
AS $fn$
DECLARE
    v_table integer := TG_ARGV[0]::integer;
    v_keys  text[];
    v_img   dbsync.sync_log.row_image%TYPE;
    v_key   dbsync.sync_log.pk%TYPE;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO dbsync.sync_log (table_id, op) VALUES (v_table, 'T');
        IF dbsync.doorbell_armed() THEN
            PERFORM pg_catalog.pg_notify('dbsync', '');
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD OPERATOR(pg_catalog.*=) NEW THEN
        RETURN NULL;  -- nothing changed
    END IF;
    v_keys := TG_ARGV[1:TG_NARGS - 1];
    IF TG_OP <> 'DELETE' THEN
        v_img := dbsync.row_image(NEW);
        v_key := dbsync.key_image(v_img, v_keys);
    END IF;

    IF TG_OP = 'INSERT' THEN
        INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) VALUES (v_table, 'I', v_key, v_img);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO dbsync.sync_log (table_id, op, pk)
        VALUES (v_table, 'D', dbsync.key_image(dbsync.row_image(OLD), v_keys));
    ELSIF dbsync.with_key(OLD, v_key) OPERATOR(pg_catalog.*=) OLD THEN
        INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) VALUES (v_table, 'U', v_key, v_img);
    ELSE
        -- The primary key changed: the old key must disappear on the Agent DB.
        INSERT INTO dbsync.sync_log (table_id, op, pk)
        VALUES (v_table, 'D', dbsync.key_image(dbsync.row_image(OLD), v_keys));
        INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) VALUES (v_table, 'I', v_key, v_img);
    END IF;
    -- A doorbell, not data: a constant payload is folded into one notification per transaction.
    IF dbsync.doorbell_armed() THEN
        PERFORM pg_catalog.pg_notify('dbsync', '');
    END IF;
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION dbsync.capture() FROM PUBLIC;

CREATE OR REPLACE FUNCTION dbsync.resync_target(
    p_table regclass,
    OUT table_id integer, OUT key_columns text[], OUT key_defs text, OUT key_list text,
    OUT alias text, OUT key_match text, OUT key_order text, OUT pk_expr text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    SELECT r.table_id, r.key_columns INTO table_id, key_columns
      FROM dbsync.replicated_tables r
     WHERE r.relid = p_table AND r.removed_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dbsync: table % is not replicated', p_table USING ERRCODE = 'invalid_parameter_value';
    END IF;
    alias := 'dbsync_row';
    WHILE EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = p_table AND a.attname = alias) LOOP
        alias := alias || '_';
    END LOOP;
    SELECT string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord),
           string_agg(format('%I', a.attname), ', ' ORDER BY k.ord),
           string_agg(format('%1$I.%2$I = k.%2$I', alias, a.attname), ' AND ' ORDER BY k.ord),
           string_agg(format('%I.%I', alias, a.attname), ', ' ORDER BY k.ord)
      INTO key_defs, key_list, key_match, key_order
      FROM unnest(key_columns) WITH ORDINALITY AS k(name, ord)
      JOIN pg_attribute a ON a.attrelid = p_table AND a.attname = k.name AND NOT a.attisdropped;
    -- The pk of an event from its row image `i.img`, as dbsync.capture() builds it.
    pk_expr := format('dbsync.key_image(i.img, %L::text[])', key_columns);
END
$fn$;

CREATE OR REPLACE FUNCTION dbsync.resync_keys(p_table regclass, p_keys json) RETURNS json
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET extra_float_digits = 3
SET IntervalStyle = postgres
SET DateStyle = 'ISO, YMD'
SET TimeZone = 'UTC'
SET bytea_output = hex
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
    SELECT string_agg(format('k.%I IS NULL', c), ' OR ') INTO v_null FROM unnest(t.key_columns) AS c;

    EXECUTE format('SELECT count(*) FILTER (WHERE %s) FROM pg_catalog.json_to_recordset($1) AS k(%s)',
                   v_null, t.key_defs)
       INTO v_absent USING p_keys;
    IF v_absent > 0 THEN
        RAISE EXCEPTION 'dbsync: % key(s) lack a key column of % (%)', v_absent, p_table, t.key_list
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- %1$s table, %2$I alias, %3$s key list, %4$s key defs, %5$s alias.key = k.key, %6$s pk, %7$s alias.keys
    EXECUTE format(
        'SELECT count(*) FROM (SELECT DISTINCT %3$s FROM pg_catalog.json_to_recordset($1) AS k(%4$s)) k '
        'WHERE NOT EXISTS (SELECT 1 FROM %1$s %2$I WHERE %5$s)',
        p_table, t.alias, t.key_list, t.key_defs, t.key_match)
       INTO v_absent USING p_keys;

    IF v_absent > 0 THEN
        -- Waits for the table's writers in progress; blocks new ones until commit (keep it short).
        EXECUTE format('LOCK TABLE %s IN SHARE MODE', p_table);
        EXECUTE format(
            'WITH k AS (SELECT DISTINCT %3$s FROM pg_catalog.json_to_recordset($1) AS k(%4$s)), '
            '     gone AS (SELECT * FROM k WHERE NOT EXISTS (SELECT 1 FROM %1$s %2$I WHERE %5$s)), '
            '     i AS (SELECT dbsync.row_image(%2$I) AS img FROM gone AS %2$I) '
            'INSERT INTO dbsync.sync_log (table_id, op, pk) SELECT $2, ''D'', %6$s FROM i',
            p_table, t.alias, t.key_list, t.key_defs, t.key_match, t.pk_expr)
           USING p_keys, t.table_id;
        GET DIAGNOSTICS v_deleted = ROW_COUNT;
    END IF;

    EXECUTE format(
        'WITH k AS (SELECT DISTINCT %3$s FROM pg_catalog.json_to_recordset($1) AS k(%4$s)), '
        '     r AS (SELECT %2$I AS rec FROM %1$s %2$I JOIN k ON %5$s ORDER BY %7$s FOR SHARE OF %2$I), '
        '     i AS (SELECT dbsync.row_image(r.rec) AS img FROM r) '
        'INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) SELECT $2, ''U'', %6$s, i.img FROM i',
        p_table, t.alias, t.key_list, t.key_defs, t.key_match, t.pk_expr, t.key_order)
       USING p_keys, t.table_id;
    GET DIAGNOSTICS v_updated = ROW_COUNT;

    -- The doorbell as dbsync.capture() rings it: only while the daemon is idle (armed), read
    -- after the events are written, so the daemon's xid fence covers this transaction.
    IF v_deleted + v_updated > 0 AND (SELECT d.armed FROM dbsync.doorbell d) THEN
        PERFORM pg_catalog.pg_notify('dbsync', '');
    END IF;
    RETURN pg_catalog.json_build_object('updated', v_updated, 'deleted', v_deleted);
END
$fn$;

CREATE OR REPLACE FUNCTION dbsync.resync_range(p_table regclass, p_after json, p_limit integer) RETURNS json
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET extra_float_digits = 3
SET IntervalStyle = postgres
SET DateStyle = 'ISO, YMD'
SET TimeZone = 'UTC'
SET bytea_output = hex
AS $fn$
DECLARE
    t       record;
    v_tcols text;
    v_acols text;
    v_hcols text;
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
    SELECT string_agg(format('a.%I', c), ', '), string_agg(format('h.%I', c), ', ')
      INTO v_acols, v_hcols
      FROM unnest(t.key_columns) AS c;
    IF p_after IS NOT NULL THEN
        v_lower := format('ROW(%s) > ROW(%s)', v_tcols, v_acols);
    END IF;

    EXECUTE format(
        'SELECT pg_catalog.to_json(%5$I) FROM (SELECT %2$s FROM %1$s %5$I, pg_catalog.json_to_record($1) AS a(%3$s) '
        'WHERE %4$s ORDER BY %2$s OFFSET $2 - 1 LIMIT 1) %5$I',
        p_table, v_tcols, t.key_defs, v_lower, t.alias)
       INTO v_hi USING coalesce(p_after, '{}'::json), p_limit;
    IF v_hi IS NOT NULL THEN
        v_upper := format('ROW(%s) <= ROW(%s)', v_tcols, v_hcols);
    END IF;

    EXECUTE format(
        'WITH r AS (SELECT %7$I AS rec FROM %1$s %7$I, pg_catalog.json_to_record($1) AS a(%3$s), '
        '                  pg_catalog.json_to_record($2) AS h(%3$s) '
        '           WHERE %4$s AND %5$s ORDER BY %2$s FOR SHARE OF %7$I), '
        '     i AS (SELECT dbsync.row_image(r.rec) AS img FROM r) '
        'INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) SELECT $3, ''U'', %6$s, i.img FROM i',
        p_table, v_tcols, t.key_defs, v_lower, v_upper, t.pk_expr, t.alias)
       USING coalesce(p_after, '{}'::json), coalesce(v_hi, '{}'::json), t.table_id;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    IF v_rows > 0 AND (SELECT d.armed FROM dbsync.doorbell d) THEN
        PERFORM pg_catalog.pg_notify('dbsync', '');
    END IF;
    RETURN pg_catalog.json_build_object('rows', v_rows, 'last', v_hi);
END
$fn$;

ALTER FUNCTION dbsync.backfill_step(regclass, integer) RESET row_security;
DROP FUNCTION dbsync.key_compare(regclass, text[], text, text, text);
DROP FUNCTION dbsync.key_operator(regclass, text, integer);
