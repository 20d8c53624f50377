"""Each kind of change reaches the Agent DB, for plain and awkward tables alike."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.helpers import DbPair, assert_same, count, dbsync_cmd, replicate, rows_of, sync_once

ITEMS = "public.items"
ITEMS_DDL = "CREATE TABLE public.items (id integer PRIMARY KEY, label text, qty integer)"


def agent_rows(pair: DbPair, table: str) -> list[str]:
    return rows_of(pair.agent_dsn, table)


# -- the WhatsApp tables -----------------------------------------------------------------


def test_insert_update_delete_replicate(pair: DbPair) -> None:
    site = pair.site()
    site.execute("INSERT INTO conversations (id, phone_number, contact_name) VALUES (1, '+1', 'Ann'), (2, '+2', NULL)")
    site.execute(
        "INSERT INTO whatsapp_messages (id, message_id, conversation_id, phone_number, direction, content) "
        "SELECT g, 'm' || g, 1 + g % 2, '+1', 'outbound', 'hello ' || g FROM generate_series(1, 20) g"
    )
    site.execute("INSERT INTO leads (phone_number, name, attributes) VALUES ('+1', 'Ann', '{\"src\": \"ad\"}')")
    sync_once(pair)
    assert count(pair.agent_dsn, "whatsapp_messages") == 20
    assert_same(pair)

    site.execute("UPDATE whatsapp_messages SET status = 'delivered', delivered_at = now() WHERE id % 3 = 0")
    site.execute("UPDATE conversations SET unread_count = unread_count + 5, status = 'pending' WHERE id = 1")
    site.execute("UPDATE leads SET stage = 'contacted', score = 10")
    sync_once(pair)
    assert_same(pair)

    site.execute("DELETE FROM whatsapp_messages WHERE id > 15")
    site.execute("DELETE FROM leads")
    sync_once(pair)
    assert count(pair.agent_dsn, "whatsapp_messages") == 15
    assert count(pair.agent_dsn, "leads") == 0
    assert_same(pair)


def test_non_replicated_table_stays_on_the_site(pair: DbPair) -> None:
    site = pair.site()
    site.execute("INSERT INTO notifications (user_id, kind) VALUES ('u1', 'ping')")
    site.execute("INSERT INTO conversations (id, phone_number) VALUES (1, '+1')")
    sync_once(pair)
    assert_same(pair)
    agent = pair.agent()
    assert agent.execute("SELECT to_regclass('public.notifications')").fetchone() == (None,)


def test_truncate_replicates(pair: DbPair) -> None:
    replicate(pair, ITEMS_DDL, ITEMS)
    site = pair.site()
    site.execute("INSERT INTO public.items SELECT g, 'old', g FROM generate_series(1, 100) g")
    sync_once(pair)
    assert count(pair.agent_dsn, ITEMS) == 100

    # Rows before the TRUNCATE in the same page go, rows after it stay.
    site.execute("INSERT INTO public.items VALUES (101, 'doomed', 0)")
    site.execute("TRUNCATE public.items")
    site.execute("INSERT INTO public.items VALUES (1, 'new', 1), (500, 'new', 500)")
    sync_once(pair)
    assert count(pair.agent_dsn, ITEMS) == 2
    assert_same(pair, [ITEMS])

    with site.transaction():
        site.execute("UPDATE public.items SET label = 'x'")
        site.execute("TRUNCATE public.items")
        site.execute("INSERT INTO public.items VALUES (7, 'after', 7)")
        site.execute("TRUNCATE public.items")
    sync_once(pair)
    assert count(pair.agent_dsn, ITEMS) == 0
    assert_same(pair, [ITEMS])


def test_truncate_cascade_replicates_to_every_table(pair: DbPair) -> None:
    site = pair.site()
    site.execute("INSERT INTO conversations (id, phone_number) VALUES (1, '+1'), (2, '+2')")
    site.execute("INSERT INTO leads (phone_number, conversation_id) VALUES ('+1', 1)")
    site.execute(
        "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction) "
        "VALUES ('m1', 1, '+1', 'inbound'), ('m2', 2, '+2', 'outbound')"
    )
    sync_once(pair)
    site.execute("TRUNCATE conversations CASCADE")
    site.execute("INSERT INTO conversations (id, phone_number) VALUES (3, '+3')")
    sync_once(pair)
    assert count(pair.agent_dsn, "whatsapp_messages") == 0
    assert count(pair.agent_dsn, "leads") == 0
    assert_same(pair)


def test_primary_key_change_removes_the_old_key(pair: DbPair) -> None:
    replicate(pair, ITEMS_DDL, ITEMS)
    site = pair.site()
    site.execute("INSERT INTO public.items VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)")
    sync_once(pair)

    site.execute("UPDATE public.items SET id = 10 WHERE id = 1")
    sync_once(pair)
    assert [r.split(",")[0] for r in agent_rows(pair, ITEMS)] == ["(2", "(3", "(10"]
    assert_same(pair, [ITEMS])

    # A key swap inside one transaction, and a chain of renames within one page.
    with site.transaction():
        site.execute("UPDATE public.items SET id = -1 WHERE id = 2")
        site.execute("UPDATE public.items SET id = 2 WHERE id = 3")
        site.execute("UPDATE public.items SET id = 3 WHERE id = -1")
    site.execute("UPDATE public.items SET id = 11 WHERE id = 10")
    site.execute("UPDATE public.items SET id = 12 WHERE id = 11")
    site.execute("UPDATE public.items SET id = id + 100")
    sync_once(pair)
    assert count(pair.agent_dsn, ITEMS) == 3
    assert_same(pair, [ITEMS])


def test_swapping_unique_values_between_rows_replicates(pair: DbPair) -> None:
    """The Agent table has the same UNIQUE constraint; applying the page's last images in one
    statement would collide, applying in log order does not."""
    ddl = "CREATE TABLE public.u (id integer PRIMARY KEY, code text NOT NULL UNIQUE)"
    replicate(pair, ddl, "public.u")
    site = pair.site()
    site.execute("INSERT INTO public.u VALUES (1, 'a'), (2, 'b')")
    sync_once(pair)
    with site.transaction():
        site.execute("UPDATE public.u SET code = 'tmp' WHERE id = 1")
        site.execute("UPDATE public.u SET code = 'a' WHERE id = 2")
        site.execute("UPDATE public.u SET code = 'b' WHERE id = 1")
    sync_once(pair)
    assert_same(pair, ["public.u"])

    # The same through WhatsApp message ids, with a delete and a reinsert in between.
    site.execute(
        "INSERT INTO whatsapp_messages (id, message_id, phone_number, direction) "
        "VALUES (1, 'wamid.1', '+1', 'inbound'), (2, 'wamid.2', '+1', 'inbound')"
    )
    sync_once(pair)
    site.execute("DELETE FROM whatsapp_messages WHERE id = 1")
    site.execute("UPDATE whatsapp_messages SET message_id = 'wamid.1' WHERE id = 2")
    site.execute(
        "INSERT INTO whatsapp_messages (id, message_id, phone_number, direction) "
        "VALUES (3, 'wamid.2', '+1', 'outbound')"
    )
    sync_once(pair)
    assert_same(pair)


def test_composite_primary_key(pair: DbPair) -> None:
    ddl = (
        "CREATE TABLE public.ck (tenant text, day date, n integer, v text, "
        "PRIMARY KEY (tenant, day, n))"
    )
    replicate(pair, ddl, "public.ck")
    site = pair.site()
    site.execute(
        "INSERT INTO public.ck SELECT t, date '2024-01-01' + d, n, t || d || n "
        "FROM unnest(ARRAY['a', 'b', 'a b', 'a,b']) t, generate_series(0, 2) d, generate_series(1, 3) n"
    )
    sync_once(pair)
    assert count(pair.agent_dsn, "public.ck") == 36
    assert_same(pair, ["public.ck"])

    site.execute("UPDATE public.ck SET v = 'changed' WHERE n = 2")
    site.execute("UPDATE public.ck SET n = n + 10 WHERE tenant = 'a' AND n = 1")  # one key column changes
    site.execute("UPDATE public.ck SET tenant = 'c' WHERE tenant = 'b' AND n = 3")
    site.execute("DELETE FROM public.ck WHERE tenant = 'a,b' AND day = '2024-01-02'")
    # Same values in another column order must not be confused with each other.
    site.execute("INSERT INTO public.ck VALUES ('2', '2024-01-01', 1, 'x')")
    sync_once(pair)
    assert_same(pair, ["public.ck"])


TEXT_KEYS = ["", " ", "a b", 'quo"te', "O'Brien", "back\\slash", "{\"json\": 1}", "ünïcødé ✓", "tab\there", "new\nline",
             "NULL", "null", "1", "01", "a" * 3000]


def test_text_primary_key(pair: DbPair) -> None:
    replicate(pair, "CREATE TABLE public.tk (k text PRIMARY KEY, v integer)", "public.tk")
    site = pair.site()
    with site.cursor() as cur:
        cur.executemany("INSERT INTO public.tk VALUES (%s, %s)", [(k, i) for i, k in enumerate(TEXT_KEYS)])
    sync_once(pair)
    assert count(pair.agent_dsn, "public.tk") == len(TEXT_KEYS)
    assert_same(pair, ["public.tk"])

    with site.cursor() as cur:
        cur.executemany("UPDATE public.tk SET v = v + 100 WHERE k = %s", [(k,) for k in TEXT_KEYS[::2]])
        cur.executemany("DELETE FROM public.tk WHERE k = %s", [(k,) for k in TEXT_KEYS[1::3]])
        cur.execute("UPDATE public.tk SET k = k || ' renamed' WHERE v < 5")
    sync_once(pair)
    assert_same(pair, ["public.tk"])


WEIRD_SCHEMA = 'we ird."sch" ü'
WEIRD_TABLE = 'Tab"le.x ✓'
WEIRD = '"we ird.""sch"" ü"."Tab""le.x ✓"'
WEIRD_DDL = f"""
CREATE SCHEMA "we ird.""sch"" ü";
CREATE TABLE {WEIRD} (
    "Id ""k"".1" integer,
    "päge,key" text,
    "va lue" text,
    "select" integer,
    PRIMARY KEY ("päge,key", "Id ""k"".1")
);
"""


def test_table_with_quotes_spaces_dots_and_unicode_in_its_names(pair: DbPair) -> None:
    pair.site().execute(WEIRD_DDL)
    pair.agent().execute(WEIRD_DDL)
    added = dbsync_cmd("tables", "add", WEIRD, env=pair.env())
    assert added.returncode == 0, added.stderr
    assert WEIRD in added.stdout  # quoted as it must be typed

    site = pair.site()
    site.execute(f"INSERT INTO {WEIRD} SELECT g, 'p' || (g % 3), 'v' || g, g FROM generate_series(1, 30) g")
    sync_once(pair)
    assert count(pair.agent_dsn, WEIRD) == 30
    assert_same(pair, [WEIRD])

    site.execute(f'UPDATE {WEIRD} SET "va lue" = \'changed "quoted"\' WHERE "select" % 2 = 0')
    site.execute(f'UPDATE {WEIRD} SET "Id ""k"".1" = "Id ""k"".1" + 1000 WHERE "select" % 5 = 0')
    site.execute(f'DELETE FROM {WEIRD} WHERE "select" % 7 = 0')
    sync_once(pair)
    assert_same(pair, [WEIRD])

    site.execute(f"TRUNCATE {WEIRD}")
    site.execute(f"INSERT INTO {WEIRD} VALUES (1, 'x', NULL, NULL)")
    sync_once(pair)
    assert count(pair.agent_dsn, WEIRD) == 1
    assert_same(pair, [WEIRD])
    listed = dbsync_cmd("tables", "list", "--json", env=pair.env())
    assert listed.returncode == 0, listed.stderr
    keys = {t["table"]: t["key"] for t in json.loads(listed.stdout)}
    assert keys[WEIRD] == ["päge,key", 'Id "k".1']


def test_same_row_changed_many_times_in_one_page_ends_at_the_last_image(pair: DbPair) -> None:
    replicate(pair, ITEMS_DDL, ITEMS)
    site = pair.site()
    site.execute("INSERT INTO public.items VALUES (1, 'v0', 0), (2, 'other', 0)")
    for i in range(1, 151):
        site.execute("UPDATE public.items SET label = %s, qty = %s WHERE id = 1", (f"v{i}", i))
    with site.transaction():
        for i in range(151, 201):
            site.execute("UPDATE public.items SET label = %s, qty = %s WHERE id = 1", (f"v{i}", i))
    replicator = sync_once(pair)  # 202 events, far below one page's limits
    assert replicator.stats.events == 202
    assert agent_rows(pair, ITEMS) == ["(1,v200,200)", "(2,other,0)"]
    assert_same(pair, [ITEMS])


def test_delete_and_reinsert_of_the_same_key(pair: DbPair) -> None:
    replicate(pair, ITEMS_DDL, ITEMS)
    site = pair.site()
    site.execute("INSERT INTO public.items VALUES (1, 'first', 1), (2, 'first', 2), (3, 'first', 3)")
    sync_once(pair)

    # Separate transactions in one page.
    site.execute("DELETE FROM public.items WHERE id = 1")
    site.execute("INSERT INTO public.items VALUES (1, 'second', 10)")
    # One transaction.
    with site.transaction():
        site.execute("DELETE FROM public.items WHERE id = 2")
        site.execute("INSERT INTO public.items VALUES (2, 'second', 20)")
    # Insert, delete, insert, delete: gone.
    for _ in range(2):
        site.execute("INSERT INTO public.items VALUES (4, 'flicker', 4)")
        site.execute("DELETE FROM public.items WHERE id = 4")
    # Delete, reinsert, delete: gone although it existed before.
    site.execute("DELETE FROM public.items WHERE id = 3")
    site.execute("INSERT INTO public.items VALUES (3, 'second', 30)")
    site.execute("DELETE FROM public.items WHERE id = 3")
    sync_once(pair)
    assert agent_rows(pair, ITEMS) == ["(1,second,10)", "(2,second,20)"]
    assert_same(pair, [ITEMS])

    # Reinsert of a key deleted in an earlier page.
    site.execute("INSERT INTO public.items VALUES (3, 'third', 300)")
    sync_once(pair)
    assert_same(pair, [ITEMS])


def test_dropped_column_on_the_site(pair: DbPair) -> None:
    replicate(
        pair,
        "CREATE TABLE public.dc (id integer PRIMARY KEY, gone text, v text)",
        "public.dc",
        agent_ddl="CREATE TABLE public.dc (id integer PRIMARY KEY, v text)",
    )
    pair.site().execute("ALTER TABLE public.dc DROP COLUMN gone")
    site = pair.site()
    site.execute("INSERT INTO public.dc VALUES (1, 'a'), (2, 'b')")
    site.execute("UPDATE public.dc SET v = 'c' WHERE id = 2")
    sync_once(pair)
    assert_same(pair, ["public.dc"])


# -- `dbsync tables add` refusals --------------------------------------------------------


def installed(site: psycopg.Connection, table: str) -> tuple[int, int]:
    triggers = site.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal", (table,)
    ).fetchone()[0]  # type: ignore[index]
    registered = site.execute(
        "SELECT count(*) FROM dbsync.replicated_tables WHERE relid = to_regclass(%s)", (table,)
    ).fetchone()[0]  # type: ignore[index]
    return int(triggers), int(registered)


@pytest.mark.parametrize(
    ("site_ddl", "agent_ddl", "name", "reason"),
    [
        pytest.param(
            "CREATE TABLE public.nopk (a integer, b text)",
            "CREATE TABLE public.nopk (a integer, b text)",
            "public.nopk",
            "primary key",
            id="no-primary-key",
        ),
        pytest.param(
            "CREATE TABLE public.siteonly (id integer PRIMARY KEY, b text)",
            None,
            "public.siteonly",
            "Agent",
            id="missing-on-agent",
        ),
        pytest.param(None, None, "public.nowhere", "does not exist", id="missing-on-site"),
        pytest.param(
            "CREATE TABLE public.lacking (id integer PRIMARY KEY, b text, c text)",
            "CREATE TABLE public.lacking (id integer PRIMARY KEY, b text)",
            "public.lacking",
            "c",
            id="agent-lacks-a-column",
        ),
    ],
)
def test_tables_add_refuses_with_one_clear_line(
    pair: DbPair, site_ddl: str | None, agent_ddl: str | None, name: str, reason: str
) -> None:
    site = pair.site()
    if site_ddl:
        site.execute(site_ddl)
    if agent_ddl:
        pair.agent().execute(agent_ddl)
    before = site.execute("SELECT count(*) FROM dbsync.replicated_tables").fetchone()[0]  # type: ignore[index]

    result = dbsync_cmd("tables", "add", name, env=pair.env())

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("dbsync: error:"), lines[0]
    assert name.split(".")[1] in lines[0] and reason in lines[0], lines[0]
    assert "replicating" not in result.stdout
    if site_ddl:
        assert installed(site, name) == (0, 0)
    after = site.execute("SELECT count(*) FROM dbsync.replicated_tables").fetchone()[0]  # type: ignore[index]
    assert after == before


@pytest.mark.parametrize(
    ("key_type", "setting", "one", "other", "k1", "k2"),
    [
        pytest.param("timestamptz", "TimeZone", "UTC", "Europe/Berlin", "2024-01-01 00:00+00", "2024-06-01 12:00+00",
                     id="timestamptz-TimeZone"),
        pytest.param("bytea", "bytea_output", "hex", "escape", "\\x00ff", "\\x5c27", id="bytea-bytea_output"),
    ],
)
def test_key_written_from_sessions_with_different_output_settings(
    pair: DbPair, key_type: str, setting: str, one: str, other: str, k1: str, k2: str
) -> None:
    """Sessions with different output settings render the same key differently into the log
    (e.g. "...00:00+00:00" vs "...01:00+01:00"); it is still one row."""
    replicate(
        pair,
        f"CREATE TABLE public.ev (k {key_type}, device integer, v text, PRIMARY KEY (device, k))",
        "public.ev",
    )
    a = psycopg.connect(pair.site_dsn, autocommit=True, options=f"-c {setting}={one}")
    b = psycopg.connect(pair.site_dsn, autocommit=True, options=f"-c {setting}={other}")
    try:
        a.execute("INSERT INTO public.ev VALUES (%s, 1, 'a'), (%s, 2, 'a')", (k1, k1))
        b.execute("UPDATE public.ev SET v = 'b' WHERE device = 1")
        b.execute("DELETE FROM public.ev WHERE device = 2")
        sync_once(pair)
        assert_same(pair, ["public.ev"])

        a.execute("INSERT INTO public.ev VALUES (%s, 3, 'a')", (k2,))
        b.execute("DELETE FROM public.ev WHERE device = 3")
        a.execute("UPDATE public.ev SET v = 'c' WHERE device = 1")
        b.execute("DELETE FROM public.ev WHERE device = 1")
        sync_once(pair)
        assert_same(pair, ["public.ev"])
    finally:
        a.close()
        b.close()
