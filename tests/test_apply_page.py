"""The Agent side of a page: one statement in the common case, a transaction when it cannot be.

A page without a TRUNCATE is written with its progress in one statement whose every write needs
the progress row to move; a page that statement cannot write (keys equal under the key type's
equality, another consumer's progress) goes the transaction's way, with today's outcome. With
asynchronous commit on the Agent, the Site's log is pruned only behind a flushed commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg
import pytest

from dbsync.daemon import pg
from dbsync.daemon.apply import Applier, Catalog, ConcurrentConsumerError
from dbsync.daemon.consume import ApplyProgress, Event, progress_from_row
from dbsync.daemon.retention import Retention
from dbsync.daemon.runner import Replicator
from dbsync.protocol import READ_PROGRESS
from tests.helpers import DbPair, assert_same, replicate, sync_once

T = TypeVar("T")
NUMS = "public.nums"
NUMS_DDL = "CREATE TABLE public.nums (id numeric PRIMARY KEY, v text)"


def events_applied(pair: DbPair) -> int:
    row = pair.agent().execute("SELECT events_applied FROM dbsync.apply_progress WHERE source = 'site'").fetchone()
    assert row is not None
    return int(row[0])


def table_id(pair: DbPair, table: str) -> int:
    row = pair.site().execute("SELECT table_id FROM dbsync.replicated_tables WHERE %s::regclass = relid", (table,))
    found = row.fetchone()
    assert found is not None
    return int(found[0])


def with_links(pair: DbPair, work: Callable[[asyncpg.Connection, asyncpg.Connection], Awaitable[T]]) -> T:
    """Run `work(site, agent)` on daemon-style connections."""

    async def go() -> T:
        site = await pg.connect(pair.site_dsn, "Site")
        agent = await pg.connect(pair.agent_dsn, "Agent")
        try:
            return await work(site, agent)
        finally:
            await agent.close()
            await site.close()

    return asyncio.run(go())


async def progress(agent: asyncpg.Connection) -> ApplyProgress:
    return progress_from_row(await agent.fetchrow(READ_PROGRESS.asyncpg, "site"))


def nums_synced(pair: DbPair, values: str) -> int:
    """public.nums replicated, holding `values` (an SQL VALUES list) on both sides; its table id."""
    replicate(pair, NUMS_DDL, NUMS)
    pair.site().execute(f"INSERT INTO public.nums VALUES {values}")
    sync_once(pair)
    return table_id(pair, NUMS)


async def apply_page(
    site: asyncpg.Connection, agent: asyncpg.Connection, page: list[Event], *, moved: bool = False
) -> Applier:
    """Apply `page` on top of the stored progress; with `moved`, another consumer moves the
    progress between the daemon's read and its write."""
    applier = Applier("site", Catalog())
    before = await progress(agent)
    if moved:
        await agent.execute(
            "UPDATE dbsync.apply_progress SET prev_snapshot = pg_current_snapshot(), events_applied = 99 "
            "WHERE source = 'site'"
        )
    after = dataclasses.replace(before, events_applied=before.events_applied + len(page))
    await applier.apply(site, agent, page, before, after)
    return applier


def event(seq: int, table: int, key: object, image: dict[str, object] | None) -> Event:
    pk = json.dumps({"id": key})
    return Event(seq, table, "U", pk, datetime.now(UTC), None if image is None else json.dumps(image))


def test_an_ordinary_page_is_one_statement_with_its_progress(pair: DbPair) -> None:
    site = pair.site()
    site.execute("INSERT INTO public.conversations (id, phone_number) VALUES (1, '+1')")
    site.execute(
        "INSERT INTO public.whatsapp_messages (message_id, conversation_id, phone_number, direction, content) "
        "VALUES ('m1', 1, '+1', 'inbound', 'hello')"
    )
    site.execute("UPDATE public.conversations SET unread_count = 1 WHERE id = 1")
    replicator = sync_once(pair)
    assert replicator.applier.one_statement_pages >= 1
    assert_same(pair)
    assert events_applied(pair) == 3
    # A page of deletes and upserts of distinct keys, in several tables, is one statement too.
    site.execute("DELETE FROM public.whatsapp_messages")
    site.execute("INSERT INTO public.conversations (id, phone_number) VALUES (2, '+2')")
    replicator = sync_once(pair)
    assert replicator.applier.one_statement_pages >= 1
    assert_same(pair)


def test_keys_equal_under_the_key_type_take_the_transaction(pair: DbPair) -> None:
    """1.0 deleted and 1.00 upserted in one page: one statement cannot order the two (neither
    sees the other's rows), so the page goes the transaction's way: delete, then upsert."""
    nums = nums_synced(pair, "(1.0, 'old')")

    async def work(site: asyncpg.Connection, agent: asyncpg.Connection) -> int:
        page = [event(1, nums, "1.0", None), event(2, nums, "1.00", {"id": "1.00", "v": "new"})]
        return (await apply_page(site, agent, page)).one_statement_pages

    assert with_links(pair, work) == 0
    rows = pair.agent().execute("SELECT id::text, v FROM public.nums").fetchall()
    assert rows == [("1.00", "new")]


