"""dbsync through a real PgBouncer (issue: hardening, item 6).

Session mode with PgBouncer's default settings works: the daemon replicates and `dbsync status`
answers. Transaction mode is refused when a session connects, by the daemon and by the CLI, with
one line that names the pooler and the fix, quickly, and without leaving a setting behind on the
pooler's server connections (other clients get them next). A direct connection is never taken
for a pooler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from dbsync.daemon.runner import LOCK_CLASS
from dbsync.errors import PoolerError
from dbsync.pooler import check_own_session
from tests.helpers import WHATSAPP_TABLES, Daemon, DbPair, assert_same, count, dbsync_cmd, same, sync_once, wait_until
from tests.pgbouncer import PgBouncer, binary

# The refusal names the cause and the fix.
REFUSAL = ("transaction-mode pooler", "session-mode")
# A refusal comes at connect: well under any connect or query timeout.
QUICK = 10.0

Bouncer = Callable[[str], PgBouncer]


@pytest.fixture
def bouncer(pair: DbPair, tmp_path: Path) -> Iterator[Bouncer]:
    """Start a PgBouncer in the given pool mode serving this test's Site and Agent databases."""
    if binary() is None:
        pytest.skip("pgbouncer is not installed (Debian package `pgbouncer`; .ci/run installs it)")
    started: list[PgBouncer] = []

    def start(pool_mode: str) -> PgBouncer:
        databases = {}
        for dsn in (pair.site_dsn, pair.agent_dsn):
            parts = conninfo_to_dict(dsn)
            databases[str(parts["dbname"])] = (str(parts.get("host", "127.0.0.1")), int(parts.get("port", 5432)))
        b = PgBouncer(tmp_path / f"pgbouncer-{len(started)}", pool_mode, databases)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()


def through(pair: DbPair, b: PgBouncer, *, site: bool = True, agent: bool = True) -> DbPair:
    """The same databases, with the chosen sides seen through the pooler."""
    return replace(
        pair,
        site_dsn=b.route(pair.site_dsn) if site else pair.site_dsn,
        agent_dsn=b.route(pair.agent_dsn) if agent else pair.agent_dsn,
        _conns=[],
    )


def write_rows(pair: DbPair, first: int, n: int) -> None:
    site = pair.site()
    site.execute(
        "INSERT INTO conversations (id, phone_number) SELECT g, '+' || g FROM generate_series(%s::int, %s::int) g",
        (first, first + n - 1),
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower()]


