"""The daemon survives every fault, injected for real (issue #3, item 9).

Links are cut and stalled by a TCP proxy (tests/proxy.py), backends are terminated, clusters are
stopped and started, the daemon is SIGKILLed and SIGTERMed, the Agent DB rejects rows and the
Site schema drifts. Every test ends with the Site and Agent tables identical.

Synchronisation is on polled conditions with deadlines. The only sleeps are the writers' pacing,
the random moments of the kill loop and the length of an outage, which is what is being tested.
Measured times are printed as `MEASURE ...` lines (run with -s to see them).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dbsync import migrations
from dbsync.daemon.runner import LOCK_CLASS
from dbsync.embedded.cluster import LocalCluster
from dbsync.status import Status, read_status
from tests.helpers import (
    WHATSAPP_TABLES,
    Daemon,
    DbPair,
    Server,
    assert_same,
    dbsync_cmd,
    replicate,
    same,
    wait_until,
)
from tests.proxy import Proxy

SOURCE = "site"
MESSAGE_STATUSES = ("sent", "delivered", "read", "failed")

# -- load ----------------------------------------------------------------------------------
def _uuid(rng: random.Random) -> uuid.UUID:
    """A random UUID from the writer's generator, so that a replayed seed writes the same keys."""
    return uuid.UUID(int=rng.getrandbits(128), version=4)


@dataclass
class _Rows:
    """What one writer thread created and still owns (no two writers touch the same row)."""

    conversations: dict[int, list[int]] = field(default_factory=dict)  # conversation -> its messages
    leads: list[int] = field(default_factory=list)
    messages: dict[int, int] = field(default_factory=dict)  # message -> its conversation


class Load:
    """Writer threads on the Site DB, always connected directly (never through a proxy).

    Counts what committed: per lead the `score = score + 1` increments, per message the
    `content = content || 'x'` appends. An operation whose connection broke has an unknown
    outcome: the rows it touched are marked uncertain and left out of the counter check.
    """

    def __init__(self, dsn: str, seed: int | str, threads: int = 2, pace: float = 0.003) -> None:
        self.dsn = dsn
        self.pace = pace
        self.ops = 0
        self.increments: collections.Counter[int] = collections.Counter()
        self.appends: dict[int, int] = {}
        self.uncertain: set[tuple[str, int]] = set()
        self.broken = 0  # operations that hit a connection error
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        # Each writer's choices (and the keys it makes) follow from the test's seed alone.
        self._threads = [
            threading.Thread(
                target=self._writer, args=(random.Random(f"{seed}:writer-{i}"),), name=f"writer-{i}", daemon=True
            )
            for i in range(threads)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        for t in self._threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self._threads), "a writer thread did not stop"
        if self.failures:
            raise AssertionError(f"writer failed: {self.failures[0]!r}") from self.failures[0]

    def wait_ops(self, n: int, timeout: float = 30) -> None:
        """Wait until `n` more operations have committed."""
        target = self.ops + n
        wait_until(lambda: self.ops >= target or self.failures, timeout, what=f"{n} more writes")
        assert not self.failures, self.failures

    def _writer(self, rng: random.Random) -> None:
        own = _Rows()
        conn: psycopg.Connection | None = None
        try:
            while not self._stop.is_set():
                if not self._running.is_set():
                    self._running.wait()
                    continue
                if conn is None or conn.closed:
                    try:
                        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                    except psycopg.OperationalError:
                        self._stop.wait(0.1)
                        continue
                touched: list[tuple[str, int]] = []
                try:
                    self._one(conn, rng, own, touched)
                    with self._lock:
                        self.ops += 1
                except psycopg.OperationalError:
                    with self._lock:
                        self.broken += 1
                        self.uncertain.update(touched)
                    conn.close()
                time.sleep(self.pace)  # pacing, not synchronisation
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.failures.append(exc)
        finally:
            if conn is not None:
                conn.close()

    def _one(self, conn: psycopg.Connection, rng: random.Random, own: _Rows, touched: list[tuple[str, int]]) -> None:
        r = rng.random()
        if r < 0.25 or len(own.leads) < 3:
            with conn.transaction():
                conv = conn.execute(
                    "INSERT INTO conversations (phone_number, contact_name) VALUES (%s, %s) RETURNING id",
                    (f"+{rng.randrange(10**11)}", f"contact {rng.randrange(1000)}"),
                ).fetchone()[0]  # type: ignore[index]
                lead = conn.execute(
                    "INSERT INTO leads (phone_number, name, conversation_id, attributes) "
                    "VALUES (%s, %s, %s, %s) RETURNING id",
                    (f"lead-{_uuid(rng)}", "lead", conv, json.dumps({"n": rng.randrange(100)})),
                ).fetchone()[0]  # type: ignore[index]
                msgs = [
                    conn.execute(
                        "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction, content) "
                        "VALUES (%s, %s, '+1', %s, 'm') RETURNING id",
                        (str(_uuid(rng)), conv, rng.choice(("inbound", "outbound"))),
                    ).fetchone()[0]  # type: ignore[index]
                    for _ in range(rng.randint(1, 3))
                ]
            own.conversations[conv] = msgs
            own.leads.append(lead)
            for m in msgs:
                own.messages[m] = conv
            with self._lock:
                self.increments[lead] += 0
                for m in msgs:
                    self.appends[m] = 0
        elif r < 0.5:
            lead = rng.choice(own.leads)
            touched.append(("leads", lead))
            conn.execute("UPDATE leads SET score = score + 1, updated_at = now() WHERE id = %s", (lead,))
            with self._lock:
                self.increments[lead] += 1
        elif r < 0.75 and own.messages:
            msg = rng.choice(list(own.messages))
            touched.append(("whatsapp_messages", msg))
            conn.execute(
                "UPDATE whatsapp_messages SET content = content || 'x', status = %s, updated_at = now() WHERE id = %s",
                (rng.choice(MESSAGE_STATUSES), msg),
            )
            with self._lock:
                self.appends[msg] += 1
        elif r < 0.85 and len(own.messages) >= 2:
            msgs = rng.sample(list(own.messages), min(len(own.messages), rng.randint(2, 5)))
            touched.extend(("whatsapp_messages", m) for m in msgs)
            with conn.transaction():
                conn.execute(
                    "UPDATE whatsapp_messages SET content = content || 'x', read_at = now() WHERE id = ANY(%s)", (msgs,)
                )
                conn.execute(
                    "UPDATE conversations SET unread_count = unread_count + 1, last_message_at = now() "
                    "WHERE id = ANY(%s)",
                    (list({own.messages[m] for m in msgs}),),
                )
            with self._lock:
                for m in msgs:
                    self.appends[m] += 1
        elif r < 0.95 and own.messages:
            msg = rng.choice(list(own.messages))
            touched.append(("whatsapp_messages", msg))
            conn.execute("DELETE FROM whatsapp_messages WHERE id = %s", (msg,))
            own.conversations[own.messages.pop(msg)].remove(msg)
            with self._lock:
                self.appends.pop(msg, None)
        elif len(own.conversations) > 5:
            # ON DELETE CASCADE deletes its messages, ON DELETE SET NULL updates its lead.
            conv = rng.choice(list(own.conversations))
            msgs = own.conversations[conv]
            touched.extend(("whatsapp_messages", m) for m in msgs)
            conn.execute("DELETE FROM conversations WHERE id = %s", (conv,))
            del own.conversations[conv]
            with self._lock:
                for m in msgs:
                    own.messages.pop(m, None)
                    self.appends.pop(m, None)
        else:
            return


