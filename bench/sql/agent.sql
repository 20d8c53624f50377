-- Benchmark helpers on an Agent DB: an arrival doorbell for the latency measurement.
-- ENABLE ALWAYS so it fires under session_replication_role = replica, which both dbsync's
-- apply connection and native logical replication's apply worker use. NOTIFY is delivered at
-- commit, i.e. exactly when the change becomes visible on the Agent DB.

CREATE SCHEMA bench;

CREATE FUNCTION bench.arrival() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.id >= 100000000 THEN
            PERFORM pg_notify('bench_arrival', OLD.id || ':deleted');
        END IF;
    ELSIF NEW.id >= 100000000 THEN
        PERFORM pg_notify('bench_arrival', NEW.id || ':' || NEW.status);
    END IF;
    RETURN NULL;
END
$$;
