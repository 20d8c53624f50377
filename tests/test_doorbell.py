"""Writers ring only when the daemon is idle, and no wake-up is lost when it arms."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from pathlib import Path

import psycopg

from dbsync.config import Settings
from dbsync.daemon.runner import WAKE_INTERVAL, Replicator
from dbsync.embedded.cluster import default_bindir
from tests.helpers import Daemon, DbPair, assert_same, same, wait_until
from tests.helpers import count as rows


def armed(conn: psycopg.Connection) -> bool:
    """The daemon's switch, which must agree with what writers' triggers read.

    The mirror is a sequence, which changes when the daemon's UPDATE runs, not when it commits:
    a look between the two sees them differ. Only a disagreement that lasts is a fault."""
    deadline = time.monotonic() + 5
    while True:
        row = conn.execute("SELECT armed, dbsync.doorbell_armed() FROM dbsync.doorbell").fetchone()
        assert row is not None
        if row[0] == row[1]:
            return bool(row[0])
        assert time.monotonic() < deadline, f"doorbell table says {row[0]}, writers read {row[1]}"
        time.sleep(0.01)


def test_writers_ring_exactly_while_armed(pair: DbPair) -> None:
    listener = psycopg.connect(pair.site_dsn, autocommit=True)
    listener.execute("LISTEN dbsync")
    site = pair.site()

    def rings_until_marker() -> int:
        """Notifications before a marker sent now: all earlier commits are delivered first."""
        site.execute("SELECT pg_notify('dbsync', 'marker')")
        for count, note in enumerate(listener.notifies(timeout=10)):
            if note.payload == "marker":
                return count
        raise AssertionError("the marker notification did not arrive")

    assert not armed(site)
    site.execute("INSERT INTO conversations (phone_number) VALUES ('+1')")
    assert rings_until_marker() == 0  # disarmed: silent
    # The writers' view changes as soon as the switch does, before the daemon's update commits.
    with psycopg.connect(pair.site_dsn) as daemon_side:
        daemon_side.execute("UPDATE dbsync.doorbell SET armed = true")
        assert site.execute("SELECT dbsync.doorbell_armed()").fetchone() == (True,)
    assert armed(site)
    with site.transaction():  # one notification per transaction, however many rows
        site.execute("INSERT INTO conversations (phone_number) VALUES ('+2'), ('+3')")
        site.execute("UPDATE conversations SET unread_count = 1")
    assert rings_until_marker() == 1
    site.execute("UPDATE dbsync.doorbell SET armed = false")
    assert not armed(site)
    site.execute("DELETE FROM conversations")
    assert rings_until_marker() == 0
    site.execute("UPDATE dbsync.doorbell SET armed = true")
    site.execute("TRUNCATE conversations CASCADE")
    assert rings_until_marker() == 1
    listener.close()


def test_idle_daemon_is_woken_by_notify_not_by_polling(pair: DbPair) -> None:
    site = pair.site()
    with Daemon(pair, "--poll-interval", "30"):
        wait_until(lambda: armed(site), 20, 0.02, "the idle daemon to arm the doorbell")
        for i in range(3):
            site.execute("INSERT INTO conversations (phone_number) VALUES (%s)", (f"+49151{i}",))
            started = time.monotonic()
            # Polling every 30 s cannot explain this: the notification woke it.
            wait_until(lambda: same(pair), 10, 0.01, "the insert to be applied")
            assert time.monotonic() - started < 5
    assert_same(pair)


# The daemon's Agent backend waits on a lock (the test's).
DAEMON_BLOCKED = """
SELECT count(*) = 1 FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'dbsync' AND wait_event_type = 'Lock'
"""


def rings(listener: psycopg.Connection, site: psycopg.Connection) -> int:
    """Notifications on 'dbsync' before a marker sent now: all earlier commits are delivered first."""
    site.execute("SELECT pg_notify('dbsync', 'marker')")
    for count, note in enumerate(listener.notifies(timeout=10)):
        if note.payload == "marker":
            return count
    raise AssertionError("the marker notification did not arrive")


def test_busy_daemon_disarms_so_writers_skip_notify(pair: DbPair) -> None:
    site, agent = pair.site(), pair.agent()
    listener = psycopg.connect(pair.site_dsn, autocommit=True)
    listener.execute("LISTEN dbsync")

    def commit_writes(tag: str) -> None:
        for i in range(5):  # five transactions: an insert, an update, a delete
            with site.transaction():
                site.execute("INSERT INTO conversations (phone_number) VALUES (%s)", (f"+{tag}{i}",))
            site.execute(
                "UPDATE conversations SET unread_count = unread_count + 1 WHERE phone_number = %s", (f"+{tag}{i}",)
            )
        site.execute("DELETE FROM conversations WHERE phone_number = %s", (f"+{tag}0",))

    # A busy daemon, held busy: a backlog whose first page an Agent lock blocks.
    blocker = psycopg.connect(pair.agent_dsn)  # not autocommit: the lock lasts until rollback
    blocker.execute("LOCK TABLE conversations IN SHARE MODE")
    site.execute("INSERT INTO conversations (phone_number) SELECT '+4915' || g FROM generate_series(1, 50) g")
    with Daemon(pair):
        wait_until(lambda: agent.execute(DAEMON_BLOCKED).fetchone() == (True,), 20, 0.02, "the daemon to be busy")
        assert not armed(site), "the busy daemon left the doorbell armed"
        commit_writes("busy")
        assert rings(listener, site) == 0, "writers notified while the daemon was busy"
        assert agent.execute(DAEMON_BLOCKED).fetchone() == (True,) and not armed(site)  # busy all along
        blocker.rollback()
        blocker.close()
        wait_until(lambda: same(pair), 30, 0.05, "the daemon to catch up")
        wait_until(lambda: armed(site), 20, 0.02, "the idle daemon to arm the doorbell")
        commit_writes("idle")
        assert rings(listener, site) >= 1, "writers did not notify the idle daemon"

        # Under a steady load the armed daemon disarms by itself, and arms again once idle.
        stop = threading.Event()

        def writer() -> None:
            with psycopg.connect(pair.site_dsn, autocommit=True) as conn:
                while not stop.is_set():
                    conn.execute("INSERT INTO conversations (phone_number) VALUES ('+4915100')")

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: not armed(site), 20, 0.01, "the busy daemon to disarm")
        finally:
            stop.set()
            for t in threads:
                t.join()
        wait_until(lambda: same(pair), 30, 0.05, "the daemon to catch up")
        wait_until(lambda: armed(site), 20, 0.02, "the daemon, idle again, to re-arm")
    listener.close()
    assert_same(pair)


def test_writer_that_missed_the_arming_is_still_picked_up_quickly(pair: DbPair) -> None:
    """A transaction whose trigger saw the doorbell disarmed, committing after the daemon armed
    it, never notifies: the arming fence must still find it, long before the 30 s poll."""
    site = pair.site()
    writer = psycopg.connect(pair.site_dsn)  # a transaction, left open
    writer.execute("INSERT INTO conversations (phone_number) VALUES ('+4915177')")
    assert not armed(site)
    with Daemon(pair, "--poll-interval", "30"):
        wait_until(lambda: armed(site), 20, 0.02, "the daemon to arm the doorbell")
        writer.commit()  # read "disarmed": no NOTIFY
        started = time.monotonic()
        wait_until(lambda: same(pair), 10, 0.01, "the unnotified commit to be applied")
        assert time.monotonic() - started < 5
    writer.close()
    assert_same(pair)


class InProcess:
    """The Replicator in a thread of this process, so a test can read its stats."""

    def __init__(self, settings: Settings) -> None:
        self.replicator = Replicator(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.replicator.run())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            self.error = exc

    def __enter__(self) -> InProcess:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.replicator.stop.set)
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the replicator did not stop"
        self.loop.close()
        if self.error is not None:
            raise self.error


def pgbench(pair: DbPair) -> Path:
    cluster = pair.site_server.cluster
    bindir = (
        cluster.bindir if cluster is not None else Path(os.environ.get("DBSYNC_TEST_PG_BINDIR") or default_bindir())
    )
    return bindir / "pgbench"


def test_a_notify_flood_costs_one_look_per_interval(pair: DbPair, tmp_path: Path) -> None:
    """Any role may NOTIFY dbsync thousands of times a second. Notifications only set an event,
    and the daemon acts on at most one per WAKE_INTERVAL: the flood costs a bounded number of
    looks at the log, not one per notification, and writes made meanwhile are still applied."""
    clients, each = 4, 5000
    script = tmp_path / "notify.sql"
    script.write_text("NOTIFY dbsync;\n")
    site = pair.site()
    with InProcess(pair.settings(poll_interval=30)) as daemon:
        stats = daemon.replicator.stats
        wait_until(lambda: armed(site), 20, 0.02, "the idle daemon to arm the doorbell")
        looks, started = stats.looks, time.monotonic()
        # A separate process, one NOTIFY per transaction, as flooding clients would send them.
        flood = f"{pgbench(pair)} -n -M simple -f {script} -c {clients} -j 2 -t {each}".split()
        flooder = subprocess.Popen(
            [*flood, pair.site_dsn],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        written = 0
        try:
            while flooder.poll() is None and written < 10:
                written += 1
                site.execute("INSERT INTO conversations (phone_number) VALUES (%s)", (f"+4916{written}",))
                wait_until(lambda n=written: rows(pair.agent_dsn, "conversations") == n, 10, 0.01, "a write to apply")
        finally:
            _, err = flooder.communicate(timeout=120)
        assert flooder.returncode == 0, err
        wait_until(lambda: stats.notifications >= clients * each, 30, 0.02, "every notification to arrive")
        looked, elapsed = stats.looks - looks, time.monotonic() - started
    assert written >= 1
    # Per interval one wake-up; each write adds a look that finds it and one that finds the end.
    bound = elapsed / WAKE_INTERVAL + 3 * written + 10
    print(f"{looked} looks for {clients * each} notifications in {elapsed:.2f} s, {written} writes")
    assert looked <= bound, f"{looked} looks for {clients * each} notifications in {elapsed:.1f} s (bound {bound:.0f})"
    assert_same(pair)
