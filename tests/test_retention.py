"""Applied events leave the Site's sync log; nothing a consumer still needs does.

"Applied" means: the event's transaction is visible in the snapshot the Agent DB stores as
applied (apply_progress.prev_snapshot). The states below are built with real concurrent
transactions, so that a wrong rule deletes something it must not, or keeps something it should
delete, every time: a transaction still running when the snapshot was taken and committed since
(seq below events that were applied), one committed after the snapshot, the first transaction
after the snapshot (its xid is the snapshot's xmax), one that committed between the snapshot's
xmin and xmax, and an open batch on the Agent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from dbsync.consumers import agent_consumer_name
from dbsync.daemon import pg
from dbsync.daemon.retention import Retention
from tests.helpers import Daemon, DbPair, assert_same, same, sync_once, wait_until


def log_rows(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM dbsync.sync_log").fetchone()[0])  # type: ignore[index]


def log_seqs(conn: psycopg.Connection) -> set[int]:
    return {r[0] for r in conn.execute("SELECT seq FROM dbsync.sync_log").fetchall()}


EVENT_OF_THIS_TRANSACTION = """
SELECT seq, txid::text::bigint FROM dbsync.sync_log WHERE txid = pg_current_xact_id() ORDER BY seq DESC LIMIT 1
"""


def insert(conn: psycopg.Connection, phone: str) -> tuple[int, int]:
    """Insert a conversation; returns its event's (seq, txid), read in the writing transaction."""
    if not conn.autocommit:  # a transaction left open, as the caller wants
        conn.execute("INSERT INTO conversations (phone_number) VALUES (%s)", (phone,))
        row = conn.execute(EVENT_OF_THIS_TRANSACTION).fetchone()
    else:
        with conn.transaction():  # both statements in one transaction, committed
            conn.execute("INSERT INTO conversations (phone_number) VALUES (%s)", (phone,))
            row = conn.execute(EVENT_OF_THIS_TRANSACTION).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def stored_snapshot(pair: DbPair) -> tuple[str, Any]:
    """The Agent's applied snapshot (text, parsed) and its open batch cursor, if any."""
    with psycopg.connect(pair.agent_dsn, autocommit=True) as agent:
        row = agent.execute(
            "SELECT prev_snapshot::text, batch_cursor FROM dbsync.apply_progress WHERE source = 'site'"
        ).fetchone()
    assert row is not None, "the Agent DB stores no progress"
    return row[0], row[1]


def snapshot_parts(text: str) -> tuple[int, int, set[int]]:
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), {int(x) for x in xip.split(",") if x}


def consumer_of(pair: DbPair) -> str:
    """The consumer name the daemon of `pair` registers on the Site DB."""
    with psycopg.connect(pair.agent_dsn, autocommit=True) as agent:
        return agent_consumer_name(agent, "site", None)


def prune(pair: DbPair, snapshot: str, **retention: Any) -> int:
    """One retention step, as the daemon runs it, against `snapshot`; returns how many went."""

    async def go() -> int:
        site = await pg.connect(pair.site_dsn, "Site")
        try:
            return await Retention(consumer=consumer_of(pair), **retention).maybe_prune(site, snapshot)
        finally:
            await site.close()

    return asyncio.run(go())


def test_retention_deletes_exactly_the_events_the_stored_snapshot_applied(pair: DbPair) -> None:
    site = pair.site()
    before_seq, before_xid = insert(site, "+1 committed before the snapshot's xmin")
    held = psycopg.connect(pair.site_dsn)  # a transaction, running when the daemon takes its snapshot
    held_seq, held_xid = insert(held, "+2 running at the snapshot, committed after it")
    between_seq, between_xid = insert(site, "+3 committed between the snapshot's xmin and xmax")
    sync_once(pair)  # applies what its snapshot sees and stores that snapshot on the Agent
    held.commit()  # committed now, so a rule that wrongly covers it can delete it
    held.close()
    after_seq, _ = insert(site, "+4 committed after the snapshot")
    snapshot, cursor = stored_snapshot(pair)
    xmin, xmax, xip = snapshot_parts(snapshot)
    # The state this test means: the held transaction is in the snapshot's xip (its xmin, unless
    # something older runs in the cluster), the other applied one lies between xmin and xmax, and
    # the held event's seq is below an applied one.
    assert cursor is None
    assert held_xid in xip and xmin <= held_xid < between_xid < xmax and between_xid not in xip, snapshot
    assert before_xid < held_xid and before_xid not in xip, snapshot
    assert before_seq < held_seq < between_seq < after_seq

    deleted = prune(pair, snapshot)

    kept = log_seqs(site)
    assert held_seq in kept, "deleted the event of a transaction running at the snapshot (not applied)"
    assert after_seq in kept, "deleted the event of a transaction committed after the snapshot (not applied)"
    assert before_seq not in kept, "kept an applied event (committed before the snapshot's xmin)"
    assert between_seq not in kept, "kept an applied event (committed between the snapshot's xmin and xmax)"
    assert kept == {held_seq, after_seq} and deleted == 2, (kept, deleted)

    # Once the Agent has applied them too, they go as well.
    sync_once(pair)
    assert prune(pair, stored_snapshot(pair)[0]) == 2
    assert log_rows(site) == 0
    assert_same(pair)