def test_site_writes_of_keys_equal_under_the_key_type_replicate(pair: DbPair) -> None:
    nums_synced(pair, "(1.0, 'old'), (2, 'two')")
    site = pair.site()
    with site.transaction():
        site.execute("DELETE FROM public.nums WHERE id = 1.0")
        site.execute("INSERT INTO public.nums VALUES (1.00, 'new')")
        site.execute("DELETE FROM public.nums WHERE id = 2")
    sync_once(pair)
    # Equal by value: the Agent keeps the stored key's text (1.0) when an upsert finds its row,
    # on either path (as before the one-statement page).
    query = "SELECT id, v FROM public.nums ORDER BY id"
    assert pair.agent().execute(query).fetchall() == pair.site().execute(query).fetchall() == [(1, "new")]


def test_a_moved_progress_voids_the_page_and_writes_nothing(pair: DbPair) -> None:
    nums = nums_synced(pair, "(5, 'five')")

    async def work(site: asyncpg.Connection, agent: asyncpg.Connection) -> None:
        page = [event(1, nums, "5", None), event(2, nums, "6", {"id": "6", "v": "six"})]
        with pytest.raises(ConcurrentConsumerError):
            await apply_page(site, agent, page, moved=True)

    with_links(pair, work)
    assert pair.agent().execute("SELECT id::text, v FROM public.nums").fetchall() == [("5", "five")]
    assert events_applied(pair) == 99


def test_the_log_is_pruned_only_after_the_agent_is_durable(pair: DbPair) -> None:
    site = pair.site()
    site.execute("INSERT INTO public.conversations (phone_number) VALUES ('+1'), ('+2')")
    sync_once(pair)
    prev = pair.agent().execute("SELECT prev_snapshot::text FROM dbsync.apply_progress").fetchone()
    assert prev is not None

    def log_rows() -> int:
        return int(site.execute("SELECT count(*) FROM dbsync.sync_log").fetchone()[0])  # type: ignore[index]

    async def work(site_link: asyncpg.Connection, agent: asyncpg.Connection) -> tuple[list[int], str]:
        applier = Applier("site", Catalog())
        await applier.relax_commit(agent)
        seen: list[int] = []

        async def durable() -> None:
            await applier.make_durable(agent)
            seen.append(log_rows())  # nothing is pruned yet

        retention = Retention(interval=60)
        await retention.maybe_prune(site_link, prev[0], durable)
        await retention.maybe_prune(site_link, prev[0], durable)  # not due: no barrier either
        return seen, str(await agent.fetchval("SHOW synchronous_commit"))

    xmin = pair.agent().execute("SELECT xmin::text FROM dbsync.apply_progress").fetchone()
    seen, setting = with_links(pair, work)
    assert len(seen) == 1 and seen[0] > 0
    assert log_rows() == 0
    assert setting == "off"  # the barrier's setting was its transaction's alone
    # The barrier wrote the progress row (a commit without WAL of its own is not flushed).
    assert pair.agent().execute("SELECT xmin::text FROM dbsync.apply_progress").fetchone() != xmin


def test_the_barrier_commits_synchronously_on_a_relaxed_session(pair: DbPair) -> None:
    sync_once(pair)
    # What the barrier's write runs under, recorded by a trigger in its own transaction.
    pair.agent().execute(
        """
        CREATE TABLE public.commit_modes (mode text);
        CREATE FUNCTION public.record_commit_mode() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.commit_modes VALUES (current_setting('synchronous_commit'));
            RETURN NEW;
        END $$;
        CREATE TRIGGER record_commit_mode BEFORE UPDATE ON dbsync.apply_progress
            FOR EACH ROW EXECUTE FUNCTION public.record_commit_mode();
        """
    )

    async def work(site: asyncpg.Connection, agent: asyncpg.Connection) -> list[str]:
        applier = Applier("site", Catalog())
        await agent.execute("SET synchronous_commit = on")  # whatever the server's default
        await applier.relax_commit(agent)
        done = await progress(agent)
        await applier.save(agent, done, done)  # a page's commit
        await applier.make_durable(agent)
        await applier.save(agent, done, done)
        return [str(await agent.fetchval("SHOW synchronous_commit"))]

    after = with_links(pair, work)
    modes = [r[0] for r in pair.agent().execute("SELECT mode FROM public.commit_modes").fetchall()]
    assert modes == ["off", "on", "off"]
    assert after == ["off"]


def test_identifiers_with_dollar_signs_keep_their_parameters(pair: DbPair) -> None:
    """Parameters are numbered where the SQL is built, never rewritten in its text: "$1" in a
    quoted name stays a name."""
    ddl = 'CREATE TABLE public."t$1" ("$2" integer PRIMARY KEY, "v$10" text)'
    replicate(pair, ddl, 'public."t$1"')
    site = pair.site()
    site.execute("""INSERT INTO public."t$1" VALUES (1, 'one'), (2, 'two'), (3, 'three')""")
    sync_once(pair)
    site.execute("""DELETE FROM public."t$1" WHERE "$2" = 1""")
    site.execute("""UPDATE public."t$1" SET "v$10" = 'zwei' WHERE "$2" = 2""")
    site.execute("INSERT INTO public.conversations (id, phone_number) VALUES (1, '+1')")
    replicator = sync_once(pair)
    assert replicator.applier.one_statement_pages >= 1
    assert_same(pair, ['public."t$1"', "public.conversations"])


