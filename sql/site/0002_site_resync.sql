-- depends: 0001_site_core
-- Resync: write the CURRENT state of chosen rows into the sync log, so that the daemon applies it
-- in order with live changes. `dbsync reconcile --repair` resyncs the keys that differ; `dbsync
-- backfill` resyncs a whole table in key order, chunk by chunk (the initial copy).
--
-- Why this cannot race live replication:
-- * a row that exists is read FOR SHARE in the same statement that logs it: a writer that
--   committed earlier already has a smaller seq and its change is in the image; a writer that
--   comes later waits for this transaction and takes a larger seq;
-- * a key that does not exist gets a 'D' event only after LOCK TABLE ... IN SHARE MODE: every
--   writer of the table has finished (and is visible to the next statement) and none can start
--   until commit, so no insert of that key can sit in the log below the 'D'.
-- The functions need READ COMMITTED (each statement a fresh snapshot, taken after the locks).
--
-- Events are built exactly like dbsync.capture() builds them: with its image helpers
-- dbsync.row_image(row) and dbsync.key_image(image, key columns), under the same output settings.

CREATE TABLE dbsync.backfill_state (
    table_id    integer PRIMARY KEY REFERENCES dbsync.replicated_tables (table_id),
    -- The highest key copied so far (null before the first chunk).
    last_key    json,
    rows_done   bigint NOT NULL DEFAULT 0,
    chunks_done bigint NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
REVOKE ALL ON dbsync.backfill_state FROM PUBLIC;

-- The registry row of a replicated table plus the pieces of SQL the resync statements need.
-- key_defs is a column definition list for json_to_record[set] (key columns only, so domains
-- with NOT NULL on other columns are never instantiated from a partial key). alias names the
-- table, and sets of its keys, in whole-row references (row_image(alias)); it is chosen to differ
-- from every column name, which would otherwise win over the alias.
CREATE FUNCTION dbsync.resync_target(
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

CREATE FUNCTION dbsync.resync_require_read_committed() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'dbsync: resync must run at READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
END
$fn$;

-- Resync the rows with the given keys (a JSON array of objects holding the key columns):
-- a 'U' event with the current image where the row exists, a 'D' event where it does not.
-- Returns {"updated": n, "deleted": m}.
CREATE FUNCTION dbsync.resync_keys(p_table regclass, p_keys json) RETURNS json
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

-- Resync the next chunk of a table in key order: the rows with key > p_after (null: from the
-- start) up to and including the p_limit-th one. The range is fixed by key bounds before any row
-- is locked, so a row whose key a writer changes meanwhile cannot widen it (that writer's own
-- 'D' and 'I' events carry the change). Returns {"rows": n, "last": key}, last = null once the
-- range reached the end of the table.
CREATE FUNCTION dbsync.resync_range(p_table regclass, p_after json, p_limit integer) RETURNS json
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

-- One chunk of a resumable backfill: resync_range from where the last chunk stopped, with the
-- new position stored in the same transaction. Concurrent backfills of one table queue on the
-- state row. Returns {"rows": n, "rows_done": total, "last": key, "finished": bool}.
CREATE FUNCTION dbsync.backfill_step(p_table regclass, p_limit integer) RETURNS json
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t      record;
    s      dbsync.backfill_state;
    v_res  json;
    v_last json;
BEGIN
    SELECT * INTO t FROM dbsync.resync_target(p_table);
    INSERT INTO dbsync.backfill_state (table_id) VALUES (t.table_id) ON CONFLICT (table_id) DO NOTHING;
    SELECT * INTO s FROM dbsync.backfill_state WHERE table_id = t.table_id FOR UPDATE;
    IF s.finished_at IS NOT NULL THEN
        RETURN json_build_object('rows', 0, 'rows_done', s.rows_done, 'last', s.last_key, 'finished', true);
    END IF;
    v_res := dbsync.resync_range(p_table, s.last_key, p_limit);
    v_last := CASE WHEN json_typeof(v_res -> 'last') = 'null' THEN s.last_key ELSE v_res -> 'last' END;
    UPDATE dbsync.backfill_state
       SET last_key = v_last,
           rows_done = rows_done + (v_res ->> 'rows')::bigint,
           chunks_done = chunks_done + 1,
           updated_at = now(),
           finished_at = CASE WHEN json_typeof(v_res -> 'last') = 'null' THEN now() END
     WHERE table_id = t.table_id
    RETURNING * INTO s;
    RETURN json_build_object('rows', (v_res ->> 'rows')::bigint, 'rows_done', s.rows_done, 'last', s.last_key,
                             'finished', s.finished_at IS NOT NULL);
END
$fn$;

-- Forget a table's backfill position (`dbsync backfill --restart`).
CREATE FUNCTION dbsync.backfill_reset(p_table regclass) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    t record;
BEGIN
    SELECT * INTO t FROM dbsync.resync_target(p_table);
    DELETE FROM dbsync.backfill_state WHERE table_id = t.table_id;
    RETURN FOUND;
END
$fn$;

REVOKE ALL ON FUNCTION dbsync.resync_target(regclass), dbsync.resync_require_read_committed(),
    dbsync.resync_keys(regclass, json), dbsync.resync_range(regclass, json, integer),
    dbsync.backfill_step(regclass, integer), dbsync.backfill_reset(regclass) FROM PUBLIC;