def test_the_first_transaction_after_the_snapshot_is_kept(pair: DbPair) -> None:
    """The snapshot's xmax is the first xid not yet assigned: a transaction that gets exactly that
    xid started after the snapshot, and its event is not applied."""
    site = pair.site()
    applied_seq, _ = insert(site, "+1 before the snapshot")
    for _ in range(20):  # another xid taken in between (anywhere in the cluster) spoils the attempt
        snapshot = str(site.execute("SELECT pg_current_snapshot()::text").fetchone()[0])  # type: ignore[index]
        seq, txid = insert(site, f"+2 first after {snapshot}")
        if txid == snapshot_parts(snapshot)[1]:
            break
    else:
        raise AssertionError("no transaction got the snapshot's xmax as its xid in 20 attempts")
    assert prune(pair, snapshot) >= 1
    kept = log_seqs(site)
    assert seq in kept, f"deleted the event of xid {txid}, the snapshot's xmax ({snapshot})"
    assert applied_seq not in kept


def test_a_prune_cut_short_resumes_with_the_same_snapshot(pair: DbPair) -> None:
    """Deletes go in chunks; a step that ran out of time leaves the rest for the next step, even
    though the snapshot has not moved."""
    site = pair.site()
    for g in range(1, 8):  # seven log rows (one statement's keys would share one)
        site.execute("INSERT INTO conversations (phone_number) VALUES (%s)", (f"+49151{g}",))
    snapshot = str(site.execute("SELECT pg_current_snapshot()::text").fetchone()[0])  # type: ignore[index]
    later, _ = insert(site, "+1 after the snapshot")

    async def go() -> list[int]:
        conn = await pg.connect(pair.site_dsn, "Site")
        retention = Retention(interval=0, chunk=2, budget=0)  # one chunk per step
        try:
            return [await retention.maybe_prune(conn, snapshot) for _ in range(6)]
        finally:
            await conn.close()

    assert asyncio.run(go()) == [2, 2, 2, 1, 0, 0]
    assert log_seqs(site) == {later}