def test_the_running_daemon_prunes_only_right_after_a_synchronous_commit(pair: DbPair) -> None:
    """The runner wires the barrier: every prune of the Site log follows, as the Agent's latest
    progress write, one committed synchronously, while pages commit asynchronously."""
    pair.agent().execute(
        """
        CREATE TABLE public.progress_writes (at timestamptz, mode text);
        CREATE FUNCTION public.record_progress_write() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.progress_writes VALUES (clock_timestamp(), current_setting('synchronous_commit'));
            RETURN NEW;
        END $$;
        CREATE TRIGGER record_progress_write BEFORE UPDATE ON dbsync.apply_progress
            FOR EACH ROW EXECUTE FUNCTION public.record_progress_write();
        -- The daemon runs as a replica (session_replication_role): fire anyway.
        ALTER TABLE dbsync.apply_progress ENABLE ALWAYS TRIGGER record_progress_write;
        """
    )
    pair.site().execute(
        """
        CREATE TABLE public.prunes (at timestamptz);
        CREATE FUNCTION public.record_prune() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.prunes VALUES (clock_timestamp());
            RETURN NULL;
        END $$;
        CREATE TRIGGER record_prune AFTER DELETE ON dbsync.sync_log
            REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION public.record_prune();
        """
    )
    prunes = 3

    async def scenario() -> None:
        stop = asyncio.Event()
        replicator = Replicator(pair.settings(), stop=stop)
        replicator.retention = Retention(interval=0.05)
        running = asyncio.ensure_future(replicator.run())
        site = await pg.connect(pair.site_dsn, "Site")
        try:
            for i in range(prunes):
                await site.execute(
                    "INSERT INTO public.conversations (id, phone_number, created_at, updated_at) "
                    "VALUES ($1, $2, now(), now())",
                    900 + i,
                    f"+31009{i:05d}",
                )
                deadline = asyncio.get_running_loop().time() + 30
                while await site.fetchval("SELECT count(*) FROM dbsync.sync_log"):
                    assert asyncio.get_running_loop().time() < deadline, "the log was never pruned"
                    assert not running.done(), "the daemon stopped"
                    await asyncio.sleep(0.02)
        finally:
            stop.set()
            await site.close()
            await running

    asyncio.run(scenario())
    writes = pair.agent().execute("SELECT at, mode FROM public.progress_writes ORDER BY at").fetchall()
    pruned = [r[0] for r in pair.site().execute("SELECT at FROM public.prunes ORDER BY at").fetchall()]
    assert len(pruned) >= prunes
    assert "off" in [mode for _, mode in writes], "pages were not committed asynchronously"
    for at in pruned:
        before = [mode for written, mode in writes if written < at]
        assert before and before[-1] == "on", f"a prune at {at} did not follow a synchronous commit"
    assert_same(pair, ["public.conversations"])


def _removed_by_join_filter(plan: dict[str, object]) -> int:
    removed = int(plan.get("Rows Removed by Join Filter", 0))  # type: ignore[call-overload]
    return removed + sum(_removed_by_join_filter(p) for p in plan.get("Plans", []))  # type: ignore[attr-defined]


def test_the_equal_key_check_of_a_large_page_does_not_compare_every_pair(pair: DbPair) -> None:
    """A page of 1,000 deleted and 9,000 upserted keys (a bulk DELETE and UPDATE caught up) checks
    whether a deleted key equals an upserted one. As EXISTS, planned for the 100 rows a
    recordset is estimated at, it was a nested loop of 9,000,000 comparisons (about 1.5 s of
    each such page, most of the bulk catch-up's time); it must join by hash or sort."""
    messages = table_id(pair, "public.whatsapp_messages")
    deletes = json.dumps([{"id": str(i)} for i in range(1, 10_001, 10)])
    upserts = json.dumps([{"id": str(i)} for i in range(100_000, 109_000)])

    async def work(site: asyncpg.Connection, agent: asyncpg.Connection) -> int:
        table = await Catalog().table(site, agent, messages)
        await agent.execute(f"PREPARE overlap(text, text) AS SELECT {table.overlap_sql(1, 2)}")
        await agent.execute("SET plan_cache_mode = force_generic_plan")  # as the daemon's sessions plan
        plan = await agent.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE overlap({pg_literal(deletes)}, {pg_literal(upserts)})"
        )
        assert await agent.fetchval(f"EXECUTE overlap({pg_literal(deletes)}, {pg_literal(upserts)})") is False
        overlapping = json.dumps([{"id": "100005"}])
        assert await agent.fetchval(f"EXECUTE overlap({pg_literal(overlapping)}, {pg_literal(upserts)})") is True
        return _removed_by_join_filter(json.loads(plan)[0]["Plan"])

    assert with_links(pair, work) <= 10_000


def pg_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
