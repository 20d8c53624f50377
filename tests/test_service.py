"""`dbsync run` as a service: systemd notifications, /metrics and health endpoints, alerts, logs.

Every test runs the real daemon as a subprocess and talks to it the way systemd, Prometheus, a
load balancer and a webhook receiver would: over a real datagram socket, real HTTP, real TCP.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dbsync.embedded.cluster import free_port
from tests.helpers import Daemon, DbPair, count, dbsync_cmd, same, wait_until

SECRET = "s3cret-Pa55word"


# -- a fake systemd: the notify socket -----------------------------------------------------------
class NotifySocket:
    """The AF_UNIX datagram socket systemd would own; collects sd_notify messages."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def _receive(self, deadline: float) -> bool:
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return False
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return True

    def wait_for(
        self,
        predicate: Callable[[dict[str, str]], bool],
        timeout: float = 30,
        *,
        after: int = 0,
        what: str = "a notification",
    ) -> int:
        """Index of the first message from `after` on that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        index = after
        while True:
            while index < len(self.messages):
                if predicate(self.messages[index][1]):
                    return index
                index += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; got {self.texts()}")
            self._receive(deadline)

    def drain(self) -> None:
        """Take in everything already sent."""
        while self._receive(time.monotonic()):
            pass

    def collect(self, seconds: float) -> list[tuple[float, dict[str, str]]]:
        """Everything that arrives in the next `seconds` (for asserting what does not arrive)."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._receive(deadline)
        return self.messages[start:]

    def texts(self) -> list[dict[str, str]]:
        return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], NotifySocket]]:
    """NOTIFY_SOCKET for the daemons this test starts: call with "path" or "abstract"."""
    opened: list[NotifySocket] = []

    def make(kind: str, watchdog_usec: int = 1_000_000) -> NotifySocket:
        name = f"dbsync-test-{os.getpid()}-{len(opened)}"
        address = f"@{name}" if kind == "abstract" else str(tmp_path / f"{len(opened)}.sock")
        sock = NotifySocket(address)
        opened.append(sock)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        monkeypatch.setenv("WATCHDOG_USEC", str(watchdog_usec))
        return sock

    yield make
    for sock in opened:
        sock.close()


