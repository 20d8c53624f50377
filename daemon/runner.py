"""The daemon's main loop: connect, become the active daemon, LISTEN, drain, wait, repeat.

On every (re)connect it LISTENs first and drains second, so that nothing committed while it was
away waits for a notification that will never come. The wait has a deadline (poll_interval) in
case a notification is lost anyway. Any failure closes both connections and retries with capped
exponential backoff and jitter; nothing is skipped, so a poison event is reported (in the log
and in dbsync.apply_progress.last_error) until someone fixes its cause, unless the policy is
"park".

Only one daemon applies a source at a time: it holds a session advisory lock on the Agent DB
for as long as its Agent connection lives. Others wait as standbys and take over when the lock
is released (the holder's connection closes when the process dies). The progress row's guard
(see apply.SAVE_PROGRESS) makes a double apply impossible even if two ever overlapped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from dbsync.config import Settings
from dbsync.daemon import pg
from dbsync.daemon.apply import LOAD_PROGRESS, READ_PROGRESS, RECORD_ERROR, Applier, Catalog
from dbsync.daemon.consume import INITIAL_SNAPSHOT, Progress, advance, open_batch, progress_from_row, read_page
from dbsync.errors import ApplyError, DbsyncError, SchemaError

log = logging.getLogger("dbsync.daemon")

CHANNEL = "dbsync"
# Row-image bytes per page (past its first event); with batch_size it bounds memory.
PAGE_BYTES = 8 * 1024 * 1024
# Advisory lock space: (LOCK_CLASS, hashtext(source)).
LOCK_CLASS = 0x64627379  # "dbsy"

TRY_LOCK = "SELECT pg_catalog.pg_try_advisory_lock($1::int4, pg_catalog.hashtext($2))"
CLAIM = """
UPDATE dbsync.apply_progress SET active_holder = $2, active_since = pg_catalog.now() WHERE source = $1
"""
RETRY_REQUESTED = "SELECT EXISTS (SELECT 1 FROM dbsync.parked_events WHERE source = $1 AND retry_requested)"

# Server-side keepalives on the Agent connection: if this host vanishes without closing the
# socket, the server drops the session (and the lock) in about 6 s, so a standby can take over.
AGENT_KEEPALIVES = {"tcp_keepalives_idle": "3", "tcp_keepalives_interval": "1", "tcp_keepalives_count": "3"}


@dataclass
class Stats:
    batches: int = 0
    events: int = 0
    parked: int = 0
    reconnects: int = 0
    last_apply_at: float | None = None


class Backoff:
    """Capped exponential backoff with jitter; the caller sleeps, so tests can shrink it."""

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2**self.attempt))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Replicator:
    def __init__(
        self,
        settings: Settings,
        *,
        stop: asyncio.Event | None = None,
        on_page: Callable[[Sequence[asyncpg.Record]], None] | None = None,
    ) -> None:
        settings.require("site_dsn", "agent_dsn")
        self.settings = settings
        self.stop = stop or asyncio.Event()
        self.wake = asyncio.Event()
        self.catalog = Catalog()
        self.applier = Applier(settings.source, self.catalog, park=settings.poison_policy == "park")
        self.stats = Stats()
        self.site: asyncpg.Connection | None = None
        self.agent: asyncpg.Connection | None = None
        self.progress = Progress()
        self._persisted = Progress()
        self._problem: str | None = None
        self.active = False
        # Called after each page commits on the Agent DB (the demo and metrics use it).
        self.on_page = on_page

    # -- connections -----------------------------------------------------------------------
    async def _connect(self) -> None:
        assert self.settings.site_dsn and self.settings.agent_dsn
        agent = await pg.connect(self.settings.agent_dsn, "Agent", server_settings=AGENT_KEEPALIVES)
        self.agent = agent
        await agent.execute("SET search_path = pg_catalog, pg_temp")
        if not await agent.fetchval("SELECT to_regclass('dbsync.apply_progress') IS NOT NULL"):
            raise SchemaError("the Agent DB has no dbsync schema: run `dbsync migrate` first")
        await self._become_active(agent)
        if self.stop.is_set():
            return
        site = await pg.connect(self.settings.site_dsn, "Site")
        self.site = site
        await site.execute("SET search_path = pg_catalog, pg_temp")
        if not await site.fetchval("SELECT to_regclass('dbsync.sync_log') IS NOT NULL"):
            raise SchemaError("the Site DB has no dbsync schema: run `dbsync migrate` first")
        # Replicated rows must not fire the Agent DB's own triggers and foreign keys.
        try:
            await agent.execute("SET session_replication_role = replica")
        except asyncpg.InsufficientPrivilegeError:
            log.warning(
                "the Agent role may not set session_replication_role; Agent DB triggers and foreign keys "
                "fire on replicated rows"
            )
        row = await agent.fetchrow(READ_PROGRESS, self.settings.source)
        self.progress = self._persisted = progress_from_row(row)
        self.catalog.forget()
        await self.applier.count_parked(agent)
        # LISTEN before the first read: a commit after this point rings the bell.
        await site.add_listener(CHANNEL, self._on_notify)

    async def _become_active(self, agent: asyncpg.Connection) -> None:
        """Take the source's advisory lock, waiting as a standby while another daemon holds it."""
        await agent.execute(LOAD_PROGRESS, self.settings.source, INITIAL_SNAPSHOT)
        announced = False
        while not self.stop.is_set():
            if await agent.fetchval(TRY_LOCK, LOCK_CLASS, self.settings.source):
                await agent.execute(CLAIM, self.settings.source, holder_name())
                self.active = True
                if announced:
                    log.info("the active daemon is gone; taking over source %r", self.settings.source)
                return
            if not announced:
                holder = await agent.fetchval(
                    "SELECT active_holder FROM dbsync.apply_progress WHERE source = $1", self.settings.source
                )
                log.info("standby: source %r is applied by %s; waiting to take over", self.settings.source, holder)
                announced = True
            await self._sleep(min(self.settings.poll_interval, 1.0))

    async def _disconnect(self) -> None:
        self.active = False
        for conn in (self.site, self.agent):
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), timeout=2)
                except (Exception, asyncio.TimeoutError):  # noqa: BLE001 - closing a broken link
                    conn.terminate()
        self.site = self.agent = None

    def _on_notify(self, *_: object) -> None:
        self.wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on stop."""
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

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
            parked = await self.applier.apply(self.site, self.agent, page.events, self._persisted, after)
            if parked:
                self.stats.parked += parked
                log.warning("parked %d event(s) the Agent DB rejected; see `dbsync status`", parked)
        else:
            await self.applier.save(self.agent, self._persisted, after)
        self.progress = self._persisted = after
        self.stats.events += len(page.events)
        self.stats.batches += 1
        self.stats.last_apply_at = time.time()
        if self.on_page is not None and page.events:
            self.on_page(page.events)
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

    async def _retry_parked(self) -> None:
        assert self.site and self.agent
        if not self.applier.parked:
            return
        if not await self.agent.fetchval(RETRY_REQUESTED, self.settings.source):
            return
        done, failed = await self.applier.retry_parked(self.site, self.agent)
        log.info("retry of parked events: %d applied, %d failed again", done, failed)

    # -- the loop --------------------------------------------------------------------------
    async def run(self, *, once: bool = False, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        backoff = Backoff(self.settings.retry_initial, self.settings.retry_max)
        try:
            while not self.stop.is_set():
                try:
                    await self._connect()
                    if self.stop.is_set():
                        return
                    self._recovered()
                    backoff.reset()
                    if on_ready is not None:
                        await on_ready()
                    if once:
                        await self._retry_parked()
                        await self.drain()
                        return
                    await self._loop()
                except (DbsyncError, asyncpg.PostgresError, *pg.CONNECTION_ERRORS) as exc:
                    await self._record_error(exc)
                    await self._disconnect()
                    if once:
                        raise
                    self._report(exc)
                    self.stats.reconnects += 1
                    await self._sleep(backoff.next_delay())
        finally:
            await self._disconnect()

    async def _loop(self) -> None:
        while not self.stop.is_set():
            self.wake.clear()
            if await self.step():
                continue
            await self._retry_parked()
            waiter = asyncio.ensure_future(self.wake.wait())
            stopper = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait(
                    {waiter, stopper}, timeout=self.settings.poll_interval, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
                stopper.cancel()

    async def _record_error(self, exc: BaseException) -> None:
        """Leave a stuck apply where `dbsync status` shows it."""
        if not isinstance(exc, (ApplyError, SchemaError)) or self.agent is None or self.agent.is_closed():
            return
        try:
            await self.agent.execute(RECORD_ERROR, self.settings.source, str(exc)[:2000])
        except (asyncpg.PostgresError, *pg.CONNECTION_ERRORS):
            pass

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

