-- depends: 0003_site_lean_capture
-- Nothing that runs with dbsync's rights may call a function or operator another role can
-- supply (DESIGN-NOTES §7, CVE-2018-1058 class).
--
-- hstore lives in public on most installations, and a role that may CREATE there can add an
-- overload that is more specific than the one dbsync means: public.hstore(<a table's row type>)
-- beats the extension's hstore(record) even when called as public.hstore(...), and
-- public.populate_record(<row type>, hstore) beats populate_record(anyelement, hstore). Only an
-- exact match on the argument types cannot be beaten, so:
--   * a row image is taken from an expression whose type is exactly `record`, the extension's own
--     signature: dbsync.as_record(NEW) (declared to return record; at run time the value still
--     carries its table's current row type, so a column added or dropped since is seen), or in
--     dynamic SQL the whole-row value of a subquery. (Not `SELECT NEW.* INTO r`: PL/pgSQL keeps
--     that statement's plan, with the columns NEW had when it was first run in the session.)
--   * "did the key change" sets the key columns with pg_catalog.jsonb_populate_record instead of
--     hstore's populate_record (schema-qualified pg_catalog: nobody else can create there);
--   * the other hstore calls (slice, hstore_to_json, hstore_to_jsonb) already take exactly hstore.
-- Key columns are compared with the operator of the primary key's operator class
-- (dbsync.key_operator): a bare `=` under the pinned search_path finds no operator for extension
-- types such as ltree, and an operator on a writer's domain must never be chosen.
-- The SECURITY DEFINER functions that read replicated tables run with row_security = off: a read
-- that row-level security would filter fails instead of silently missing rows (a missing row
-- would become a 'D' event).

-- Any row, typed as `record` for overload resolution. Plain SQL, inlined: it costs nothing.
CREATE FUNCTION dbsync.as_record(anyelement) RETURNS record
LANGUAGE sql IMMUTABLE AS 'SELECT $1';

DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.row_image(anyelement) RETURNS %1$s.hstore
        LANGUAGE sql STABLE AS 'SELECT %1$s.hstore(dbsync.as_record($1))'$sql$, ext);

    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.with_key(anyelement, %1$s.hstore) RETURNS anyelement
        LANGUAGE sql STABLE
        AS 'SELECT pg_catalog.jsonb_populate_record($1, %1$s.hstore_to_jsonb($2))'$sql$, ext);

    EXECUTE pg_catalog.format($sql$
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
            v_img   dbsync.sync_log.row_image%%TYPE;
            v_key   dbsync.sync_log.pk%%TYPE;
            v_old   dbsync.sync_log.pk%%TYPE;
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
                v_img := %1$s.hstore(dbsync.as_record(NEW));  -- see the head of 0004_site_safe_calls
                v_key := dbsync.key_image(v_img, v_keys);
            END IF;

            IF TG_OP = 'INSERT' THEN
                INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) VALUES (v_table, 'I', v_key, v_img);
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO dbsync.sync_log (table_id, op, pk)
                VALUES (v_table, 'D', dbsync.key_image(%1$s.hstore(dbsync.as_record(OLD)), v_keys));
            ELSIF dbsync.with_key(OLD, v_key) OPERATOR(pg_catalog.*=) OLD THEN
                INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) VALUES (v_table, 'U', v_key, v_img);
            ELSE
                -- The key looks changed. jsonb_populate_record keeps a row type's columns from its
                -- first call in a session, so after ALTER TABLE it can say "changed" when it is
                -- not (never the other way: keys keep their column numbers); the old key's image,
                -- which the 'D' needs anyway, decides.
                v_old := dbsync.key_image(%1$s.hstore(dbsync.as_record(OLD)), v_keys);
                IF v_old OPERATOR(%1$s.=) v_key THEN
                    INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) VALUES (v_table, 'U', v_key, v_img);
                ELSE
                    -- The primary key changed: the old key must disappear on the Agent DB.
                    INSERT INTO dbsync.sync_log (table_id, op, pk) VALUES (v_table, 'D', v_old);
                    INSERT INTO dbsync.sync_log (table_id, op, pk, row_image) VALUES (v_table, 'I', v_key, v_img);
                END IF;
            END IF;
            -- A doorbell, not data: a constant payload is folded into one notification per transaction.
            IF dbsync.doorbell_armed() THEN
                PERFORM pg_catalog.pg_notify('dbsync', '');
            END IF;
            RETURN NULL;
        END
        $fn$$sql$, ext);
