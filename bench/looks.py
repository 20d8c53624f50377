"""Where a look's milliseconds go: the daemon at the latency bench's load, each phase timed.

`python -m bench.looks [SECONDS] [--linger MS] [--explain]` starts a Site/Agent pair (durable
settings), the latency bench's paced writer (1,000 row changes/s on 8 connections) and its
observer, and runs the Replicator in this process with a wall-clock and a CPU timer (this
process's, time.process_time) around each phase of a step: the one-statement Site read
(read_small_batch), the apply and its one Agent statement (_write_page), the pause between
looks, the doorbell and retention calls. It prints commit -> visible percentiles, looks per
second, the daemon's CPU share (user and system) and CPU per look, and per phase the median,
p90, p99 and total. `--explain` then runs EXPLAIN ANALYZE of the small-batch statement with
the daemon's settings (generic plan, no JIT) over a two-event batch.

The timers cost a few microseconds per phase; compare runs of this script with each other,
not with bench.latency's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from bench import latency
from bench.env import world
from bench.stats import median, percentile
from dbsync.config import Settings
from dbsync.daemon import runner
from dbsync.daemon.consume import SMALL_BATCH
from dbsync.daemon.pg import connect_kwargs

Timings = dict[str, list[float]]


def _timed(owner: Any, attr: str, name: str, out: Timings) -> None:
    fn: Callable[..., Awaitable[Any]] = getattr(owner, attr)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return await fn(*args, **kwargs)
        finally:
            out.setdefault(name, []).append((time.perf_counter() - wall) * 1000)
            out.setdefault(name + " cpu", []).append((time.process_time() - cpu) * 1000)

    setattr(owner, attr, wrapper)


def instrument(out: Timings) -> None:
    _timed(runner, "read_small_batch", "site read (one statement)", out)
    _timed(runner.Applier, "apply", "apply", out)
    _timed(runner.Applier, "_write_page", "agent write (one statement)", out)
    _timed(runner.Replicator, "step", "step", out)
    _timed(runner.Replicator, "_pause", "pause between looks", out)
    _timed(runner.Doorbell, "busy", "doorbell.busy", out)
    _timed(runner.Doorbell, "idle", "doorbell.idle", out)
    _timed(runner.Retention, "maybe_prune", "retention.maybe_prune", out)


async def explain(site_dsn: str, prev: str) -> list[str]:
    """EXPLAIN ANALYZE of the small-batch statement from `prev` over two new events."""
    site = await asyncpg.connect(**connect_kwargs(site_dsn, "site_dsn"))
    try:
        await site.execute(latency.INSERT, 999_000_001, 5, "looks-999000001")
        await site.execute(latency.DELIVERED, 999_000_001)
        await site.execute("SET plan_cache_mode = force_generic_plan; SET jit = off")
        await site.execute(f"PREPARE small_batch(text, text, int) AS {SMALL_BATCH}")
        if not all(c in "0123456789:," for c in prev):
            raise ValueError(f"not a snapshot: {prev!r}")
        plan: list[asyncpg.Record] = []
        for _ in range(6):  # past the first executions, as in the daemon
            plan = await site.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE small_batch('{prev}', '{prev}', 100)")
        return [row[0] for row in plan]
    finally:
        await site.close()


async def measure(site_dsn: str, agent_dsn: str, seconds: float, show_plan: bool) -> None:
    timings: Timings = {}
    instrument(timings)
    stop = asyncio.Event()
    r = runner.Replicator(Settings(site_dsn=site_dsn, agent_dsn=agent_dsn), stop=stop)
    r.on_report = lambda _report: None  # as the service's metrics do: _applied_by_table runs
    task = asyncio.ensure_future(r.run())
    await asyncio.sleep(2)
    ctx = mp.get_context("spawn")
    obs_out, wr_out = ctx.Queue(), ctx.Queue()
    ready, obs_stop = ctx.Event(), ctx.Event()
    observer = ctx.Process(target=latency.observer_main, args=(agent_dsn, ready, obs_stop, obs_out), daemon=True)
    writer = ctx.Process(
        target=latency.writer_main, args=(site_dsn, 1000.0, seconds, latency.BASE_ID, 8, wr_out), daemon=True
    )
    observer.start()
    while not ready.is_set():
        await asyncio.sleep(0.05)
    timings.clear()
    looks0 = r.stats.looks
    events0 = r.stats.events
    usage0, cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.monotonic()
    writer.start()
    loop = asyncio.get_running_loop()
    written = await loop.run_in_executor(None, latency._collect, wr_out, writer, seconds + 120, "writer")
    elapsed = time.monotonic() - wall0
    cpu, usage = time.process_time() - cpu0, resource.getrusage(resource.RUSAGE_SELF)
    looks, events = r.stats.looks - looks0, r.stats.events - events0
    await asyncio.sleep(1.5)
    obs_stop.set()
    arrivals = await loop.run_in_executor(None, latency._collect, obs_out, observer, 60, "observer")
    prev = r.progress.prev_snapshot
    stop.set()
    await task
    s = latency.summarize(written, arrivals, 2.0)
    user, system = usage.ru_utime - usage0.ru_utime, usage.ru_stime - usage0.ru_stime
    print(
        f"LINGER {runner.LINGER * 1000:.1f} ms: commit -> visible p50 {s['p50_ms']:.1f} / p90 {s['p90_ms']:.1f} / "
        f"p99 {s['p99_ms']:.1f} ms at {s['achieved_changes_per_s']:.0f} changes/s; {looks / elapsed:.0f} looks/s, "
        f"{events / max(1, looks):.1f} events per look; daemon CPU {cpu / elapsed:.0%} of a core "
        f"(user {user / elapsed:.1%}, system {system / elapsed:.1%}), "
        f"{cpu / max(1, looks) * 1000:.2f} ms per look"
    )
    print(f"{'phase (ms)':<34} {'n':>6} {'median':>8} {'p90':>8} {'p99':>8} {'total s':>8}")
    for name, xs in sorted(timings.items()):
        print(
            f"{name:<34} {len(xs):>6} {median(xs) or 0:>8.3f} {percentile(xs, 90) or 0:>8.3f} "
            f"{percentile(xs, 99) or 0:>8.3f} "
            f"{sum(xs) / 1000:>8.2f}"
        )
    if show_plan:
        print("\n".join(await explain(site_dsn, prev)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.looks", description=__doc__.splitlines()[0])
    p.add_argument("seconds", nargs="?", type=float, default=15.0, help="seconds of writing (default 15)")
    p.add_argument("--linger", type=float, help="the pause between looks in ms (default: runner.LINGER)")
    p.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the small-batch statement after")
    args = p.parse_args(argv)
    if args.linger is not None:
        runner.LINGER = args.linger / 1000
    with world("durable") as w:
        site_dsn, agent_dsn = latency._setup(w, "dbsync")
        asyncio.run(measure(site_dsn, agent_dsn, args.seconds, args.explain))


if __name__ == "__main__":
    main()
