-- depends: 0005_site_partitions
-- Key-only capture (docs/design.md, "Capture: keys, read at the batch's snapshot").
--
-- Until now every changed row was turned into a full hstore image by a PL/pgSQL row trigger: a
-- statement changing 200k rows made 200k calls, and a status update of a message with a 100 kB
-- body wrote the body into the log again. From here on the log holds only which keys changed;
-- the daemon reads the rows themselves, as they stand at its batch's snapshot, through
-- dbsync.read_rows below. For every registered table:
--   * a plain table gets three AFTER ... FOR EACH STATEMENT triggers with transition tables (one
--     per INSERT, UPDATE, DELETE: PostgreSQL allows transition tables on single-event triggers
--     only), which log every changed key of the statement in one set-based INSERT;
--   * a partitioned table (and a partition or inheritance child registered on its own) keeps a
--     row trigger: PostgreSQL clones row triggers to every partition, attached ones included, but
--     not statement triggers, which fire only for statements naming the table itself;
--   * TRUNCATE is captured as before (dbsync.capture(), the partition marks of 0005).
-- The trigger function is generated per table, so its key columns are static SQL and PL/pgSQL
-- keeps its plans. A key is logged as the hstore of each key column's own text output
-- (pg_catalog.format('%s', ...): the type's output function, never a cast another role could
-- have created), exactly the `pk` the row trigger wrote, so everything that reads keys from the
-- log (reconcile's in-flight check, parking, retention) is unchanged. Output settings are pinned
-- only when a key type's text depends on them; integers, text and uuid keys need none, which
-- saves five settings swaps per statement.
-- An UPDATE logs, as the row trigger did: the old key of each row whose key changed ('D', first),
-- then the new key of each changed row ('U', or 'I' when its key is new). Rows an UPDATE left
-- byte for byte equal (`*=`, record_image_eq) are not logged.
-- Events written before this migration carry a row image; the daemon reads them as their key.

-- A statement's keys travel in chunks: `keys` holds up to 100 keys as a two-dimensional array
-- (one row per key, one element per key column, in key_columns order, each the column's text
-- output); such a log row has no `pk`. Row triggers still write one key per row in `pk`.
ALTER TABLE dbsync.sync_log ADD COLUMN keys text[];

-- Every key of a log row as a JSON object of text values, numbered from 0 (`pk`) or 1 (`keys`),
-- in the one canonical form (an hstore's JSON, so a key logged either way reads the same).
-- Nothing for a TRUNCATE. Operators schema-qualified: it runs with its caller's search_path.
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.log_keys(p_pk %1$s.hstore, p_keys text[], p_columns text[],
                                        OUT key_no integer, OUT key json)
        RETURNS SETOF record
        LANGUAGE sql IMMUTABLE
        AS $fn$
            SELECT 0, %1$s.hstore_to_json(p_pk) WHERE p_pk IS NOT NULL
            UNION ALL
            SELECT i, %1$s.hstore_to_json(%1$s.hstore(p_columns,
                       CASE WHEN pg_catalog.array_length(p_keys, 2) OPERATOR(pg_catalog.=) 1 THEN ARRAY[p_keys[i][1]]
                            ELSE ARRAY(SELECT p_keys[i][j]
                                         FROM pg_catalog.generate_series(1, pg_catalog.array_length(p_keys, 2)) AS j)
                       END))
              FROM pg_catalog.generate_series(1, pg_catalog.array_length(p_keys, 1)) AS i
             WHERE p_keys IS NOT NULL
        $fn$$sql$, ext);
END
$do$;

-- A daemon (or CLI) older than this migration would read a key-only insert or update as a row
-- to write with no row, and skip it. It reads every page through dbsync.image_json: that now
-- stops it with one line, and nothing is skipped. What reads keys from here on calls
-- dbsync.key_json, the same conversion.
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.key_json(%1$s.hstore) RETURNS json
        LANGUAGE sql IMMUTABLE AS 'SELECT %1$s.hstore_to_json($1)'$sql$, ext);
    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.image_json(%1$s.hstore) RETURNS json
        LANGUAGE plpgsql IMMUTABLE
        SET search_path = pg_catalog, pg_temp
        AS $fn$
        BEGIN
            RAISE EXCEPTION 'dbsync: the Site DB logs keys only since migration 0006_site_key_capture, and this '
                'dbsync is older: upgrade the dbsync daemon and CLI (nothing has been skipped)'
                USING ERRCODE = 'feature_not_supported';
        END
        $fn$$sql$, ext);
