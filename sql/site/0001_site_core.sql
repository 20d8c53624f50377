-- dbsync Site DB core: the sync log, the capture trigger and the registry of replicated tables.
-- Requires PostgreSQL 13+ (xid8, pg_current_xact_id, pg_snapshot).

-- The schema is new, or (`dbsync migrate --two-way`: this database is also an Agent DB) the one
-- the Agent chain created: refused unless the installing role owns it, nobody else may create in
-- it and it holds the Agent chain's mark table, so a schema planted by another role is never used.
DO $do$
DECLARE
    v_owner oid;
BEGIN
    SELECT n.nspowner INTO v_owner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'dbsync';
    IF NOT FOUND THEN
        CREATE SCHEMA dbsync;
    ELSIF v_owner OPERATOR(pg_catalog.<>) (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER)
          OR pg_catalog.to_regclass('dbsync.apply_progress') IS NULL
          OR EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
                      WHERE n.nspname OPERATOR(pg_catalog.=) 'dbsync' AND a.privilege_type OPERATOR(pg_catalog.=) 'CREATE'
                        AND a.grantee OPERATOR(pg_catalog.<>) v_owner) THEN
        RAISE EXCEPTION 'dbsync: a schema dbsync already exists that dbsync''s Agent chain did not create for this role; refusing to install into it'
            USING ERRCODE = 'duplicate_schema';
    END IF;
END
$do$;
REVOKE ALL ON SCHEMA dbsync FROM PUBLIC;

-- Tables whose changes are captured. The Agent DB holds a table of the same schema and name.
CREATE TABLE dbsync.replicated_tables (
    table_id    integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relid       oid NOT NULL UNIQUE,
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    key_columns text[] NOT NULL CHECK (cardinality(key_columns) > 0),
    added_at    timestamptz NOT NULL DEFAULT now(),
    -- Removed tables keep their row: events already in the log still name them.
    removed_at  timestamptz
);
CREATE UNIQUE INDEX replicated_tables_name_idx ON dbsync.replicated_tables (schema_name, table_name)
    WHERE removed_at IS NULL;

-- Row images are hstore values: every column as PostgreSQL's own text output, keyed by name.
-- Text output and input are PostgreSQL's exact round trip for every type (floats incl. -0 and
-- NaN, numeric scale, array bounds, json whitespace, JSON null vs SQL NULL), provided the output
-- settings are fixed: the capture function pins them. hstore is a trusted contrib extension;
-- an existing installation is used wherever it lives.
CREATE EXTENSION IF NOT EXISTS hstore;

DO $do$
DECLARE
    ext text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                   JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'hstore');
BEGIN
    -- One row per captured change. The sequence must keep CACHE 1 (the default): per-row
    -- ordering relies on sequence numbers being handed out in time order across sessions.
    EXECUTE format($sql$
        CREATE TABLE dbsync.sync_log (
            seq         bigint GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME dbsync.sync_log_seq CACHE 1) PRIMARY KEY,
            txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
            table_id    integer NOT NULL,
            op          "char" NOT NULL CHECK (op IN ('I', 'U', 'D', 'T')),
            pk          %1$s.hstore,
            row_image   %1$s.hstore,
            captured_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )$sql$, ext);
    -- The image helpers: the one place where a row becomes an event. Plain SQL, so they are
    -- inlined; the caller pins the output settings.
    EXECUTE format($sql$
        CREATE FUNCTION dbsync.row_image(anyelement) RETURNS %1$s.hstore
        LANGUAGE sql STABLE AS 'SELECT %1$s.hstore($1)'$sql$, ext);
    EXECUTE format($sql$
        CREATE FUNCTION dbsync.key_image(%1$s.hstore, text[]) RETURNS %1$s.hstore
        LANGUAGE sql IMMUTABLE AS 'SELECT %1$s.slice($1, $2)'$sql$, ext);
    EXECUTE format($sql$
        CREATE FUNCTION dbsync.image_json(%1$s.hstore) RETURNS json
        LANGUAGE sql IMMUTABLE AS 'SELECT %1$s.hstore_to_json($1)'$sql$, ext);
    -- The row with its key columns set from a key image: equal to the row iff the key is.
    EXECUTE format($sql$
        CREATE FUNCTION dbsync.with_key(anyelement, %1$s.hstore) RETURNS anyelement
        LANGUAGE sql STABLE AS 'SELECT %1$s.populate_record($1, $2)'$sql$, ext);
