"""The consumption rule: committed transactions are applied, whatever order they took their
sequence numbers in; open ones are neither applied nor skipped; rolled-back ones stall nothing.
"""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

import psycopg
import pytest

from dbsync.status import read_status
from tests.helpers import Daemon, DbPair, assert_same, count, replicate, rows_of, same, sync_once, wait_until

ITEMS = "public.items"
ITEMS_DDL = "CREATE TABLE public.items (id integer PRIMARY KEY, v text, n integer NOT NULL DEFAULT 0)"


@pytest.fixture
def items(pair: DbPair) -> str:
    replicate(pair, ITEMS_DDL, ITEMS)
    return ITEMS


class Txn:
    """A Site session with an explicit transaction; a statement can run in the background
    (to block on a row lock) and be joined later."""

    def __init__(self, pair: DbPair, name: str) -> None:
        self.name = name
        self.conn = psycopg.connect(pair.site_dsn)
        self.xid: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def execute(self, query: str, params: tuple[object, ...] = ()) -> None:
        self.conn.execute(query, params)
        if self.xid is None:
            self.xid = int(self.conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])  # type: ignore[index]

    def background(self, query: str, params: tuple[object, ...] = ()) -> None:
        def run() -> None:
            try:
                self.execute(query, params)
            except BaseException as exc:  # noqa: BLE001 - re-raised in join()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"txn-{self.name}")
        self._thread.start()

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), f"{self.name} is still blocked"
        self._thread = None
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._thread is not None:
            self.conn.cancel()
            self._thread.join(timeout=10)
        self.conn.close()


def blocked_on_lock(site: psycopg.Connection, txn: Txn) -> bool:
    row = site.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (txn.conn.info.backend_pid,)
    ).fetchone()
    return row is not None and row[0] == "Lock"


def own_seqs(txn: Txn) -> list[int]:
    return [
        r[0]
        for r in txn.conn.execute(
            "SELECT seq FROM dbsync.sync_log WHERE txid = pg_current_xact_id() ORDER BY seq"
        ).fetchall()
    ]


def agent_ids(pair: DbPair, table: str = ITEMS) -> list[int]:
    with psycopg.connect(pair.agent_dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()]


# -- (a) a sequence number taken first, committed last -----------------------------------


def test_transaction_that_takes_its_seq_first_and_commits_last_is_applied(pair: DbPair, items: str) -> None:
    a, b = Txn(pair, "A"), Txn(pair, "B")
    try:
        a.execute("INSERT INTO public.items VALUES (1, 'A')")
        b.execute("INSERT INTO public.items VALUES (2, 'B')")
        a_seqs, b_seqs = own_seqs(a), own_seqs(b)
        b.conn.commit()
        assert max(a_seqs) < min(b_seqs), "the scenario needs A's sequence number below B's"

        sync_once(pair)
        assert agent_ids(pair) == [2]
        assert_same(pair, [ITEMS])

        # A writes again after B's events were applied, then commits: all of A arrives.
        a.execute("INSERT INTO public.items VALUES (3, 'A')")
        a.execute("UPDATE public.items SET v = 'A2' WHERE id = 1")
        sync_once(pair)
        assert agent_ids(pair) == [2]
        a.conn.commit()

        sync_once(pair)
        assert agent_ids(pair) == [1, 2, 3]
        assert_same(pair, [ITEMS])
    finally:
        a.close()
        b.close()


def test_many_interleaved_transactions_commit_in_reverse_order(pair: DbPair, items: str) -> None:
    txns = [Txn(pair, f"T{i}") for i in range(8)]
    try:
        for i, t in enumerate(txns):
            t.execute("INSERT INTO public.items VALUES (%s, %s)", (i, t.name))
        for round_ in range(3):
            for i, t in enumerate(txns):
                t.execute("INSERT INTO public.items VALUES (%s, %s)", (100 * (round_ + 1) + i, t.name))
        for t in reversed(txns):
            t.conn.commit()
            sync_once(pair)
            assert_same(pair, [ITEMS])
        assert count(pair.agent_dsn, ITEMS) == 32
    finally:
        for t in txns:
            t.close()