END
$do$;

-- Whether a key type's text output depends on session settings (DateStyle, TimeZone,
-- IntervalStyle, extra_float_digits, bytea_output, lc_monetary): everything but a short list of
-- types whose output never does, looked through domains; arrays, ranges and composites count
-- as dependent (their elements may be).
CREATE FUNCTION dbsync.output_is_fixed(p_type oid) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_base oid := p_type;
BEGIN
    WHILE (SELECT t.typtype = 'd' FROM pg_type t WHERE t.oid = v_base) LOOP
        v_base := (SELECT t.typbasetype FROM pg_type t WHERE t.oid = v_base);
    END LOOP;
    RETURN v_base IN ('pg_catalog.int2'::regtype, 'pg_catalog.int4'::regtype, 'pg_catalog.int8'::regtype,
                      'pg_catalog.numeric'::regtype, 'pg_catalog.text'::regtype, 'pg_catalog.varchar'::regtype,
                      'pg_catalog.bpchar'::regtype, 'pg_catalog.name'::regtype, 'pg_catalog.uuid'::regtype,
                      'pg_catalog.bool'::regtype, 'pg_catalog.oid'::regtype, 'pg_catalog.char'::regtype)
        OR (SELECT t.typtype = 'e' FROM pg_type t WHERE t.oid = v_base);
END
$fn$;

-- The name of a table's generated capture function.
CREATE FUNCTION dbsync.capture_function(p_table_id integer) RETURNS text
LANGUAGE sql IMMUTABLE
AS $fn$ SELECT 'dbsync.capture_t' OPERATOR(pg_catalog.||) p_table_id::text $fn$;

