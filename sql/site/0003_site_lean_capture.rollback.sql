-- Back to 0002: the capture trigger of 0001_site_core (writers read the doorbell table), no
-- mirror, and the op CHECK.
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
DROP FUNCTION dbsync.doorbell_armed();
DROP TRIGGER doorbell_mirror ON dbsync.doorbell;
DROP FUNCTION dbsync.doorbell_mirror();
DROP SEQUENCE dbsync.doorbell_state;
ALTER TABLE dbsync.sync_log ADD CONSTRAINT sync_log_op_check CHECK (op IN ('I', 'U', 'D', 'T'));