# -- (b) rolled-back transactions -------------------------------------------------------


def test_rolled_back_transactions_leave_holes_and_do_not_stall(pair: DbPair, items: str, tmp_path: Path) -> None:
    site = pair.site()
    with Daemon(pair, log_path=tmp_path / "daemon.log"):
        site.execute("INSERT INTO public.items VALUES (0, 'ready')")
        wait_until(lambda: agent_ids(pair) == [0], timeout=60, what="the daemon to start replicating")

        # Rollbacks with sequence numbers below and between committed ones.
        doomed = Txn(pair, "doomed")
        try:
            doomed.execute("INSERT INTO public.items SELECT g, 'doomed' FROM generate_series(1000, 1999) g")
            for i in range(1, 11):
                with psycopg.connect(pair.site_dsn) as rb:
                    rb.execute("INSERT INTO public.items VALUES (%s, 'rolled back')", (2000 + i,))
                    rb.execute("UPDATE public.items SET v = 'rolled back' WHERE id = 0")
                    rb.rollback()
            doomed.conn.rollback()
        finally:
            doomed.close()
        site.execute("INSERT INTO public.items VALUES (1, 'after the holes')")
        wait_until(lambda: agent_ids(pair) == [0, 1], timeout=30, what="the committed row after the holes")

        # A hole left by a rollback while the daemon kept reading.
        with psycopg.connect(pair.site_dsn) as rb:
            rb.execute("INSERT INTO public.items VALUES (3000, 'rolled back')")
            site.execute("INSERT INTO public.items VALUES (2, 'while a rollback was pending')")
            wait_until(lambda: agent_ids(pair) == [0, 1, 2], timeout=30, what="the row committed past the open one")
            rb.rollback()
        site.execute("INSERT INTO public.items VALUES (3, 'last')")
        wait_until(lambda: agent_ids(pair) == [0, 1, 2, 3], timeout=30, what="the row after the last hole")
        assert_same(pair, [ITEMS])

    with psycopg.connect(pair.site_dsn, autocommit=True) as s, psycopg.connect(pair.agent_dsn, autocommit=True) as a:
        assert read_status(s, a, "site").events_behind == 0


# -- (c) a transaction left open --------------------------------------------------------


def test_open_transaction_is_not_applied_and_does_not_block_others(pair: DbPair, tmp_path: Path) -> None:
    site = pair.site()
    site.execute("INSERT INTO conversations (id, phone_number) VALUES (1, '+1'), (2, '+2')")
    long = Txn(pair, "long")
    try:
        with Daemon(pair, log_path=tmp_path / "daemon.log"):
            wait_until(lambda: count(pair.agent_dsn, "conversations") == 2, timeout=60, what="initial rows")

            long.execute("INSERT INTO conversations (id, phone_number, contact_name) VALUES (100, '+100', 'open')")
            long.execute("UPDATE conversations SET contact_name = 'long' WHERE id = 1")

            for i in range(3, 8):
                site.execute("INSERT INTO conversations (id, phone_number) VALUES (%s, %s)", (i, f"+{i}"))
                site.execute(
                    "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction) "
                    "VALUES (%s, %s, %s, 'inbound')",
                    (f"m{i}", i, f"+{i}"),
                )
            site.execute("UPDATE conversations SET status = 'pending' WHERE id = 2")
            wait_until(lambda: same(pair), timeout=30, what="others to replicate while one transaction is open")
            assert count(pair.agent_dsn, "conversations WHERE id = 100") == 0
            assert count(pair.agent_dsn, "conversations WHERE contact_name = 'long'") == 0

            # Later the open transaction writes again, to a row others have changed meanwhile.
            long.execute("UPDATE conversations SET unread_count = 99 WHERE id = 2")
            site.execute("INSERT INTO leads (phone_number, name) VALUES ('+3', 'still flowing')")
            wait_until(lambda: same(pair), timeout=30, what="the lead to replicate")
            assert count(pair.agent_dsn, "conversations WHERE unread_count = 99") == 0

            long.conn.commit()
            wait_until(lambda: same(pair), timeout=30, what="the long transaction to be applied")
            assert_same(pair)
            assert count(pair.agent_dsn, "conversations WHERE id = 100") == 1
    finally:
        long.close()


