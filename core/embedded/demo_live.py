"""The live part of `dbsync demo`: both directions of the daemon in this event loop, the web
app's traffic on the Site DB and the automation on the Agent DB, lag measured each way.

Lag is per event: from its capture on the side it was written (sync_log.captured_at) to the
commit of its page on the other side (when the Replicator's on_page callback runs); both clusters
run on this machine, so the two timestamps come from one clock. "Behind" comes from
dbsync.status, the same numbers `dbsync status` shows for each direction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO, TypeVar

import psycopg

from dbsync.config import Settings
from dbsync.daemon.consume import Event
from dbsync.daemon.runner import Replicator
from dbsync.db import connect, first_line
from dbsync.embedded.demo_automation import Automation, automate
from dbsync.embedded.demo_report import percentile
from dbsync.embedded.demo_traffic import Crm, drive, run_all
from dbsync.errors import DbsyncError
from dbsync.status import Status, read_status

if TYPE_CHECKING:
    from dbsync.embedded.demo import DemoOptions

SOURCE = "site"
WRITE_BACK_SOURCE = Settings.write_back_source
DAEMON_START_TIMEOUT = 30.0
CATCH_UP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

T = TypeVar("T")


class LiveError(DbsyncError):
    """The daemon did not start or died under load, or its progress could not be read."""


@dataclass
class LagMeter:
    """Fed by a direction's Replicator after each page commits on the side it applies to."""

    applied: asyncio.Event  # set by both directions' meters
    lags_ms: list[float] = field(default_factory=list)
    window_ms: list[float] = field(default_factory=list)

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

    async def status(self, *, back: bool = False) -> Status:
        """Site -> Agent, or with `back` write-back: the Agent DB's log against the Site's progress."""
        capture, target = (self.agent, self.site) if back else (self.site, self.agent)
        source = WRITE_BACK_SOURCE if back else SOURCE
        async with self.lock:
            try:
                return await asyncio.to_thread(read_status, capture, target, source)
            except psycopg.Error as exc:
                raise LiveError(f"cannot read the replication status: {first_line(exc)}") from exc

    def close(self) -> None:
        self.site.close()
        self.agent.close()


@dataclass
class Direction:
    """One direction as the ticker shows it: who writes, what they wrote, what was applied."""

    label: str  # "Site -> Agent"
    writer: str  # who writes on the capturing side
    written: Callable[[], int]  # transactions so far
    meter: LagMeter
    back: bool  # the write-back direction
    last_tx: int = 0
    last_events: int = 0

    def line(self, span: float, behind: str) -> str:
        tx, events, window = self.written(), len(self.meter.lags_ms), sorted(self.meter.take_window())
        p50, p99 = (f"{percentile(window, q):6.1f}" if window else "     -" for q in (0.50, 0.99))
        line = (
            f"{self.label}  {self.writer} {(tx - self.last_tx) / span:6.1f} tx/s  "
            f"applied {(events - self.last_events) / span:7.1f} ev/s  lag p50 {p50} ms  p99 {p99} ms  "
            f"behind {behind}"
        )
        self.last_tx, self.last_events = tx, events
        return line


class Ticker:
    """Two progress lines a second, one per direction: updated in place on a terminal, plain
    lines otherwise."""

    def __init__(self, out: TextIO, directions: Sequence[Direction], probe: Probe, start: float) -> None:
        self.out, self.directions, self.probe, self.start = out, directions, probe, start
        self.tty = out.isatty()
        self.last_t = start
        self.shown = False
        self.dirty = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = self.start
        while True:
            tick += 1.0
            await asyncio.sleep(max(0.0, tick - loop.time()))
            await self.show(loop.time())

    async def show(self, now: float) -> None:
        span = max(now - self.last_t, 1e-6)
        lines: list[str] = []
        for d in self.directions:
            try:
                status = await self.probe.status(back=d.back)
                behind = behind_text(status.events_behind, status.seconds_behind)
            except LiveError:
                behind = "? (the status query failed)"
            lead = f"{now - self.start:6.1f}s" if not lines else " " * 7
            lines.append(f"{lead}  {d.line(span, behind)}")
        self.last_t = now
        if self.tty:  # back to the start of the previous tick's lines, each cleared as it is rewritten
            up = f"\x1b[{len(lines) - 1}A" if self.shown and len(lines) > 1 else ""
            self.out.write(up + "\r" + "\n".join(f"{line}\x1b[K" for line in lines))
        else:
            self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()
        self.shown = True
        self.dirty = self.tty

    def end(self) -> None:
        if self.dirty:
            self.out.write("\n")
            self.out.flush()
            self.dirty = False


