"""`dbsync status --watch` in a real pseudo-terminal: frames redrawn in place, the rate between
refreshes, a refresh that fails shown in the view, Ctrl-C as a clean exit; and the same command
with stdout a pipe, an unreachable database and invalid SECONDS."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dbsync.embedded.cluster import free_port
from tests.helpers import Daemon, DbPair, dbsync_cmd, same, wait_until

CLEAR = "\x1b[H\x1b[2J"
HEADER = "dbsync status, every 0.5 s"
APP = "dbsync-watch-test"

# The child makes the pseudo-terminal its controlling terminal, as a login shell would, so that
# the ^C written to it reaches the command as SIGINT from the terminal itself.
CONTROLLING_TTY = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'dbsync', *sys.argv[1:]])"
)


class Terminal:
    """A command whose stdin, stdout and stderr are a pseudo-terminal; its output is collected."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        os.set_blocking(self.master, False)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CONTROLLING_TTY, *args], stdin=slave, stdout=slave, stderr=slave, env=env
        )
        os.close(slave)
        self.data = b""

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def read_until(self, predicate: Callable[[str], bool], timeout: float = 30, what: str = "output") -> str:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.text[-2000:]!r}")
            if not self._read(remaining):
                raise AssertionError(f"the command ended while waiting for {what}; got {self.text[-2000:]!r}")
        return self.text

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the other end is closed, the command has exited
                return False
            if not chunk:
                return False
            self.data += chunk
        return True

    def finish(self, timeout: float = 15) -> int:
        code = self.proc.wait(timeout=timeout)
        while self._read(0.2):  # what it wrote last
            pass
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def watch_env(pair: DbPair) -> dict[str, str]:
    env = pair.env()
    env["PGAPPNAME"] = APP  # its sessions can be told from the daemon's
    return env


def test_watch_redraws_in_a_terminal_until_ctrl_c(pair: DbPair, tmp_path: Path) -> None:
    with Daemon(pair, log_path=tmp_path / "daemon.log"):
        agent = pair.agent()
        holder = wait_until(
            lambda: agent.execute(
                "SELECT max(active_holder) FROM dbsync.apply_progress WHERE source = 'site'"
            ).fetchone()[0],  # type: ignore[index]
            what="the daemon to take the source",
        )
        # The consumer of another Site DB, which no daemon applies: listed, without a lag.
        agent.execute(
            "INSERT INTO dbsync.apply_progress (source, prev_snapshot, events_applied) "
            "VALUES ('branch2', pg_current_snapshot(), 42)"
        )
        term = Terminal(["status", "--watch", "0.5"], watch_env(pair))
        try:
            text = term.read_until(lambda t: t.count(CLEAR) >= 2 and t.count(HEADER) >= 2, what="two frames")
            first = text.split(CLEAR)[1]
            assert "source" in first and "active daemon" in first and "parked" in first
            assert holder and holder in first and "0 events" in first
            site_row, other_row = [line for line in first.splitlines() if line.startswith(("site ", "branch2 "))]
            assert site_row.split()[:3] == ["site", "0", "events"] and site_row.rstrip().endswith("ok"), first
            assert other_row.split()[:3] == ["branch2", "-", "-"] and "UNHEALTHY" in other_row, first
            assert "branch2: no active daemon" in first and "another Site DB's source" in first
            assert "Traceback" not in text

            # Rows applied between two refreshes show as a rate.
            site = pair.site()
            at = len(term.text)
            with site.transaction():
                for i in range(50):
                    site.execute("INSERT INTO leads (phone_number, name) VALUES (%s, %s)", (f"+49{i}", f"w{i}"))
            wait_until(lambda: same(pair), what="the rows to replicate")
            term.read_until(
                lambda t: any(re.search(r"^site .* [1-9][0-9.]* events/s ", f, re.M) for f in t[at:].split(CLEAR)),
                what="a frame with a non-zero rate for the source",
            )

            # A refresh that fails is shown in the view; the next one reconnects.
            at = len(term.text)
            agent.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (APP,))
            term.read_until(lambda t: "refresh failed: " in t[at:], what="the failed refresh in the view")
            failed_at = term.text.rindex("refresh failed: ")
            term.read_until(
                lambda t: any(
                    "refresh failed" not in f and "active daemon" in f for f in t[failed_at:].split(CLEAR)[1:-1]
                ),
                what="a good frame after the failure",
            )
            assert term.proc.poll() is None

            os.write(term.master, b"\x03")  # Ctrl-C, through the terminal
            assert term.finish() == 0
            assert "Traceback" not in term.text and "aborted" not in term.text
        finally:
            term.close()


