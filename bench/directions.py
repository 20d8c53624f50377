"""Events per second per direction of a two-way pair (docs/scaling.md).

Two fresh databases on the benchmark's two clusters, `dbsync migrate --two-way`, one table
(`public.items`: a bigint key, a text and two small columns) registered both ways. Each rep
writes the same backlog (single-row INSERT transactions, then one UPDATE of every row, in a
server-side loop) on one side while nothing consumes, then times `dbsync run --once`
draining it: Site -> Agent, then Agent -> Site on new databases. Both sides are compared
row for row after each drain.

    python -m bench.directions --events 100000 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.env import REPO, World, connect, world
from bench.stats import median

TABLE = "CREATE TABLE public.items (id bigint PRIMARY KEY, v text NOT NULL, stage text, score int)"
# The backlog: `n` one-row transactions, then one statement updating every row (2n events).
BACKLOG = """
CREATE PROCEDURE public.backlog(n int) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..n LOOP
        INSERT INTO public.items VALUES (i, 'item ' || i, 'new', 0);
        COMMIT;
    END LOOP;
    UPDATE public.items SET stage = 'qualified', score = id % 100;
    COMMIT;
END $$
"""
DIGEST = "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0) FROM public.items t"


def _cli(env: dict[str, str], *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dbsync", *args], env=env, cwd=REPO, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"dbsync {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def _pair(w: World, rep: int) -> tuple[str, str, dict[str, str]]:
    site = w.site.create_db(f"bench_dir_site_{rep}")
    agent = w.agent.create_db(f"bench_dir_agent_{rep}")
    for dsn in (site, agent):
        with connect(dsn) as conn:
            conn.execute(TABLE)
            conn.execute(BACKLOG)
    env = {**os.environ, "DBSYNC_SITE_DSN": site, "DBSYNC_AGENT_DSN": agent}
    _cli(env, "migrate", "--two-way")
    _cli(env, "tables", "add", "public.items")
    _cli(env, "tables", "add", "--from", "agent", "public.items")
    return site, agent, env


def _drain(env: dict[str, str]) -> float:
    started = time.monotonic()
    _cli(env, "--log-level", "warning", "run", "--once")
    return time.monotonic() - started


def one(w: World, direction: str, events: int, rep: int) -> dict[str, Any]:
    site, agent, env = _pair(w, rep)
    source, target = (site, agent) if direction == "site->agent" else (agent, site)
    try:
        with connect(source) as conn:
            started = time.monotonic()
            conn.execute("CALL public.backlog(%s)", (events // 2,))
            write_s = time.monotonic() - started
        drain_s = _drain(env)
        with connect(source) as s, connect(target) as t:
            if s.execute(DIGEST).fetchone() != t.execute(DIGEST).fetchone():
                raise SystemExit(f"{direction}: the two sides differ after the drain")
        return {"direction": direction, "rep": rep, "events": events, "write_s": write_s, "drain_s": drain_s,
                "events_per_s": events / drain_s}
    finally:
        w.site.drop_db(f"bench_dir_site_{rep}")
        w.agent.drop_db(f"bench_dir_agent_{rep}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000, help="events per backlog (default 100000)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    runs: list[dict[str, Any]] = []
    with world("durable") as w:
        for rep in range(args.reps):
            order = ("site->agent", "agent->site") if rep % 2 == 0 else ("agent->site", "site->agent")
            for direction in order:
                run = one(w, direction, args.events, rep)
                runs.append(run)
                print(f"rep {rep + 1} {direction}: {run['events_per_s']:,.0f} events/s "
                      f"(drain {run['drain_s']:.1f} s, backlog written in {run['write_s']:.1f} s)", flush=True)
    for direction in ("site->agent", "agent->site"):
        rates = [r["events_per_s"] for r in runs if r["direction"] == direction]
        print(f"{direction}: median {median(rates):,.0f} events/s over {len(rates)} reps", flush=True)
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
