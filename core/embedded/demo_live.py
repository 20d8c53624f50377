"""The live part of `dbsync demo`: the daemon in this event loop, traffic on, lag measured.

Lag is per event: from its capture on the Site DB (sync_log.captured_at) to the commit of its
page on the Agent DB (when the Replicator's on_page callback runs); both clusters run on this
machine, so the two timestamps come from one clock. "Behind" comes from
dbsync.status, the same numbers `dbsync status` shows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO, TypeVar

import psycopg

from dbsync.config import Settings
from dbsync.daemon.consume import Event
from dbsync.daemon.runner import Replicator
from dbsync.db import connect, first_line
from dbsync.embedded.demo_report import percentile
from dbsync.embedded.demo_traffic import Crm, drive
from dbsync.errors import DbsyncError
from dbsync.status import Status, read_status

if TYPE_CHECKING:
    from dbsync.embedded.demo import DemoOptions

SOURCE = "site"
DAEMON_START_TIMEOUT = 30.0
CATCH_UP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

T = TypeVar("T")


class LiveError(DbsyncError):
    """The daemon did not start or died under load, or its progress could not be read."""


@dataclass
class LagMeter:
    """Fed by the Replicator after each page commits on the Agent DB."""

    lags_ms: list[float] = field(default_factory=list)
    window_ms: list[float] = field(default_factory=list)
    applied: asyncio.Event = field(default_factory=asyncio.Event)

    def on_page(self, events: Sequence[Event]) -> None:
        now = time.time()
        lags = [(now - e.captured_at.timestamp()) * 1000.0 for e in events]
        self.lags_ms.extend(lags)
        self.window_ms.extend(lags)
        self.applied.set()

    def take_window(self) -> list[float]:
        window, self.window_ms = self.window_ms, []
        return window


class Probe:
    """dbsync.status on two sync connections, run off the event loop one call at a time."""

    def __init__(self, site_dsn: str, agent_dsn: str) -> None:
        self.site = connect(site_dsn, "Site")
        self.agent = connect(agent_dsn, "Agent")
        self.lock = asyncio.Lock()

    async def status(self) -> Status:
        async with self.lock:
            try:
                return await asyncio.to_thread(read_status, self.site, self.agent, SOURCE)
            except psycopg.Error as exc:
                raise LiveError(f"cannot read the replication status: {first_line(exc)}") from exc

    def close(self) -> None:
        self.site.close()
        self.agent.close()


class Ticker:
    """One progress line a second: an updating line on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO, crm: Crm, meter: LagMeter, probe: Probe, start: float) -> None:
        self.out, self.crm, self.meter, self.probe, self.start = out, crm, meter, probe, start
        self.tty = out.isatty()
        self.last_t, self.last_tx, self.last_events = start, 0, 0
        self.dirty = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = self.start
        while True:
            tick += 1.0
            await asyncio.sleep(max(0.0, tick - loop.time()))
            await self.show(loop.time())

    async def show(self, now: float) -> None:
        try:
            status = await self.probe.status()
            behind = behind_text(status.events_behind, status.seconds_behind)
        except LiveError:
            behind = "? (the status query failed)"
        span = max(now - self.last_t, 1e-6)
        tx, events, window = self.crm.transactions, len(self.meter.lags_ms), sorted(self.meter.take_window())
        p50, p99 = (f"{percentile(window, q):6.1f}" if window else "     -" for q in (0.50, 0.99))
        line = (
            f"{now - self.start:6.1f}s  site {(tx - self.last_tx) / span:6.1f} tx/s  "
            f"applied {(events - self.last_events) / span:7.1f} ev/s  lag p50 {p50} ms  p99 {p99} ms  "
            f"behind {behind}"
        )
        self.last_t, self.last_tx, self.last_events = now, tx, events
        self.out.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.out.flush()
        self.dirty = self.tty

    def end(self) -> None:
        if self.dirty:
            self.out.write("\n")
            self.out.flush()
            self.dirty = False


def behind_text(events: int, seconds: float) -> str:
    """How far the Agent DB is behind, with units: events not applied, and the age of the oldest."""
    age = f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
    return f"{events} event{'' if events == 1 else 's'}, {age}"


@dataclass
class Live:
    crm: Crm
    meter: LagMeter
    traffic_seconds: float = 0.0
    catch_up_seconds: float | None = None
    behind: int = 0
    parked: int = 0


async def replicate_under_load(site_dsn: str, agent_dsn: str, options: DemoOptions, seed: int, out: TextIO) -> Live:
    """Start the daemon, drive the traffic, wait (with a deadline) until all of it is applied, stop."""
    live = Live(Crm(), LagMeter())
    stop, ready = asyncio.Event(), asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    probe = Probe(site_dsn, agent_dsn)
    replicator = Replicator(Settings(site_dsn=site_dsn, agent_dsn=agent_dsn), stop=stop, on_page=live.meter.on_page)
    daemon = asyncio.create_task(replicator.run(on_ready=on_ready), name="dbsync-daemon")
    loop = asyncio.get_running_loop()
    ticker: Ticker | None = None
    ticking: asyncio.Task[None] | None = None
    try:
        if not await _unless_daemon_dies(ready.wait(), daemon, DAEMON_START_TIMEOUT):
            raise LiveError(f"the replicator did not connect within {DAEMON_START_TIMEOUT:.0f} s")
        start = loop.time()
        ticker = Ticker(out, live.crm, live.meter, probe, start)
        ticking = asyncio.create_task(ticker.run())
        traffic = drive(
            site_dsn, live.crm, rate=options.rate, duration=options.duration, writers=options.writers, seed=seed
        )
        await _unless_daemon_dies(traffic, daemon)
        stopped = loop.time()
        live.traffic_seconds = stopped - start
        deadline = stopped + CATCH_UP_TIMEOUT
        while True:
            live.meter.applied.clear()
            status = await probe.status()
            live.behind, live.parked = status.events_behind, status.parked_events
            if status.events_behind == 0:
                live.catch_up_seconds = loop.time() - stopped
                return live
            if loop.time() >= deadline:
                return live
            await _unless_daemon_dies(live.meter.applied.wait(), daemon, min(0.5, deadline - loop.time()))
    finally:
        if ticking is not None:
            ticking.cancel()
            await asyncio.gather(ticking, return_exceptions=True)
        if ticker is not None:
            ticker.end()
        stop.set()
        await asyncio.wait({daemon}, timeout=STOP_TIMEOUT)
        if not daemon.done():
            daemon.cancel()
        await asyncio.gather(daemon, return_exceptions=True)
        probe.close()


async def _unless_daemon_dies(aw: Awaitable[T], daemon: asyncio.Task[None], timeout: float | None = None) -> T | None:
    """Await `aw` (None once `timeout` passes), failing at once if the daemon task ends first."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait({task, daemon}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.done() and not task.cancelled():
        return task.result()
    if daemon.done():
        exc = None if daemon.cancelled() else daemon.exception()
        raise LiveError(f"the replicator stopped unexpectedly: {exc or 'no error reported'}") from exc
    return None