def behind_text(events: int, seconds: float) -> str:
    """How far a direction is behind, with units: events not applied, and the age of the oldest."""
    age = f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
    return f"{events} event{'' if events == 1 else 's'}, {age}"


@dataclass
class Live:
    crm: Crm
    automation: Automation
    meter: LagMeter  # Site -> Agent
    back_meter: LagMeter  # Agent -> Site (write-back)
    traffic_seconds: float = 0.0
    catch_up_seconds: float | None = None
    behind: int = 0
    back_behind: int = 0
    parked: int = 0


async def replicate_under_load(site_dsn: str, agent_dsn: str, options: DemoOptions, seed: int, out: TextIO) -> Live:
    """Start both directions, drive the Site traffic and the Agent automation, wait (with a
    deadline) until each direction has applied all of it, stop."""
    applied = asyncio.Event()
    live = Live(Crm(), Automation(), LagMeter(applied), LagMeter(applied))
    stop = asyncio.Event()
    probe = Probe(site_dsn, agent_dsn)
    settings = Settings(site_dsn=site_dsn, agent_dsn=agent_dsn)
    daemons: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    ticker: Ticker | None = None
    ticking: asyncio.Task[None] | None = None
    try:
        # As `dbsync run` does: write-back starts once the Site -> Agent direction is up.
        for direction, meter in ((settings, live.meter), (settings.write_back(), live.back_meter)):
            ready = asyncio.Event()
            name = f"dbsync-{direction.source}"
            daemons.append(asyncio.create_task(_start(direction, stop, meter, ready), name=name))
            if not await _unless_daemon_dies(ready.wait(), daemons, DAEMON_START_TIMEOUT):
                raise LiveError(
                    f"the replicator (source {direction.source}) did not connect within {DAEMON_START_TIMEOUT:.0f} s"
                )
        start = loop.time()
        directions = [
            Direction("Site -> Agent", "site", lambda: live.crm.transactions, live.meter, back=False),
            Direction("Agent -> Site", "auto", lambda: live.automation.transactions, live.back_meter, back=True),
        ]
        ticker = Ticker(out, directions, probe, start)
        ticking = asyncio.create_task(ticker.run())
        traffic = drive(
            site_dsn, live.crm, rate=options.rate, duration=options.duration, writers=options.writers, seed=seed
        )
        automation = automate(
            agent_dsn, live.automation, rate=options.automation_rate, duration=options.duration, seed=seed
        )
        await _unless_daemon_dies(run_all((traffic, automation)), daemons)
        stopped = loop.time()
        live.traffic_seconds = stopped - start
        deadline = stopped + CATCH_UP_TIMEOUT
        while True:
            applied.clear()
            status, back = await probe.status(), await probe.status(back=True)
            live.behind, live.back_behind = status.events_behind, back.events_behind
            live.parked = status.parked_events + back.parked_events
            # Nothing dbsync applies is captured again, so once both are 0 both stay 0.
            if status.events_behind == 0 and back.events_behind == 0:
                live.catch_up_seconds = loop.time() - stopped
                return live
            if loop.time() >= deadline:
                return live
            await _unless_daemon_dies(applied.wait(), daemons, min(0.5, deadline - loop.time()))
    finally:
        if ticking is not None:
            ticking.cancel()
            await asyncio.gather(ticking, return_exceptions=True)
        if ticker is not None:
            ticker.end()
        stop.set()
        if daemons:
            await asyncio.wait(daemons, timeout=STOP_TIMEOUT)
        for daemon in daemons:
            if not daemon.done():
                daemon.cancel()
        await asyncio.gather(*daemons, return_exceptions=True)
        probe.close()


async def _start(settings: Settings, stop: asyncio.Event, meter: LagMeter, ready: asyncio.Event) -> None:
    async def on_ready() -> None:
        ready.set()

    await Replicator(settings, stop=stop, on_page=meter.on_page).run(on_ready=on_ready)


async def _unless_daemon_dies(
    aw: Awaitable[T], daemons: Collection[asyncio.Task[None]], timeout: float | None = None
) -> T | None:
    """Await `aw` (None once `timeout` passes), failing at once if a daemon task ends first."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait({task, *daemons}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.done() and not task.cancelled():
        return task.result()
    for daemon in daemons:
        if daemon.done():
            exc = None if daemon.cancelled() else daemon.exception()
            raise LiveError(f"the replicator stopped unexpectedly: {exc or 'no error reported'}") from exc
    return None