def test_watch_without_a_terminal_prints_plain_blocks(pair: DbPair) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbsync", "status", "--watch", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=watch_env(pair),
    )
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        out = b""
        deadline = time.monotonic() + 30
        while out.decode().count(HEADER) < 2:
            assert time.monotonic() < deadline, out
            select.select([proc.stdout], [], [], 1)
            out += proc.stdout.read() or b""
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode()
    assert "\x1b" not in text
    assert "no active daemon" in text  # no daemon runs: the view says what is wrong
    assert "Traceback" not in err.decode() and err.decode() == "", err


def test_watch_refuses_an_unreachable_database_and_bad_seconds(pair: DbPair) -> None:
    env = pair.env()
    env["DBSYNC_SITE_DSN"] = f"host=127.0.0.1 port={free_port()} dbname=nowhere user=nobody connect_timeout=2"
    proc = dbsync_cmd("status", "--watch", "0.5", env=env, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dbsync: error: cannot connect to the Site DB"), proc.stderr
    assert proc.stdout == ""

    for args, message in [
        (["--watch", "0"], "Invalid value for '--watch': 0.0 is not in the range x>0."),
        (["--watch=soon"], "Invalid value for '--watch'"),
        # An optional value that starts with "-" is read as an option by click: still one line.
        (["--watch", "-1"], "No such option"),
    ]:
        proc = dbsync_cmd("status", *args, env=pair.env(), timeout=60)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr)
    proc = dbsync_cmd("status", "--watch", "--json", env=pair.env(), timeout=60)
    assert proc.returncode == 2 and "--json and --watch cannot be combined" in proc.stderr


@pytest.mark.unit
def test_the_rate_is_the_change_between_two_reads() -> None:
    from datetime import UTC, datetime

    from dbsync.cli.watch import Row, Sample, rates, render
    from dbsync.status import Consumer, Status

    def status(source: str, applied: int, **kw: object) -> Row:
        values: dict[str, object] = dict(
            source=source, high_water_mark=applied, newest_seq=applied, events_behind=3, seconds_behind=0.25,
            events_applied=applied, oldest_pending_at=None, last_applied_capture_at=None, progress_updated_at=None,
            batch_open=False, tables=[], active_daemon="h:1", parked_events=0, last_error=None, last_error_at=None,
            lag_threshold=5.0, problems=[],
        )  # fmt: skip
        values.update(kw)
        return Row.of(Status(**values))  # type: ignore[arg-type]

    def consumer(source: str, applied: int) -> Row:
        return Row.of(Consumer(source, applied, None, None, 2, None, ["no active daemon", "2 parked event(s)"]))

    now = datetime.now(UTC)
    a = Sample(10.0, now, [status("site", 100), consumer("crm", 5)])
    b = Sample(12.0, now, [status("site", 300), consumer("crm", 5), consumer("new", 7)])
    assert rates(None, a) == {"site": None, "crm": None}
    assert rates(a, b) == {"site": 100.0, "crm": 0.0, "new": None}
    frame = render("head", b, rates(a, b))
    lines = frame.splitlines()
    assert lines[2].split() == ["source", "behind", "lag", "rate", "active", "daemon", "parked", "health"]
    assert lines[3].split() == ["site", "3", "events", "0.2", "s", "100.0", "events/s", "h:1", "0", "ok"]
    assert lines[4].split() == ["crm", "-", "-", "0.0", "events/s", "none", "2", "UNHEALTHY"]
    assert lines[5].split() == ["new", "-", "-", "-", "none", "2", "UNHEALTHY"]
    assert "crm: no active daemon; 2 parked event(s)" in frame
    stuck = Sample(14.0, now, [status("site", 300, problems=["no active daemon"], active_daemon=None)])
    frame = render("head", stuck, rates(b, stuck))
    assert "UNHEALTHY" in frame and "site: no active daemon" in frame and "another Site DB" not in frame
    frame = render("head", stuck, {}, error="server closed the connection")
    assert "refresh failed: server closed the connection" in frame and "the last good read" in frame
