"""The catch-up fast paths keep every guarantee: large unchanged values are kept on the Agent DB
without being rewritten, and reading the next page while the current one is written changes
nothing about what is applied, in the happy path and when the Agent DB rejects a page."""

from __future__ import annotations

import psycopg
import pytest

from dbsync.errors import ApplyError
from tests.helpers import DbPair, assert_same, replicate, rows_of, sync_once

DOCS = "public.docs"
DOCS_DDL = "CREATE TABLE public.docs (id integer PRIMARY KEY, status text, body text, meta jsonb)"
# About 100 kB that pglz cannot shrink, so it is stored out of line (TOAST).
BIG = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 3200))"


def toast_chunks(conn: psycopg.Connection, table: str, column: str) -> dict[int, int]:
    """Row id -> the TOAST value id holding `column` (a rewrite of the value gets a new one)."""
    toast = conn.execute(
        "SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = %s::regclass", (table,)
    ).fetchone()
    assert toast is not None and toast[0] != "-"
    # The value id is the first field of the out-of-line pointer: find the chunks whose data
    # reassembles to the stored value, per row.
    rows = conn.execute(
        f"SELECT d.id, t.chunk_id FROM {table} d "  # noqa: S608 - test names only
        f"JOIN (SELECT chunk_id, string_agg(chunk_data, ''::bytea ORDER BY chunk_seq) AS v "
        f"      FROM {toast[0]} GROUP BY chunk_id) t "
        f"ON t.v = convert_to(d.{column}, 'UTF8')"
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def test_unchanged_large_value_is_kept_not_rewritten(pair: DbPair) -> None:
    replicate(pair, DOCS_DDL, DOCS)
    site, agent = pair.site(), pair.agent()
    site.execute(f"INSERT INTO public.docs SELECT g, 'sent', {BIG}, NULL FROM generate_series(1, 3) g")
    sync_once(pair)
    before = toast_chunks(agent, DOCS, "body")
    assert sorted(before) == [1, 2, 3], before

    # Status updates carry the whole row image, body included: each in its own page.
    for status in ("delivered", "read"):
        site.execute("UPDATE public.docs SET status = %s WHERE id IN (1, 2)", (status,))
        sync_once(pair)
        assert toast_chunks(agent, DOCS, "body") == before
    assert_same(pair, [DOCS])

    # A changed large value is written; the others stay where they are.
    site.execute(f"UPDATE public.docs SET body = {BIG} WHERE id = 2")
    sync_once(pair)
    after = toast_chunks(agent, DOCS, "body")
    assert after[1] == before[1] and after[3] == before[3]
    assert after[2] != before[2]
    assert_same(pair, [DOCS])


def test_large_value_equal_but_not_identical_is_replicated(pair: DbPair) -> None:
    """jsonb 1.0 = 1.00, but they are different values: the Agent must get the new one."""
    replicate(pair, DOCS_DDL, DOCS)
    site = pair.site()
    site.execute(
        "INSERT INTO public.docs SELECT 1, 'x', NULL, "
        "jsonb_build_object('n', 1.0, 'blob', (SELECT jsonb_agg(md5(g::text)) FROM generate_series(1, 4000) g))"
    )
    sync_once(pair)
    site.execute("UPDATE public.docs SET meta = jsonb_set(meta, '{n}', '1.00'::jsonb)")
    assert site.execute("SELECT meta->>'n' FROM public.docs").fetchone() == ("1.00",)
    sync_once(pair)
    assert pair.agent().execute("SELECT meta->>'n' FROM public.docs").fetchone() == ("1.00",)
    assert_same(pair, [DOCS])


ITEMS = "public.items"
ITEMS_DDL = "CREATE TABLE public.items (id integer PRIMARY KEY, qty integer)"
# The Agent DB rejects negative quantities; the Site does not.
ITEMS_AGENT_DDL = "CREATE TABLE public.items (id integer PRIMARY KEY, qty integer CHECK (qty >= 0))"


def test_multi_page_batch_is_read_ahead(pair: DbPair) -> None:
    replicate(pair, ITEMS_DDL, ITEMS)
    pair.site().execute("INSERT INTO public.items SELECT g, g FROM generate_series(1, 1000) g")
    replicator = sync_once(pair, batch_size=50)
    # The statement's keys are logged 100 to a log row, and a page ends at a log row's end.
    assert replicator.stats.batches == 10
    assert replicator.stats.read_ahead == 9  # every page after the first
    assert_same(pair, [ITEMS])


@pytest.mark.parametrize("policy", ["stop", "park"])
def test_rejected_page_while_the_next_is_read_ahead(pair: DbPair, policy: str) -> None:
    """The set-based write of the first page fails while the second is being read: the event-by-
    event fallback must wait for the Site connection, and nothing of the read-ahead may leak."""
    replicate(pair, ITEMS_DDL, ITEMS, agent_ddl=ITEMS_AGENT_DDL)
    site = pair.site()
    site.execute("INSERT INTO public.items SELECT g, CASE WHEN g = 5 THEN -1 ELSE g END FROM generate_series(1, 200) g")
    if policy == "stop":
        with pytest.raises(ApplyError, match=r"seq \d+ \(insert on public.items key \{\"id\": \"5\"\}\)"):
            sync_once(pair, batch_size=20)
        assert rows_of(pair.agent_dsn, ITEMS) == []  # the whole first page rolled back
        pair.agent().execute("ALTER TABLE public.items DROP CONSTRAINT items_qty_check")
        replicator = sync_once(pair, batch_size=20)
        assert replicator.stats.events == 200
        assert_same(pair, [ITEMS])
    else:
        replicator = sync_once(pair, batch_size=20, poison_policy="park")
        assert replicator.stats.events == 200 and replicator.stats.parked == 1
        agent = pair.agent()
        assert agent.execute("SELECT pk::text FROM dbsync.parked_events").fetchall() == [('{"id": "5"}',)]
        site.execute("DELETE FROM public.items WHERE id = 5")  # the Site gives up the bad row too
        sync_once(pair, batch_size=20, poison_policy="park")
        assert_same(pair, [ITEMS])


def test_a_rejected_key_is_parked_with_its_row_at_the_snapshot(pair: DbPair) -> None:
    """The log holds keys; a key the Agent DB rejects is parked once per page, with its row as it
    stands at the batch's snapshot (what a retry writes), and a later change of the same key is
    held back behind it, in order; the rest of the page is applied."""
    replicate(pair, ITEMS_DDL, ITEMS, agent_ddl=ITEMS_AGENT_DDL)
    site = pair.site()
    with site.transaction():
        site.execute("INSERT INTO public.items SELECT g, g FROM generate_series(1, 10) g")
        site.execute("UPDATE public.items SET qty = -1 WHERE id = 5")
        site.execute("UPDATE public.items SET qty = -2 WHERE id = 5")
        site.execute("UPDATE public.items SET qty = 70 WHERE id = 7")
    replicator = sync_once(pair, poison_policy="park")
    assert replicator.stats.parked == 1
    parked = "SELECT op, row_image->>'qty' FROM dbsync.parked_events ORDER BY seq, key_no"
    assert pair.agent().execute(parked).fetchall() == [("U", "-2")]
    assert rows_of(pair.agent_dsn, ITEMS)[3:6] == ["(4,4)", "(6,6)", "(7,70)"]

    site.execute("UPDATE public.items SET qty = -3 WHERE id = 5")
    site.execute("UPDATE public.items SET qty = 8 WHERE id = 8")
    assert sync_once(pair, poison_policy="park").stats.parked == 1  # held back
    assert pair.agent().execute(parked).fetchall() == [("U", "-2"), ("U", "-3")]
    assert rows_of(pair.agent_dsn, ITEMS)[6] == "(8,8)"

    # Once the Agent accepts the row, a retry writes the parked rows in order: the last one stays.
    pair.agent().execute("ALTER TABLE public.items DROP CONSTRAINT items_qty_check")
    pair.agent().execute("UPDATE dbsync.parked_events SET retry_requested = true")
    sync_once(pair, poison_policy="park")
    assert pair.agent().execute("SELECT count(*) FROM dbsync.parked_events").fetchone() == (0,)
    assert_same(pair, [ITEMS])
