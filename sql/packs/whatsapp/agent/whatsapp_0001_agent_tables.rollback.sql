DROP TABLE public.agent_processing_log, public.whatsapp_messages, public.leads, public.conversations;