# -- a fake alert receiver -----------------------------------------------------------------------
class Webhook:
    """An HTTP server on 127.0.0.1 that records the JSON it is POSTed; can fail the first posts."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        self.fail_first = fail_first
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    hook.attempts += 1
                    failing = hook.attempts <= hook.fail_first
                    if not failing:
                        hook.received.append(json.loads(body))
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        # The path stands for a token, as in Slack's URLs: it must never be logged.
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{SECRET}"

    def messages(self, alert: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.received if alert in (None, m["alert"]) and status in (None, m["status"])]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Callable[..., Webhook]]:
    made: list[Webhook] = []

    def make(fail_first: int = 0) -> Webhook:
        made.append(Webhook(fail_first))
        return made[-1]

    yield make
    for hook in made:
        hook.close()


# -- scraping ------------------------------------------------------------------------------------
def get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)


def metrics(port: int) -> dict[str, float]:
    """The scrape as {'name{labels}': value}."""
    answer = get(port, "/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for line in answer.text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def scrape_when(port: int, predicate: Callable[[dict[str, float]], bool]) -> dict[str, float] | None:
    scrape = metrics(port)
    return scrape if predicate(scrape) else None


def probe(port: int, path: str) -> httpx.Response | None:
    """The answer, or None while nothing listens yet."""
    try:
        return get(port, path)
    except httpx.TransportError:
        return None


def serving(port: int) -> bool:
    answer = probe(port, "/healthz")
    return answer is not None and answer.status_code == 200


def ready(port: int) -> httpx.Response | None:
    answer = probe(port, "/readyz")
    return answer if answer is not None and answer.status_code == 200 else None


def not_ready(port: int, reason: str) -> httpx.Response | None:
    answer = probe(port, "/readyz")
    return answer if answer is not None and answer.status_code == 503 and reason in answer.text else None


# -- the Site and Agent DBs ----------------------------------------------------------------------
def insert_leads(pair: DbPair, *names: str) -> None:
    site = pair.site()
    for name in names:
        site.execute("INSERT INTO leads (phone_number, name) VALUES (%s, %s)", (f"+{abs(hash(name))}", name))


def poison(pair: DbPair) -> None:
    """An Agent DB constraint the Site DB does not have, and a Site row that breaks it."""
    pair.agent().execute("ALTER TABLE leads ADD CONSTRAINT no_poison CHECK (name IS DISTINCT FROM 'poison')")
    insert_leads(pair, "poison")


def cure(pair: DbPair) -> None:
    pair.agent().execute("ALTER TABLE leads DROP CONSTRAINT no_poison")


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def status(pair: DbPair, *extra: str) -> tuple[int, str]:
    proc = dbsync_cmd("status", "--site-dsn", pair.site_dsn, "--agent-dsn", pair.agent_dsn, *extra)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout


# -- systemd -------------------------------------------------------------------------------------
def test_notify_ready_status_watchdog_stopping(
    pair: DbPair, notify: Callable[..., NotifySocket], tmp_path: Path
) -> None:
    """READY once connected, STATUS with the lag, WATCHDOG at least every WATCHDOG_USEC/2 even
    with a poll interval far longer than that, STOPPING on SIGTERM; a standby reports and pings too."""
    systemd = notify("abstract", watchdog_usec=1_000_000)
    insert_leads(pair, "Ann", "Ben")
    with Daemon(pair, "--poll-interval", "30", log_path=tmp_path / "active.log") as daemon:
        ready_at = systemd.wait_for(lambda m: m.get("READY") == "1", what="READY=1")
        assert systemd.messages[ready_at][1]["STATUS"].startswith("applying")
        systemd.wait_for(
            lambda m: m.get("STATUS", "").startswith("applying; lag ") and " 0 events behind" in m["STATUS"],
            after=ready_at,
            what="STATUS with no events behind",
        )
        wait_until(lambda: same(pair), what="the rows to replicate")

        # Idle, with a 30 s poll interval: pings still come at least every 0.5 s.
        at = len(systemd.messages)
        pings = []
        for _ in range(8):
            at = systemd.wait_for(lambda m: m.get("WATCHDOG") == "1", timeout=5, after=at, what="a watchdog ping")
            pings.append(systemd.messages[at][0])
            at += 1
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.5 + 0.2, gaps  # half the interval, plus scheduling slack

        # A second daemon for the same source is a standby: ready (systemd would otherwise time
        # the start out), says so, and pings.
        standby_sock = notify("path", watchdog_usec=1_000_000)
        with Daemon(pair, log_path=tmp_path / "standby.log") as standby:
            at = standby_sock.wait_for(lambda m: m.get("READY") == "1", what="the standby's READY=1")
            assert standby_sock.messages[at][1]["STATUS"] == "standby"
            standby_sock.wait_for(lambda m: m.get("WATCHDOG") == "1", after=at, what="the standby's ping")
            assert standby.terminate() == 0
        standby_sock.wait_for(lambda m: m.get("STOPPING") == "1", timeout=5, what="the standby's STOPPING=1")

        # SIGHUP without a config file: nothing to read again; said so, and the daemon carries on.
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "there is no config file" in log_text(tmp_path / "active.log"), what="the SIGHUP log line")
        insert_leads(pair, "Cem")
        after_hup = len(systemd.messages)
        systemd.wait_for(lambda m: m.get("WATCHDOG") == "1", after=after_hup, what="a ping after SIGHUP")
        wait_until(lambda: same(pair), what="replication after SIGHUP")

        assert daemon.terminate() == 0
    systemd.wait_for(lambda m: m.get("STOPPING") == "1", timeout=5, what="STOPPING=1")


def test_watchdog_stops_while_the_loop_hangs(pair: DbPair, notify: Callable[..., NotifySocket], tmp_path: Path) -> None:
    """The pings come from the replication loop itself: a page stuck on a lock stops them, while
    the process (and /healthz) stays alive; /readyz and the lag tell why."""
    systemd = notify("path", watchdog_usec=1_000_000)
    port = free_port()
    with Daemon(pair, "--http", f"127.0.0.1:{port}", "--lag-threshold", "1", log_path=tmp_path / "d.log"):
        wait_until(lambda: ready(port), what="/readyz 200")
        blocker = psycopg.connect(pair.agent_dsn)  # not autocommit: the lock lasts until rollback
        try:
            blocker.execute("LOCK TABLE leads IN ACCESS EXCLUSIVE MODE")
            insert_leads(pair, "Dora")
            watcher = pair.agent()
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbsync' AND wait_event_type = 'Lock'"
            )
            wait_until(
                lambda: watcher.execute(waiting).fetchone() == (1,), what="the daemon's apply to wait on the lock"
            )
            # From now on the loop is inside a step: what it sent before has arrived, and for two
            # watchdog intervals it sends no ping.
            systemd.drain()
            quiet = systemd.collect(2.0)
            assert not [m for _, m in quiet if "WATCHDOG" in m], quiet
            assert get(port, "/healthz").status_code == 200
            answer = wait_until(lambda: not_ready(port, "over the threshold"), what="/readyz 503 for lag")
            assert answer.text.startswith("not ready: lag ")
            assert metrics(port)["dbsync_lag_events"] == 1
        finally:
            blocker.rollback()
            blocker.close()
        resumed = len(systemd.messages)
        systemd.wait_for(lambda m: m.get("WATCHDOG") == "1", after=resumed, what="pings after the lock is gone")
        wait_until(lambda: same(pair), what="the stuck page to apply")
        wait_until(lambda: ready(port), what="/readyz 200 again")


def test_sighup_reloads_the_config_file(pair: DbPair, notify: Callable[..., NotifySocket], tmp_path: Path) -> None:
    """SIGHUP: the live settings change in the running process (pages of the new batch size,
    debug lines), the others are named as needing a restart, systemd sees RELOADING=1 and READY=1,
    and a broken file is refused in one line while the daemon keeps replicating as before."""
    systemd = notify("path")
    port = free_port()
    log = tmp_path / "daemon.log"
    conf = tmp_path / "dbsync.toml"
    conf.write_text("batch_size = 1000\nlag_threshold = 5\n")
    site = pair.site()

    def pages_for(*names: str) -> float:
        """Pages the daemon took for these leads, inserted in one transaction."""
        before = metrics(port)
        with site.transaction():
            for name in names:
                site.execute("INSERT INTO leads (phone_number, name) VALUES (%s, %s)", (f"+1{len(name)}{name}", name))
        wait_until(lambda: same(pair), what="the new leads to replicate")
        total = before["dbsync_batch_size_sum"] + len(names)
        after = wait_until(
            lambda: scrape_when(port, lambda m: m["dbsync_batch_size_sum"] == total), what="the pages' metrics"
        )
        return after["dbsync_batch_size_count"] - before["dbsync_batch_size_count"]

    def reload(text: str, line: str) -> dict[str, str]:
        """Write the file, SIGHUP, wait for the log line; the RELOADING=1 message."""
        conf.write_text(text)
        at = len(systemd.messages)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: line in log_text(log), what=f"the log line {line!r}")
        reloading = systemd.wait_for(lambda m: m.get("RELOADING") == "1", after=at, what="RELOADING=1")
        systemd.wait_for(lambda m: m.get("READY") == "1", after=reloading, what="READY=1 after the reload")
        return systemd.messages[reloading][1]

    with Daemon(pair, "--config", str(conf), "--http", f"127.0.0.1:{port}", log_path=log) as daemon:
        systemd.wait_for(lambda m: m.get("READY") == "1", what="READY=1")
        wait_until(lambda: ready(port), what="/readyz 200")
        assert pages_for("a1", "a2", "a3", "a4", "a5", "a6") == 1
        assert "batch opened" not in log_text(log)  # a debug line

        message = reload(
            'batch_size = 2\nlag_threshold = 5\nlog_level = "debug"\nsource = "other"\n',
            "configuration reloaded: batch_size=2, log_level=debug",
        )
        sent_at = int(message["MONOTONIC_USEC"]) / 1e6
        assert abs(time.clock_gettime(time.CLOCK_MONOTONIC) - sent_at) < 60
        assert "configuration reload: source changed but needs a restart" in log_text(log)
        assert pages_for("b1", "b2", "b3", "b4", "b5", "b6") == 3
        assert "batch opened: 6 events" in log_text(log)

        reload("batch_size = 0\n", "configuration reload refused, the old settings stay in use: ")
        refusal = [line for line in log_text(log).splitlines() if "reload refused" in line]
        assert len(refusal) == 1 and "batch_size must be a positive int, got 0" in refusal[0], refusal
        assert daemon.proc.poll() is None
        assert pages_for("c1", "c2", "c3", "c4") == 2  # still the batch size of the last good file
        assert ready(port)
        assert daemon.terminate() == 0
    text = log_text(log)
    assert "Traceback" not in text and "password" not in text


def test_sighup_switches_to_park_and_turns_the_webhook_on(
    pair: DbPair, webhook: Callable[..., Webhook], tmp_path: Path
) -> None:
    """A daemon stuck on a poison event under policy stop, with no webhook: a reload to policy
    park and a webhook parks the event, replication goes on, and the stall's recovery is POSTed."""
    hook = webhook()
    port = free_port()
    log = tmp_path / "daemon.log"
    conf = tmp_path / "dbsync.toml"
    conf.write_text("lag_threshold = 1\n")
    with Daemon(pair, "--config", str(conf), "--http", f"127.0.0.1:{port}", log_path=log) as daemon:
        wait_until(lambda: ready(port), what="/readyz 200")
        poison(pair)
        wait_until(lambda: "alert stalled: failing for" in log_text(log), what="the stalled alert")
        conf.write_text(f'lag_threshold = 1\npoison_policy = "park"\nalert_webhook = "{hook.url}"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: scrape_when(port, lambda m: m["dbsync_parked_events"] == 1), what="the event to be parked")
        wait_until(lambda: hook.messages("stalled", "resolved"), what="the recovery POSTed to the new webhook")
        insert_leads(pair, "after")
        wait_until(lambda: count(pair.agent_dsn, "leads") == 1, what="replication past the parked event")
        assert daemon.terminate() == 0
    text = log_text(log)
    assert "configuration reloaded: poison_policy=park, alert_webhook=http://127.0.0.1:" in text
    assert SECRET not in text


# -- metrics and health --------------------------------------------------------------------------
def test_metrics_and_health_endpoints(pair: DbPair, tmp_path: Path) -> None:
    port, standby_port = free_port(), free_port()
    site = pair.site()
    with Daemon(pair, "--http", f"127.0.0.1:{port}", log_path=tmp_path / "active.log") as active:
        wait_until(lambda: serving(port), what="the HTTP listener")
        answer = wait_until(lambda: ready(port), what="/readyz 200")
        assert answer.text.startswith("ready; applying")

        with site.transaction():
            site.execute("INSERT INTO conversations (id, phone_number) VALUES (1, '+1'), (2, '+2'), (3, '+3')")
        site.execute("UPDATE conversations SET status = 'closed' WHERE id = 1")
        site.execute("DELETE FROM conversations WHERE id = 2")
        insert_leads(pair, "Eve")
        expected = {
            'dbsync_events_applied_total{table="public.conversations",op="insert"}': 3,
            'dbsync_events_applied_total{table="public.conversations",op="update"}': 1,
            'dbsync_events_applied_total{table="public.conversations",op="delete"}': 1,
            'dbsync_events_applied_total{table="public.leads",op="insert"}': 1,
        }
        wait_until(lambda: expected.items() <= metrics(port).items(), what="the applied-event counters")
        m = wait_until(lambda: scrape_when(port, lambda s: s.get("dbsync_lag_events") == 0), what="dbsync_lag_events 0")
        assert m["dbsync_active"] == 1
        assert m['dbsync_connected{database="site"}'] == m['dbsync_connected{database="agent"}'] == 1
        assert 0 <= m["dbsync_lag_seconds"] < 5
        assert m["dbsync_parked_events"] == 0 and m["dbsync_events_parked_total"] == 0
        assert m["dbsync_reconnects_total"] == 0
        assert abs(m["dbsync_last_apply_timestamp_seconds"] - time.time()) < 60
        pages = m["dbsync_batch_size_count"]
        assert pages >= 1 and m['dbsync_batch_size_bucket{le="+Inf"}'] == pages
        assert m["dbsync_batch_size_sum"] == 6
        assert m["dbsync_batch_duration_seconds_count"] == pages
        assert m['dbsync_batch_duration_seconds_bucket{le="+Inf"}'] == pages
        assert get(port, "/nothing").status_code == 404
        assert httpx.post(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 405

        # A standby, its listener set in the config file: ready, not active, no lag of its own.
        conf = tmp_path / "standby.toml"
        conf.write_text(f'http = "127.0.0.1:{standby_port}"\n')
        with Daemon(pair, "--config", str(conf), log_path=tmp_path / "standby.log") as standby:
            answer = wait_until(lambda: serving(standby_port) and ready(standby_port), what="the standby's /readyz")
            assert answer.text == "ready; standby\n"
            sm = metrics(standby_port)
            assert sm["dbsync_active"] == 0 and "dbsync_lag_seconds" not in sm

            # The active daemon dies; the standby takes over and now reports lag.
            active.kill()
            wait_until(lambda: metrics(standby_port)["dbsync_active"] == 1, what="the standby to take over")
            insert_leads(pair, "Fay")
            wait_until(
                lambda: metrics(standby_port).get('dbsync_events_applied_total{table="public.leads",op="insert"}') == 1,
                what="the new active daemon to count its own applies",
            )
            wait_until(lambda: ready(standby_port), what="the new active daemon's /readyz")
            assert "dbsync_lag_seconds" in metrics(standby_port)
            assert same(pair)
            assert standby.terminate() == 0


def test_listener_errors_are_one_line(pair: DbPair) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        for args, message in [
            (["--http", f"127.0.0.1:{port}"], f"cannot listen on 127.0.0.1:{port}"),
            (["--http", "9187"], "http must be host:port"),
            (["--alert-webhook", "ftp://example.com/x"], "alert_webhook must be an http:// or https:// URL"),
        ]:
            proc = dbsync_cmd("run", *args, env=pair.env(), timeout=60)
            assert proc.returncode == 2, (args, proc.stderr)
            lines = proc.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"dbsync: error: {message}"), proc.stderr
    finally:
        taken.close()


# -- alerts --------------------------------------------------------------------------------------
def test_alerts_fire_once_and_resolve(pair: DbPair, webhook: Callable[..., Webhook], tmp_path: Path) -> None:
    """A poison event under policy stop stalls applying: one "stalled" and one "lag" alert (the
    first POST fails and is retried), however many retries the daemon makes, then one recovery
    each once the cause is fixed. `dbsync status` says the same and exits 1 meanwhile."""
    hook = webhook(fail_first=1)
    port = free_port()
    log = tmp_path / "daemon.log"
    with Daemon(
        pair,
        "--poison-policy",
        "stop",
        "--lag-threshold",
        "1",
        "--alert-webhook",
        hook.url,
        "--http",
        f"127.0.0.1:{port}",
        log_path=log,
    ):
        wait_until(lambda: ready(port), what="/readyz 200")
        poison(pair)
        wait_until(lambda: hook.messages("stalled", "firing") and hook.messages("lag", "firing"), what="both alerts")
        # The daemon keeps retrying the poison event; still one alert of each kind.
        retries = metrics(port)["dbsync_reconnects_total"]
        wait_until(lambda: metrics(port)["dbsync_reconnects_total"] >= retries + 3, what="three more retries")
        assert len(hook.messages("stalled")) == len(hook.messages("lag")) == 1, hook.received
        assert hook.attempts == len(hook.received) + 1  # the first POST failed and was retried

        stalled = hook.messages("stalled")[0]
        assert "no_poison" in stalled["summary"] and "no_poison" in stalled["last_error"]
        assert stalled["text"].startswith("dbsync site: stalled FIRING: ")
        assert stalled["source"] == "site" and stalled["resolved_at"] is None
        lag = hook.messages("lag")[0]
        # Over the threshold, as the payload reports it: rounded to the millisecond (1.0004 s is 1.0).
        assert lag["events_behind"] == 1 and lag["lag_seconds"] >= 1 and lag["lag_threshold"] == 1
        code, out = status(pair, "--lag-threshold", "1")
        assert code == 1 and "apply is failing" in out and "no_poison" in out, out
        answer = not_ready(port, "stuck")  # the details are for the log and `dbsync status`
        assert answer is not None and "no_poison" not in answer.text

        cure(pair)
        wait_until(
            lambda: hook.messages("stalled", "resolved") and hook.messages("lag", "resolved"), what="both recoveries"
        )
        for kind in ("stalled", "lag"):
            fired, resolved = hook.messages(kind)
            assert resolved["incident"] == fired["incident"] and resolved["started_at"] == fired["started_at"]
            assert resolved["resolved_at"] is not None
        assert same(pair)
        wait_until(lambda: status(pair, "--lag-threshold", "1")[0] == 0, what="status to exit 0 again")
    text = log_text(log)
    assert "alert stalled: failing for" in text and "alert stalled resolved" in text
    assert "alert webhook http://127.0.0.1:" in text  # the failed first POST, logged without its path
    assert SECRET not in text


def test_health_endpoints_say_state_never_details(pair: DbPair, tmp_path: Path) -> None:
    """Anyone who reaches the port reads /healthz, /readyz and /metrics: a daemon stuck on an
    event the Agent DB rejects says "stuck" there, never the event's key or the database's error;
    the log and `dbsync status` (which needs the database credentials) have the details."""
    port = free_port()
    log = tmp_path / "daemon.log"
    key, phone, name = "918273645", "+4915799887766", "Zebulon Quux"
    with Daemon(pair, "--poison-policy", "stop", "--http", f"127.0.0.1:{port}", log_path=log):
        wait_until(lambda: ready(port), what="/readyz 200")
        pair.agent().execute(
            "ALTER TABLE leads ADD CONSTRAINT no_zebulon_7q CHECK (name IS DISTINCT FROM 'Zebulon Quux')"
        )
        pair.site().execute("INSERT INTO leads (id, phone_number, name) VALUES (%s, %s, %s)", (int(key), phone, name))
        wait_until(lambda: "no_zebulon_7q" in log_text(log), what="the rejection in the log")
        stuck = wait_until(lambda: not_ready(port, "stuck"), what="/readyz 503 stuck")
        code, out = status(pair)
        assert code == 1 and "apply is failing" in out and "no_zebulon_7q" in out and key in out, out
        proc = dbsync_cmd("status", "--json", "--site-dsn", pair.site_dsn, "--agent-dsn", pair.agent_dsn)
        error = json.loads(proc.stdout)["last_error"]
        assert "no_zebulon_7q" in error and key in error, error
        alive = get(port, "/healthz")
        scrape = get(port, "/metrics").text
    assert alive.status_code == 200 and "stuck" in alive.text, alive.text
    assert stuck.text == "not ready: stuck\n"
    words = {w for w in re.split(r"[^\w+]+", error) if len(w) >= 4}
    assert {key, phone, "no_zebulon_7q", "violates"} <= words
    for body in (alive.text, stuck.text):
        assert not {w for w in words if w in body}, (body, words)
    for secret in (key, phone, "Zebulon", "no_zebulon_7q", "violates", "rejected", "Failing"):
        assert secret not in scrape, secret
    assert key in log_text(log) and "no_zebulon_7q" in log_text(log)


def test_status_exit_codes_name_the_problem(pair: DbPair, tmp_path: Path) -> None:
    """`dbsync status` exits 1 and says why for each unhealthy state, 0 when healthy."""
    insert_leads(pair, "Gus")
    code, out = status(pair, "--lag-threshold", "0.001")
    assert code == 1 and "no active daemon" in out and "over the threshold of 0.001 s" in out, out
    with Daemon(pair, "--poison-policy", "park", log_path=tmp_path / "daemon.log"):
        wait_until(lambda: status(pair)[0] == 0, what="status healthy with the daemon running")
        poison(pair)
        wait_until(lambda: status(pair)[0] == 1, what="status 1 for parked events")
        code, out = status(pair)
        assert "UNHEALTHY: 1 parked event(s)" in out, out
        proc = dbsync_cmd("status", "--json", "--site-dsn", pair.site_dsn, "--agent-dsn", pair.agent_dsn)
        st = json.loads(proc.stdout)
        assert proc.returncode == 1 and st["healthy"] is False and st["parked_events"] == 1
        assert st["problems"] == ["1 parked event(s)"]


# -- logs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_never_show_a_password(
    pair: DbPair,
    log_format: str,
    notify: Callable[..., NotifySocket],
    webhook: Callable[..., Webhook],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unreachable Site DB whose DSN carries a password (URL form), an Agent DSN with one
    (key=value form): the password appears in no log line, status, alert or HTTP answer."""
    closed = free_port()
    site_dsn = f"postgresql://nobody:{SECRET}@127.0.0.1:{closed}/nowhere?connect_timeout=3"
    agent_dsn = make_conninfo(pair.agent_dsn, password=SECRET)  # trust auth: the password is ignored
    monkeypatch.setenv("DBSYNC_LOG_FORMAT", log_format)
    monkeypatch.setenv("DBSYNC_LOG_LEVEL", "debug")
    systemd = notify("abstract")
    hook = webhook()
    port = free_port()
    log = tmp_path / "daemon.log"
    with Daemon(
        pair,
        "--site-dsn",
        site_dsn,
        "--agent-dsn",
        agent_dsn,
        "--http",
        f"127.0.0.1:{port}",
        "--alert-webhook",
        hook.url,
        "--lag-threshold",
        "0.5",
        log_path=log,
    ) as daemon:
        wait_until(lambda: "cannot connect to the Site DB" in log_text(log), what="the connect error in the log")
        systemd.wait_for(lambda m: m.get("STATUS", "").startswith("reconnecting"), what="STATUS reconnecting")
        # Every local user may read STATUS (systemctl status): the state, never the error's text.
        assert not any(
            "cannot connect" in m.get("STATUS", "") or "127.0.0.1" in m.get("STATUS", "") for m in systemd.texts()
        )
        wait_until(lambda: hook.messages("stalled", "firing"), what="the stalled alert")
        answers = [get(port, p).text for p in ("/readyz", "/healthz", "/metrics")]
        assert answers[0] == "not ready: reconnecting\n" and "127.0.0.1" not in answers[0] + answers[1]
        assert daemon.terminate() == 0
    output = log_text(log)
    everything = output + json.dumps(hook.received) + json.dumps(systemd.texts()) + "".join(answers)
    assert SECRET not in everything
    assert f"nobody@127.0.0.1:{closed}/nowhere" in output  # the database is still named
    lines = output.splitlines()
    assert lines
    if log_format == "json":
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert {"time", "level", "logger", "message"} <= set(records[0])
        assert any(r["level"] == "error" and "cannot connect to the Site DB" in r["message"] for r in records)
    else:
        assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ", line) for line in lines), output


def test_json_log_format_for_a_fatal_error() -> None:
    """The last line of a failing command is a JSON record too when logs are JSON."""
    proc = dbsync_cmd(
        "--log-format",
        "json",
        "run",
        "--site-dsn",
        f"host=x password={SECRET}",
        env={k: v for k, v in os.environ.items() if not k.startswith("DBSYNC_")},
    )
    assert proc.returncode == 2
    record = json.loads(proc.stderr.strip().splitlines()[-1])
    assert record["level"] == "error" and "agent_dsn is not set" in record["message"]
    assert SECRET not in proc.stderr
