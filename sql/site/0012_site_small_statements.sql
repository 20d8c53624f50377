-- depends: 0011_site_keyed_reads
-- One-row (and up to 100-row) statements logged by one aggregate (issue 10, target 3).
--
-- The statement triggers of 0006_site_key_capture chunk a statement's keys 100 to a log row
-- with a window function and a GROUP BY, and an UPDATE runs two such statements (keys gone,
-- keys changed) with joins of its transition tables. For the one-row statements a web app
-- writes, that machinery was most of the capture's cost. A statement of up to 100 rows now
-- takes one aggregate over (at most 101 rows of) its transition table; an UPDATE of up to 100
-- rows that kept every key takes one join and one log row. Everything else (a bulk statement,
-- an UPDATE that changed a key, a statement of no rows) goes the general way, unchanged.
-- The log rows written are the same either way.

DO $do$
DECLARE
    ext text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    EXECUTE pg_catalog.format($sql$
        CREATE OR REPLACE FUNCTION dbsync.install_key_capture(p_table_id integer) RETURNS void
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
                    v_rows    bigint := 0;
                    v_more    bigint := 0;
                    v_n       bigint;
                    v_matched bigint;
                    v_keys    text[];
                    v_done    boolean := false;
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
                    ELSIF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
                        -- A statement of up to 100 rows: its keys in one log row, from one
                        -- aggregate (the general path below chunks any number of them).
                        INSERT INTO dbsync.sync_log (table_id, op, keys)
                        SELECT %%3$s, 'I', pg_catalog.array_agg(k.key)
                          FROM (SELECT %%4$s AS key FROM dbsync_new dbsync_n LIMIT 101) k
                        HAVING pg_catalog.count(*) OPERATOR(pg_catalog.<=) 100
                           AND pg_catalog.count(*) OPERATOR(pg_catalog.>) 0;
                        GET DIAGNOSTICS v_rows = ROW_COUNT;
                    ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
                        INSERT INTO dbsync.sync_log (table_id, op, keys)
                        SELECT %%3$s, 'D', pg_catalog.array_agg(k.key)
                          FROM (SELECT %%5$s AS key FROM dbsync_old dbsync_o LIMIT 101) k
                        HAVING pg_catalog.count(*) OPERATOR(pg_catalog.<=) 100
                           AND pg_catalog.count(*) OPERATOR(pg_catalog.>) 0;
                        GET DIAGNOSTICS v_rows = ROW_COUNT;
                    ELSE
                        -- An UPDATE of up to 100 rows that kept every key: the keys of the rows
                        -- it changed, in one log row. Any key changed: the general path.
                        SELECT pg_catalog.count(*), pg_catalog.count(*) FILTER (WHERE NOT %%9$s),
                               pg_catalog.array_agg(%%4$s) FILTER (WHERE dbsync_o OPERATOR(pg_catalog.*<>) dbsync_n)
                          INTO v_n, v_matched, v_keys
                          FROM (SELECT * FROM dbsync_new LIMIT 101) dbsync_n LEFT JOIN dbsync_old dbsync_o ON %%8$s;
                        IF v_n OPERATOR(pg_catalog.<=) 100 AND v_matched OPERATOR(pg_catalog.=) v_n THEN
                            IF v_keys IS NOT NULL THEN
                                INSERT INTO dbsync.sync_log (table_id, op, keys) VALUES (%%3$s, 'U', v_keys);
                                v_rows := 1;
                            END IF;
                            v_done := true;
                        END IF;
                    END IF;
                    IF TG_LEVEL OPERATOR(pg_catalog.=) 'ROW' OR v_rows OPERATOR(pg_catalog.>) 0 OR v_done THEN
                        NULL;  -- logged above
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

-- The capture functions of the tables registered before this migration, regenerated in this
-- migration's transaction (as 0006 did: no change is captured twice or not at all).
DO $do$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT r.table_id, r.relid FROM dbsync.replicated_tables r JOIN pg_catalog.pg_class c ON c.oid = r.relid
              WHERE r.removed_at IS NULL AND NOT r.insert_only ORDER BY r.table_id LOOP
        PERFORM dbsync.drop_key_capture(t.relid::pg_catalog.regclass);
        PERFORM dbsync.install_key_capture(t.table_id);
    END LOOP;
END
$do$;
