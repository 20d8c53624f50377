"""What a NOTIFY flood costs an idle daemon: CPU of a real `dbsync run` while a role floods 'dbsync'.

    python -m bench.notify_flood [--seconds 10] [--clients 4]

One throwaway cluster holds the Site and the Agent DB. The daemon runs as a subprocess; its CPU
(utime + stime from /proc/<pid>/stat) is read over an idle interval and over a flood: pgbench
clients that each send `NOTIFY dbsync` in a loop, one per transaction, for `--seconds` seconds.
Prints both, as a share of one core.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from dbsync import migrations
from dbsync.embedded.cluster import LocalCluster

TICK = os.sysconf("SC_CLK_TCK")
DAEMON_BACKENDS = "SELECT pid FROM pg_stat_activity WHERE application_name = 'dbsync' AND datname = 'flood_site'"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4, help="pgbench clients, each NOTIFYing in a loop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(name="flood") as cluster:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE flood_site")
            admin.execute("CREATE DATABASE flood_agent")
        site, agent = cluster.dsn("flood_site"), cluster.dsn("flood_agent")
        migrations.apply(site, "site", ["whatsapp"])
        migrations.apply(agent, "agent", ["whatsapp"])
        env = {**os.environ, "DBSYNC_SITE_DSN": site, "DBSYNC_AGENT_DSN": agent}
        daemon = subprocess.Popen([sys.executable, "-m", "dbsync", "run"], env=env, stderr=subprocess.DEVNULL)
        try:
            with psycopg.connect(site, autocommit=True) as conn:
                deadline = time.monotonic() + 30
                while conn.execute("SELECT armed FROM dbsync.doorbell").fetchone() != (True,):
                    if time.monotonic() > deadline:
                        raise SystemExit("the daemon did not arm the doorbell")
                    time.sleep(0.05)
                # The daemon's own Site session works for every look too.
                backends = [r[0] for r in conn.execute(DAEMON_BACKENDS).fetchall()]

                def cpu() -> tuple[float, float]:
                    return cpu_seconds(daemon.pid), sum(cpu_seconds(pid) for pid in backends)

                t0, (c0, b0) = time.monotonic(), cpu()
                time.sleep(args.seconds)
                t1, (c1, b1) = time.monotonic(), cpu()
                script = Path(tmp) / "notify.sql"
                script.write_text("NOTIFY dbsync;\n")
                bench = [str(cluster.bindir / "pgbench"), "-n", "-M", "simple", "-f", str(script)]
                bench += ["-c", str(args.clients), "-j", "2", "-T", str(int(args.seconds)), site]
                out = subprocess.run(bench, capture_output=True, text=True, check=True).stdout
                t2, (c2, b2) = time.monotonic(), cpu()
                sent = re.search(r"number of transactions actually processed: (\d+)", out)
            print(
                f"idle:  daemon CPU {100 * (c1 - c0) / (t1 - t0):5.1f}% of a core, its Site backend "
                f"{100 * (b1 - b0) / (t1 - t0):5.1f}%, over {t1 - t0:.1f} s"
            )
            print(
                f"flood: daemon CPU {100 * (c2 - c1) / (t2 - t1):5.1f}% of a core, its Site backend "
                f"{100 * (b2 - b1) / (t2 - t1):5.1f}%, over {t2 - t1:.1f} s "
                f"while {args.clients} pgbench clients sent {sent[1] if sent else '?'} NOTIFYs "
                f"({int(sent[1]) / (t2 - t1) if sent else 0:.0f}/s)"
            )
        finally:
            daemon.terminate()
            daemon.wait(timeout=20)


if __name__ == "__main__":
    main()
