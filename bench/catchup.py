"""Catch-up throughput (and the daemon's peak memory while it catches up).

The same backlog is written to two fresh Site databases while nothing consumes. Two workloads:
`whatsapp` (bench.backlog, deterministic: small transactions, every Nth message with a 100 kB
body) and `bulk` (bulk statements: messages inserted 10,000 rows per statement, one UPDATE of
the status of half of them, one DELETE of a tenth):

* native: tables without dbsync triggers, a publication, and on the Agent a subscription
  created disabled with copy_data = false, so its slot exists before the backlog is written
  and the subscription replays exactly the backlog from WAL once enabled;
* dbsync: tables with capture; `dbsync run --once` as a subprocess drains the sync log.

Both clocks start when the consumer is started (ALTER SUBSCRIPTION ... ENABLE committed /
the daemon process spawned) and stop when the backlog's last transaction (the sentinel row)
is visible on the Agent DB; both Agent DBs are then checked row for row against their Site.
Only one side runs at a time, and the order alternates between reps.

The daemon's peak RSS is read from /proc/<pid>/status (VmHWM) while it runs, and exactly
from wait4()'s ru_maxrss when it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.env import (
    AGENT_TEMPLATE,
    REPO,
    SITE_TEMPLATE,
    TABLES,
    BenchError,
    World,
    connect,
    table_digest,
    uncapture,
    wait_for,
)
from bench.stats import median

SENTINEL = "SELECT EXISTS (SELECT 1 FROM public.whatsapp_messages WHERE message_id = 'bench-sentinel')"
SITE_DB, AGENT_DB = "bench_cu_site", "bench_cu_agent"
# Rows the consumer actually wrote on the Agent. dbsync coalesces a page to the last image per
# key; native logical replication applies every change. Both are correct for state replication.
AGENT_ROW_WRITES = """
SELECT sum(n_tup_ins + n_tup_upd + n_tup_del)::bigint FROM pg_catalog.pg_stat_user_tables
WHERE schemaname = 'public' AND relname IN ('conversations', 'leads', 'whatsapp_messages')
"""


def _agent_row_writes(agent_dsn: str) -> int:
    time.sleep(1.2)  # the apply processes report table statistics at most once a second
    with connect(agent_dsn) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(conn.execute(AGENT_ROW_WRITES).fetchone()[0] or 0)  # type: ignore[index]


def write_backlog(dsn: str, events: int, big_every: int, timeout: float) -> tuple[int, float]:
    """Returns (row changes written, seconds)."""
    return call_backlog(dsn, "CALL bench.backlog(%s, %s, NULL)", (events, big_every), timeout)


def call_backlog(dsn: str, call: str, params: tuple[int, ...], timeout: float) -> tuple[int, float]:
    """CALL a backlog procedure of bench/sql/site.sql (its INOUT is the row changes it wrote);
    returns (row changes, seconds). Durability is irrelevant to the backlog itself."""
    with connect(dsn) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(int(timeout * 1000))))
        started = time.monotonic()
        row = conn.execute(call, params).fetchone()
        elapsed = time.monotonic() - started
        conn.execute("VACUUM (ANALYZE)")
    assert row is not None
    return int(row[0]), elapsed


def write_bulk_backlog(dsn: str, events: int, timeout: float) -> tuple[int, float]:
    """The bulk-statement backlog of about `events` row changes (bench.bulk_backlog: N messages
    inserted in statements of 10,000, an UPDATE of N/2, a DELETE of N/10, 1.6 N in all, after
    the seed), then the sentinel. Returns (row changes written, seconds)."""
    rows = max(10_000, round(events / 1.6 / 10_000) * 10_000)
    return call_backlog(dsn, "CALL bench.bulk_backlog(%s, NULL)", (rows,), timeout)


def sentinel_seen(agent: psycopg.Connection) -> bool:
    return bool(agent.execute(SENTINEL).fetchone()[0])  # type: ignore[index]


def verify(site_dsn: str, agent_dsn: str, side: str) -> None:
    site, agent = table_digest(site_dsn), table_digest(agent_dsn)
    if site != agent:
        diff = {t: (site[t], agent[t]) for t in TABLES if site[t] != agent[t]}
        raise BenchError(f"{side}: the Agent DB differs from the Site after catch-up: {diff}")


# -- native logical replication -------------------------------------------------------------------
def _drop_subscription(agent_dsn: str, site_dsn: str) -> None:
    with connect(agent_dsn) as conn:
        if conn.execute("SELECT 1 FROM pg_subscription WHERE subname = 'bench_sub'").fetchone():
            conn.execute("ALTER SUBSCRIPTION bench_sub DISABLE")
            conn.execute("ALTER SUBSCRIPTION bench_sub SET (slot_name = NONE)")
            conn.execute("DROP SUBSCRIPTION bench_sub")
    with connect(site_dsn) as conn:

        def slot_free() -> bool:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = 'bench_sub'").fetchone()
            return row is None or not row[0]

        wait_for(slot_free, 30, "the walsender to release slot bench_sub", 0.1)
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'bench_sub'"
        )


def setup_native(w: World, site_db: str, agent_db: str) -> tuple[str, str]:
    """A Site database with a publication, an Agent database with a disabled subscription."""
    site_dsn = w.site.create_db(site_db, SITE_TEMPLATE)
    uncapture(site_dsn)
    with connect(site_dsn) as conn:
        conn.execute(f"CREATE PUBLICATION bench_pub FOR TABLE {', '.join(TABLES)}")
    agent_dsn = w.agent.create_db(agent_db, AGENT_TEMPLATE)
    with connect(agent_dsn) as conn:
        conn.execute(
            sql.SQL(
                "CREATE SUBSCRIPTION bench_sub CONNECTION {} PUBLICATION bench_pub "
                "WITH (enabled = false, copy_data = false, create_slot = true, slot_name = 'bench_sub')"
            ).format(sql.Literal(site_dsn))
        )
    return site_dsn, agent_dsn


def teardown_native(w: World, site_db: str, agent_db: str) -> None:
    try:
        _drop_subscription(w.agent.dsn(agent_db), w.site.dsn(site_db))
    finally:
        w.agent.drop_db(agent_db)
        w.site.drop_db(site_db)


def drain_native(agent_dsn: str, timeout: float) -> float:
    with connect(agent_dsn) as agent:
        started = time.monotonic()
        agent.execute("ALTER SUBSCRIPTION bench_sub ENABLE")
        wait_for(lambda: sentinel_seen(agent), timeout, "native logical replication to catch up")
        elapsed = time.monotonic() - started
        agent.execute("ALTER SUBSCRIPTION bench_sub DISABLE")
    return elapsed


# -- dbsync ---------------------------------------------------------------------------------------
def _vm_hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def run_daemon_once(
    site_dsn: str, agent_dsn: str, timeout: float, log_path: Path, agent_poll: psycopg.Connection | None = None
) -> dict[str, Any]:
    """`dbsync run --once` as a subprocess: wall time, time to the sentinel, peak RSS."""
    env = {**os.environ, "DBSYNC_SITE_DSN": site_dsn, "DBSYNC_AGENT_DSN": agent_dsn}
    with log_path.open("ab") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbsync", "--log-level", "warning", "run", "--once"],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=REPO,
        )
        hwm: int | None = None
        seen: float | None = None
        maxrss = 0
        try:
            deadline = started + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    maxrss = usage.ru_maxrss
                    break
                hwm = _vm_hwm_kb(proc.pid) or hwm
                if agent_poll is not None and seen is None and sentinel_seen(agent_poll):
                    seen = time.monotonic() - started
                if time.monotonic() > deadline:
                    raise BenchError(f"dbsync run --once did not finish within {timeout:.0f}s")
                time.sleep(0.02)
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        wall = time.monotonic() - started
    if proc.returncode != 0:
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
        raise BenchError(f"dbsync run --once exited with {proc.returncode}: {tail}")
    if agent_poll is not None and seen is None and sentinel_seen(agent_poll):
        seen = wall
    return {"wall_s": wall, "sentinel_s": seen, "vm_hwm_kb": hwm, "ru_maxrss_kb": maxrss}


def setup_dbsync(w: World, site_db: str, agent_db: str) -> tuple[str, str]:
    return w.site.create_db(site_db, SITE_TEMPLATE), w.agent.create_db(agent_db, AGENT_TEMPLATE)


# -- one side, one rep ----------------------------------------------------------------------------
def _one(
    w: World,
    side: str,
    events: int,
    big_every: int,
    workdir: Path,
    rep: int,
    log: Callable[[str], None],
    workload: str = "whatsapp",
) -> dict[str, Any]:
    site_db, agent_db = f"{SITE_DB}_{side}", f"{AGENT_DB}_{side}"
    write_timeout = 120 + events / 500
    drain_timeout = 120 + events / 400
    if side == "native":
        site_dsn, agent_dsn = setup_native(w, site_db, agent_db)
    else:
        site_dsn, agent_dsn = setup_dbsync(w, site_db, agent_db)
    try:
        if workload == "bulk":
            written, write_s = write_bulk_backlog(site_dsn, events, write_timeout)
        else:
            written, write_s = write_backlog(site_dsn, events, big_every, write_timeout)
        log(
            f"  catch-up {workload} rep {rep + 1} {side:<6}: backlog of {written} row changes written in {write_s:.1f}s"
        )
        out: dict[str, Any] = {"side": side, "rep": rep, "events": written, "write_s": write_s}
        if side == "dbsync":
            with connect(site_dsn) as conn:
                out["sync_log_events"] = int(
                    conn.execute(
                        "SELECT sum(coalesce(array_length(keys, 1), 1)) FROM dbsync.sync_log"  # keys, not log rows
                    ).fetchone()[0]  # type: ignore[index]
                )
            if out["sync_log_events"] != written:
                raise BenchError(f"sync_log holds {out['sync_log_events']} events, the workload wrote {written}")
        w.site.checkpoint()
        w.agent.checkpoint()
        if side == "native":
            out["drain_s"] = drain_native(agent_dsn, drain_timeout)
        else:
            with connect(agent_dsn) as poll:
                daemon = run_daemon_once(
                    site_dsn, agent_dsn, drain_timeout, workdir / f"dbsync-catchup-{rep}.log", poll
                )
            out.update(daemon)
            out["drain_s"] = daemon["sentinel_s"] or daemon["wall_s"]
            if rep == 0:
                # The same process with nothing to do: the interpreter + asyncpg floor.
                idle = run_daemon_once(site_dsn, agent_dsn, 120, workdir / "dbsync-idle.log")
                out["idle_ru_maxrss_kb"] = idle["ru_maxrss_kb"]
        out["events_per_s"] = written / out["drain_s"]
        out["agent_row_writes"] = _agent_row_writes(agent_dsn)
        verify(site_dsn, agent_dsn, side)
        log(
            f"  catch-up {workload} rep {rep + 1} {side:<6}: drained in {out['drain_s']:.1f}s "
            f"= {out['events_per_s']:,.0f} events/s"
            + (f", peak RSS {out['ru_maxrss_kb'] / 1024:.0f} MB" if side == "dbsync" else "")
        )
        return out
    finally:
        if side == "native":
            teardown_native(w, site_db, agent_db)
        else:
            w.agent.drop_db(agent_db)
            w.site.drop_db(site_db)


def run(
    w: World,
    events: int,
    big_every: int,
    reps: int,
    workdir: Path,
    log: Callable[[str], None],
    workload: str = "whatsapp",
) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for rep in range(reps):
        order = ("native", "dbsync") if rep % 2 == 0 else ("dbsync", "native")
        for side in order:
            runs.append(_one(w, side, events, big_every, workdir, rep, log, workload))
    by = {s: [r for r in runs if r["side"] == s] for s in ("native", "dbsync")}
    ratios = []
    for rep in range(reps):
        n = next(r for r in by["native"] if r["rep"] == rep)
        d = next(r for r in by["dbsync"] if r["rep"] == rep)
        ratios.append(round(d["events_per_s"] / n["events_per_s"], 4))
    dbsync_runs = by["dbsync"]
    return {
        "workload": workload,
        "runs": runs,
        "events": runs[0]["events"],
        "big_every": big_every,
        "native_events_per_s": median([r["events_per_s"] for r in by["native"]]),
        "dbsync_events_per_s": median([r["events_per_s"] for r in by["dbsync"]]),
        "native_drain_s": median([r["drain_s"] for r in by["native"]]),
        "dbsync_drain_s": median([r["drain_s"] for r in by["dbsync"]]),
        "dbsync_wall_s": median([r["wall_s"] for r in dbsync_runs]),
        "native_write_s": median([r["write_s"] for r in by["native"]]),
        "dbsync_write_s": median([r["write_s"] for r in by["dbsync"]]),
        "native_agent_row_writes": median([r["agent_row_writes"] for r in by["native"]]),
        "dbsync_agent_row_writes": median([r["agent_row_writes"] for r in by["dbsync"]]),
        "ratios": ratios,
        "ratio_median": median(ratios),
        "memory": {
            "ru_maxrss_mb": [round(r["ru_maxrss_kb"] / 1024, 1) for r in dbsync_runs],
            "vm_hwm_mb": [round((r["vm_hwm_kb"] or 0) / 1024, 1) for r in dbsync_runs],
            "peak_mb_median": median([r["ru_maxrss_kb"] / 1024 for r in dbsync_runs]),
            "peak_mb_max": max(r["ru_maxrss_kb"] / 1024 for r in dbsync_runs),
            "idle_mb": round(dbsync_runs[0].get("idle_ru_maxrss_kb", 0) / 1024, 1),
        },
    }