def assert_one_line_refusal(stderr: str, role: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert errors[0] == lines[-1], stderr
    assert f"the {role} DB" in errors[0], errors[0]
    for word in REFUSAL:
        assert word in errors[0], errors[0]


def pooled_settings(dsn: str, servers: int = 4) -> set[tuple[str, str]]:
    """search_path and row_security as clients of the pooler get them, on `servers` server
    connections at once (each client holds one in an open transaction)."""
    conns = [psycopg.connect(dsn) for _ in range(servers)]
    try:
        seen = set()
        for conn in conns:
            path = conn.execute("SHOW search_path").fetchone()
            rls = conn.execute("SHOW row_security").fetchone()
            assert path and rls
            seen.add((str(path[0]), str(rls[0])))
        return seen
    finally:
        for conn in conns:
            conn.close()


DEFAULTS = {('"$user", public', "on")}


def advisory_locks(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = %s", (LOCK_CLASS,)
        ).fetchone()
        return int(row[0]) if row else 0


# -- session mode: works with PgBouncer's defaults ------------------------------------------------
def test_session_pooler_with_default_settings(pair: DbPair, bouncer: Bouncer, tmp_path: Path) -> None:
    """The daemon and `dbsync status` through a session-mode PgBouncer on both sides."""
    b = bouncer("session")
    pooled = through(pair, b)
    write_rows(pair, 1, 50)
    with Daemon(pooled, log_path=tmp_path / "daemon.log") as d:
        wait_until(lambda: same(pair), 30, 0.1, "the daemon to replicate through the pooler")
        write_rows(pair, 51, 50)  # and keeps replicating: the doorbell rings through the pooler
        wait_until(lambda: count(pair.agent_dsn, "conversations") == 100, 30, 0.1, "the second write")
        st = dbsync_cmd("status", "--json", env=pooled.env(), timeout=60)
        assert st.returncode == 0, st.stderr
        assert '"events_behind": 0' in st.stdout, st.stdout
        assert d.terminate() == 0
    log = (tmp_path / "daemon.log").read_text()
    assert not error_lines(log), log
    assert "unsupported startup parameter" not in b.log(), b.log()
    assert_same(pair)


def test_session_pooler_once_in_process(pair: DbPair, bouncer: Bouncer) -> None:
    """`run --once` semantics in-process through the session pooler: the connect path the
    daemon uses, with the pooler check, passes."""
    b = bouncer("session")
    write_rows(pair, 1, 20)
    replicator = sync_once(through(pair, b))
    assert replicator.stats.events == 20
    assert_same(pair)


# -- transaction mode: refused at connect ---------------------------------------------------------
@pytest.mark.parametrize("side", ["agent", "site"])
def test_transaction_pooler_refused_by_the_daemon(pair: DbPair, bouncer: Bouncer, tmp_path: Path, side: str) -> None:
    """`dbsync run` with one side through a transaction-mode PgBouncer exits at once with one
    line; nothing is applied, no lock is left, and no setting is left on the pooled servers."""
    b = bouncer("transaction")
    pooled = through(pair, b, site=side == "site", agent=side == "agent")
    write_rows(pair, 1, 10)
    log_path = tmp_path / "daemon.log"
    started = time.monotonic()
    with Daemon(pooled, log_path=log_path) as d:
        wait_until(lambda: d.proc.poll() is not None, QUICK, 0.05, "the daemon to refuse the pooler and exit")
        took = time.monotonic() - started
        assert d.proc.returncode == 2
    print(f"MEASURE refusal: the daemon exited {took:.2f} s after it started")
    assert_one_line_refusal(log_path.read_text(), side.capitalize())
    # Nothing was applied, the lock went with the process, the pooled servers are as they were.
    assert count(pair.agent_dsn, "conversations") == 0
    assert advisory_locks(pair.agent_dsn) == 0
    assert pooled_settings(b.route(pair.site_dsn if side == "site" else pair.agent_dsn)) == DEFAULTS
    # The same databases, directly: replication works.
    sync_once(pair)
    assert_same(pair)


def test_transaction_pooler_refused_by_a_standby(pair: DbPair, bouncer: Bouncer, tmp_path: Path) -> None:
    """A standby whose Site DSN leads to a transaction-mode pooler refuses now, not at takeover;
    the active daemon carries on."""
    b = bouncer("transaction")
    write_rows(pair, 1, 10)
    with Daemon(pair, log_path=tmp_path / "active.log") as active:
        wait_until(lambda: same(pair), 30, 0.1, "the active daemon to replicate")
        log_path = tmp_path / "standby.log"
        with Daemon(through(pair, b, agent=False), log_path=log_path) as standby:
            wait_until(lambda: standby.proc.poll() is not None, QUICK, 0.05, "the standby to refuse and exit")
            assert standby.proc.returncode == 2
        assert "standby" in log_path.read_text(), log_path.read_text()
        assert_one_line_refusal(log_path.read_text(), "Site")
        write_rows(pair, 11, 10)
        wait_until(lambda: same(pair), 30, 0.1, "the active daemon to go on replicating")
        assert active.terminate() == 0
    assert pooled_settings(b.route(pair.site_dsn)) == DEFAULTS
    assert_same(pair)


@pytest.mark.parametrize("command", [["status"], ["tables", "list"], ["migrate"]])
def test_transaction_pooler_refused_by_the_cli(pair: DbPair, bouncer: Bouncer, command: list[str]) -> None:
    """CLI commands through a transaction-mode PgBouncer refuse with one line, at once."""
    b = bouncer("transaction")
    pooled = through(pair, b)
    write_rows(pair, 1, 10)
    started = time.monotonic()
    result = dbsync_cmd(*command, env=pooled.env(), timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert took < QUICK, f"{command} took {took:.1f} s to refuse"
    assert_one_line_refusal(result.stderr, "Site")
    assert pooled_settings(pooled.site_dsn) == DEFAULTS
    # The direct connection is not misdetected, and the data is intact.
    direct = dbsync_cmd(*command, env=pair.env(), timeout=60)
    assert direct.returncode in (0, 1), direct.stderr  # status: 1 = unhealthy (no daemon yet)
    assert "pooler" not in direct.stderr, direct.stderr
    sync_once(pair)
    assert_same(pair)


# -- the rule, without a server -------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    ("first", "other", "again", "refused"),
    [
        (100, 101, 100, False),  # directly, or session mode: each session has its own backend
        (100, 100, 100, True),  # B was handed A's backend (PgBouncer's LIFO reuse)
        (100, 101, 102, True),  # A's backend changed between two transactions
        (100, 100, 101, True),
    ],
)
def test_shared_backend_rule(first: int, other: int, again: int, refused: bool) -> None:
    dsn = "host=db.example.com port=6543 dbname=postgres user=postgres.ref password=s3cret-pw"
    if not refused:
        check_own_session("Site", dsn, first, other, again)
        return
    with pytest.raises(PoolerError) as info:
        check_own_session("Site", dsn, first, other, again)
    message = str(info.value)
    assert "\n" not in message
    assert "s3cret" not in message
    assert "postgres.ref@db.example.com:6543/postgres" in message
    for word in REFUSAL:
        assert word in message


# -- the direct connection ------------------------------------------------------------------------
def test_direct_connections_are_not_taken_for_a_pooler(pair: DbPair, tmp_path: Path) -> None:
    """Many sessions at once straight to PostgreSQL: each has its own backend, none refuses."""
    write_rows(pair, 1, 30)
    with Daemon(pair, log_path=tmp_path / "daemon.log") as d:
        results = [dbsync_cmd("status", env=pair.env(), timeout=60) for _ in range(3)]
        wait_until(lambda: same(pair), 30, 0.1, "the daemon to replicate")
        assert d.terminate() == 0
    for result in results:
        assert "pooler" not in result.stderr, result.stderr
        assert result.returncode in (0, 1), result.stderr
    assert not error_lines((tmp_path / "daemon.log").read_text())
    assert_same(pair, WHATSAPP_TABLES)
