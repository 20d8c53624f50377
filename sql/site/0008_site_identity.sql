-- depends: 0007_site_stable_read
-- Tables without a primary key (issue 13).
--
-- * Identity: a unique index on NOT NULL columns stands in for the primary key
--   (`dbsync tables add --identity INDEX NAME`). Its columns, in index order, are the table's
--   key_columns; the key operators come from its operator classes (dbsync.key_operator below).
--   Everything else (key capture, readers, resync, backfill, the apply) works as for a primary
--   key.
-- * Insert-only: an append-only table with no key at all (`dbsync tables add --insert-only NAME`).
--   There is no key to read a row back by, so the capture logs each inserted row's image (the
--   log's row_image column, one log row per inserted row, set-based from the statement's
--   transition table), and the daemon inserts it as it is; readers and read_rows are never used
--   for such a table. An UPDATE, DELETE or TRUNCATE of it would make the Agent DB differ without
--   anything to say so, so the Site refuses it: BEFORE statement triggers raise an error (an
--   UPDATE or DELETE that matches no row is refused too, as is INSERT ... ON CONFLICT DO UPDATE).
--   key_columns is empty for it.

ALTER TABLE dbsync.replicated_tables ADD COLUMN identity_index oid;
ALTER TABLE dbsync.replicated_tables ADD COLUMN insert_only boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN dbsync.replicated_tables.identity_index IS
    'The unique index whose columns are key_columns, for a table replicated by --identity; NULL: its primary key.';
COMMENT ON COLUMN dbsync.replicated_tables.insert_only IS
    'Replicated insert-only: no key (key_columns empty), rows logged as images, UPDATE/DELETE/TRUNCATE refused.';
ALTER TABLE dbsync.replicated_tables DROP CONSTRAINT replicated_tables_key_columns_check;
ALTER TABLE dbsync.replicated_tables ADD CONSTRAINT replicated_tables_key_columns_check
    CHECK (CASE WHEN insert_only THEN cardinality(key_columns) = 0 AND identity_index IS NULL
                ELSE cardinality(key_columns) > 0 END);

