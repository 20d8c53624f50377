-- depends: 0002_site_resync
-- A leaner capture trigger: what each change costs the writer, measured per WhatsApp
-- transaction (insert a message, update its status) in one session, 48 us without capture:
--   * reading the doorbell table (a one-row scan through SPI, with an lseek to size the table)
--     cost ~9 us; writers now read a sequence that mirrors it, with one function call;
--   * the CHECK on sync_log.op (its expression is re-read from the catalog text on every insert)
--     cost ~5 us; only dbsync's own SECURITY DEFINER functions write the log, so it goes.
-- bench/ holds the measurements (docs/benchmarks.md).

ALTER TABLE dbsync.sync_log DROP CONSTRAINT IF EXISTS sync_log_op_check;

-- The doorbell writers read: last_value 1 = armed; 0 or never set = not armed. The daemon still
-- writes dbsync.doorbell (its grants are unchanged); a trigger mirrors each write here. A
-- sequence is not transactional: the mirror takes effect at once, before the daemon's update
-- commits, so a writer sees an arm no later than before (the wake-up protocol only needs that).
CREATE SEQUENCE dbsync.doorbell_state AS smallint MINVALUE 0 MAXVALUE 1 START 0 NO CYCLE;
REVOKE ALL ON SEQUENCE dbsync.doorbell_state FROM PUBLIC;

CREATE FUNCTION dbsync.doorbell_mirror() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM pg_catalog.setval('dbsync.doorbell_state', CASE WHEN NEW.armed THEN 1 ELSE 0 END);
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION dbsync.doorbell_mirror() FROM PUBLIC;
CREATE TRIGGER doorbell_mirror AFTER INSERT OR UPDATE ON dbsync.doorbell
    FOR EACH ROW EXECUTE FUNCTION dbsync.doorbell_mirror();
UPDATE dbsync.doorbell SET armed = armed;  -- the mirror starts from the current state

-- What writers read. Plain SQL without a FROM: PL/pgSQL evaluates it inline as a simple
-- expression, without a query plan.
CREATE FUNCTION dbsync.doorbell_armed() RETURNS boolean
LANGUAGE sql STABLE
AS $fn$ SELECT pg_catalog.pg_sequence_last_value('dbsync.doorbell_state'::pg_catalog.regclass) OPERATOR(pg_catalog.=) 1 $fn$;
REVOKE ALL ON FUNCTION dbsync.doorbell_armed() FROM PUBLIC;

-- The capture trigger, as in 0001_site_core but for the doorbell read.
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