def assert_counters(pair: DbPair, load: Load, *, exact: bool = True) -> int:
    """Each counted row holds exactly its committed increments, on the Site and on the Agent.

    Returns how many increments were checked. With `exact`, no operation may have had an unknown
    outcome (the Site was never disturbed).
    """
    if exact:
        assert not load.uncertain, f"{len(load.uncertain)} writes had an unknown outcome"
    checked = 0
    for table, expr, counter in (
        ("leads", "score", dict(load.increments)),
        ("whatsapp_messages", "length(content) - 1", load.appends),
    ):
        ids = [i for i in counter if (table, i) not in load.uncertain]
        query = f"SELECT id, {expr} FROM {table} WHERE id = ANY(%s)"
        with psycopg.connect(pair.site_dsn) as site, psycopg.connect(pair.agent_dsn) as agent:
            on_site: dict[int, int] = dict(site.execute(query, (ids,)).fetchall())  # type: ignore[arg-type]
            on_agent: dict[int, int] = dict(agent.execute(query, (ids,)).fetchall())  # type: ignore[arg-type]
        expected = {i: counter[i] for i in ids}
        assert on_site == expected, f"{table}: the Site lost or gained writes"
        assert on_agent == expected, f"{table}: the Agent does not hold each committed increment exactly once"
        checked += sum(expected.values())
    assert checked > 0
    return checked


# -- looking at the databases --------------------------------------------------------------
def status_of(pair: DbPair) -> Status:
    with psycopg.connect(pair.site_dsn, autocommit=True, connect_timeout=5) as site, psycopg.connect(
        pair.agent_dsn, autocommit=True, connect_timeout=5
    ) as agent:
        return read_status(site, agent, SOURCE)


def cli_status(pair: DbPair) -> dict[str, Any]:
    """`dbsync status --json` (exits 1 when unhealthy, and still prints the document)."""
    out = dbsync_cmd("status", "--json", env=pair.env())
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def converged(pair: DbPair, tables: tuple[str, ...] = WHATSAPP_TABLES) -> bool:
    try:
        return status_of(pair).events_behind == 0 and same(pair, tables)
    except psycopg.OperationalError:
        return False  # a cluster is (re)starting


def wait_converged(pair: DbPair, timeout: float = 30, tables: tuple[str, ...] = WHATSAPP_TABLES) -> float:
    """Wait until nothing is pending and the tables are identical; returns the seconds it took."""
    t0 = time.monotonic()
    wait_until(lambda: converged(pair, tables), timeout, 0.1, "the Agent DB to catch up")
    return time.monotonic() - t0


def events_applied(pair: DbPair) -> int:
    with psycopg.connect(pair.agent_dsn, autocommit=True) as agent:
        row = agent.execute("SELECT events_applied FROM dbsync.apply_progress WHERE source = %s", (SOURCE,)).fetchone()
    return row[0] if row else 0


def wait_applying(pair: DbPair, timeout: float = 30) -> None:
    """Wait until the daemon applies something new (it is connected and working)."""
    before = events_applied(pair)
    wait_until(lambda: events_applied(pair) > before, timeout, 0.05, "the daemon to apply new events")


# Advisory locks are per database: count only those taken in this Agent DB.
LOCKS = """
SELECT l.pid FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def lock_holders(pair: DbPair) -> list[int]:
    """Agent backends holding a dbsync advisory lock in this database."""
    with psycopg.connect(pair.agent_dsn, autocommit=True) as agent:
        return [r[0] for r in agent.execute(LOCKS, (LOCK_CLASS,)).fetchall()]


def dbsync_backends(dsn: str) -> list[int]:
    """Backends of the daemon: application_name 'dbsync' in this database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'dbsync' "
                "AND datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        ]