END
$do$;
REVOKE ALL ON FUNCTION dbsync.capture() FROM PUBLIC;

-- How dbsync compares values of one key column in the SQL it builds: the operator for a btree
-- strategy (1 <, 2 <=, 3 =, 4 >=, 5 >) of the operator class the table's primary key index uses
-- for that column, schema-qualified, and the type both sides are cast to (the class's input
-- type, or for a polymorphic class such as enum_ops the column's base type). Operator classes
-- can only be created by superusers, so no other role can supply the operator, and a domain is
-- compared as its base type, so an operator on a writer's domain is never chosen.
CREATE FUNCTION dbsync.key_operator(
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

-- The key columns of two row sources compared with dbsync.key_operator: p_op '=' (every column
-- equal), '>' (p_left's key sorts after p_right's) or '<=' (not after). Keys never hold NULL.
CREATE FUNCTION dbsync.key_compare(p_table regclass, p_keys text[], p_left text, p_right text, p_op text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_eq    text[] := '{}';
    v_terms text[] := '{}';
    v_lefts text[] := '{}';
    v_right text[] := '{}';
    v_plain boolean := true;
    v_col   text;
    e       record;
    g       record;
BEGIN
    IF p_op NOT IN ('=', '>', '<=') THEN
        RAISE EXCEPTION 'dbsync: key_compare takes =, > or <=, not %', p_op USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_col IN ARRAY p_keys LOOP
        e := dbsync.key_operator(p_table, v_col, 3);
        v_plain := v_plain AND e.operator LIKE 'OPERATOR(pg_catalog.%';
        v_lefts := v_lefts || format('(%I.%I)::%s', p_left, v_col, e.cast_to);
        v_right := v_right || format('(%I.%I)::%s', p_right, v_col, e.cast_to);
        IF p_op <> '=' THEN
            -- p_left > p_right, lexicographically: equal on every earlier column, greater on this one.
            g := dbsync.key_operator(p_table, v_col, 5);
            v_plain := v_plain AND g.operator LIKE 'OPERATOR(pg_catalog.%';
            v_terms := v_terms || format('(%s(%I.%I)::%s %s (%I.%I)::%s)',
                CASE WHEN cardinality(v_eq) > 0 THEN array_to_string(v_eq, ' AND ') || ' AND ' ELSE '' END,
                p_left, v_col, g.cast_to, g.operator, p_right, v_col, g.cast_to);
        END IF;
        v_eq := v_eq || format('(%I.%I)::%s %s (%I.%I)::%s',
            p_left, v_col, e.cast_to, e.operator, p_right, v_col, e.cast_to);
    END LOOP;
    IF p_op = '=' THEN
        RETURN array_to_string(v_eq, ' AND ');
    ELSIF v_plain AND cardinality(p_keys) > 1 THEN
        -- Only pg_catalog operators: a row comparison, which an index on the key can serve; its
        -- operators resolve by name, in pg_catalog alone under the pinned search_path.
        RETURN format('ROW(%s) %s ROW(%s)', array_to_string(v_lefts, ', '), p_op, array_to_string(v_right, ', '));
    ELSIF p_op = '>' THEN
        RETURN '(' || array_to_string(v_terms, ' OR ') || ')';
    END IF;
    RETURN 'NOT (' || array_to_string(v_terms, ' OR ') || ')';
END
$fn$;

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
           string_agg(format('%I.%I', alias, a.attname), ', ' ORDER BY k.ord)
      INTO key_defs, key_list, key_order
      FROM unnest(key_columns) WITH ORDINALITY AS k(name, ord)
      JOIN pg_attribute a ON a.attrelid = p_table AND a.attname = k.name AND NOT a.attisdropped;
    key_match := dbsync.key_compare(p_table, key_columns, alias, 'k', '=');
    -- The pk of an event from its row image `i.img`, as dbsync.capture() builds it.
    pk_expr := format('dbsync.key_image(i.img, %L::text[])', key_columns);
END
$fn$;

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

ALTER FUNCTION dbsync.backfill_step(regclass, integer) SET row_security = off;
REVOKE ALL ON FUNCTION dbsync.as_record(anyelement), dbsync.key_operator(regclass, text, integer),
    dbsync.key_compare(regclass, text[], text, text, text) FROM PUBLIC;