# -- (d) savepoints ---------------------------------------------------------------------


def test_only_changes_that_survive_a_rolled_back_savepoint_replicate(pair: DbPair, items: str) -> None:
    site = pair.site()
    site.execute("INSERT INTO public.items VALUES (1, 'orig'), (2, 'orig'), (3, 'orig')")
    sync_once(pair)
    with psycopg.connect(pair.site_dsn) as conn:
        conn.execute("INSERT INTO public.items VALUES (10, 'kept')")
        conn.execute("SAVEPOINT a")
        conn.execute("INSERT INTO public.items VALUES (11, 'undone')")
        conn.execute("UPDATE public.items SET v = 'undone' WHERE id = 1")
        conn.execute("DELETE FROM public.items WHERE id = 2")
        conn.execute("ROLLBACK TO SAVEPOINT a")
        conn.execute("UPDATE public.items SET v = 'kept' WHERE id = 3")
        conn.execute("SAVEPOINT b")
        conn.execute("INSERT INTO public.items VALUES (12, 'released')")
        conn.execute("SAVEPOINT c")
        conn.execute("UPDATE public.items SET v = 'undone' WHERE id = 12")
        conn.execute("TRUNCATE public.items")
        conn.execute("ROLLBACK TO SAVEPOINT c")
        conn.execute("RELEASE SAVEPOINT b")
        conn.execute("SAVEPOINT d")
        conn.execute("INSERT INTO public.items VALUES (13, 'undone with its parent')")
        conn.execute("SAVEPOINT e")
        conn.execute("INSERT INTO public.items VALUES (14, 'undone with its parent')")
        conn.execute("RELEASE SAVEPOINT e")
        conn.execute("ROLLBACK TO SAVEPOINT d")
        conn.commit()
    sync_once(pair)
    assert rows_of(pair.agent_dsn, ITEMS) == [
        "(1,0,orig)", "(2,0,orig)", "(3,0,kept)", "(10,0,kept)", "(12,0,released)"
    ]
    assert_same(pair, [ITEMS])


def test_transaction_whose_only_writes_were_rolled_back_to_a_savepoint(pair: DbPair, items: str) -> None:
    """It has an xid but no events; it must neither stall nor leak."""
    site = pair.site()
    with psycopg.connect(pair.site_dsn) as conn:
        conn.execute("SAVEPOINT a")
        conn.execute("INSERT INTO public.items VALUES (1, 'undone')")
        conn.execute("ROLLBACK TO SAVEPOINT a")
        site.execute("INSERT INTO public.items VALUES (2, 'other')")
        sync_once(pair)
        conn.commit()
    site.execute("INSERT INTO public.items VALUES (3, 'later')")
    sync_once(pair)
    assert agent_ids(pair) == [2, 3]
    assert_same(pair, [ITEMS])


# -- (e) conflicting writers while an older transaction is open --------------------------

# Steps: "<txn> z" writes the txn's own row, "<txn> r" updates the shared row (in the background
# with "&", joined by "<txn> j"), "<txn> c" commits, "<txn> a" rolls back, "s" syncs and
# compares. L always writes first, so it holds the oldest xid.
INTERLEAVINGS = {
    "both-then-sync": "L z | A r | A c | B r | B c | s | L c | s",
    "sync-between": "L z | A r | A c | s | B r | B c | s | L c | s",
    "sync-before-any-commit": "L z | A r | s | A c | B r | s | B c | s | L c | s",
    "old-txn-writes-last": "L z | A r | A c | B r | B c | s | L r | s | L c | s",
    "old-txn-writes-first": "L z | L r | A r& | s | L c | A j | s | A c | B r | B c | s",
    "old-txn-between": "L z | A r | L r& | A c | L j | B r& | s | L c | B j | B c | s",
    "old-txn-rolls-back": "L z | L r | A r& | B z | B c | s | L a | A j | A c | s",
}


