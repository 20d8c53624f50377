"""The daemon's main loop: connect, LISTEN, drain the log, wait for the doorbell, repeat.

On every (re)connect it LISTENs first and drains second, so that nothing committed while it was
away waits for a notification that will never come. The wait has a deadline (poll_interval) in
case a notification is lost anyway. Any failure closes both connections and retries with capped
exponential backoff and jitter; nothing is skipped, so a poison event is reported again and again
until someone fixes its cause.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from dbsync.config import Settings
from dbsync.daemon import pg
from dbsync.daemon.apply import LOAD_PROGRESS, READ_PROGRESS, Applier, Catalog
from dbsync.daemon.consume import INITIAL_SNAPSHOT, Progress, advance, open_batch, progress_from_row, read_page
from dbsync.errors import DbsyncError

log = logging.getLogger("dbsync.daemon")

CHANNEL = "dbsync"
PAGE_BYTES = 32 * 1024 * 1024


@dataclass
class Stats:
    batches: int = 0
    events: int = 0
    last_apply_at: float | None = None


class Backoff:
    """Capped exponential backoff with full jitter; `sleep` is injectable for tests."""

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Replicator:
    def __init__(self, settings: Settings, *, stop: asyncio.Event | None = None) -> None:
        settings.require("site_dsn", "agent_dsn")
        self.settings = settings
        self.stop = stop or asyncio.Event()
        self.wake = asyncio.Event()
        self.catalog = Catalog()
        self.applier = Applier(settings.source, self.catalog)
        self.stats = Stats()
        self.site: asyncpg.Connection | None = None
        self.agent: asyncpg.Connection | None = None
        self.progress = Progress()
        self._persisted = Progress()
        self._problem: str | None = None

    # -- connections -----------------------------------------------------------------------
    async def _connect(self) -> None:
        assert self.settings.site_dsn and self.settings.agent_dsn
        site = await pg.connect(self.settings.site_dsn, "Site")
        try:
            agent = await pg.connect(self.settings.agent_dsn, "Agent")
        except BaseException:
            await site.close()
            raise
        self.site, self.agent = site, agent
        for conn in (site, agent):
            await conn.execute("SET search_path = pg_catalog, pg_temp")
        await self._check_schema()
        # Replicated rows must not fire the Agent DB's own triggers and foreign keys.
        try:
            await agent.execute("SET session_replication_role = replica")
        except asyncpg.InsufficientPrivilegeError:
            log.warning(
                "the Agent role may not set session_replication_role; Agent DB triggers and foreign keys "
                "fire on replicated rows"
            )
        await agent.execute(LOAD_PROGRESS, self.settings.source, INITIAL_SNAPSHOT)
        row = await agent.fetchrow(READ_PROGRESS, self.settings.source)
        self.progress = self._persisted = progress_from_row(row)
        self.catalog.forget()
        # LISTEN before the first read: a commit after this point rings the bell.
        await site.add_listener(CHANNEL, self._on_notify)

    async def _check_schema(self) -> None:
        assert self.site and self.agent
        if not await self.site.fetchval("SELECT to_regclass('dbsync.sync_log') IS NOT NULL"):
            raise SchemaError("the Site DB has no dbsync schema: run `dbsync migrate` first")
        if not await self.agent.fetchval("SELECT to_regclass('dbsync.apply_progress') IS NOT NULL"):
            raise SchemaError("the Agent DB has no dbsync schema: run `dbsync migrate` first")

    async def _disconnect(self) -> None:
        for conn in (self.site, self.agent):
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), timeout=2)
                except (Exception, asyncio.TimeoutError):  # noqa: BLE001 - closing a broken link
                    conn.terminate()
        self.site = self.agent = None

    def _on_notify(self, *_: object) -> None:
        self.wake.set()

    # -- one step --------------------------------------------------------------------------
    async def step(self) -> bool:
        """Apply one page. Returns True when more may be waiting (do not sleep)."""
        assert self.site and self.agent
        progress = self.progress
        if not progress.in_batch:
            progress, count = await open_batch(self.site, progress)
            if not progress.in_batch:
                return False
            log.debug("batch opened: %d events", count)
        page = await read_page(self.site, progress, self.settings.batch_size, PAGE_BYTES)
        after = advance(progress, page)
        if page.events:
            await self.applier.apply(self.site, self.agent, page.events, self._persisted, after)
        else:
            await self.applier.save(self.agent, self._persisted, after)
        self.progress = self._persisted = after
        self.stats.events += len(page.events)
        self.stats.batches += 1
        self.stats.last_apply_at = time.time()
        return True

    async def drain(self) -> None:
        """Apply everything committed before this call, then return."""
        # A batch left open by a previous run first; then one snapshot taken now.
        while self.progress.in_batch and not self.stop.is_set():
            await self.step()
        while not self.stop.is_set():
            if not await self.step():
                return
            if not self.progress.in_batch:
                return

    # -- the loop --------------------------------------------------------------------------
    async def run(self, *, once: bool = False, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        backoff = Backoff(self.settings.retry_initial, self.settings.retry_max)
        try:
            while not self.stop.is_set():
                try:
                    await self._connect()
                    self._recovered()
                    backoff.reset()
                    if on_ready is not None:
                        await on_ready()
                    if once:
                        await self.drain()
                        return
                    await self._loop()
                except (DbsyncError, asyncpg.PostgresError, *pg.CONNECTION_ERRORS) as exc:
                    await self._disconnect()
                    if once:
                        raise
                    self._report(exc)
                    delay = backoff.next_delay()
                    try:
                        await asyncio.wait_for(self.stop.wait(), timeout=delay)
                    except asyncio.TimeoutError:
                        pass
        finally:
            await self._disconnect()

    async def _loop(self) -> None:
        while not self.stop.is_set():
            self.wake.clear()
            if await self.step():
                continue
            waiter = asyncio.ensure_future(self.wake.wait())
            stopper = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, timeout=self.settings.poll_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()

    def _report(self, exc: BaseException) -> None:
        """One log line per change of state, not per attempt."""
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, DbsyncError):
            message = f"{type(exc).__name__}: {message}"
        if message != self._problem:
            log.error("%s; retrying", message)
            self._problem = message

    def _recovered(self) -> None:
        if self._problem is not None:
            log.info("connected again; resuming")
            self._problem = None
        else:
            log.info("connected to the Site and Agent DBs; replicating")
