from tests.helpers import sync_once, assert_same, count

def test_smoke(pair):
    s = pair.site()
    s.execute("insert into conversations (phone_number) values ('+1') returning id")
    s.execute("insert into whatsapp_messages (message_id, conversation_id, phone_number, direction, content) values ('m1', 1, '+1', 'outbound', 'hi')")
    s.execute("update whatsapp_messages set status='delivered' where message_id='m1'")
    s.execute("insert into leads (phone_number, name) values ('+1', 'A')")
    r = sync_once(pair)
    assert count(pair.agent_dsn, "whatsapp_messages") == 1
    assert_same(pair)
    s.execute("delete from leads")
    sync_once(pair)
    assert_same(pair)
