-- Capture designs measured against dbsync's shipped capture (bench/designs.py), installed on
-- public.whatsapp_messages of a throwaway Site database only, never by `dbsync migrate`.
-- Both log the key alone: the daemon would read the row itself, at the batch's snapshot. Keys are
-- each column's own text output (format('%s'), no cast a type's owner could shadow), as a
-- two-dimensional text[] (rows x key columns), so one log row can carry many keys.

CREATE SCHEMA bench_keys;
CREATE TABLE bench_keys.log (
    seq         bigint GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME bench_keys.log_seq CACHE 1) PRIMARY KEY,
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    table_id    integer NOT NULL,
    op          "char" NOT NULL,
    keys        text[],
    captured_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX log_txid_idx ON bench_keys.log (txid);

-- A row trigger writing one key per log row.
CREATE FUNCTION bench_keys.capture_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        INSERT INTO bench_keys.log (table_id, op, keys) VALUES (3, 'D', ARRAY[ARRAY[pg_catalog.format('%s', OLD.id)]]);
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO bench_keys.log (table_id, op, keys) VALUES (3, 'I', ARRAY[ARRAY[pg_catalog.format('%s', NEW.id)]]);
    ELSIF OLD OPERATOR(pg_catalog.*<>) NEW THEN
        INSERT INTO bench_keys.log (table_id, op, keys) VALUES (3, 'U', ARRAY[ARRAY[pg_catalog.format('%s', NEW.id)]]);
    END IF;
    IF dbsync.doorbell_armed() THEN
        PERFORM pg_catalog.pg_notify('dbsync', '');
    END IF;
    RETURN NULL;
END $fn$;

-- Statement triggers with transition tables writing one log row per statement that carries every
-- key the statement changed (an UPDATE logs the new keys of changed rows, and the old keys of rows
-- whose key changed). Generated per table in a real design, so the key columns are static SQL
-- and PL/pgSQL keeps the plans.
CREATE FUNCTION bench_keys.capture_statement() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO bench_keys.log (table_id, op, keys)
        SELECT 3, 'I', pg_catalog.array_agg(ARRAY[pg_catalog.format('%s', n.id)]) FROM dbsync_new n
        HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        INSERT INTO bench_keys.log (table_id, op, keys)
        SELECT 3, 'D', pg_catalog.array_agg(ARRAY[pg_catalog.format('%s', o.id)]) FROM dbsync_old o
        HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0;
    ELSE
        INSERT INTO bench_keys.log (table_id, op, keys)
        SELECT 3, 'U', pg_catalog.array_agg(ARRAY[pg_catalog.format('%s', k.id)])
        FROM (SELECT n.id FROM dbsync_new n
              LEFT JOIN dbsync_old o ON o.id OPERATOR(pg_catalog.=) n.id
              WHERE o.id IS NULL OR o OPERATOR(pg_catalog.*<>) n
              UNION ALL
              SELECT o.id FROM dbsync_old o
              WHERE NOT EXISTS (SELECT 1 FROM dbsync_new n WHERE n.id OPERATOR(pg_catalog.=) o.id)) k
        HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0;
    END IF;
    IF dbsync.doorbell_armed() THEN
        PERFORM pg_catalog.pg_notify('dbsync', '');
    END IF;
    RETURN NULL;
END $fn$;