END
$do$;

-- The consumer finds the events of newly committed transactions by their xid.
CREATE INDEX sync_log_txid_idx ON dbsync.sync_log (txid);
-- The daemon deletes applied events continuously: vacuum after a fixed number of dead rows,
-- not a fraction of the table, so the log stays small however busy the Site is.
ALTER TABLE dbsync.sync_log SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 100000
);
REVOKE ALL ON dbsync.sync_log, dbsync.replicated_tables FROM PUBLIC;

-- The doorbell. NOTIFY makes every notifying transaction take a database-wide lock at commit,
-- which serialises commits (no group commit), so writers only ring when the daemon has said it
-- is idle and waiting (armed); while it is busy it reads the log anyway. The daemon's protocol
-- for arming without losing a wake-up is in dbsync.daemon.doorbell.
CREATE TABLE dbsync.doorbell (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    armed     boolean NOT NULL DEFAULT false
);
INSERT INTO dbsync.doorbell DEFAULT VALUES;
REVOKE ALL ON dbsync.doorbell FROM PUBLIC;

-- The capture trigger. SECURITY DEFINER so writers need no rights on the log; a fixed
-- search_path so a writer cannot hijack it; fixed output settings so row images are exact and
-- keys canonical whatever the writer's session has set.
-- TG_ARGV: [0] table_id, [1..] primary-key column names.
CREATE FUNCTION dbsync.capture() RETURNS trigger
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
        IF (SELECT d.armed FROM dbsync.doorbell d) THEN
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
    IF (SELECT d.armed FROM dbsync.doorbell d) THEN
        PERFORM pg_catalog.pg_notify('dbsync', '');
    END IF;
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION dbsync.capture() FROM PUBLIC;

-- Register a table: validate it, record it and install the capture triggers.
CREATE FUNCTION dbsync.add_table(p_table regclass) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_schema text;
    v_name   text;
    v_keys   text[];
    v_id     integer;
    v_args   text;
BEGIN
    SELECT n.nspname, c.relname INTO v_schema, v_name
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

    INSERT INTO dbsync.replicated_tables (relid, schema_name, table_name, key_columns)
    VALUES (p_table, v_schema, v_name, v_keys)
    ON CONFLICT (relid) DO UPDATE
        SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
            key_columns = EXCLUDED.key_columns, added_at = now(), removed_at = NULL
    RETURNING table_id INTO v_id;

    SELECT string_agg(quote_literal(x), ', ') INTO v_args FROM unnest(v_id::text || v_keys) AS x;
    EXECUTE format(
        'CREATE TRIGGER dbsync_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION dbsync.capture(%s)', p_table, v_args);
    EXECUTE format(
        'CREATE TRIGGER dbsync_capture_truncate AFTER TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION dbsync.capture(%s)', p_table, v_args);
    RETURN v_id;
END
$fn$;

-- Stop capturing a table. Events already in the log are still delivered.
CREATE FUNCTION dbsync.remove_table(p_table regclass) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM dbsync.replicated_tables WHERE relid = p_table AND removed_at IS NULL) THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsync_capture_truncate ON %s', p_table);
    UPDATE dbsync.replicated_tables SET removed_at = now() WHERE relid = p_table;
    RETURN true;
END
$fn$;
REVOKE ALL ON FUNCTION dbsync.add_table(regclass), dbsync.remove_table(regclass) FROM PUBLIC;