@pytest.mark.parametrize("steps", INTERLEAVINGS.values(), ids=INTERLEAVINGS.keys())
def test_same_row_updated_in_sequence_while_an_older_transaction_is_open(
    pair: DbPair, items: str, steps: str
) -> None:
    site = pair.site()
    site.execute("INSERT INTO public.items VALUES (0, 'shared')")
    sync_once(pair)
    txns = {name: Txn(pair, name) for name in "LAB"}
    own = {"L": 1, "A": 2, "B": 3}
    try:
        for step in steps.split(" | "):
            if step == "s":
                sync_once(pair)
                assert_same(pair, [ITEMS])
                continue
            name, action = step.split()
            t = txns[name]
            if action == "z":
                t.execute("INSERT INTO public.items VALUES (%s, %s)", (own[name], name))
            elif action == "r":
                t.execute("UPDATE public.items SET v = %s, n = n + 1 WHERE id = 0", (name,))
            elif action == "r&":
                t.background("UPDATE public.items SET v = %s, n = n + 1 WHERE id = 0", (name,))
                wait_until(partial(blocked_on_lock, site, t), timeout=30, what=f"{name} to block")
            elif action == "j":
                t.join()
            elif action == "c":
                t.conn.commit()
            elif action == "a":
                t.conn.rollback()
            else:
                raise AssertionError(f"bad step {step!r}")
        xids = {n: t.xid for n, t in txns.items() if t.xid is not None}
        assert xids["L"] == min(xids.values()), "the scenario needs L to hold the oldest xid"
        sync_once(pair)
        assert_same(pair, [ITEMS])
        last = steps.split(" | ")
        writers = [s.split()[0] for s in last if s.split()[-1] in ("r", "r&") and f"{s.split()[0]} a" not in last]
        assert rows_of(pair.agent_dsn, ITEMS)[0] == f"(0,{len(writers)},{writers[-1]})"
    finally:
        for t in txns.values():
            t.close()


# -- (f) one statement, many pages ------------------------------------------------------


def test_single_statement_of_12k_rows_applies_in_many_pages(pair: DbPair, items: str) -> None:
    site = pair.site()
    site.execute("INSERT INTO public.items SELECT g, 'v' || g FROM generate_series(1, 12000) g")
    first = sync_once(pair, batch_size=1000)
    assert first.stats.batches >= 12
    assert_same(pair, [ITEMS])

    site.execute("UPDATE public.items SET v = v || '!', n = n + 1")
    site.execute("DELETE FROM public.items WHERE id % 1000 = 0")
    second = sync_once(pair, batch_size=1000)
    assert second.stats.batches >= 13
    assert count(pair.agent_dsn, ITEMS) == 11988
    assert_same(pair, [ITEMS])


def test_daemon_killed_inside_a_batch_resumes_from_its_cursor(pair: DbPair, items: str, tmp_path: Path) -> None:
    site = pair.site()
    site.execute("INSERT INTO public.items SELECT g, 'v' || g FROM generate_series(1, 30000) g")
    agent = pair.agent()

    def mid_batch() -> bool:
        row = agent.execute("SELECT batch_cursor FROM dbsync.apply_progress").fetchone()
        return row is not None and row[0] is not None

    with Daemon(pair, "--batch-size", "300", log_path=tmp_path / "daemon.log") as first:
        wait_until(mid_batch, timeout=60, interval=0.005, what="a page of the batch to be applied")
        first.kill()
    assert mid_batch(), "the daemon finished the batch before it could be killed"
    assert 0 < count(pair.agent_dsn, ITEMS) < 30000

    with Daemon(pair, "--batch-size", "300", log_path=tmp_path / "daemon.log"):
        wait_until(lambda: same(pair, [ITEMS]), timeout=120, what="the batch to finish after the restart")
    assert_same(pair, [ITEMS])
    progress = agent.execute("SELECT batch_cursor, events_applied FROM dbsync.apply_progress").fetchone()
    assert progress is not None and progress[0] is None
