"""What the incremental verification costs: `python -m bench.verify_cost [--reps 3]`.

The latency bench's paced WhatsApp load (bench/latency.py, 1,000 row changes/s by default) runs
against one dbsync daemon, alternately without and with `--verify-interval`. For each run it
reports replication latency (p50, p99) and the Site DB's load from the start of the writing until
the daemon has stopped: the Site server's CPU seconds (the postmaster and every backend, exited
ones included, from /proc), the rows read from every table of the Site database
(pg_stat_all_tables: seq_tup_read + idx_tup_fetch, the writers', the daemon's and the verifier's
together, and by table: sequential and index reads), and the keys the verification compared
(dbsync.verify_mark) against the rows written. The summary gives medians and, for the spread,
each rep's ratio of the verifying run to the plain one (the two run back to back).
The issue's target: at most +20% Site read load, p99 no more than 2 ms higher.

With --statements the Site server loads pg_stat_statements (a restart before the setup) and each
run records the statements that hit the most buffers, with their calls and rows, and the share
of the verifier's own statements (by their text: the key lookups, the in-flight and pass-key log
reads, the catch-up count): which statement the extra rows read come from. Results go to
bench/results/verify-cost-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from bench import latency
from bench.env import World, connect, world
from bench.stats import median

# Every table of the Site database, dbsync's log included. Counters reach pg_stat at the end of a
# transaction, at most a second late: read after the daemon has stopped, and a second later.
SITE_READS = """
SELECT coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)), 0)::bigint,
       coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del) FILTER (WHERE schemaname = 'public'), 0)::bigint
FROM pg_stat_all_tables WHERE schemaname IN ('public', 'dbsync')
"""
BY_TABLE = """
SELECT schemaname || '.' || relname, seq_tup_read, coalesce(idx_tup_fetch, 0)
FROM pg_stat_all_tables WHERE schemaname IN ('public', 'dbsync') ORDER BY 1
"""
# The daemon's own Site sessions (apply, log reads, retention, verification) carry this name.
APP = "dbsync_bench_daemon"
DAEMON_BACKENDS = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
KEYS_VERIFIED = "SELECT coalesce(sum(keys_verified), 0)::bigint FROM dbsync.verify_mark"
RESULTS = Path(__file__).resolve().parent / "results"

# pg_stat_statements of the Site database (--statements): a run's statements by buffers hit.
STATEMENTS = """
SELECT s.query, s.calls, s.rows, s.shared_blks_hit + s.shared_blks_read
FROM public.pg_stat_statements s
WHERE s.dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
ORDER BY 4 DESC
"""
# The verifier's statements on the Site, by what their text holds (core/reconcile.py,
# daemon/verify_keys.py, protocol.PENDING_BY_TABLE as core/catchup.py runs it).
VERIFIER_MARKS = {
    "key lookup (rows_by_key)": "json_to_recordset",
    "moving keys (in-flight log read)": "json_to_record(lk.key)",
    "catch-up count (pending_by_table)": "GROUP BY l.table_id",
    "pass keys (log read after a restart)": "SELECT p.seq, p.table_id, k.key::text",
    "pass bounds": "SELECT min(l.seq), max(l.seq)",
}


def server_cpu(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL server: the postmaster's own and reaped children's (fields
    14-17 of /proc/<pid>/stat), plus its live children's."""
    tick = os.sysconf("SC_CLK_TCK")

    def fields(pid: int | str) -> list[str]:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    own = fields(postmaster)
    total = sum(int(x) for x in own[11:15])
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                f = fields(entry)
            except OSError:
                continue
            if int(f[1]) == postmaster:
                total += int(f[11]) + int(f[12])
    return total / tick