def terminate(dsn: str, pids: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))


def holder_pid(st: Status | dict[str, Any]) -> int | None:
    active = st["active_daemon"] if isinstance(st, dict) else st.active_daemon
    return int(active.rsplit(":", 1)[1]) if active else None


def rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


# -- fixtures ------------------------------------------------------------------------------
class Kit:
    """Daemons, loads and proxies of one test; whatever is left is stopped at teardown."""

    def __init__(self, tmp_path: Path, seed: int) -> None:
        self.tmp_path = tmp_path
        self.seed = seed  # the test's (conftest.py `seed`): DBSYNC_TEST_SEED replays it
        self.daemons: list[Daemon] = []
        self.loads: list[Load] = []
        self.proxies: list[Proxy] = []

    def daemon(self, pair: DbPair, *args: str) -> Daemon:
        d = Daemon(pair, *args, log_path=self.tmp_path / f"daemon-{len(self.daemons)}.log")
        self.daemons.append(d)
        return d

    def load(self, pair: DbPair, **kwargs: Any) -> Load:
        load = Load(pair.site_dsn, f"{self.seed}:load-{len(self.loads)}", **kwargs)
        self.loads.append(load)
        return load.start()

    def proxy(self, dsn: str) -> Proxy:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
        proxy = Proxy(str(parts.get("host") or "127.0.0.1"), int(parts.get("port") or 5432)).start()
        self.proxies.append(proxy)
        return proxy

    def log(self, d: Daemon) -> str:
        assert d.log_path is not None
        return d.log_path.read_text(errors="replace")

    def close(self) -> None:
        for load in self.loads:
            with contextlib.suppress(AssertionError):
                load.stop()
        for d in self.daemons:
            d.close()
        for proxy in self.proxies:
            proxy.close()
        for i, d in enumerate(self.daemons):  # shown when the test fails
            print(f"---- daemon-{i} (pid {d.proc.pid}, exit {d.proc.returncode}) ----")
            print(self.log(d)[-6000:])


@pytest.fixture
def kit(tmp_path: Path, seed: int) -> Iterator[Kit]:
    k = Kit(tmp_path, seed)
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small pages, so that a fault lands inside a batch as well as between batches."""
    monkeypatch.setenv("DBSYNC_BATCH_SIZE", "200")


def routed(pair: DbPair, *, site: Proxy | None = None, agent: Proxy | None = None) -> DbPair:
    """The same databases, seen through proxies (for the daemon only)."""
    return replace(
        pair,
        site_dsn=site.route(pair.site_dsn) if site else pair.site_dsn,
        agent_dsn=agent.route(pair.agent_dsn) if agent else pair.agent_dsn,
        _conns=[],
    )


@pytest.fixture(scope="module")
def own_clusters() -> Iterator[tuple[LocalCluster, LocalCluster]]:
    """A Site and an Agent cluster of our own, which these tests may stop and start."""
    bindir = os.environ.get("DBSYNC_TEST_PG_BINDIR")
    site = LocalCluster(Path(bindir) if bindir else None, name="fault-site").init().start()
    agent = LocalCluster(Path(bindir) if bindir else None, name="fault-agent").init().start()
    try:
        yield site, agent
    finally:
        site.destroy()
        agent.destroy()


@pytest.fixture
def own_pair(own_clusters: tuple[LocalCluster, LocalCluster]) -> Iterator[DbPair]:
    site, agent = own_clusters
    name = f"faults_{uuid.uuid4().hex[:8]}"
    for cluster in (site, agent):
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
    pair = DbPair(site.dsn(name), agent.dsn(name), Server(site.dsn(), site), Server(agent.dsn(), agent))
    migrations.apply(pair.site_dsn, "site", ["whatsapp"])
    migrations.apply(pair.agent_dsn, "agent", ["whatsapp"])
    try:
        yield pair
    finally:
        pair.close()
        for cluster in (site, agent):  # a failed test must not leave a cluster down for the next
            if not cluster.running:
                cluster.start()


def accepts_connections(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def hold(seconds: float, check: Callable[[], None] = lambda: None) -> None:
    """Keep an outage going for `seconds` (its length is the point), checking `check` meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check()
        time.sleep(0.1)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


# -- a, b: links cut ------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["site", "agent"])
def test_link_cut_repeatedly(pair: DbPair, kit: Kit, small_pages: None, side: str) -> None:
    """a/b: every connection of the daemon to one database dies, six times, under load."""
    dsn = pair.site_dsn if side == "site" else pair.agent_dsn
    proxy = kit.proxy(dsn)
    d = kit.daemon(routed(pair, **{side: proxy}))
    load = kit.load(pair)
    rng = random.Random(f"{kit.seed}:cuts")
    for _ in range(6):
        load.wait_ops(rng.randint(20, 200))  # a random amount of work between cuts
        wait_applying(pair)  # connected and in the middle of the work
        accepted = proxy.accepted
        assert proxy.cut() >= 1
        wait_until(lambda n=accepted: proxy.accepted > n, 15, what="the daemon to reconnect")  # type: ignore[misc]
    wait_applying(pair)
    load.stop()
    wait_converged(pair)
    assert d.proc.poll() is None
    assert error_lines(kit.log(d)), "the daemon reported none of the cuts"
    assert load.ops > 100
    assert_counters(pair, load)
    assert_same(pair)


