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
(see dbsync.protocol.SAVE_PROGRESS) makes a double apply impossible even if two ever overlapped.

The loop calls `on_tick` whenever it has made progress or finished a slice of a normal wait
(never more than `tick_interval` apart while waiting); the service turns that into systemd's
watchdog ping, so a loop stuck inside a step stops pinging.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg
from asyncpg.transaction import Transaction

from dbsync.config import Settings
from dbsync.daemon import pg
from dbsync.daemon.apply import Applier, Catalog
from dbsync.daemon.backoff import Backoff
from dbsync.daemon.columns import add_missing_columns
from dbsync.daemon.consume import (
    READS_AT_CALLER,
    ApplyProgress,
    Event,
    Page,
    advance,
    open_batch,
    progress_from_row,
    read_page,
    read_small_batch,
)
from dbsync.daemon.doorbell import Doorbell
from dbsync.daemon.retention import Retention, consumer_name
from dbsync.db import display_name
from dbsync.errors import ApplyError, ConfigError, ConnectError, DbsyncError, DriftError, SchemaError
from dbsync.protocol import (
    AGENT_SCHEMA_MARK,
    APPLY_MARK,
    CHANNEL,
    CLAIM,
    HOLDER,
    INITIAL_SNAPSHOT,
    LOAD_PROGRESS,
    LOCK_CLASS,
    PARKED_IN_PAGE,
    READ_PROGRESS,
    RECORD_ERROR,
    RETRY_REQUESTED,
    SCHEMA_EXISTS,
    SITE_SCHEMA_MARK,
    TRY_LOCK,
    no_schema,
)
from dbsync.rls import LOCATE_ASYNCPG, RowSecurityError, error_table, from_error, is_rls_error, refusal

log = logging.getLogger("dbsync.daemon")

# Row-image bytes (JSON text) per page past its first group of keys; with batch_size it bounds
# memory.
PAGE_BYTES = 8 * 1024 * 1024
# Under a steady stream of writes every batch is small, and each costs the daemon a Site read and
# an Agent write whatever its size. After a batch smaller than one page the next look waits until
# this long after the previous one, so events gather: at most ~200 batches a second, which bounds
# its cost to both databases (measured at 1,000 changes/s: 0 ms gives p50 5 ms at 27% of a core, 5 ms gives
# p50 10 ms at 14%; docs/benchmarks.md). An idle daemon is woken at once; a backlog is drained
# without pause.
LINGER = 0.005
# A batch of at most this many events is opened and read in one statement (read_small_batch).
SMALL_BATCH_EVENTS = 100
# On unless the Site lacks 0007_site_stable_read (READS_AT_CALLER); off, batches are read in their
# REPEATABLE READ transaction.
SMALL_BATCHES = True
# Any role may NOTIFY the channel, as often as it likes: the notifications that arrive within
# this long of the previous look are one wake-up, so a flood costs at most one look per interval.
WAKE_INTERVAL = 0.005

# The daemon runs the same few statements again and again with new values: planned once a
# session, not each time (PostgreSQL plans the first five executions of a prepared statement
# anew, and keeps doing so while it guesses a fresh plan may be cheaper: planning the one-statement
# small batch costs more than running it).
GENERIC_PLANS = "SET plan_cache_mode = force_generic_plan"
# Nor compiled: JIT compiles a statement whose estimated cost passes jit_above_cost again at every
# execution. The small batch is estimated at 1,000 rows per function scan, far above what it reads,
# and where the server has LLVM (Debian's PostgreSQL 15, managed services) it spent ~80 ms of
# every look compiling a statement that runs in under 1 ms: the daemon fell behind a steady writer.
NO_JIT = "SET jit = off"
# Server-side keepalives on the Agent connection: if this host vanishes without closing the
# socket, the server drops the session (and the lock) in about 6 s, so a standby can take over.
# SET after connecting, not startup parameters: PgBouncer refuses those by default.
AGENT_KEEPALIVES = "SET tcp_keepalives_idle = 3; SET tcp_keepalives_interval = 1; SET tcp_keepalives_count = 3"


