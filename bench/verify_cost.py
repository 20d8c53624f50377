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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
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


def one(
    w: World, consumer: latency.Consumer, interval: float | None, args: argparse.Namespace, rep: int
) -> dict[str, Any]:
    site_dsn, agent_dsn = consumer.site_dsn, consumer.agent_dsn
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
    return {
        "verify_interval": interval,
        "rep": rep,
        "site_cpu_s": round(cpu, 2),
        "daemon_site_cpu_s": round(sum(t - daemon0.get(pid, 0.0) for pid, t in daemon1.items()), 2),
        "site_rows_read": reads,
        "site_rows_written": writes,
        "keys_verified": keys,
        **{k: result[k] for k in ("p50_ms", "p99_ms", "achieved_changes_per_s", "lost", "daemon_cpu_share")},
        "site_rows_read_by_table": where,
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
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="dbsync-verify-cost-"))
    runs: list[dict[str, Any]] = []
    with world(args.mode) as w:
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
                        f"written {r['site_rows_written']}, keys verified {r['keys_verified']}, lost {r['lost']}",
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
    print(json.dumps({"runs": runs, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
