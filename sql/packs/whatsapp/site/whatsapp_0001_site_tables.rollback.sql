DO $$
BEGIN
    PERFORM dbsync.remove_table('public.whatsapp_messages');
    PERFORM dbsync.remove_table('public.leads');
    PERFORM dbsync.remove_table('public.conversations');
END
$$;
DROP TABLE public.notifications, public.whatsapp_messages, public.leads, public.conversations;
