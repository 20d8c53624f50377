"""Small batches read in one statement, and rows read through each table's generated reader
(0007_site_stable_read), with the general paths where those do not apply."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from dbsync.daemon import runner
from dbsync.daemon.consume import SMALL_BATCH
from dbsync.daemon.runner import SMALL_BATCH_EVENTS, Replicator
from tests.helpers import DbPair, assert_same, replicate, rows_of, sync_once

pytestmark = pytest.mark.usefixtures("pair")


def _one_by_one(pair: DbPair, n: int, base: int = 1) -> None:
    site = pair.site()
    for i in range(base, base + n):
        site.execute(
            "INSERT INTO public.conversations (id, phone_number, created_at, updated_at) "
            "VALUES (%s, %s, now(), now())",
            (i, f"+3100{i:06d}"),
        )


def test_a_small_batch_is_read_whole_in_one_statement(pair: DbPair, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "SMALL_BATCHES", True)  # the default; set so the test holds either way
    _one_by_one(pair, 5)
    pair.site().execute("UPDATE public.conversations SET contact_name = 'Ana' WHERE id = 2")
    pair.site().execute("DELETE FROM public.conversations WHERE id = 4")
    replicator = sync_once(pair)
    assert replicator.stats.whole == 1 and replicator.stats.events == 7
    assert_same(pair, ["public.conversations"])


def test_a_batch_larger_than_a_small_one_is_read_in_pages(pair: DbPair, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "SMALL_BATCHES", True)
    _one_by_one(pair, SMALL_BATCH_EVENTS + 1)
    replicator = sync_once(pair, batch_size=40)
    assert replicator.stats.whole == 0 and replicator.stats.batches >= 3
    assert_same(pair, ["public.conversations"])


def test_every_table_gets_a_reader_and_read_rows_uses_it(pair: DbPair) -> None:
    site = pair.site()
    rows = site.execute(
        "SELECT r.table_name, r.reader_reads, "
        "pg_catalog.to_regprocedure(dbsync.reader_function(r.table_id) || '(json)') IS NOT NULL "
        "FROM dbsync.replicated_tables r WHERE r.removed_at IS NULL ORDER BY 1"
    ).fetchall()
    assert rows and all(reads == f"public.{name}" and exists for name, reads, exists in rows)
    marked = site.execute("SELECT provolatile FROM pg_proc WHERE oid = 'dbsync.read_rows(integer, json)'::regprocedure")
    assert marked.fetchone() == ("s",)


def test_by_default_a_small_batch_is_read_whole(pair: DbPair) -> None:
    _one_by_one(pair, 3)
    replicator = sync_once(pair)
    assert replicator.stats.whole == 1 and replicator.stats.events == 3
    assert_same(pair, ["public.conversations"])


def test_with_small_batches_off_every_batch_is_read_in_its_transaction(
    pair: DbPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "SMALL_BATCHES", False)
    _one_by_one(pair, 3)
    replicator = sync_once(pair)
    assert replicator.stats.whole == 0 and replicator.stats.events == 3
    assert_same(pair, ["public.conversations"])


def test_the_reads_are_never_jit_compiled(pair: DbPair) -> None:
    """JIT compiles a statement anew at every execution. On a server with LLVM (Debian's
    PostgreSQL 15) the small batch, estimated far above jit_above_cost, spent ~80 ms of every look
    compiling: the daemon fell behind a steady writer, and reconcile's recheck of the keys it
    writes found them changing round after round (unsettled). Below, every cost passes the
    threshold; where the server cannot JIT at all only the setting is seen."""
    _one_by_one(pair, 3)
    replicator = Replicator(pair.settings())
    seen: list[str] = []

    async def explain() -> None:
        reader = replicator.reader
        assert reader is not None
        await reader.execute("SET jit_above_cost = 0")
        prev = replicator.progress.prev_snapshot
        seen.append(await reader.fetchval("SHOW jit"))
        seen.append(await reader.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {SMALL_BATCH}", prev, prev, 100))

    asyncio.run(replicator.run(once=True, on_ready=explain))
    assert seen[0] == "off"
    assert '"JIT"' not in seen[1]
    assert_same(pair, ["public.conversations"])


def test_a_renamed_table_is_read_the_general_way(pair: DbPair) -> None:
    _one_by_one(pair, 3)
    sync_once(pair)
    site = pair.site()
    site.execute("ALTER TABLE public.conversations RENAME TO chats")
    site.execute("UPDATE public.chats SET contact_name = 'Renamed' WHERE id = 2")
    site.execute("DELETE FROM public.chats WHERE id = 3")
    sync_once(pair)
    assert rows_of(pair.site_dsn, "public.chats") == rows_of(pair.agent_dsn, "public.conversations")


def test_a_removed_table_leaves_no_reader_and_its_waiting_events_are_delivered(pair: DbPair) -> None:
    _one_by_one(pair, 3)
    site = pair.site()
    site.execute("SELECT dbsync.remove_table('public.conversations')")
    left = site.execute(
        "SELECT r.reader_reads, pg_catalog.to_regprocedure(dbsync.reader_function(r.table_id) || '(json)') "
        "FROM dbsync.replicated_tables r WHERE r.table_name = 'conversations'"
    ).fetchall()
    assert left == [(None, None)]
    sync_once(pair)
    assert_same(pair, ["public.conversations"])


def test_key_columns_named_like_the_readers_own_names(pair: DbPair) -> None:
    ddl = """
        CREATE TABLE public.odd (ord int, image text, dbsync_row int, dbsync_ord_ int, payload text,
                                 PRIMARY KEY (ord, image, dbsync_row));
    """
    replicate(pair, ddl, "public.odd")
    site = pair.site()
    site.execute("INSERT INTO public.odd SELECT i, 'k' || i, -i, i, 'v' || i FROM generate_series(1, 20) i")
    site.execute("UPDATE public.odd SET payload = 'changed' WHERE ord % 3 = 0")
    site.execute("DELETE FROM public.odd WHERE ord % 5 = 0")
    site.execute("UPDATE public.odd SET image = 'moved' WHERE ord = 7")  # a key change
    sync_once(pair)
    assert rows_of(pair.site_dsn, "public.odd") == rows_of(pair.agent_dsn, "public.odd")
    assert len(rows_of(pair.agent_dsn, "public.odd")) == 16


def test_without_the_migration_every_batch_is_read_in_its_transaction(
    pair: DbPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "SMALL_BATCHES", True)
    # A Site DB at 0006 (read_rows VOLATILE): the daemon must not read in one statement there.
    with psycopg.connect(pair.site_dsn, autocommit=True) as conn:
        conn.execute("ALTER FUNCTION dbsync.read_rows(integer, json) VOLATILE")
    _one_by_one(pair, 4)
    replicator = sync_once(pair)
    assert replicator.stats.whole == 0 and replicator.stats.events == 4
    assert_same(pair, ["public.conversations"])


def test_a_reader_looks_keys_up_by_index_on_a_small_table(pair: DbPair) -> None:
    """The daemon's generic plans take a reader's key list for 100 keys: on a table of a few
    thousand rows the planner preferred one scan of the whole table to 100 index lookups, and
    every small batch read the table whole (0011_site_keyed_reads)."""
    replicate(pair, "CREATE TABLE public.notes (id bigint PRIMARY KEY, body text)", "public.notes")
    site = pair.site()
    site.execute("INSERT INTO public.notes SELECT g, 'note ' || g FROM generate_series(1, 3000) g")
    site.execute("ANALYZE public.notes")
    find = "SELECT table_id FROM dbsync.replicated_tables WHERE table_name = 'notes'"
    table_id = site.execute(find).fetchone()[0]  # type: ignore[index]
    statement = site.execute("SELECT dbsync.reader_statement(%s)", (table_id,)).fetchone()[0]  # type: ignore[index]
    site.execute("SET plan_cache_mode = force_generic_plan")
    site.execute(f"PREPARE reader(json) AS {statement}")
    plan = "\n".join(r[0] for r in site.execute("""EXPLAIN EXECUTE reader('[{"id": "5"}]')""").fetchall())
    assert "Index Scan using notes_pkey" in plan and "Seq Scan on notes" not in plan, plan
    got = site.execute("""EXECUTE reader('[{"id": "5"}, {"id": "99999"}]')""").fetchall()
    assert got == [(1, {"id": "5", "body": "note 5"})], got
    # The installed reader is generated from the same statement.
    read = site.execute("""SELECT * FROM dbsync.read_rows(%s, '[{"id": "5"}]')""", (table_id,))
    assert [tuple(r) for r in read] == got