AGENT_WAITS_ON_LOCK = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'dbsync' AND wait_event_type = 'Lock'
"""


def test_events_of_an_open_batch_survive_retention(pair: DbPair) -> None:
    """The daemon is held inside a batch (an Agent lock blocks its fourth page): the events above
    its cursor stay in the log, both while the daemon runs and under a retention step against the
    snapshot the Agent stores; once the batch is applied they go.

    The batch is in the log before the daemon starts, so its retention is due at once (a fresh
    daemon's first prune does not wait for the interval): a daemon that pruned between the pages
    of a batch would do it here."""
    site, agent = pair.site(), pair.agent()
    warm_up, _ = insert(site, "+1 warm-up")
    sync_once(pair)  # so that the stored snapshot is a real one, not the initial one
    blocker = psycopg.connect(pair.agent_dsn)  # not autocommit: the lock lasts until rollback
    blocker.execute("LOCK TABLE conversations IN SHARE MODE")
    with site.transaction():  # one batch: three pages of leads, then conversations (blocked)
        # One statement per row: one log row each (a statement's keys would share log rows).
        site.execute(
            "DO $$ BEGIN "
            "FOR g IN 1..30 LOOP INSERT INTO leads (phone_number) VALUES ('lead-' || g); END LOOP; "
            "FOR g IN 1..30 LOOP INSERT INTO conversations (phone_number) VALUES ('+4916' || g); END LOOP; END $$"
        )
    above = "SELECT count(*) FROM dbsync.sync_log WHERE seq > %s"
    with Daemon(pair, "--batch-size", "10"):
        blocked = lambda: agent.execute(AGENT_WAITS_ON_LOCK).fetchone() == (1,)  # noqa: E731
        # A daemon that deletes the rest of its batch never gets to the blocked page.
        wait_until(lambda: blocked() or log_rows(site) < 61, 30, 0.05, "the daemon to block")
        assert log_rows(site) == 61, "the daemon deleted events of its open batch"
        assert blocked()
        snapshot, cursor = stored_snapshot(pair)
        assert cursor is not None, "the daemon is not inside a batch"
        assert site.execute(above, (cursor,)).fetchone() == (30,), "the daemon deleted events of its open batch"
        prune(pair, snapshot)
        assert site.execute(above, (cursor,)).fetchone() == (30,), "retention deleted events of the open batch"
        assert warm_up not in log_seqs(site), "retention kept the applied warm-up event"
        blocker.rollback()
        blocker.close()
        wait_until(lambda: same(pair), 30, 0.05, "the batch to be applied")
        wait_until(lambda: log_rows(site) == 0, 30, 0.1, "the applied batch to be pruned")
    assert_same(pair)


def test_applied_events_are_deleted_and_pending_ones_kept(pair: DbPair) -> None:
    site = pair.site()
    site.execute("INSERT INTO conversations (phone_number) SELECT '+49151' || g FROM generate_series(1, 3000) g")
    # A transaction that stays open across several prunes: its event must survive them.
    held = psycopg.connect(pair.site_dsn)
    held.execute("INSERT INTO conversations (phone_number) VALUES ('+4915199999999')")
    with Daemon(pair):
        for _ in range(3):
            site.execute("UPDATE conversations SET unread_count = unread_count + 1 WHERE id <= 1000")
        wait_until(lambda: log_rows(site) == 0, 30, 0.1, "the applied events to be pruned")
        held.commit()
        held.close()
        wait_until(lambda: same(pair), 30, 0.05, "the held transaction to be applied")
        wait_until(lambda: log_rows(site) == 0, 30, 0.1, "its event to be pruned too")
    assert_same(pair)


def test_run_once_with_incremental_verification_keeps_what_is_unverified(pair: DbPair) -> None:
    """With verify_interval, the position a consumer reports is its verified mark, also when the
    daemon runs --once (which verifies nothing): reporting its apply progress instead would let
    the log be pruned under keys the verification has yet to read, and a later report of the
    (older) mark would look like a consumer gone back past the pruned log."""
    site = pair.site()
    site.execute("INSERT INTO conversations (phone_number) SELECT '+49152' || g FROM generate_series(1, 50) g")
    sync_once(pair, verify_interval=60.0)
    assert_same(pair)
    name = site.execute("SELECT name FROM dbsync.consumers").fetchone()
    assert name is not None, "run --once registered no consumer"
    unseen = site.execute(
        "SELECT count(*) FROM dbsync.sync_log l, dbsync.consumers c WHERE c.name = %s "
        "AND NOT pg_visible_in_snapshot(l.txid, c.applied_snapshot)",
        (name[0],),
    ).fetchone()
    assert unseen is not None and unseen[0] > 0, "run --once reported events as applied that nothing verified"
    assert log_rows(site) > 0


def sync_log_rows_read(site: psycopg.Connection) -> int:
    """Rows of dbsync.sync_log read so far (sequential and by index), as the statistics say."""
    site.execute("SELECT pg_stat_force_next_flush()")
    row = site.execute(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables"
        " WHERE relid = 'dbsync.sync_log'::regclass"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_prune_reads_what_it_deletes_not_the_kept_log(pair: DbPair) -> None:
    """The log a consumer has not applied yet (a catch-up backlog, a verified mark far behind, a
    stale consumer) is kept, and each retention round (every 2 s) must not read it all again to
    find that nothing of it may go: a prune's reads follow what it deletes."""
    site = pair.site()
    consumer = consumer_of(pair)
    site.execute("SELECT dbsync.register_consumer(%s, pg_current_snapshot()::text)", (consumer,))
    applied = 50
    for i in range(applied):
        insert(site, f"+1{i:05d}")
    position = str(site.execute("SELECT pg_current_snapshot()::text").fetchone()[0])  # type: ignore[index]
    kept = 20_000  # the backlog after the position, one event per statement
    site.execute(
        f"DO $$BEGIN FOR i IN 1..{kept} LOOP"
        " INSERT INTO conversations (phone_number) VALUES ('+2' || i); END LOOP; END$$"
    )
    site.execute("ANALYZE dbsync.sync_log")
    site.execute("SELECT dbsync.consumer_applied(%s, %s)", (consumer, position))
    for _ in range(6):  # past PL/pgSQL's switch to a generic plan (after five executions)
        before = sync_log_rows_read(site)
        deleted = int(site.execute("SELECT dbsync.prune_log(10000)").fetchone()[0])  # type: ignore[index]
        read = sync_log_rows_read(site) - before
        assert read <= 1_000, f"one prune read {read} log rows to delete {deleted} of {applied} applied ones"
    assert log_rows(site) == kept