def backends_cpu(site_dsn: str) -> dict[int, float]:
    """CPU seconds so far of each of the daemon's Site backends, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    with connect(site_dsn) as site:
        pids = [r[0] for r in site.execute(DAEMON_BACKENDS, (APP,)).fetchall()]
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(f[11]) + int(f[12])) / tick
    return out


def _counters(w: World, site_dsn: str, agent_dsn: str) -> tuple[float, int, int, int]:
    with connect(site_dsn) as site:
        reads, writes = site.execute(SITE_READS).fetchone()  # type: ignore[misc]
    with connect(agent_dsn) as agent:
        keys = agent.execute(KEYS_VERIFIED).fetchone()[0]  # type: ignore[index]
    pid = w.site.cluster.pid
    assert pid is not None
    return server_cpu(pid), int(reads), int(writes), int(keys)


def _by_table(site_dsn: str) -> dict[str, tuple[int, int]]:
    with connect(site_dsn) as site:
        return {r[0]: (int(r[1]), int(r[2])) for r in site.execute(BY_TABLE).fetchall()}


def _read_where(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Rows read during a run by table, [sequential, through an index], tables that read none left out."""
    out: dict[str, list[int]] = {}
    for name, (seq, idx) in sorted(after.items()):
        was = before.get(name, (0, 0))
        if (seq - was[0], idx - was[1]) != (0, 0):
            out[name] = [seq - was[0], idx - was[1]]
    return out


def load_statements(w: World) -> None:
    """pg_stat_statements on the Site server: preloaded, so a restart (before the setup)."""
    with connect(w.site.admin_dsn) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.max = 10000")
    w.site.cluster.stop()
    w.site.cluster.start()


def reset_statements(site_dsn: str) -> None:
    with connect(site_dsn) as site:
        site.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public")
        site.execute("SELECT public.pg_stat_statements_reset()")


def read_statements(site_dsn: str, top: int = 15) -> dict[str, Any]:
    """The run's statements with the most buffers hit, and the verifier's statements summed."""
    with connect(site_dsn) as site:
        rows = [(str(q), int(c), int(r), int(b)) for q, c, r, b in site.execute(STATEMENTS).fetchall()]
    verifier: dict[str, list[int]] = {}
    for kind, mark in VERIFIER_MARKS.items():
        mine = [r for r in rows if mark in r[0]]
        verifier[kind] = [sum(r[1] for r in mine), sum(r[2] for r in mine), sum(r[3] for r in mine)]
    return {
        "buffers_total": sum(r[3] for r in rows),
        "verifier_calls_rows_buffers": verifier,
        "top": [{"query": " ".join(q.split())[:160], "calls": c, "rows": n, "buffers": b} for q, c, n, b in rows[:top]],
    }


