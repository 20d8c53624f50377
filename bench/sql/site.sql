-- Benchmark helpers on a Site DB (installed into the benchmark's Site template, never by
-- `dbsync migrate`). The bench schema itself is not replicated.

CREATE SCHEMA bench;

CREATE FUNCTION bench.phone(n bigint) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT '+49151' || lpad(n::text, 7, '0') $$;

-- About 100 kB of text that pglz cannot shrink (hex digits without repeats), like a base64 media blob.
CREATE FUNCTION bench.blob(bytes integer) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT string_agg(md5(random()::text), '') FROM generate_series(1, bytes / 32)
$$;

CREATE FUNCTION bench.text_for(m bigint) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT (ARRAY[
        'Hallo, ist das Angebot noch gültig?',
        'Gerne! Ich schicke Ihnen das Angebot gleich.',
        'Wann können Sie liefern?',
        'Lieferung ist am Donnerstag möglich.',
        'Passt 10 Uhr für einen Anruf?',
        'Die Premium-Variante kostet 49 € im Monat.',
        'Ich habe die Rechnung nicht bekommen',
        'Here is the brochure: https://example.com/b.pdf'
    ])[1 + m % 8] || ' #' || m
$$;

-- Conversations and leads 1..n, explicit ids, committed in transactions of 50 of each.
CREATE PROCEDURE bench.seed(n integer, INOUT events bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
BEGIN
    events := 0;
    FOR c IN 1..n LOOP
        INSERT INTO public.conversations (id, phone_number, contact_name, assigned_agent)
        VALUES (c, bench.phone(c), 'Kontakt ' || c, (ARRAY['anna', 'ben', 'chiara', 'deniz'])[1 + c % 4]);
        INSERT INTO public.leads (id, phone_number, name, conversation_id, attributes)
        VALUES (c, bench.phone(c), 'Kontakt ' || c, c,
                jsonb_build_object('source', 'whatsapp', 'campaign', 'spring-' || c % 7));
        events := events + 2;
        IF c % 50 = 0 THEN
            COMMIT;
        END IF;
    END LOOP;
    COMMIT;
END
$$;

-- The last row of a backlog: a consumer has caught up once this message is on the Agent.
CREATE PROCEDURE bench.sentinel(p_id bigint)
LANGUAGE sql AS $$
    INSERT INTO public.whatsapp_messages (id, message_id, conversation_id, phone_number, direction, content)
    VALUES (p_id, 'bench-sentinel', 1, bench.phone(1), 'outbound', 'end of backlog')
$$;

-- The WhatsApp backlog: one small transaction per user-visible action, as the web app and
-- its webhooks write them. Per message m:
--   insert m + bump its conversation; every big_every-th message carries a 100 kB body, and so
--   do the 50 messages of a burst every 20,000 messages (a media import: enough consecutive big
--   images to fill the daemon's page byte limit);
--   m-20 becomes 'delivered'; m-50 becomes 'read'; every 10th message m-100 is deleted;
--   every 100th message moves a lead one stage on.
-- That is ~4.1 row changes per message in ~3.1 transactions. Ends with the sentinel message
-- 'bench-sentinel' in its own last transaction: when a consumer shows it, it has applied all.
-- Returns the exact number of row changes written (conversations/leads seed included).
CREATE PROCEDURE bench.backlog(p_events bigint, p_big_every integer, INOUT events bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    n_conv CONSTANT integer := 1000;
    seeded bigint;
    m      bigint := 0;
    conv   integer;
BEGIN
    PERFORM setseed(0.42);
    CALL bench.seed(n_conv, seeded);
    events := seeded;
    WHILE events < p_events - 1 LOOP
        m := m + 1;
        conv := 1 + (m * 7919) % n_conv;
        INSERT INTO public.whatsapp_messages (id, message_id, conversation_id, phone_number, direction, content)
        VALUES (m, 'wamid.bench.' || m, conv, bench.phone(conv),
                CASE WHEN m % 2 = 0 THEN 'inbound' ELSE 'outbound' END,
                CASE WHEN m % p_big_every = 0 OR m % 20000 BETWEEN 1 AND 50
                     THEN bench.blob(102400) ELSE bench.text_for(m) END);
        UPDATE public.conversations
           SET unread_count = unread_count + 1, last_message_at = now(), updated_at = now()
         WHERE id = conv;
        COMMIT;
        events := events + 2;
        IF m > 20 THEN
            UPDATE public.whatsapp_messages
               SET status = 'delivered', delivered_at = now(), updated_at = now()
             WHERE id = m - 20;
            COMMIT;
            events := events + 1;
        END IF;
        IF m > 50 THEN
            UPDATE public.whatsapp_messages
               SET status = 'read', read_at = now(), updated_at = now()
             WHERE id = m - 50;
            COMMIT;
            events := events + 1;
        END IF;
        IF m > 100 AND m % 10 = 0 THEN
            DELETE FROM public.whatsapp_messages WHERE id = m - 100;
            COMMIT;
            events := events + 1;
        END IF;
        IF m % 100 = 0 THEN
            UPDATE public.leads
               SET score = score + 1, updated_at = now(),
                   stage = (ARRAY['new', 'contacted', 'qualified', 'won', 'lost'])[1 + (m / 100) % 5]
             WHERE id = conv;
            COMMIT;
            events := events + 1;
        END IF;
    END LOOP;
    CALL bench.sentinel(m + 1);
    COMMIT;
    events := events + 1;
END
$$;

-- The bulk-statement backlog (issue 10): the seed, then p_rows messages inserted in statements
-- of 10,000 rows, one UPDATE of the status of half of them, one DELETE of a tenth, and the
-- sentinel; each statement its own transaction. Deterministic, like bench.backlog.
CREATE PROCEDURE bench.bulk_backlog(p_rows integer, INOUT events bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    seeded bigint;
    done   integer := 0;
    n      integer;
BEGIN
    CALL bench.seed(1000, seeded);
    events := seeded;
    WHILE done < p_rows LOOP
        n := least(10000, p_rows - done);
        INSERT INTO public.whatsapp_messages (id, message_id, conversation_id, phone_number, direction, content)
        SELECT g, 'wamid.bulk.' || g, 1 + g % 1000, bench.phone(1 + g % 1000), 'inbound', bench.text_for(g)
          FROM generate_series(done + 1, done + n) g;
        COMMIT;
        done := done + n;
        events := events + n;
    END LOOP;
    UPDATE public.whatsapp_messages SET status = 'delivered', delivered_at = now(), updated_at = now()
     WHERE id % 2 = 0;
    GET DIAGNOSTICS n = ROW_COUNT;
    COMMIT;
    events := events + n;
    DELETE FROM public.whatsapp_messages WHERE id % 10 = 5;
    GET DIAGNOSTICS n = ROW_COUNT;
    COMMIT;
    events := events + n;
    CALL bench.sentinel(p_rows + 1);
    COMMIT;
    events := events + 1;
END
$$;

-- Reference capture: what a first attempt usually looks like. A plain row trigger that logs
-- to_jsonb of the row and sends one notification per row (the payload names the row, so
-- PostgreSQL cannot fold them). TG_ARGV[0] = 'notify' turns the notification on.
CREATE TABLE bench.naive_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name text NOT NULL,
    op         text NOT NULL,
    row_data   jsonb,
    changed_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION bench.naive_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    INSERT INTO bench.naive_log (table_name, op, row_data) VALUES (TG_TABLE_NAME, TG_OP, to_jsonb(r));
    IF TG_NARGS > 0 AND TG_ARGV[0] = 'notify' THEN
        PERFORM pg_notify('changes', TG_TABLE_NAME || ':' || TG_OP || ':' || (to_jsonb(r) ->> 'id'));
    END IF;
    RETURN NULL;
END
$$;

-- The doorbell alone (dbsync's constant-payload NOTIFY, without any logging).
CREATE FUNCTION bench.notify_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dbsync', '');
    RETURN NULL;
END
$$;
