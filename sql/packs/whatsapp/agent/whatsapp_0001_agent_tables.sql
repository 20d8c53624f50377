-- depends: 0001_agent_core
-- The WhatsApp CRM schema on the Agent DB. conversations, leads and whatsapp_messages are
-- exact copies of the Site DB's, written by dbsync; agent_processing_log belongs to the agents.
-- No foreign keys between replicated tables: a batch may carry a child before its parent.

CREATE TABLE public.conversations (
    id              bigint PRIMARY KEY,
    phone_number    text NOT NULL,
    contact_name    text,
    status          text NOT NULL DEFAULT 'open',
    assigned_agent  text,
    unread_count    integer NOT NULL DEFAULT 0,
    last_message_at timestamptz,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX conversations_phone_idx ON public.conversations (phone_number);

CREATE TABLE public.leads (
    id              bigint PRIMARY KEY,
    phone_number    text NOT NULL UNIQUE,
    name            text,
    email           text,
    stage           text NOT NULL DEFAULT 'new',
    score           integer NOT NULL DEFAULT 0,
    conversation_id bigint,
    attributes      jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

CREATE TABLE public.whatsapp_messages (
    id              bigint PRIMARY KEY,
    message_id      text NOT NULL UNIQUE,
    conversation_id bigint,
    phone_number    text NOT NULL,
    direction       text NOT NULL,
    content         text,
    media_url       text,
    status          text NOT NULL,
    error_message   text,
    sent_at         timestamptz NOT NULL,
    delivered_at    timestamptz,
    read_at         timestamptz,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX whatsapp_messages_conversation_idx ON public.whatsapp_messages (conversation_id, sent_at);
CREATE INDEX whatsapp_messages_status_idx ON public.whatsapp_messages (status);

-- What the workflow agents did with each message; never replicated.
CREATE TABLE public.agent_processing_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      text NOT NULL,
    agent_name      text NOT NULL,
    action          text NOT NULL,
    result          jsonb,
    processed_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_processing_log_message_idx ON public.agent_processing_log (message_id);
