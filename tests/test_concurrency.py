"""Many writers at once against a running daemon, with and without the daemon being killed.

The writers keep their own tally of every increment they committed; the Site must match it (the
workload did what we think) and the Agent must match the Site exactly (nothing lost, nothing
applied twice in effect).
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import errors

from dbsync.status import read_status
from tests.helpers import Daemon, DbPair, assert_same, same, wait_until

SHARED_CONVERSATIONS = 24


class Writers:
    """`threads` sessions, each committing at least `per_thread` transactions of a WhatsApp-like
    mix; with `until` set, they go on until it is set too."""

    def __init__(
        self, pair: DbPair, threads: int, per_thread: int, seed: int = 1, until: threading.Event | None = None
    ) -> None:
        self.pair = pair
        self.per_thread = per_thread
        self.seed = seed
        self.until = until
        self.committed = 0
        self.unread: Counter[int] = Counter()  # conversation id -> increments committed
        self.scores: Counter[str] = Counter()  # lead phone -> increments committed
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"writer-{i}") for i in range(threads)]

    def start(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float = 300) -> None:
        for t in self._threads:
            t.join(timeout)
            assert not t.is_alive(), f"{t.name} did not finish"
        if self.errors:
            raise self.errors[0]

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _run(self, tid: int) -> None:
        rng = random.Random(self.seed * 1000 + tid)
        messages: list[tuple[str, str]] = []  # (message_id, status) of this writer's live messages
        made = 0
        try:
            with psycopg.connect(self.pair.site_dsn, autocommit=True) as conn:
                done = 0
                while done < self.per_thread or (self.until is not None and not self.until.is_set()):
                    unread: Counter[int] = Counter()
                    scores: Counter[str] = Counter()
                    try:
                        with conn.transaction():
                            made = self._transaction(conn, rng, tid, messages, made, unread, scores)
                    except (errors.DeadlockDetected, errors.SerializationFailure):
                        messages[:] = self._reload(conn, tid)
                        continue
                    done += 1
                    with self._lock:
                        self.committed += 1
                        self.unread.update(unread)
                        self.scores.update(scores)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.errors.append(exc)

    @staticmethod
    def _reload(conn: psycopg.Connection, tid: int) -> list[tuple[str, str]]:
        rows = conn.execute(
            "SELECT message_id, status FROM whatsapp_messages WHERE message_id LIKE %s ORDER BY id", (f"t{tid}-%",)
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def _transaction(
        self,
        conn: psycopg.Connection,
        rng: random.Random,
        tid: int,
        messages: list[tuple[str, str]],
        made: int,
        unread: Counter[int],
        scores: Counter[str],
    ) -> int:
        conv = rng.randrange(1, SHARED_CONVERSATIONS + 1)
        roll = rng.random()
        pending = [i for i, (_, st) in enumerate(messages) if st in ("sent", "delivered")]
        if roll < 0.35 or not messages:
            made += 1
            mid = f"t{tid}-{made}"
            conn.execute(
                "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction, content) "
                "VALUES (%s, %s, %s, %s, %s)",
                (mid, conv, f"+{conv}", rng.choice(["inbound", "outbound"]), f"hello {mid} ✓ " * rng.randint(1, 5)),
            )
            conn.execute(
                "UPDATE conversations SET unread_count = unread_count + 1, last_message_at = now(), "
                "updated_at = now() WHERE id = %s",
                (conv,),
            )
            unread[conv] += 1
            messages.append((mid, "sent"))
        elif roll < 0.75 and pending:
            i = rng.choice(pending)
            mid, st = messages[i]
            if st == "sent":
                new = "delivered" if rng.random() < 0.85 else "failed"
            else:
                new = "read" if rng.random() < 0.9 else "failed"
            conn.execute(
                "UPDATE whatsapp_messages SET status = %s, updated_at = now(), "
                "delivered_at = CASE WHEN %s = 'delivered' THEN now() ELSE delivered_at END, "
                "read_at = CASE WHEN %s = 'read' THEN now() ELSE read_at END, "
                "error_message = CASE WHEN %s = 'failed' THEN 'timeout' END WHERE message_id = %s",
                (new, new, new, new, mid),
            )
            if new == "read":
                row = conn.execute("SELECT conversation_id FROM whatsapp_messages WHERE message_id = %s", (mid,))
                cid = row.fetchone()[0]  # type: ignore[index]
                conn.execute("UPDATE conversations SET unread_count = unread_count + 1 WHERE id = %s", (cid,))
                unread[cid] += 1
            messages[i] = (mid, new)
        elif roll < 0.85:
            i = rng.randrange(len(messages))
            conn.execute("DELETE FROM whatsapp_messages WHERE message_id = %s", (messages[i][0],))
            messages.pop(i)
        else:
            phone = f"+lead-{tid}-{rng.randrange(8)}"
            conn.execute(
                "INSERT INTO leads (phone_number, name, conversation_id, score) VALUES (%s, %s, %s, 1) "
                "ON CONFLICT (phone_number) DO UPDATE SET score = leads.score + 1, "
                "stage = (ARRAY['new', 'contacted', 'qualified', 'won', 'lost'])[1 + leads.score %% 5], "
                "attributes = leads.attributes || jsonb_build_object('touch', leads.score + 1), updated_at = now()",
                (phone, f"Lead {phone}", conv),
            )
            scores[phone] += 1
            conn.execute(
                "UPDATE conversations SET assigned_agent = %s, status = %s WHERE id = %s",
                (f"agent-{tid}", rng.choice(["open", "pending", "closed"]), conv),
            )
        return made


def seed_conversations(pair: DbPair) -> None:
    pair.site().execute(
        "INSERT INTO conversations (id, phone_number, contact_name) "
        "SELECT g, '+' || g, 'Contact ' || g FROM generate_series(1, %s) g",
        (SHARED_CONVERSATIONS,),
    )


def check_tallies(pair: DbPair, writers: Writers) -> None:
    """The Site holds exactly what the writers committed: the workload itself is sound."""
    site = pair.site()
    unread = site.execute("SELECT id, unread_count FROM conversations WHERE unread_count > 0").fetchall()
    assert dict(unread) == dict(writers.unread)
    scores = site.execute("SELECT phone_number, score FROM leads").fetchall()
    assert dict(scores) == dict(writers.scores)


def events_behind(pair: DbPair) -> int:
    with psycopg.connect(pair.site_dsn, autocommit=True) as s, psycopg.connect(pair.agent_dsn, autocommit=True) as a:
        return read_status(s, a, "site").events_behind


def applied(pair: DbPair) -> int:
    with psycopg.connect(pair.agent_dsn, autocommit=True) as a:
        row = a.execute("SELECT events_applied FROM dbsync.apply_progress").fetchone()
        return int(row[0]) if row else 0


def newest_seq(pair: DbPair) -> int:
    with psycopg.connect(pair.site_dsn, autocommit=True) as s:
        return int(s.execute("SELECT coalesce(max(seq), 0) FROM dbsync.sync_log").fetchone()[0])  # type: ignore[index]


def test_sixteen_writers_against_a_running_daemon(pair: DbPair, tmp_path: Path) -> None:
    seed_conversations(pair)
    with Daemon(pair, log_path=tmp_path / "daemon.log") as daemon:
        wait_until(lambda: same(pair), timeout=60, what="the daemon to start replicating")
        start = applied(pair)
        writers = Writers(pair, threads=16, per_thread=500).start()
        try:
            wait_until(lambda: applied(pair) > start + 500 or not writers.alive, timeout=120, interval=0.01,
                       what="the daemon to apply while writers run")
            overlapped = writers.alive
        finally:
            writers.join()
        assert overlapped, "the writers finished before the daemon applied anything: no concurrency tested"
        assert writers.committed == 16 * 500
        wait_until(lambda: events_behind(pair) == 0, timeout=180, interval=0.2, what="status to show 0 events behind")
        wait_until(lambda: same(pair), timeout=120, interval=0.2, what="the tables to be identical")
        assert daemon.proc.poll() is None, "the daemon died"
    check_tallies(pair, writers)
    assert_same(pair)


def grows(measure: Callable[[DbPair], int], pair: DbPair, by: int) -> Callable[[], bool]:
    """A predicate: `measure` has grown by `by` since now."""
    target = measure(pair) + by
    return lambda: measure(pair) >= target


def test_daemon_killed_repeatedly_while_writers_run_converges_exactly(pair: DbPair, tmp_path: Path) -> None:
    seed_conversations(pair)
    log = tmp_path / "daemon.log"
    kills_done = threading.Event()
    writers = Writers(pair, threads=8, per_thread=400, seed=2, until=kills_done).start()
    try:
        for _ in range(3):
            with Daemon(pair, "--batch-size", "200", log_path=log) as daemon:
                wait_until(grows(applied, pair, 300), timeout=120, interval=0.01, what="the daemon to apply events")
                daemon.kill()
            # Writers keep going while no daemon runs.
            wait_until(grows(newest_seq, pair, 200), timeout=120, interval=0.01, what="writers to go on meanwhile")
            assert writers.alive
    finally:
        kills_done.set()
        writers.join()
    assert writers.committed >= 8 * 400
    with Daemon(pair, "--batch-size", "200", log_path=log):
        wait_until(lambda: same(pair), timeout=180, interval=0.2, what="the tables to converge after restarts")
        assert events_behind(pair) == 0
    check_tallies(pair, writers)
    assert_same(pair)