-- Generate a registered table's capture function and install its INSERT/UPDATE/DELETE triggers
-- (TRUNCATE stays with dbsync.capture(); add_table installs it). A trigger of the same name that
-- is already there is an error, not replaced: it may be somebody else's.
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.install_capture(p_table_id integer) RETURNS void
        LANGUAGE plpgsql
        SET search_path = pg_catalog, pg_temp
        AS $fn$
        DECLARE
            v_table  regclass;
            v_keys   text[];
            v_fn     text := dbsync.capture_function(p_table_id);
            v_names  text;
            v_new    text;
            v_old    text;
            v_nrow   text;
            v_orow   text;
            v_match  text;
            v_fixed  boolean;
            v_stmt   boolean;
            v_pin    text := '';
            v_null   text;
        BEGIN
            SELECT r.relid::regclass, r.key_columns INTO v_table, v_keys
              FROM dbsync.replicated_tables r WHERE r.table_id = p_table_id AND r.removed_at IS NULL;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'dbsync: table id %% is not replicated', p_table_id USING ERRCODE = 'invalid_parameter_value';
            END IF;
            SELECT bool_and(dbsync.output_is_fixed(a.atttypid)) INTO v_fixed
              FROM unnest(v_keys) AS k(name) JOIN pg_attribute a ON a.attrelid = v_table AND a.attname = k.name;
            IF NOT v_fixed THEN
                v_pin := 'SET extra_float_digits = 3 SET IntervalStyle = postgres SET DateStyle = ''ISO, YMD'' '
                         'SET TimeZone = ''UTC'' SET bytea_output = hex SET lc_monetary = ''C''';
            END IF;
            -- Statement triggers only where they see every row change: a plain table that is
            -- neither a partition nor an inheritance child, and has no inheritance children.
            SELECT c.relkind = 'r' AND NOT c.relispartition
                   AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid OR i.inhparent = c.oid)
              INTO v_stmt
              FROM pg_class c WHERE c.oid = v_table;

            -- The key as an hstore: names as a literal, values as each column's text output.
            v_names := pg_catalog.format('ARRAY[%%s]::text[]',
                (SELECT string_agg(quote_literal(k), ', ') FROM unnest(v_keys) AS k));
            SELECT pg_catalog.format('ARRAY[%%s]',
                       string_agg(pg_catalog.format('pg_catalog.format(''%%%%s'', dbsync_n.%%I)', k), ', ')),
                   pg_catalog.format('ARRAY[%%s]',
                       string_agg(pg_catalog.format('pg_catalog.format(''%%%%s'', dbsync_o.%%I)', k), ', ')),
                   pg_catalog.format('%1$s.hstore(%%s, ARRAY[%%s])', v_names,
                       string_agg(pg_catalog.format('pg_catalog.format(''%%%%s'', NEW.%%I)', k), ', ')),
                   pg_catalog.format('%1$s.hstore(%%s, ARRAY[%%s])', v_names,
                       string_agg(pg_catalog.format('pg_catalog.format(''%%%%s'', OLD.%%I)', k), ', '))
              INTO v_new, v_old, v_nrow, v_orow
              FROM unnest(v_keys) AS k;
            v_match := dbsync.key_compare(v_table, v_keys, 'dbsync_o', 'dbsync_n', '=');
            v_null := pg_catalog.format('dbsync_o.%%I IS NULL', v_keys[1]);

            EXECUTE pg_catalog.format($gen$
                CREATE OR REPLACE FUNCTION %%1$s() RETURNS trigger
                LANGUAGE plpgsql
                SECURITY DEFINER
                SET search_path = pg_catalog, pg_temp
                %%2$s
                AS $body$
                DECLARE
                    v_rows bigint := 0;
                    v_more bigint := 0;
                BEGIN
                    IF TG_LEVEL OPERATOR(pg_catalog.=) 'ROW' THEN
                        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
                            INSERT INTO dbsync.sync_log (table_id, op, pk) VALUES (%%3$s, 'I', %%6$s);
                        ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
                            INSERT INTO dbsync.sync_log (table_id, op, pk) VALUES (%%3$s, 'D', %%7$s);
                        ELSIF OLD OPERATOR(pg_catalog.*=) NEW THEN
                            RETURN NULL;  -- nothing changed
                        ELSIF %%7$s OPERATOR(%1$s.=) %%6$s THEN
                            INSERT INTO dbsync.sync_log (table_id, op, pk) VALUES (%%3$s, 'U', %%6$s);
                        ELSE
                            INSERT INTO dbsync.sync_log (table_id, op, pk) VALUES (%%3$s, 'D', %%7$s);
                            INSERT INTO dbsync.sync_log (table_id, op, pk) VALUES (%%3$s, 'I', %%6$s);
                        END IF;
                        v_rows := 1;
                    ELSE
                        -- The statement's keys (each a row of each key column's text), 100 to a
                        -- log row: old keys that are gone (deleted, or the key changed), new keys,
                        -- keys of changed rows. Chunked in SQL, in one pass: slicing one big array
                        -- in a loop would walk it from the start for every slice.
                        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
                            INSERT INTO dbsync.sync_log (table_id, op, keys)
                            SELECT %%3$s, 'I', pg_catalog.array_agg(k.key)
                              FROM (SELECT %%4$s AS key, pg_catalog.row_number() OVER () AS n FROM dbsync_new dbsync_n) k
                             GROUP BY (k.n OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 100;
                            GET DIAGNOSTICS v_rows = ROW_COUNT;
                        ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
                            INSERT INTO dbsync.sync_log (table_id, op, keys)
                            SELECT %%3$s, 'D', pg_catalog.array_agg(k.key)
                              FROM (SELECT %%5$s AS key, pg_catalog.row_number() OVER () AS n FROM dbsync_old dbsync_o) k
                             GROUP BY (k.n OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 100;
                            GET DIAGNOSTICS v_rows = ROW_COUNT;
                        ELSE
                            INSERT INTO dbsync.sync_log (table_id, op, keys)
                            SELECT %%3$s, 'D', pg_catalog.array_agg(k.key)
                              FROM (SELECT %%5$s AS key, pg_catalog.row_number() OVER () AS n FROM dbsync_old dbsync_o
                                     WHERE NOT EXISTS (SELECT 1 FROM dbsync_new dbsync_n WHERE %%8$s)) k
                             GROUP BY (k.n OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 100;
                            GET DIAGNOSTICS v_rows = ROW_COUNT;
                            INSERT INTO dbsync.sync_log (table_id, op, keys)
                            SELECT %%3$s, k.op, pg_catalog.array_agg(k.key)
                              FROM (SELECT %%4$s AS key, CASE WHEN %%9$s THEN 'I' ELSE 'U' END AS op,
                                           pg_catalog.row_number() OVER () AS n
                                      FROM dbsync_new dbsync_n LEFT JOIN dbsync_old dbsync_o ON %%8$s
                                     WHERE %%9$s OR dbsync_o OPERATOR(pg_catalog.*<>) dbsync_n) k
                             GROUP BY k.op, (k.n OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 100;
                            GET DIAGNOSTICS v_more = ROW_COUNT;
                            v_rows := v_rows OPERATOR(pg_catalog.+) v_more;
                        END IF;
                    END IF;
                    -- A doorbell, not data: one empty notification per transaction, only while the
                    -- daemon waits (0003_site_lean_capture).
                    IF v_rows OPERATOR(pg_catalog.>) 0 AND dbsync.doorbell_armed() THEN
                        PERFORM pg_catalog.pg_notify('dbsync', '');
                    END IF;
                    RETURN NULL;
                END
                $body$$gen$,
                v_fn, v_pin, p_table_id, v_new, v_old, v_nrow, v_orow, v_match, v_null);
            EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %%s() FROM PUBLIC', v_fn);

            IF v_stmt THEN
                EXECUTE pg_catalog.format(
                    'CREATE TRIGGER dbsync_capture_insert AFTER INSERT ON %%s REFERENCING NEW TABLE AS dbsync_new '
                    'FOR EACH STATEMENT EXECUTE FUNCTION %%s()', v_table, v_fn);
                EXECUTE pg_catalog.format(
                    'CREATE TRIGGER dbsync_capture_update AFTER UPDATE ON %%s '
                    'REFERENCING OLD TABLE AS dbsync_old NEW TABLE AS dbsync_new '
                    'FOR EACH STATEMENT EXECUTE FUNCTION %%s()', v_table, v_fn);
                EXECUTE pg_catalog.format(
                    'CREATE TRIGGER dbsync_capture_delete AFTER DELETE ON %%s REFERENCING OLD TABLE AS dbsync_old '
                    'FOR EACH STATEMENT EXECUTE FUNCTION %%s()', v_table, v_fn);
            ELSE
                EXECUTE pg_catalog.format(
                    'CREATE TRIGGER dbsync_capture AFTER INSERT OR UPDATE OR DELETE ON %%s '
                    'FOR EACH ROW EXECUTE FUNCTION %%s()', v_table, v_fn);
            END IF;
        END
        $fn$$sql$, ext);
END
$do$;

-- The INSERT/UPDATE/DELETE capture triggers of a table, whichever kind it has (not TRUNCATE's).
CREATE FUNCTION dbsync.drop_capture(p_table regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
AS $fn$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_insert ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_update ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_delete ON %s', p_table);
END
$fn$;

-- The rows of the given keys of a replicated table, as the daemon applies them: for each key
-- present, its position in p_keys (a JSON array of objects of key text values, as the log's `pk`
-- reads through dbsync.key_json) and the row image as JSON of text values. A key that is absent
-- returns nothing. Run by the daemon inside its batch's REPEATABLE READ transaction, so every row
-- is as it stands at the batch's snapshot. SECURITY DEFINER: the daemon's Site role needs EXECUTE
-- here, not SELECT on the tables; row_security off, so a policy that would hide a row makes the
-- read fail instead (a hidden row would be applied as a delete). Removed tables are still read:
-- their events already in the log are delivered.
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.read_rows(p_table_id integer, p_keys json, OUT ord bigint, OUT image json)
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

-- Register a table, as in 0005_site_partitions, with the generated key capture.
CREATE OR REPLACE FUNCTION dbsync.add_table(p_table regclass) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_schema text;
    v_name   text;
    v_kind   "char";
    v_keys   text[];
    v_id     integer;
    v_args   text;
    v_other  text;
    v_member regclass;
BEGIN
    SELECT n.nspname, c.relname, c.relkind INTO v_schema, v_name, v_kind
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_table AND c.relkind IN ('r', 'p');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dbsync: % is not a table', p_table USING ERRCODE = 'wrong_object_type';
    END IF;
    IF v_schema = 'dbsync' THEN
        RAISE EXCEPTION 'dbsync: cannot replicate dbsync''s own table %', p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO v_keys
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = p_table AND i.indisprimary;
    IF v_keys IS NULL THEN
        RAISE EXCEPTION 'dbsync: table %.% has no primary key', quote_ident(v_schema), quote_ident(v_name)
            USING ERRCODE = 'invalid_table_definition';
    END IF;
    IF EXISTS (SELECT 1 FROM dbsync.replicated_tables WHERE relid = p_table AND removed_at IS NULL) THEN
        RAISE EXCEPTION 'dbsync: table %.% is already replicated', quote_ident(v_schema), quote_ident(v_name)
            USING ERRCODE = 'duplicate_object';
    END IF;
    -- One capture per row: neither an ancestor nor a member of this table may be replicated too.
    SELECT r.relid::regclass::text INTO v_other
      FROM dbsync.replicated_tables r
     WHERE r.removed_at IS NULL
       AND (r.relid IN (SELECT a.relid FROM pg_partition_ancestors(p_table) AS a WHERE a.relid <> p_table)
            OR r.relid IN (SELECT t.relid FROM pg_partition_tree(p_table) AS t WHERE t.relid <> p_table))
     LIMIT 1;
    IF v_other IS NOT NULL THEN
        RAISE EXCEPTION 'dbsync: table %.% is in the partition tree of %, which is replicated; replicate the tree once, at its root',
            quote_ident(v_schema), quote_ident(v_name), v_other USING ERRCODE = 'invalid_table_definition';
    END IF;

    INSERT INTO dbsync.replicated_tables (relid, schema_name, table_name, key_columns)
    VALUES (p_table, v_schema, v_name, v_keys)
    ON CONFLICT (relid) DO UPDATE
        SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
            key_columns = EXCLUDED.key_columns, added_at = now(), removed_at = NULL
    RETURNING table_id INTO v_id;

    PERFORM dbsync.install_capture(v_id);
    SELECT string_agg(quote_literal(x), ', ') INTO v_args FROM unnest(v_id::text || v_keys) AS x;
    EXECUTE format(
        'CREATE TRIGGER dbsync_capture_truncate AFTER TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION dbsync.capture(%s)', p_table, v_args);
    DELETE FROM dbsync.partitions WHERE table_id = v_id;
    IF v_kind = 'p' THEN
        FOR v_member IN SELECT t.relid FROM pg_partition_tree(p_table) AS t LOOP
            PERFORM dbsync.install_truncate_capture(v_id, v_member);
        END LOOP;
    END IF;
    RETURN v_id;
END
$fn$;

-- Stop capturing a table, as in 0005_site_partitions, whichever capture triggers it has.
CREATE OR REPLACE FUNCTION dbsync.remove_table(p_table regclass) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_id     integer;
    v_member regclass;
BEGIN
    SELECT table_id INTO v_id FROM dbsync.replicated_tables WHERE relid = p_table AND removed_at IS NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM dbsync.drop_capture(p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_truncate ON %s', p_table);
    FOR v_member IN SELECT p.relid FROM dbsync.partitions p JOIN pg_class c ON c.oid = p.relid WHERE p.table_id = v_id LOOP
        PERFORM dbsync.drop_truncate_capture(v_member);
    END LOOP;
    DELETE FROM dbsync.partitions WHERE table_id = v_id;
    UPDATE dbsync.replicated_tables SET removed_at = now() WHERE relid = p_table;
    EXECUTE format('DROP FUNCTION IF EXISTS %s()', dbsync.capture_function(v_id));
    RETURN true;
END
$fn$;

-- Tables registered before this migration: key capture in place of the row-image trigger, in
-- this migration's transaction, so no change is captured twice or not at all.
DO $do$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT r.table_id, r.relid FROM dbsync.replicated_tables r JOIN pg_catalog.pg_class c ON c.oid = r.relid
              WHERE r.removed_at IS NULL ORDER BY r.table_id LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER dbsync_capture ON %s', t.relid::pg_catalog.regclass);
        PERFORM dbsync.install_capture(t.table_id);
    END LOOP;
END
$do$;

REVOKE ALL ON FUNCTION dbsync.output_is_fixed(oid), dbsync.capture_function(integer), dbsync.install_capture(integer),
    dbsync.drop_capture(regclass), dbsync.read_rows(integer, json) FROM PUBLIC;
-- dbsync.log_keys stays callable by PUBLIC: it reads nothing, and the daemon, reconcile and status
-- call it on rows they may read.