-- As in 0004_site_safe_calls, with the index chosen per table: the registered identity index
-- when the table has one, else its primary key.
CREATE OR REPLACE FUNCTION dbsync.key_operator(
    p_table regclass, p_column text, p_strategy integer, OUT cast_to text, OUT operator text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_type     oid;
    v_base     oid;
    v_class    oid;
    v_identity oid := (SELECT r.identity_index FROM dbsync.replicated_tables r WHERE r.relid = p_table);
BEGIN
    SELECT a.atttypid, i.indclass[k.pos - 1] INTO v_type, v_class
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = p_table AND a.attname = p_column
       AND CASE WHEN v_identity IS NULL THEN i.indisprimary ELSE i.indexrelid = v_identity END;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dbsync: % is not a key column of %', p_column, p_table
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
        RAISE EXCEPTION 'dbsync: the key operator class of %.% has no btree strategy %',
            p_table, quote_ident(p_column), p_strategy USING ERRCODE = 'feature_not_supported';
    END IF;
END
$fn$;

-- Why an index cannot be a table's identity, or NULL when it can: unique, not partial, no
-- expressions, valid, on that table, every column NOT NULL.
CREATE FUNCTION dbsync.identity_problem(p_table regclass, p_index regclass) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    i         record;
    v_column  text;
BEGIN
    SELECT x.indrelid, x.indisunique, x.indpred IS NOT NULL AS partial, x.indexprs IS NOT NULL AS exprs,
           x.indisvalid AND x.indisready AND x.indislive AS valid
      INTO i FROM pg_index x WHERE x.indexrelid = p_index;
    IF NOT FOUND THEN
        RETURN format('%s is not an index', p_index);
    ELSIF i.indrelid <> p_table THEN
        RETURN format('index %s is on table %s, not on %s', p_index, i.indrelid::regclass, p_table);
    ELSIF NOT i.indisunique THEN
        RETURN format('index %s is not unique', p_index);
    ELSIF i.partial THEN
        RETURN format('index %s is partial (it has a WHERE clause)', p_index);
    ELSIF i.exprs THEN
        RETURN format('index %s has expressions; an identity index must be on plain columns', p_index);
    ELSIF NOT i.valid THEN
        RETURN format('index %s is not valid (a failed CREATE INDEX CONCURRENTLY?): REINDEX it first', p_index);
    END IF;
    SELECT a.attname INTO v_column
      FROM pg_index x CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
     WHERE x.indexrelid = p_index AND NOT a.attnotnull
     ORDER BY k.ord LIMIT 1;
    IF FOUND THEN
        RETURN format('column %I of index %s is nullable: ALTER TABLE %s ALTER COLUMN %I SET NOT NULL first',
                      v_column, p_index, p_table, v_column);
    END IF;
    RETURN NULL;
END
$fn$;

-- A live insert-only table by its id, or an error.
CREATE FUNCTION dbsync.insert_only_table(p_table_id integer) RETURNS regclass
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_table regclass;
BEGIN
    SELECT r.relid::regclass INTO v_table
      FROM dbsync.replicated_tables r WHERE r.table_id = p_table_id AND r.removed_at IS NULL AND r.insert_only;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dbsync: table id % is not replicated insert-only', p_table_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN v_table;
END
$fn$;

-- The capture of an insert-only table: its generated function logs the image of every row an
-- INSERT statement added (one log row each, set-based from the transition table) and refuses
-- everything else; its triggers are AFTER INSERT, and BEFORE UPDATE, DELETE and TRUNCATE, all
-- per statement, named like the key capture's so drop_capture and remove_table drop them.
-- The whole-row value of a subquery is typed `record`: the extension's exact hstore(record),
-- never an overload someone created for the table's row type. Output settings are pinned: an
-- image holds every column's text.
DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.install_insert_capture(p_table_id integer) RETURNS void
        LANGUAGE plpgsql
        SET search_path = pg_catalog, pg_temp
        AS $fn$
        DECLARE
            v_table regclass := dbsync.insert_only_table(p_table_id);
            v_fn    text := dbsync.capture_function(p_table_id);
        BEGIN
            EXECUTE pg_catalog.format($gen$
                CREATE OR REPLACE FUNCTION %%1$s() RETURNS trigger
                LANGUAGE plpgsql
                SECURITY DEFINER
                SET search_path = pg_catalog, pg_temp
                SET extra_float_digits = 3 SET IntervalStyle = postgres SET DateStyle = 'ISO, YMD'
                SET TimeZone = 'UTC' SET bytea_output = hex SET lc_monetary = 'C'
                AS $body$
                DECLARE
                    v_rows bigint := 0;
                BEGIN
                    IF TG_OP OPERATOR(pg_catalog.<>) 'INSERT' THEN
                        RAISE EXCEPTION 'dbsync: table %%%%.%%%% is replicated insert-only: %%%% is refused',
                            pg_catalog.quote_ident(TG_TABLE_SCHEMA), pg_catalog.quote_ident(TG_TABLE_NAME), TG_OP
                            USING ERRCODE = 'feature_not_supported',
                                  HINT = 'Only INSERT reaches the Agent DB for this table; to change its rows, '
                                         'stop replicating it first (dbsync tables remove).';
                    END IF;
                    INSERT INTO dbsync.sync_log (table_id, op, row_image)
                    SELECT %%2$s, 'I', %1$s.hstore(s) FROM (SELECT dbsync_n.* FROM dbsync_new dbsync_n) AS s;
                    GET DIAGNOSTICS v_rows = ROW_COUNT;
                    IF v_rows OPERATOR(pg_catalog.>) 0 AND dbsync.doorbell_armed() THEN
                        PERFORM pg_catalog.pg_notify('dbsync', '');
                    END IF;
                    RETURN NULL;
                END
                $body$$gen$, v_fn, p_table_id);
            EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %%s() FROM PUBLIC', v_fn);
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER dbsync_capture_insert AFTER INSERT ON %%s REFERENCING NEW TABLE AS dbsync_new '
                'FOR EACH STATEMENT EXECUTE FUNCTION %%s()', v_table, v_fn);
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER dbsync_capture_update BEFORE UPDATE ON %%s FOR EACH STATEMENT EXECUTE FUNCTION %%s()',
                v_table, v_fn);
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER dbsync_capture_delete BEFORE DELETE ON %%s FOR EACH STATEMENT EXECUTE FUNCTION %%s()',
                v_table, v_fn);
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER dbsync_capture_truncate BEFORE TRUNCATE ON %%s FOR EACH STATEMENT EXECUTE FUNCTION %%s()',
                v_table, v_fn);
        END
        $fn$$sql$, ext);

    -- The rows an insert-only table holds, logged as inserts. Only right in the transaction that
    -- registers the table, after add_table: its triggers' lock waited for every writer, so the
    -- rows it sees are exactly those no capture has logged (`tables add --insert-only --backfill`).
    EXECUTE pg_catalog.format($sql$
        CREATE FUNCTION dbsync.copy_insert_only(p_table_id integer) RETURNS bigint
        LANGUAGE plpgsql
        SET search_path = pg_catalog, pg_temp
        SET extra_float_digits = 3 SET IntervalStyle = postgres SET DateStyle = 'ISO, YMD'
        SET TimeZone = 'UTC' SET bytea_output = hex SET lc_monetary = 'C'
        SET row_security = off
        AS $fn$
        DECLARE
            v_table regclass := dbsync.insert_only_table(p_table_id);
            v_rows  bigint;
        BEGIN
            EXECUTE pg_catalog.format(
                'INSERT INTO dbsync.sync_log (table_id, op, row_image) '
                'SELECT %%s, ''I'', %1$s.hstore(s) FROM (SELECT dbsync_t.* FROM %%s dbsync_t) AS s',
                p_table_id, v_table);
            GET DIAGNOSTICS v_rows = ROW_COUNT;
            RETURN v_rows;
        END
        $fn$$sql$, ext);
