"""`dbsync demo` end to end, as a user runs it: real clusters, real traffic both ways, nothing left
behind.

Each run gets its own TMPDIR, so the clusters it creates (tempfile.mkdtemp(prefix="dbsync-...")) can
be told apart from any other run's, and checked for after it exits.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbsync.embedded.demo import DemoOptions
from dbsync.embedded.demo_live import behind_text
from dbsync.embedded.demo_report import DemoResult, TableCheck, WriteBack, format_summary
from tests.helpers import dbsync_cmd

TABLES = ("public.conversations", "public.leads", "public.whatsapp_messages")


@pytest.fixture
def tmpdir_env() -> Iterator[tuple[Path, dict[str, str]]]:
    # Short on purpose: the cluster's Unix socket path must stay under ~107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="dd-"))
    env = dict(os.environ, TMPDIR=str(tmp))
    env.pop("DBSYNC_LOG_LEVEL", None)
    yield tmp, env
    shutil.rmtree(tmp, ignore_errors=True)


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored and children inherit that: the demo then
    # (rightly) ignores Ctrl-C too. The demo is started as from an interactive terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_demo(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dbsync", "demo", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,  # noqa: PLW1509 - only signal.signal, before exec
    )


def read_until_progress(proc: subprocess.Popen[str]) -> list[str]:
    """stderr lines up to the first second's progress, a line per direction (both directions of
    the daemon, the traffic and the automation are running)."""
    assert proc.stderr is not None
    lines: list[str] = []
    while not (lines and "Agent -> Site" in lines[-1]):
        line = proc.stderr.readline()
        if not line:
            raise AssertionError("the demo ended before showing progress:\n" + "".join(lines))
        lines.append(line)
    return lines


def clusters_in(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("dbsync-"))


def postgres_processes_in(tmp: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "postgres" in cmdline and str(tmp) in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


BEHIND = r"behind \d+ events?, \d+(?: ms|\.\d s)$"


def test_demo_replicates_both_ways_and_cleans_up(tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    tmp, env = tmpdir_env
    proc = start_demo(env, "--duration", "3", "--rate", "50")
    try:
        early = read_until_progress(proc)
        # While it runs, its two clusters live in our TMPDIR: the checks below are not vacuous.
        running = clusters_in(tmp)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(early) + err
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert [name.rsplit("-", 1)[0] for name in running] == ["dbsync-agent", "dbsync-site"]
    for table in TABLES:
        assert re.search(rf"{re.escape(table)}\s+\d+ rows\s+Site and Agent are identical: yes", out), out
    applied = re.search(r"Events applied\s+(\d+)", out)
    assert applied is not None and int(applied.group(1)) > 0, out
    # Each second shows both directions, with units.
    forward, back = (line.rstrip("\n") for line in early[-2:])
    assert "Site -> Agent" in forward and re.search(BEHIND, forward), forward
    assert back.lstrip().startswith("Agent -> Site") and re.search(BEHIND, back), back
    # Write-back happened: the Site's app never moves a lead's stage, so every lead out of 'new' on
    # the Site DB got there from the Agent's automation, and they are the Agent's moved leads.
    moved = re.search(r"Agent automation\s+(\d+) transactions", out)
    assert moved is not None and int(moved.group(1)) > 0, out
    written = re.search(r"Written back\s+(\d+) events applied to the Site DB", out)
    assert written is not None and int(written.group(1)) > 0, out
    check = re.search(r"only the automation sets: (\d+) on the Agent DB, (\d+) on the Site DB", out)
    assert check is not None and int(check.group(1)) > 0 and check.group(1) == check.group(2), out
    assert re.search(r"\(\d+ of them simulated WhatsApp delivery failures\)", out), out
    assert out.rstrip().splitlines()[-2].startswith("Next: `dbsync demo --keep`"), out
    assert "Traceback" not in err
    assert clusters_in(tmp) == []
    assert postgres_processes_in(tmp) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_interrupted_cleans_up(tmpdir_env: tuple[Path, dict[str, str]], signum: signal.Signals) -> None:
    tmp, env = tmpdir_env
    proc = start_demo(env, "--duration", "60", "--rate", "50")
    try:
        read_until_progress(proc)
        assert len(clusters_in(tmp)) == 2
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert "dbsync: aborted" in err
    assert "Traceback" not in err
    assert clusters_in(tmp) == []
    assert postgres_processes_in(tmp) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "0"], "--duration must be a positive number"),
        (["--rate", "-5"], "--rate must be a positive number"),
        (["--writers", "0"], "--writers must be at least 1"),
        (["--automation-rate", "0"], "--automation-rate must be a positive number"),
    ],
)
def test_demo_rejects_bad_options(tmpdir_env: tuple[Path, dict[str, str]], args: list[str], message: str) -> None:
    tmp, env = tmpdir_env
    result = dbsync_cmd("demo", *args, env=env, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dbsync: error: {message}"), result.stderr
    assert clusters_in(tmp) == []


@pytest.mark.unit
def test_behind_has_units() -> None:
    assert behind_text(0, 0.0) == "0 events, 0 ms"
    assert behind_text(1, 0.0034) == "1 event, 3 ms"
    assert behind_text(250, 2.04) == "250 events, 2.0 s"


@pytest.mark.unit
def test_summary_names_the_simulated_failures_and_what_to_try_next(tmp_path: Path) -> None:
    result = DemoResult(
        options=DemoOptions(duration=3),
        seed=7,
        counts={"outbound": 40, "inbound": 30, "status": 100, "failed": 5, "crm": 9, "lead_edits": 2},
        transactions=179,
        traffic_seconds=3.0,
        lags_ms=[1.0, 2.0, 5.0],
        catch_up_seconds=0.1,
        behind=0,
        parked=0,
        checks=[TableCheck("public.leads", 10, 10)],
        write_back=WriteBack(
            stages={"contacted": 6, "won": 1}, transactions=7, lags_ms=[3.0, 4.0], behind=0, site_moved=6, agent_moved=6
        ),
    )
    text = format_summary(result)
    assert "100 delivery status callbacks (5 of them simulated WhatsApp delivery failures)" in text
    assert "9 agent actions (2 emails filed on leads the automation closed)" in text
    assert "  Agent automation   7 transactions (2.3/s), lead stages moved to: 6 contacted, 1 won" in text
    assert "  Written back       2 events applied to the Site DB (0.6/s)" in text
    assert "  Write-back lag     p50 3.0 ms  p95 4.0 ms  p99 4.0 ms  max 4.0 ms" in text
    assert "leads in a stage only the automation sets: 6 on the Agent DB, 6 on the Site DB" in text
    assert "failed)" not in text
    assert text.splitlines()[-2:] == [
        "Next: `dbsync demo --keep` leaves both clusters running, to look at them with `dbsync status`,",
        "      `dbsync reconcile --deep` or psql; `dbsync demo --help` lists the traffic options.",
    ]

    class Kept:  # what the summary reads of a kept LocalCluster
        def __init__(self, name: str) -> None:
            self.bindir, self.datadir, self.root = tmp_path / "bin", tmp_path / name / "data", tmp_path / name

    site, agent = (
        "host=127.0.0.1 port=5001 dbname=crm user=postgres",
        "host=127.0.0.1 port=5002 dbname=crm user=postgres",
    )
    result.kept = [(site, Kept("site")), (agent, Kept("agent"))]  # type: ignore[list-item]
    lines = format_summary(result).splitlines()
    status, run, psql, _ = lines[lines.index("Next, with the clusters kept:") + 1 :]
    assert status.startswith(f"  dbsync status --site-dsn '{site}' --agent-dsn '{agent}'    # exits 1")
    assert run.startswith(f"  dbsync run --site-dsn '{site}' --agent-dsn '{agent}'")
    assert psql == f"  {tmp_path / 'bin' / 'psql'} '{site}'"