def one(
    w: World, consumer: latency.Consumer, interval: float | None, args: argparse.Namespace, rep: int
) -> dict[str, Any]:
    site_dsn, agent_dsn = consumer.site_dsn, consumer.agent_dsn
    if args.statements:
        reset_statements(site_dsn)
    consumer.extra = ("--verify-interval", str(interval)) if interval is not None else ()
    consumer.start()
    try:
        w.site.checkpoint()
        w.agent.checkpoint()
        time.sleep(1.0)
        before = _counters(w, site_dsn, agent_dsn)
        tables_before = _by_table(site_dsn)
        daemon0 = backends_cpu(site_dsn)
        result = latency.measure(
            consumer,
            args.rate,
            args.seconds,
            args.warmup,
            latency.BASE_ID + rep * 2_000_000 + (interval is not None) * 1_000_000,
            args.writers,
        )
        if interval is not None:
            time.sleep(interval + 1.0)  # the pass over the last writes
        else:
            time.sleep(2.0)
        daemon1 = backends_cpu(site_dsn)
    finally:
        consumer.stop()
    time.sleep(1.5)
    after = _counters(w, site_dsn, agent_dsn)
    cpu, reads, writes, keys = (a - b for a, b in zip(after, before, strict=True))
    where = _read_where(tables_before, _by_table(site_dsn))
    statements = read_statements(site_dsn) if args.statements else None
    return {
        "load_average": os.getloadavg()[0],
        "verify_interval": interval,
        "rep": rep,
        "site_cpu_s": round(cpu, 2),
        "daemon_site_cpu_s": round(sum(t - daemon0.get(pid, 0.0) for pid, t in daemon1.items()), 2),
        "site_rows_read": reads,
        "site_rows_written": writes,
        "keys_verified": keys,
        **{k: result[k] for k in ("p50_ms", "p99_ms", "achieved_changes_per_s", "lost", "daemon_cpu_share")},
        "site_rows_read_by_table": where,
        "statements": statements,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.verify_cost", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rate", type=float, default=1000.0, help="row changes/s (default 1000)")
    p.add_argument("--seconds", type=float, default=10.0, help="writing per run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--interval", type=float, default=1.0, help="--verify-interval of the verifying runs")
    p.add_argument("--mode", choices=("durable", "fast"), default="durable")
    p.add_argument("--statements", action="store_true", help="record per-statement Site reads (pg_stat_statements)")
    args = p.parse_args(argv)
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="dbsync-verify-cost-"))
    runs: list[dict[str, Any]] = []
    with world(args.mode) as w:
        if args.statements:
            load_statements(w)
        site_dsn, agent_dsn = latency._setup(w, "dbsync")
        consumer = latency.Consumer("dbsync", site_dsn, agent_dsn, workdir)
        consumer.daemon_site_dsn = make_conninfo(site_dsn, application_name=APP)
        try:
            for rep in range(args.reps):
                order = (None, args.interval) if rep % 2 == 0 else (args.interval, None)
                for interval in order:
                    r = one(w, consumer, interval, args, rep)
                    runs.append(r)
                    print(
                        f"rep {rep + 1}/{args.reps} verify_interval={interval}: "
                        f"{r['achieved_changes_per_s']:.0f} changes/s, p50 {r['p50_ms']:.1f} ms, "
                        f"p99 {r['p99_ms']:.1f} ms, Site CPU {r['site_cpu_s']:.2f} s "
                        f"(daemon's sessions {r['daemon_site_cpu_s']:.2f} s), "
                        f"Site rows read {r['site_rows_read']}, "
                        f"written {r['site_rows_written']}, keys verified {r['keys_verified']}, lost {r['lost']}, "
                        f"load {r['load_average']:.1f}",
                        flush=True,
                    )
        finally:
            latency._teardown(w, "dbsync")
    summary: dict[str, Any] = {}
    for name, interval in (("off", None), ("on", args.interval)):
        mine = [r for r in runs if r["verify_interval"] == interval]
        summary[name] = {
            k: median([r[k] for r in mine])
            for k in (
                "p50_ms",
                "p99_ms",
                "site_cpu_s",
                "daemon_site_cpu_s",
                "site_rows_read",
                "site_rows_written",
                "keys_verified",
            )
        }
    off, on = summary["off"], summary["on"]
    summary["site_reads_ratio"] = (
        round(on["site_rows_read"] / off["site_rows_read"], 3) if off["site_rows_read"] else None
    )
    summary["site_cpu_ratio"] = round(on["site_cpu_s"] / off["site_cpu_s"], 3) if off["site_cpu_s"] else None
    summary["daemon_site_cpu_ratio"] = (
        round(on["daemon_site_cpu_s"] / off["daemon_site_cpu_s"], 3) if off["daemon_site_cpu_s"] else None
    )
    summary["p99_delta_ms"] = round(on["p99_ms"] - off["p99_ms"], 2)
    pairs = [
        (next(r for r in runs if r["rep"] == rep and r["verify_interval"] is None), r)
        for rep in range(args.reps)
        for r in runs
        if r["rep"] == rep and r["verify_interval"] is not None
    ]
    summary["per_rep"] = {
        "site_reads_ratio": [
            round(b["site_rows_read"] / a["site_rows_read"], 3) for a, b in pairs if a["site_rows_read"]
        ],
        "site_cpu_ratio": [round(b["site_cpu_s"] / a["site_cpu_s"], 3) for a, b in pairs if a["site_cpu_s"]],
        "p99_delta_ms": [round(b["p99_ms"] - a["p99_ms"], 2) for a, b in pairs],
    }
    out = {
        "command": "python -m bench.verify_cost " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": started,
        "load_average": [load_before[0], os.getloadavg()[0]],
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"verify-cost-{started}.json"
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=1))
    print(f"results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
