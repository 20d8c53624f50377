-- pgbench: one WhatsApp write transaction, as the web app does it: store an outbound message,
-- then record the delivery receipt (an insert and an update of the same row).
\set conv random(1, 1000)
BEGIN;
INSERT INTO public.whatsapp_messages (message_id, conversation_id, phone_number, direction, content)
VALUES ('wamid.pgb.' || gen_random_uuid(), :conv, '+49151' || lpad(CAST(:conv AS text), 7, '0'),
        'outbound', 'Gerne! Ich schicke Ihnen das Angebot gleich.')
RETURNING id AS msg_id \gset
UPDATE public.whatsapp_messages SET status = 'delivered', delivered_at = now(), updated_at = now()
WHERE id = :msg_id;
END;