# -- c: link stalled ------------------------------------------------------------------------
def test_agent_link_stalled(pair: DbPair, kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """c: the Agent link stops moving bytes for 5 s; the daemon gives up on it and recovers alone."""
    monkeypatch.setenv("DBSYNC_IO_TIMEOUT", "2")
    proxy = kit.proxy(pair.agent_dsn)
    d = kit.daemon(routed(pair, agent=proxy))
    load = kit.load(pair)
    wait_applying(pair)
    proxy.stall()
    hold(1)  # a commit already past the proxy may still land
    stalled_at = events_applied(pair)
    hold(4)
    # Nothing got through the stalled link, and the daemon noticed (its query timed out).
    assert events_applied(pair) == stalled_at
    wait_until(lambda: error_lines(kit.log(d)), 5, 0.1, "the daemon to report the stalled link")
    proxy.resume()
    t0 = time.monotonic()
    wait_applying(pair, timeout=20)
    recovered = time.monotonic() - t0
    load.stop()
    caught_up = wait_converged(pair)
    print(f"MEASURE stall: applying again {recovered:.2f} s after resume, converged {caught_up:.2f} s later")
    assert recovered < 10
    assert d.proc.poll() is None
    assert_counters(pair, load)
    assert_same(pair)


# -- d: backends terminated -----------------------------------------------------------------
def test_backends_terminated(pair: DbPair, kit: Kit, small_pages: None) -> None:
    """d: pg_terminate_backend of the daemon's Site backend, Agent backend, then both, under load."""
    d = kit.daemon(pair)
    load = kit.load(pair)
    for sides in (["site"], ["agent"], ["site", "agent"], ["agent"], ["site"]):
        wait_applying(pair)
        for side in sides:
            dsn = pair.site_dsn if side == "site" else pair.agent_dsn
            victims = dbsync_backends(dsn)
            assert victims, f"no dbsync backend on the {side} DB"
            terminate(dsn, victims)
            wait_until(
                lambda dsn=dsn, victims=victims: set(dbsync_backends(dsn)) - set(victims),  # type: ignore[misc]
                15, 0.05, f"the daemon to reconnect to the {side} DB",
            )
    wait_applying(pair)
    load.stop()
    wait_converged(pair)
    assert d.proc.poll() is None
    assert error_lines(kit.log(d)), "the daemon reported none of the terminations"
    assert_counters(pair, load)
    assert_same(pair)


# -- e: clusters stopped and started --------------------------------------------------------
@pytest.mark.slow
def test_agent_cluster_restart(own_pair: DbPair, kit: Kit) -> None:
    """e: the Agent cluster goes down for ~5 s while the Site keeps taking writes."""
    pair = own_pair
    cluster = pair.agent_server.cluster
    assert cluster is not None
    d = kit.daemon(pair)
    load = kit.load(pair)
    wait_applying(pair)
    log_from = len(kit.log(d))
    cluster.stop("fast")
    ops = load.ops
    hold(5, lambda: assert_alive(d))
    assert load.ops > ops, "the Site stopped taking writes"
    load.stop()  # writes continued throughout the outage
    cluster.start()
    t0 = time.monotonic()
    wait_until(lambda: accepts_connections(pair.agent_dsn), 30, 0.05, "the Agent DB to accept connections")
    wait_converged(pair)
    recovery = time.monotonic() - t0
    errors = error_lines(kit.log(d)[log_from:])
    print(f"MEASURE agent restart: caught up {recovery:.2f} s after the cluster was up; "
          f"{len(errors)} ERROR line(s) over the outage: {errors}")
    assert recovery < 10
    assert 1 <= len(errors) <= MAX_OUTAGE_ERRORS, errors
    assert d.proc.poll() is None
    assert_counters(pair, load, exact=True)
    assert_same(pair)


@pytest.mark.slow
def test_site_cluster_restart(own_pair: DbPair, kit: Kit) -> None:
    """e: the Site cluster goes down for ~5 s (the writers pause), then comes back."""
    pair = own_pair
    cluster = pair.site_server.cluster
    assert cluster is not None
    d = kit.daemon(pair)
    load = kit.load(pair)
    wait_applying(pair)
    load.pause()
    wait_converged(pair)  # the writers have paused and the daemon is idle
    log_from = len(kit.log(d))
    cluster.stop("fast")
    hold(5, lambda: assert_alive(d))
    cluster.start()
    t0 = time.monotonic()
    wait_until(lambda: accepts_connections(pair.site_dsn), 30, 0.05, "the Site DB to accept connections")
    # One write right away: the daemon must be back to apply it.
    with psycopg.connect(pair.site_dsn, autocommit=True) as site:
        conv = site.execute("INSERT INTO conversations (phone_number) VALUES ('+back') RETURNING id").fetchone()[0]  # type: ignore[index]
    wait_converged(pair)
    recovery = time.monotonic() - t0
    assert agent_has(pair, "public.conversations", conv)
    errors = error_lines(kit.log(d)[log_from:])
    print(f"MEASURE site restart: caught up {recovery:.2f} s after the cluster was up; "
          f"{len(errors)} ERROR line(s) over the outage: {errors}")
    assert recovery < 10
    assert 1 <= len(errors) <= MAX_OUTAGE_ERRORS, errors
    load.resume()
    load.wait_ops(100)
    load.stop()
    wait_converged(pair)
    assert d.proc.poll() is None
    assert_counters(pair, load, exact=False)
    assert_same(pair)


# One line per state, not per attempt (about ten attempts in 5 s here). The states a fast stop
# can show: the broken session, connecting while it shuts down (reset, or "shutting down"),
# connection refused, and "starting up".
MAX_OUTAGE_ERRORS = 4


def assert_alive(d: Daemon) -> None:
    assert d.proc.poll() is None, f"the daemon exited with {d.proc.returncode}"


# -- the server ends an idle session -------------------------------------------------------
@pytest.mark.parametrize("side", ["site", "agent"])
def test_server_ends_idle_session(pair: DbPair, kit: Kit, side: str) -> None:
    """d/e, made deterministic: the server ends the idle daemon's session with a FATAL error
    (pg_terminate_backend) and the close of the socket reaches the daemon late (the proxy holds
    the EOF, as a lost FIN would). The daemon must reconnect and carry on.

    asyncpg reads the FATAL before the close and puts the protocol in its error-consume state; a
    query issued then raises asyncpg.InternalClientError ("cannot switch to state 12; another
    operation (2) is in progress"), which the daemon must treat as a lost connection (it used to
    escape Replicator.run and end `dbsync run` with exit 1 after a restart or a terminate).
    """
    dsn = pair.site_dsn if side == "site" else pair.agent_dsn
    proxy = kit.proxy(dsn)
    d = kit.daemon(routed(pair, **{side: proxy}))
    site = pair.site()
    site.execute("INSERT INTO conversations (phone_number) VALUES ('+1')")
    wait_converged(pair)
    proxy.hold_eof()
    victims = dbsync_backends(dsn)
    assert victims
    terminate(dsn, victims)
    site.execute("INSERT INTO conversations (phone_number) VALUES ('+2')")
    wait_until(lambda: converged(pair) or d.proc.poll() is not None, 15, 0.1, "the daemon to catch up")
    assert d.proc.poll() is None, f"the daemon died: {kit.log(d)[-400:]}"
    proxy.release_eof()
    assert_same(pair)


# -- f: SIGKILL ------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_random_moments(pair: DbPair, kit: Kit, small_pages: None) -> None:
    """f: the daemon is SIGKILLed five times at random moments under load; no write is lost or
    applied twice in effect."""
    rng = random.Random(f"{kit.seed}:kills")
    load = kit.load(pair)
    while_active = 0
    for _ in range(5):
        d = kit.daemon(pair)
        # A random moment counted from when it holds the lock, so that every kill lands while it
        # applies (counted from the start, a loaded machine puts most kills before the connect).
        wait_until(lambda d=d: holder_pid(status_of(pair)) == d.proc.pid, 20, 0.02, "the daemon to become active")  # type: ignore[misc]
        time.sleep(rng.uniform(0.2, 1.5))  # the random moment: the point of the test
        while_active += holder_pid(status_of(pair)) == d.proc.pid
        d.kill()
    final = kit.daemon(pair)
    wait_applying(pair)
    load.stop()
    wait_converged(pair)
    assert final.proc.poll() is None
    checked = assert_counters(pair, load)
    print(f"MEASURE sigkill: {while_active} of 5 kills hit the active daemon; {load.ops} writes, "
          f"{checked} counted increments, all exactly once on the Agent")
    assert_same(pair)


# -- g: missed notifications ----------------------------------------------------------------
def test_missed_notifications(pair: DbPair, kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """g: changes committed while nobody listens are applied on (re)connect, with no later write.

    The poll interval is an hour, so only the drain on (re)connect can find them.
    """
    monkeypatch.setenv("DBSYNC_BATCH_SIZE", "100")
    site = pair.site()
    never = ("--poll-interval", "3600")

    def write(n: int) -> None:
        site.execute(
            "INSERT INTO conversations (phone_number) SELECT '+' || g FROM generate_series(1, %s) AS g", (n,)
        )
        site.execute("UPDATE leads SET score = score + 1")

    site.execute("INSERT INTO leads (phone_number) VALUES ('a'), ('b')")
    write(20)  # before the daemon ever ran
    d = kit.daemon(pair, *never)
    wait_converged(pair, 15)
    d.kill()
    write(20)  # while it is dead
    d = kit.daemon(pair, *never)
    wait_converged(pair, 15)
    d.kill()

    # While it reconnects: the Site link is cut in the middle of a backlog (so the daemon is
    # busy and notices at once) and new connections are refused; what is written meanwhile
    # rings no bell.
    proxy = kit.proxy(pair.site_dsn)
    write(20000)
    d = kit.daemon(routed(pair, site=proxy), *never)
    wait_until(lambda: events_applied(pair) > 0, 15, 0.01, "the daemon to start on the backlog")
    proxy.reject()
    proxy.cut()
    wait_until(lambda: error_lines(kit.log(d)), 15, 0.05, "the daemon to notice the cut")
    assert status_of(pair).events_behind > 0
    write(20)
    proxy.accept()
    wait_converged(pair, 15)
    assert d.proc.poll() is None
    assert_same(pair)


# -- h: several daemons ---------------------------------------------------------------------
def test_one_active_daemon_and_takeover(pair: DbPair, kit: Kit) -> None:
    """h: three daemons start at once; exactly one applies; when it is killed another takes over."""
    daemons = [kit.daemon(pair) for _ in range(3)]
    pids = {d.proc.pid: d for d in daemons}
    load = kit.load(pair)
    wait_until(lambda: len(dbsync_backends(pair.agent_dsn)) >= 3, 20, 0.05, "all three daemons to connect")
    wait_applying(pair)
    assert len(lock_holders(pair)) == 1
    st = cli_status(pair)
    active = holder_pid(st)
    assert active in pids, st
    assert all(d.proc.poll() is None for d in daemons)

    pids[active].kill()
    t0 = time.monotonic()

    def taken_over() -> int | None:
        pid = holder_pid(status_of(pair))
        return pid if pid is not None and pid != active and len(lock_holders(pair)) == 1 else None

    successor = wait_until(taken_over, 15, 0.02, "a standby to take over")
    wait_applying(pair)
    takeover = time.monotonic() - t0
    print(f"MEASURE takeover: {takeover:.2f} s from SIGKILL of the active daemon to the successor applying")
    assert takeover < 10
    assert successor in pids and pids[successor].proc.poll() is None
    assert len(lock_holders(pair)) == 1
    load.stop()
    wait_converged(pair)
    assert holder_pid(cli_status(pair)) == successor
    assert_counters(pair, load)
    assert_same(pair)


# -- i: graceful stop -----------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_stop(pair: DbPair, kit: Kit, small_pages: None, signum: signal.Signals) -> None:
    """i: a stop signal under load: exit 0 within 5 s; a restarted daemon carries on."""
    load = kit.load(pair)
    for _ in range(2):
        d = kit.daemon(pair)
        wait_applying(pair)
        t0 = time.monotonic()
        d.proc.send_signal(signum)
        code = d.proc.wait(timeout=5)
        took = time.monotonic() - t0
        print(f"MEASURE {signum.name}: exit {code} after {took:.2f} s")
        assert code == 0, kit.log(d)
        assert not error_lines(kit.log(d))
    d = kit.daemon(pair)
    wait_applying(pair)
    load.stop()
    wait_converged(pair)
    assert_counters(pair, load)
    assert_same(pair)


# -- j, k: poison events --------------------------------------------------------------------
CAP = "ALTER TABLE public.leads ADD CONSTRAINT agent_score_cap CHECK (score < 1000)"
UNCAP = "ALTER TABLE public.leads DROP CONSTRAINT agent_score_cap"


def log_seqs(pair: DbPair, table: str, key: int) -> list[int]:
    """The sync-log seqs of one row's events, in order."""
    with psycopg.connect(pair.site_dsn) as site:
        return [
            r[0]
            for r in site.execute(
                "SELECT l.seq FROM dbsync.sync_log l JOIN dbsync.replicated_tables t USING (table_id) "
                "CROSS JOIN LATERAL dbsync.log_keys(l.pk, l.keys, t.key_columns) AS k "
                "WHERE t.schema_name || '.' || t.table_name = %s AND (k.key ->> 'id')::bigint = %s "
                "ORDER BY l.seq",
                (table, key),
            ).fetchall()
        ]


def agent_has(pair: DbPair, table: str, key: int) -> bool:
    with psycopg.connect(pair.agent_dsn) as agent:
        return agent.execute(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE id = %s)", (key,)).fetchone()[0]  # type: ignore[index]


def test_poison_stop(pair: DbPair, kit: Kit) -> None:
    """j: the Agent DB rejects a row; policy stop retries forever, skips nothing, says why."""
    site, agent = pair.site(), pair.agent()
    d = kit.daemon(pair)
    site.execute("INSERT INTO conversations (phone_number) VALUES ('+0')")
    wait_converged(pair)
    agent.execute(CAP)
    before = site.execute("INSERT INTO conversations (phone_number) VALUES ('+1') RETURNING id").fetchone()[0]  # type: ignore[index]
    bad = site.execute("INSERT INTO leads (phone_number, score) VALUES ('bad', 5000) RETURNING id").fetchone()[0]  # type: ignore[index]
    later_conv = site.execute("INSERT INTO conversations (phone_number) VALUES ('+2') RETURNING id").fetchone()[0]  # type: ignore[index]
    later_lead = site.execute("INSERT INTO leads (phone_number, score) VALUES ('ok', 1) RETURNING id").fetchone()[0]  # type: ignore[index]
    (seq,) = log_seqs(pair, "public.leads", bad)

    st = wait_until(lambda: (s := cli_status(pair))["last_error"] and s, 20, 0.2, "status to show the error")
    error = st["last_error"]
    assert "public.leads" in error and f"seq {seq}" in error, error
    assert re.search(rf'"id"\s*:\s*"?{bad}\b', error), error  # the key, however it is rendered
    assert 'violates check constraint "agent_score_cap"' in error, error
    assert not st["healthy"] and any("apply is failing" in p for p in st["problems"])
    assert error.splitlines()[0] in kit.log(d)
    # It keeps retrying (the error is recorded again), one log line for the whole episode.
    first_at = st["last_error_at"]
    wait_until(lambda: cli_status(pair)["last_error_at"] != first_at, 20, 0.2, "another attempt")
    assert len(error_lines(kit.log(d))) == 1, error_lines(kit.log(d))
    # Nothing after it is applied (nothing is skipped either: they wait).
    for table, key in (("public.leads", bad), ("public.conversations", later_conv), ("public.leads", later_lead)):
        assert not agent_has(pair, table, key), (table, key)
    del before  # may or may not share the failing page

    agent.execute(UNCAP)
    wait_converged(pair)
    for table, key in (("public.leads", bad), ("public.conversations", later_conv), ("public.leads", later_lead)):
        assert agent_has(pair, table, key), (table, key)
    st = cli_status(pair)
    assert st["last_error"] is None and st["healthy"], st
    assert d.proc.poll() is None
    assert_same(pair)


def test_poison_park(pair: DbPair, kit: Kit) -> None:
    """k: policy park sets aside the rejected event and every later event of its key; the rest
    flows; `dbsync retry` re-applies them in order once the cause is fixed.

    The later events of the key come in pages after the first park, which look parked keys up
    (that lookup once failed on every page: a schema-qualified multi-array unnest, which
    PostgreSQL does not accept, halted replication of every key).
    """
    site, agent = pair.site(), pair.agent()
    d = kit.daemon(pair, "--poison-policy", "park")
    site.execute("INSERT INTO conversations (phone_number) VALUES ('+0')")
    wait_converged(pair)
    agent.execute(CAP)
    def parked() -> list[int]:
        return [r[0] for r in agent.execute("SELECT seq FROM dbsync.parked_events WHERE source = %s ORDER BY seq",
                                            (SOURCE,)).fetchall()]

    bad = site.execute("INSERT INTO leads (phone_number, score) VALUES ('bad', 5000) RETURNING id").fetchone()[0]  # type: ignore[index]
    good = site.execute("INSERT INTO leads (phone_number, score) VALUES ('good', 1) RETURNING id").fetchone()[0]  # type: ignore[index]
    # The rejected insert is parked first, on its own: in one page with a later, valid image of the
    # same row it would be coalesced away (state replication: only the last image is written).
    wait_until(lambda: parked() == log_seqs(pair, "public.leads", bad), 20, 0.05, "the rejected insert to be parked")
    wait_until(lambda: agent_has(pair, "public.leads", good), 20, 0.05, "the other key to flow")
    # Later events of the key, in a page with other keys' events...
    site.execute("UPDATE leads SET score = 6000 WHERE id = %s", (bad,))  # would be rejected again
    site.execute("UPDATE leads SET score = 7, name = 'fixed' WHERE id = %s", (bad,))  # fine, but must wait
    conv = site.execute("INSERT INTO conversations (phone_number) VALUES ('+3') RETURNING id").fetchone()[0]  # type: ignore[index]
    site.execute("UPDATE leads SET score = score + 1 WHERE id = %s", (good,))
    wait_until(lambda: agent_has(pair, "public.conversations", conv), 20, 0.05, "the other keys to flow")
    # ... and in a later page.
    site.execute("UPDATE leads SET email = 'x@example.com' WHERE id = %s", (bad,))
    site.execute("INSERT INTO conversations (phone_number) VALUES ('+4')")
    seqs = log_seqs(pair, "public.leads", bad)
    assert len(seqs) == 4
    # Each page parks the key once, as its row at the batch's snapshot (the log holds keys): the
    # rejected insert first, then the key's last event of every later page, held back behind it.
    wait_until(lambda: parked()[-1:] == seqs[-1:], 20, 0.05, f"the last of seqs {seqs} to be parked")
    held = parked()
    assert held[0] == seqs[0] and set(held) <= set(seqs), (held, seqs)
    wait_until(lambda: status_of(pair).events_behind == 0, 20, 0.05, "the other events to be applied")
    assert not agent_has(pair, "public.leads", bad)
    with psycopg.connect(pair.agent_dsn) as conn:
        assert conn.execute("SELECT score FROM leads WHERE id = %s", (good,)).fetchone() == (2,)
    rows = agent.execute("SELECT seq, table_name, error FROM dbsync.parked_events ORDER BY seq").fetchall()
    assert all(r[1] == "public.leads" for r in rows)
    assert 'violates check constraint "agent_score_cap"' in rows[0][2]
    assert all("held back" in r[2] for r in rows[1:]), rows  # not even tried: order per key holds
    st = cli_status(pair)
    assert st["parked_events"] == len(held) and not st["healthy"], st
    assert any("parked" in p for p in st["problems"]), st
    assert "parked" in kit.log(d)

    agent.execute(UNCAP)
    out = dbsync_cmd("retry", env=pair.env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all parked events applied" in out.stdout
    wait_converged(pair)
    assert parked() == []
    with psycopg.connect(pair.agent_dsn) as conn:
        assert conn.execute("SELECT score, name, email FROM leads WHERE id = %s", (bad,)).fetchone() == (
            7, "fixed", "x@example.com"
        )
    st = cli_status(pair)
    assert st["parked_events"] == 0 and st["healthy"], st
    assert d.proc.poll() is None
    assert_same(pair)


# -- l: schema drift ------------------------------------------------------------------------
def test_schema_drift(pair: DbPair, kit: Kit) -> None:
    """l: a column added on the Site stops replication with an error naming it; once the Agent
    has it too, replication resumes by itself with nothing lost."""
    site, agent = pair.site(), pair.agent()
    d = kit.daemon(pair)
    site.execute("INSERT INTO leads (phone_number) VALUES ('before')")
    wait_converged(pair)
    site.execute("ALTER TABLE leads ADD COLUMN tier text NOT NULL DEFAULT 'silver'")
    lead = site.execute("INSERT INTO leads (phone_number, tier) VALUES ('drift', 'gold') RETURNING id").fetchone()[0]  # type: ignore[index]
    conv = site.execute("INSERT INTO conversations (phone_number) VALUES ('+9') RETURNING id").fetchone()[0]  # type: ignore[index]
    site.execute("UPDATE leads SET score = 5 WHERE phone_number = 'before'")

    st = wait_until(lambda: (s := cli_status(pair))["last_error"] and s, 20, 0.2, "status to show the drift")
    assert "tier" in st["last_error"] and "public.leads" in st["last_error"], st["last_error"]
    assert not st["healthy"]
    wait_until(lambda: any("tier" in line for line in error_lines(kit.log(d))), 10, 0.1, "the drift in the log")
    assert not agent_has(pair, "public.leads", lead)
    assert not agent_has(pair, "public.conversations", conv)  # nothing after it is applied either

    agent.execute("ALTER TABLE leads ADD COLUMN tier text NOT NULL DEFAULT 'silver'")
    wait_converged(pair)
    with psycopg.connect(pair.agent_dsn) as conn:
        assert conn.execute("SELECT tier FROM leads WHERE id = %s", (lead,)).fetchone() == ("gold",)
    assert cli_status(pair)["last_error"] is None
    assert d.proc.poll() is None
    assert_same(pair)


# -- m: bounded memory ----------------------------------------------------------------------
BIG_DDL = "CREATE TABLE public.big (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0, payload text NOT NULL)"


@pytest.mark.slow
def test_bounded_memory(pair: DbPair, kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """m: a 300k-row transaction plus 200k single-row transactions, applied from one backlog
    with pages of 5000, in bounded memory."""
    monkeypatch.setenv("DBSYNC_BATCH_SIZE", "5000")
    replicate(pair, BIG_DDL, "public.big")
    site = pair.site()
    t0 = time.monotonic()
    site.execute(
        "INSERT INTO big (id, payload) "
        "SELECT g, rpad(md5(g::text), 200, md5((-g)::text)) FROM generate_series(1, 300000) AS g"
    )
    # 200k single-row events, one transaction each (COMMIT inside DO: no client round trips).
    site.execute(
        "DO $$ BEGIN FOR i IN 1..200000 LOOP "
        "UPDATE public.big SET n = n + 1 WHERE id = 1 + (i * 7919) % 300000; COMMIT; END LOOP; END $$"
    )
    written = time.monotonic() - t0
    assert status_of(pair).events_behind == 500_000
    d = kit.daemon(pair)
    t1 = time.monotonic()
    # Cheap polling only (comparing 300k rows would compete with the daemon for the two cores).
    wait_until(lambda: status_of(pair).events_behind == 0, 240, 1.0, "the backlog to be applied")
    applied = time.monotonic() - t1
    peak_mb = rss_peak_kb(d.proc.pid) / 1024
    assert d.terminate() == 0
    print(f"MEASURE memory: backlog of 500k events written in {written:.1f} s, applied in {applied:.1f} s, "
          f"daemon peak RSS (VmHWM) {peak_mb:.1f} MB")
    assert peak_mb < 250
    assert_same(pair, ("public.big", *WHATSAPP_TABLES))


def test_idle_daemon_notices_the_end_of_its_listening_session_alone(pair: DbPair, kit: Kit) -> None:
    """Only the Site session that LISTENs is ended while the daemon idles (armed, polling
    hourly). Its termination wakes the daemon for a look, and that look works: it reads through
    the other Site session and the armed doorbell needs no statement. The daemon must still
    reconnect, not go back to a wait that only a notification on the dead session could end (it
    lost this race now and then when test_idle_daemon_notices_a_dead_site_link_at_once ended
    both sessions)."""
    site = pair.site()
    d = kit.daemon(pair, "--poll-interval", "3600")
    wait_until(
        lambda: site.execute("SELECT armed FROM dbsync.doorbell").fetchone()[0],  # type: ignore[index]
        20, 0.02, "the idle daemon to arm the doorbell",
    )
    # The daemon's two Site sessions; the short connections that look for write-back once the
    # daemon is up (daemon/service.py) come and go meanwhile.
    before = set(wait_until(lambda: len(b := dbsync_backends(pair.site_dsn)) == 2 and b, 15, 0.02, "two Site sessions"))
    listening = site.execute(  # the Site session connects first, the reader after it
        "SELECT pid FROM pg_stat_activity WHERE pid = ANY (%s) ORDER BY backend_start LIMIT 1", (list(before),)
    ).fetchone()
    assert listening is not None and len(before) == 2
    terminate(pair.site_dsn, [listening[0]])
    wait_until(lambda: set(dbsync_backends(pair.site_dsn)) - before, 15, 0.02, "the daemon to reconnect to the Site")
    site.execute("INSERT INTO conversations (phone_number) VALUES ('+4915100000043')")
    wait_converged(pair, 10)
    assert d.proc.poll() is None
    assert_same(pair)


def test_idle_daemon_notices_a_dead_site_link_at_once(pair: DbPair, kit: Kit) -> None:
    """A Site link that dies while the daemon waits (armed, polling hourly) must not leave it
    deaf: the termination wakes it, it reconnects, re-arms, and the next write is applied."""
    site = pair.site()
    d = kit.daemon(pair, "--poll-interval", "3600")
    wait_until(
        lambda: site.execute("SELECT armed FROM dbsync.doorbell").fetchone()[0],  # type: ignore[index]
        20, 0.02, "the idle daemon to arm the doorbell",
    )
    terminate(pair.site_dsn, dbsync_backends(pair.site_dsn))
    wait_until(lambda: dbsync_backends(pair.site_dsn), 15, 0.02, "the daemon to reconnect to the Site")
    wait_until(
        lambda: site.execute("SELECT armed FROM dbsync.doorbell").fetchone()[0],  # type: ignore[index]
        20, 0.02, "the daemon to re-arm the doorbell",
    )
    site.execute("INSERT INTO conversations (phone_number) VALUES ('+4915100000042')")
    wait_converged(pair, 10)
    assert d.proc.poll() is None
    assert_same(pair)