END
$do$;

-- install_capture (0007) for every kind of table: an insert-only one gets its own capture and no reader.
CREATE OR REPLACE FUNCTION dbsync.install_capture(p_table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF (SELECT r.insert_only FROM dbsync.replicated_tables r WHERE r.table_id = p_table_id) THEN
        PERFORM dbsync.install_insert_capture(p_table_id);
        RETURN;
    END IF;
    PERFORM dbsync.install_key_capture(p_table_id);
    PERFORM dbsync.install_reader(p_table_id);
END
$fn$;

-- Register a table: by its primary key, by an identity index (p_identity), or insert-only.
CREATE FUNCTION dbsync.add_table(p_table regclass, p_identity regclass, p_insert_only boolean) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_schema  text;
    v_name    text;
    v_kind    "char";
    v_keys    text[];
    v_id      integer;
    v_args    text;
    v_other   text;
    v_member  regclass;
    v_problem text;
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
    IF p_insert_only AND p_identity IS NOT NULL THEN
        RAISE EXCEPTION 'dbsync: a table is replicated either by an identity index or insert-only, not both'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_insert_only THEN
        -- A statement trigger sees every inserted row only on a plain table outside any tree.
        IF v_kind <> 'r' OR EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p_table AND c.relispartition)
           OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = p_table OR i.inhparent = p_table) THEN
            RAISE EXCEPTION 'dbsync: table %.% is partitioned, a partition or in an inheritance tree; '
                'insert-only replication takes plain tables only', quote_ident(v_schema), quote_ident(v_name)
                USING ERRCODE = 'feature_not_supported';
        END IF;
        v_keys := '{}';
    ELSIF p_identity IS NOT NULL THEN
        v_problem := dbsync.identity_problem(p_table, p_identity);
        IF v_problem IS NOT NULL THEN
            RAISE EXCEPTION 'dbsync: %', v_problem USING ERRCODE = 'invalid_table_definition';
        END IF;
        SELECT array_agg(a.attname::text ORDER BY k.ord) INTO v_keys
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indexrelid = p_identity;
    ELSE
        SELECT array_agg(a.attname::text ORDER BY k.ord) INTO v_keys
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = p_table AND i.indisprimary;
        IF v_keys IS NULL THEN
            RAISE EXCEPTION 'dbsync: table %.% has no primary key: name a unique index on NOT NULL columns as its '
                'identity, or replicate it insert-only', quote_ident(v_schema), quote_ident(v_name)
                USING ERRCODE = 'invalid_table_definition';
        END IF;
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

    INSERT INTO dbsync.replicated_tables (relid, schema_name, table_name, key_columns, identity_index, insert_only)
    VALUES (p_table, v_schema, v_name, v_keys, p_identity, p_insert_only)
    ON CONFLICT (relid) DO UPDATE
        SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
            key_columns = EXCLUDED.key_columns, identity_index = EXCLUDED.identity_index,
            insert_only = EXCLUDED.insert_only, added_at = now(), removed_at = NULL
    RETURNING table_id INTO v_id;

    PERFORM dbsync.install_capture(v_id);
    DELETE FROM dbsync.partitions WHERE table_id = v_id;
    IF p_insert_only THEN
        RETURN v_id;  -- its TRUNCATE is refused by the insert-only capture
    END IF;
    SELECT string_agg(quote_literal(x), ', ') INTO v_args FROM unnest(v_id::text || v_keys) AS x;
    EXECUTE format(
        'CREATE TRIGGER dbsync_capture_truncate AFTER TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION dbsync.capture(%s)', p_table, v_args);
    IF v_kind = 'p' THEN
        FOR v_member IN SELECT t.relid FROM pg_partition_tree(p_table) AS t LOOP
            PERFORM dbsync.install_truncate_capture(v_id, v_member);
        END LOOP;
    END IF;
    RETURN v_id;
END
$fn$;

-- The one-argument call of earlier dbsync versions: by primary key.
CREATE OR REPLACE FUNCTION dbsync.add_table(p_table regclass) RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $fn$ SELECT dbsync.add_table(p_table, NULL::regclass, false) $fn$;

REVOKE ALL ON FUNCTION dbsync.identity_problem(regclass, regclass), dbsync.insert_only_table(integer),
    dbsync.install_insert_capture(integer),
    dbsync.copy_insert_only(integer), dbsync.add_table(regclass, regclass, boolean) FROM PUBLIC;