@dataclass
class Stats:
    batches: int = 0
    events: int = 0
    parked: int = 0
    reconnects: int = 0
    read_ahead: int = 0  # pages read while the previous one was written
    looks: int = 0  # snapshots taken to look for a new batch (found or not)
    whole: int = 0  # batches opened and read in one statement (read_small_batch)
    notifications: int = 0  # doorbell rings received (anyone may ring it)
    last_apply_at: float | None = None


@dataclass(frozen=True)
class PageReport:
    """One committed page, for metrics."""

    applied: Mapping[tuple[str, str], int]  # (table, op letter) -> events applied
    parked: int
    seconds: float


# What the daemon is doing; `active` alone says whether it holds the lock.
STARTING, STANDBY, APPLYING, RECONNECTING = "starting", "standby", "applying", "reconnecting"
STUCK = "stuck"  # a problem_state, not a state: the loop is reconnecting to retry it


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Replicator:
    def __init__(
        self,
        settings: Settings,
        *,
        stop: asyncio.Event | None = None,
        on_page: Callable[[Sequence[Event]], None] | None = None,
    ) -> None:
        settings.require("site_dsn", "agent_dsn")
        self.settings = settings
        self.stop = stop or asyncio.Event()
        self.wake = asyncio.Event()
        self.catalog = Catalog()
        # With the incremental verification, the log keeps what it has yet to verify.
        self.retention = Retention(
            consumer=settings.consumer or settings.source,
            timeout=settings.consumer_timeout,
            verified_for=settings.source if settings.verify_interval else None,
        )
        self.doorbell = Doorbell()
        self._last_snapshot: str | None = None
        self._batch_events = 0  # in the batch opened last
        self._density = 1.0  # keys per log row in the last page read
        # A page read ahead: (batch snapshot, cursor it starts after, page).
        self._ahead: tuple[str | None, int | None, Page] | None = None
        self.applier = Applier(settings.source, self.catalog, park=settings.poison_policy == "park")
        self.stats = Stats()
        self.site: asyncpg.Connection | None = None
        # The batch's pages are read on their own Site connection, in a REPEATABLE READ
        # transaction whose snapshot is the batch's (dbsync.daemon.consume).
        self.reader: asyncpg.Connection | None = None
        self._batch_tx: Transaction | None = None
        # Whether the Site's read_rows reads at its caller's snapshot (0007_site_stable_read).
        self._small_batches = False
        self.agent: asyncpg.Connection | None = None
        self.progress = ApplyProgress()
        self._persisted = ApplyProgress()
        self._problem: str | None = None
        self._problem_state = RECONNECTING
        self.active = False
        self.state = STARTING
        # Monotonic times: the last step that completed, the first failure since then.
        self.last_step_at: float | None = None
        self.failing_since: float | None = None
        # True while self.progress is what the Agent DB holds for this daemon (not as a standby).
        self.progress_known = False
        # Called after each page commits on the Agent DB (the demo uses it).
        self.on_page = on_page
        # Called after each page commits, with the page as read from the Site: the batch's prev
        # and snapshot, its events, whether more pages follow, the batch's event count (the
        # incremental verification takes the keys from here, dbsync.daemon.verify_keys).
        self.on_batch_page: Callable[[str, str, Sequence[Event], bool, int], None] | None = None
        # The service's hooks: a page report for metrics, a state change, a sign of life.
        self.on_report: Callable[[PageReport], None] | None = None
        self.on_state: Callable[[str], None] | None = None
        self.on_tick: Callable[[], None] | None = None
        self.tick_interval = float("inf")

    def use_settings(self, settings: Settings) -> None:
        """Run with these settings from now on (a reload: only dbsync.daemon.reload.LIVE differ).

        Each is read where it is used, so the next page has the new batch size; a wait in
        progress is cut short so that a shorter poll interval applies at once."""
        self.settings = settings
        self.applier.park = settings.poison_policy == "park"
        self.wake.set()

    # -- connections -----------------------------------------------------------------------
    async def _connect(self) -> None:
        assert self.settings.site_dsn and self.settings.agent_dsn
        agent = await pg.connect(self.settings.agent_dsn, "Agent", io_timeout=self.settings.io_timeout)
        self.agent = agent
        await agent.execute(AGENT_KEEPALIVES)
        await agent.execute(GENERIC_PLANS)
        await agent.execute(NO_JIT)  # the one-statement page is estimated far above what it writes
        if not await agent.fetchval(SCHEMA_EXISTS.asyncpg, AGENT_SCHEMA_MARK):
            raise SchemaError(no_schema("Agent"))
        await self._become_active(agent)
        if self.stop.is_set():
            return
        site = await pg.connect(self.settings.site_dsn, "Site", io_timeout=self.settings.io_timeout)
        self.site = site
        if not await site.fetchval(SCHEMA_EXISTS.asyncpg, SITE_SCHEMA_MARK):
            raise SchemaError(no_schema("Site"))
        self.reader = await pg.connect(self.settings.site_dsn, "Site", io_timeout=self.settings.io_timeout)
        self._small_batches = SMALL_BATCHES and bool(await self.reader.fetchval(READS_AT_CALLER))
        await self.reader.execute(GENERIC_PLANS)
        await self.reader.execute(NO_JIT)
        # Replicated rows must not fire the Agent DB's own triggers and foreign keys.
        try:
            await agent.execute("SET session_replication_role = replica")
        except asyncpg.InsufficientPrivilegeError:
            log.warning(
                "the Agent role may not set session_replication_role; Agent DB triggers and foreign keys "
                "fire on replicated rows"
            )
        await agent.execute(APPLY_MARK)  # and capture there, where write-back is installed, skips them
        # Pages commit without waiting for the WAL flush; the log is pruned only behind a flushed commit.
        await self.applier.relax_commit(agent)
        row = await agent.fetchrow(READ_PROGRESS.asyncpg, self.settings.source)
        self.progress = self._persisted = progress_from_row(row)
        self.progress_known = True
        # The Site keeps its log for every registered consumer: this one, from what it has applied.
        self.retention.consumer = await consumer_name(agent, self.settings)
        await self.retention.register(site, self.progress.prev_snapshot)
        self.catalog.forget()
        await self.applier.count_parked(agent)
        # LISTEN before the first read: a commit after this point rings the bell.
        await site.add_listener(CHANNEL, self._on_notify)
        # A Site link that dies while the daemon waits wakes it at once, to reconnect.
        site.add_termination_listener(self._on_terminate)
        # The daemon's own Site writes (doorbell, retention) need no synchronous flush.
        await site.execute("SET synchronous_commit = off")
        await self.doorbell.reset(site)

    async def _become_active(self, agent: asyncpg.Connection) -> None:
        """Take the source's advisory lock, waiting as a standby while another daemon holds it."""
        await agent.execute(LOAD_PROGRESS.asyncpg, self.settings.source, INITIAL_SNAPSHOT)
        announced = False
        while not self.stop.is_set():
            if await agent.fetchval(TRY_LOCK.asyncpg, LOCK_CLASS, self.settings.source):
                await agent.execute(CLAIM.asyncpg, self.settings.source, holder_name())
                self.active = True
                if announced:
                    log.info("the active daemon is gone; taking over source %r", self.settings.source)
                return
            if not announced:
                holder = await agent.fetchval(HOLDER.asyncpg, self.settings.source)
                log.info("standby: source %r is applied by %s; waiting to take over", self.settings.source, holder)
                await self._check_site()
                announced = True
                self.progress_known = False
                self._set_state(STANDBY)
            await self._sleep(min(self.settings.poll_interval, 1.0))

    async def _check_site(self) -> None:
        """A standby tries the Site DSN once, so that a transaction-mode pooler there is refused
        now rather than at takeover. A Site that does not answer is only retried at takeover."""
        assert self.settings.site_dsn
        try:
            site = await pg.connect(self.settings.site_dsn, "Site", io_timeout=self.settings.io_timeout)
        except (ConnectError, asyncpg.PostgresError, *pg.CONNECTION_ERRORS):
            return
        try:
            await asyncio.wait_for(site.close(), timeout=2)
        except Exception:  # noqa: BLE001 - closing a broken link (TimeoutError included)
            site.terminate()

    async def _disconnect(self) -> None:
        self.active = False
        self._ahead = None
        self._batch_tx = None
        for conn in (self.reader, self.site, self.agent):
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), timeout=2)
                except Exception:  # noqa: BLE001 - closing a broken link (TimeoutError included)
                    conn.terminate()
        self.site = self.reader = self.agent = None

    def _on_notify(self, *_: object) -> None:
        self.stats.notifications += 1
        self.wake.set()

    def _on_terminate(self, *_: object) -> None:
        self.wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on stop."""
        await self._wait(self.stop, seconds)

    async def _pause(self, seconds: float) -> None:
        """The pause between two looks (at most LINGER or WAKE_INTERVAL, a few ms): a plain sleep,
        after which the loop sees a stop. It runs up to ~200 times a second, and waiting on the
        two events as _sleep does cost the event loop about 75 us more each time."""
        await asyncio.sleep(seconds)

    async def _wait(self, event: asyncio.Event, seconds: float) -> bool:
        """Wait for `event` or stop, at most `seconds`, ticking at least every tick_interval.

        Returns True when woken by either event.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.stop.wait())}
        try:
            while True:
                self._tick()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                done, _ = await asyncio.wait(
                    waiters, timeout=min(remaining, self.tick_interval), return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    return True
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _tick(self) -> None:
        if self.on_tick is not None:
            self.on_tick()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.on_state is not None:
                self.on_state(state)

    @property
    def problem(self) -> str | None:
        """What the daemon is retrying on, one line; None while it replicates normally."""
        return self._problem

    @property
    def problem_state(self) -> str:
        """While there is a problem, what kind, in one word safe to show anyone: "reconnecting"
        (a database is unreachable) or "stuck" (retrying alone will not fix it: an event the
        Agent DB rejects, a missing schema, a privilege)."""
        return self._problem_state

    # -- one step --------------------------------------------------------------------------
    async def step(self) -> bool:
        """Apply one page. Returns True when more may be waiting (do not sleep)."""
        assert self.site and self.reader and self.agent
        progress = self.progress
        if progress.in_batch and self._batch_tx is None:
            # A batch left open by an earlier connection: its snapshot cannot be read at any
            # more. Open it again from `prev`, at a new snapshot; the pages already applied are
            # applied again, which writes the same keys with rows at least as new.
            progress = ApplyProgress(
                prev_snapshot=progress.prev_snapshot,
                applied_seq=progress.applied_seq,
                events_applied=progress.events_applied,
            )
        small: Page | None = None
        if not progress.in_batch:
            self.stats.looks += 1
            stored = self._persisted.batch_snapshot or self._persisted.prev_snapshot
            count = 0
            if self._small_batches:
                # Most batches are small: opened and read whole in one statement.
                limit = min(self.settings.batch_size, SMALL_BATCH_EVENTS)
                opened, count, self._last_snapshot, small = await read_small_batch(self.reader, progress, stored, limit)
                if small is not None:
                    progress = opened
                    self.stats.whole += 1
            if small is None and (count or not self._small_batches):
                self._batch_tx = self.reader.transaction(isolation="repeatable_read", readonly=True)
                await self._batch_tx.start()
                progress, count, self._last_snapshot = await open_batch(self.reader, progress, stored)
            if not progress.in_batch:
                await self._end_batch()
                if self._persisted.in_batch:
                    await self.applier.save(self.agent, self._persisted, progress)
                    self.progress = self._persisted = progress
                self._stepped()
                return False
            log.debug("batch opened: %d events", count)
            self._batch_events = count
        started = time.monotonic()
        page = small if small is not None else await self._page(progress)
        after = advance(progress, page)
        parked = 0
        # Read ahead: while the Agent DB writes this page, the Site reads the next one.
        ahead: asyncio.Future[Page] | None = None

        def read_ahead() -> None:
            nonlocal ahead
            if page.more:
                ahead = asyncio.ensure_future(self._read(after))

        try:
            if page.events:
                parked = await self.applier.apply(
                    self.site, self.agent, page.events, self._persisted, after, planned=read_ahead
                )
                if parked:
                    self.stats.parked += parked
                    log.warning("parked %d event(s) the Agent DB rejected; see `dbsync status`", parked)
            else:
                await self.applier.save(self.agent, self._persisted, after)
            self.progress = self._persisted = after
            if ahead is not None:
                self._ahead = (after.batch_snapshot, after.batch_cursor, await ahead)
        finally:
            if ahead is not None and not ahead.done():
                ahead.cancel()
                await asyncio.wait([ahead])
            if ahead is not None and not ahead.cancelled():
                ahead.exception()  # retrieved: a failed read-ahead was raised above or is moot
        if self.on_batch_page is not None and progress.batch_snapshot is not None:
            self.on_batch_page(
                progress.prev_snapshot, progress.batch_snapshot, page.events, page.more, self._batch_events
            )
        if not after.in_batch:
            await self._end_batch()
        self.stats.events += len(page.events)
        self.stats.batches += 1
        self.stats.last_apply_at = time.time()
        self._stepped()
        if self.on_page is not None and page.events:
            self.on_page(page.events)
        if self.on_report is not None and page.events:
            applied = await self._applied_by_table(page.events, parked)
            self.on_report(PageReport(applied, parked, time.monotonic() - started))
        return True

    async def _end_batch(self) -> None:
        """Close the batch's read transaction (it only read)."""
        tx, self._batch_tx = self._batch_tx, None
        if tx is not None:
            await tx.commit()

    async def _page(self, progress: ApplyProgress) -> Page:
        """The page at the progress's cursor: read ahead by the previous step, or read now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (progress.batch_snapshot, progress.batch_cursor):
            self.stats.read_ahead += 1
            return ahead[2]
        return await self._read(progress)

    async def _read(self, progress: ApplyProgress) -> Page:
        assert self.reader is not None
        # Log rows to look at: enough for batch_size keys at the last page's keys per row.
        rows = max(1, math.ceil(self.settings.batch_size / self._density))
        page = await read_page(self.reader, progress, self.settings.batch_size, PAGE_BYTES, rows)
        if page.events:
            self._density = page.density
        return page

    async def _applied_by_table(self, events: Sequence[Event], parked: int) -> Counter[tuple[str, str]]:
        """Events of a committed page by (table, op), less those that were parked."""
        assert self.site and self.agent
        out: Counter[tuple[str, str]] = Counter()
        # Counted by table id first: a table's label is built (and quoted) once a page, not per event.
        for (table_id, op), n in Counter((ev.table_id, ev.op) for ev in events).items():
            table = await self.catalog.table(self.site, self.agent, table_id)  # cached by the apply
            out[table.label, op] += n
        if parked:
            seqs = [ev.seq for ev in events]
            for row in await self.agent.fetch(PARKED_IN_PAGE.asyncpg, self.settings.source, seqs):
                out[row["table_name"], row["op"]] -= row["n"]
        return +out  # drops zero counts

    def _stepped(self) -> None:
        """A step completed: replication is making progress, whatever failed before is over."""
        self.last_step_at = time.monotonic()
        self.failing_since = None
        if self._problem is not None:
            log.info("recovered; replicating again")
            self._problem = None
        self._tick()

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
        if not await self.agent.fetchval(RETRY_REQUESTED.asyncpg, self.settings.source):
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
                    self._set_state(APPLYING)
                    backoff.reset()
                    if on_ready is not None:
                        await on_ready()
                    if once:
                        await self._retry_parked()
                        await self.drain()
                        assert self.site is not None and self.agent is not None
                        durable = functools.partial(self.applier.make_durable, self.agent)
                        position = await self.retention.position(self.progress.prev_snapshot, self.agent)
                        if position is not None:
                            await self.retention.report(self.site, position, durable)
                        return
                    await self._loop()
                except ConfigError:
                    raise  # the settings are wrong (a transaction-mode pooler...): retrying cannot help
                except (DbsyncError, asyncpg.PostgresError, *pg.CONNECTION_ERRORS) as caught:
                    exc = caught
                    if isinstance(caught, asyncpg.PostgresError) and is_rls_error(caught):
                        exc = await self._row_security(caught)
                    if isinstance(exc, DriftError) and self.settings.auto_add_columns:
                        added = await self._add_columns(exc)
                        if isinstance(added, DbsyncError):
                            exc = added
                        elif added:
                            await self._disconnect()
                            continue  # replicate again at once, with the columns
                    await self._record_error(exc)
                    await self._disconnect()
                    if once:
                        if exc is not caught:
                            raise exc from None
                        raise
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                    self._report(exc)
                    self._set_state(RECONNECTING)
                    self.stats.reconnects += 1
                    await self._sleep(backoff.next_delay())
        finally:
            await self.doorbell.disarm_quietly(self.site)
            await self._disconnect()

    async def _loop(self) -> None:
        clock = asyncio.get_running_loop()
        while not self.stop.is_set():
            self.wake.clear()  # a ring from now on is for a look after this one
            looked_at = clock.time()
            busy = await self.step()
            if not self.progress.in_batch:
                assert self.site is not None and self.agent is not None
                durable = functools.partial(self.applier.make_durable, self.agent)
                await self.retention.maybe_prune(self.site, self.progress.prev_snapshot, durable, self.agent)
            if busy:
                await self.doorbell.busy(self.site)
                pause = looked_at + LINGER - clock.time()  # one look per LINGER, not a pause after each
                if not self.progress.in_batch and self._batch_events < self.settings.batch_size and pause > 0:
                    await self._pause(pause)
                continue
            await self._retry_parked()
            delay = await self.doorbell.idle(self.site, self._last_snapshot)
            if delay == 0:
                continue
            self._check_site_links()
            rung = await self._wait(self.wake, self.settings.poll_interval if delay is None else delay)
            # Coalesce: every ring within WAKE_INTERVAL of the last look is one wake-up.
            pause = looked_at + WAKE_INTERVAL - clock.time()
            if rung and pause > 0 and not self.stop.is_set():
                await self._pause(pause)

    async def _add_columns(self, drift: DriftError) -> list[str] | DbsyncError:
        """auto_add_columns: the drift's columns added to the Agent table (names), or why not."""
        try:
            added = await asyncio.to_thread(add_missing_columns, self.settings, drift)
        except DbsyncError as refused:
            return refused
        if added:
            log.warning(
                "added column(s) %s to %s on the Agent DB (auto_add_columns)",
                ", ".join(added),
                display_name(drift.schema, drift.table),
            )
        return added

    def _check_site_links(self) -> None:
        """Before a wait that only a notification may end: a Site session that ended while the
        last look ran woke the daemon for that look, which may not have used it (an armed
        doorbell needs no statement, the batch is read on the other connection)."""
        if any(conn is None or conn.is_closed() for conn in (self.site, self.reader)):
            raise ConnectError("the Site DB ended the daemon's session")

    async def _row_security(self, exc: asyncpg.PostgresError) -> RowSecurityError:
        """The one line for a read that row-level security refused: which table, on which side."""
        table = error_table(exc)
        for conn, where in ((self.agent, "Agent"), (self.site, "Site")):
            if table is None or conn is None or conn.is_closed():
                continue
            try:
                row = await conn.fetchrow(LOCATE_ASYNCPG, table)
            except (asyncpg.PostgresError, *pg.CONNECTION_ERRORS):
                continue
            if row is not None:
                return refusal(display_name(row[0], row[1]), row[2], where)
        return from_error(exc, None)

    async def _record_error(self, exc: BaseException) -> None:
        """Leave a stuck apply where `dbsync status` shows it."""
        if not isinstance(exc, (ApplyError, SchemaError)) or self.agent is None or self.agent.is_closed():
            return
        try:
            await self.agent.execute(RECORD_ERROR.asyncpg, self.settings.source, str(exc)[:2000])
        except (asyncpg.PostgresError, *pg.CONNECTION_ERRORS):
            pass

    def _report(self, exc: BaseException) -> None:
        """One log line per change of state, not per attempt."""
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, DbsyncError):
            message = f"{type(exc).__name__}: {message}"
        self._problem_state = RECONNECTING if pg.is_transient(exc) else STUCK
        if message != self._problem:
            log.error("%s; retrying", message)
            self._problem = message

    def _recovered(self) -> None:
        # After a failure, the first step that completes says so (see _stepped): a poison event
        # fails again right after every reconnect, and that is one incident, not one per attempt.
        if self._problem is None:
            log.info("connected to the Site and Agent DBs; replicating")


async def run_once(settings: Settings) -> None:
    """Apply everything committed by now in this process, then return (catch-up's --apply)."""
    await Replicator(settings).run(once=True)
