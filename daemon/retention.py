"""Log retention: delete events every consumer has applied from the Site's sync log, a little at a time.

The daemon is one consumer of the log (dbsync.consumers, sql/site/0010_site_consumers). Every
`interval` it reports what it has applied (the Agent's stored prev_snapshot, once durable there)
and that it is alive, then deletes events visible in every registered consumer's reported
snapshot, so nothing a consumer still needs goes. Deletes run in short chunks between pages (row
locks only, never a table lock), and autovacuum is tuned on the log table by the Site migration,
so the log neither grows nor bloats without bound. Consumers not seen for `timeout` seconds are
logged once each (`stale` holds them for /metrics); they hold the log until someone drops them.

With the incremental verification on (`verify_interval`), the position reported is the verified
mark (dbsync.verified), not prev_snapshot: the keys a restarted daemon has yet to verify stay in
the log, for every consumer's prune. Without a mark yet, nothing is reported or deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg

from dbsync.config import Settings
from dbsync.consumers import default_name
from dbsync.protocol import (
    AGENT_IDENTITY,
    AGENT_NAME_ONLY,
    CONSUMER_APPLIED,
    CONSUMERS_MARK,
    CONSUMERS_SEEN,
    PRUNE,
    PRUNE_APPLIED,
    REGISTER_CONSUMER,
    SCHEMA_EXISTS,
)
from dbsync.verified import VERIFIED_SNAPSHOT

log = logging.getLogger("dbsync.daemon")


async def consumer_name(agent: asyncpg.Connection, settings: Settings) -> str:
    """This daemon's consumer name: the `consumer` setting, or one derived from its source and
    its Agent DB (dbsync.consumers.agent_consumer_name computes the same)."""
    if settings.consumer:
        return settings.consumer
    try:
        async with agent.transaction():
            row = await agent.fetchrow(AGENT_IDENTITY.asyncpg)
    except asyncpg.InsufficientPrivilegeError:
        row = await agent.fetchrow(AGENT_NAME_ONLY.asyncpg)
    assert row is not None
    return default_name(settings.source, row[0], row[1])


class Retention:
    def __init__(
        self,
        interval: float = 2.0,
        chunk: int = 10_000,
        budget: float = 0.1,
        *,
        consumer: str = "site",
        timeout: float = 3600.0,
        verified_for: str | None = None,
    ) -> None:
        self.interval = interval
        self.chunk = chunk
        self.budget = budget
        self.consumer = consumer
        self.timeout = timeout
        self._next = 0.0
        self._reported: str | None = None
        self._registered = False
        self._warned_old = False
        self.deleted = 0
        # Consumers not seen for longer than `timeout`, and the history this one may have missed.
        self.stale: tuple[str, ...] = ()
        self.missed_history = False
        # The source whose verified mark is the position reported (None: the apply's progress is).
        self.verified_for = verified_for
        self._no_mark_table = False

    async def register(self, site: asyncpg.Connection, applied: str) -> None:
        """Register this consumer at `applied` unless it is registered (a first start, or after
        `dbsync consumers drop`); says so loudly when events it needed were already pruned.

        A Site DB without the registry (migrated before 0010_site_consumers) is pruned the old
        way, for this consumer alone, until `dbsync migrate` adds it."""
        if not await site.fetchval(SCHEMA_EXISTS.asyncpg, CONSUMERS_MARK):
            if not self._warned_old:
                log.warning("the Site DB has no consumer registry yet: run `dbsync migrate` before adding consumers")
                self._warned_old = True
            self._registered = False
            return
        missed = bool(await site.fetchval(REGISTER_CONSUMER.asyncpg, self.consumer, applied, None))
        if missed and not self.missed_history:
            log.error(
                "consumer %r was registered on the Site DB after events it had not applied were pruned: "
                "copy the tables with `dbsync backfill` (docs/operations.md, Topologies)",
                self.consumer,
            )
        self.missed_history = missed
        self._registered = True

    async def maybe_prune(
        self,
        site: asyncpg.Connection,
        prev_snapshot: str,
        durable: Callable[[], Awaitable[None]] | None = None,
        agent: asyncpg.Connection | None = None,
    ) -> int:
        """Report `prev_snapshot` as applied and delete what every consumer has applied, if due;
        returns how many events were deleted.

        `durable` returns once `prev_snapshot` is durable on the Agent DB (Applier.make_durable);
        it is awaited before the position is reported, when the Agent commits asynchronously. With
        `verified_for`, the verified mark is read on `agent` and reported instead of prev_snapshot."""
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + self.interval
        position = await self.position(prev_snapshot, agent)
        if position is None:
            return 0
        await self.report(site, position, durable)
        deadline = now + self.budget
        deleted = 0
        while True:
            if self._registered:
                n = int(await site.fetchval(PRUNE_APPLIED.asyncpg, self.chunk))
            else:
                n = int((await site.execute(PRUNE.asyncpg, prev_snapshot, self.chunk)).split()[-1])
            deleted += n
            if n < self.chunk or time.monotonic() > deadline:
                break
        self.deleted += deleted
        if self._registered:
            await self._check_stale(site)
        return deleted

    async def position(self, prev_snapshot: str, agent: asyncpg.Connection | None) -> str | None:
        """What this consumer may report as applied: `prev_snapshot`, or with `verified_for` the
        verified mark read on `agent` (None while there is none: report nothing)."""
        if self.verified_for is None:
            return prev_snapshot
        assert agent is not None
        return await self._verified(agent)

    async def report(
        self, site: asyncpg.Connection, prev_snapshot: str, durable: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Tell the Site DB this consumer has applied what `prev_snapshot` sees, and is alive."""
        if durable is not None and prev_snapshot != self._reported:
            await durable()
        if not self._registered:
            await self.register(site, prev_snapshot)
        if not self._registered:
            return
        if not await site.fetchval(CONSUMER_APPLIED.asyncpg, self.consumer, prev_snapshot):
            log.warning(
                "consumer %r is no longer registered on the Site DB (dropped?); registering it again", self.consumer
            )
            await self.register(site, prev_snapshot)
            await site.fetchval(CONSUMER_APPLIED.asyncpg, self.consumer, prev_snapshot)
        self._reported = prev_snapshot

    async def _check_stale(self, site: asyncpg.Connection) -> None:
        stale = []
        for name, seen_ago in await site.fetch(CONSUMERS_SEEN.asyncpg):
            if seen_ago > self.timeout:
                stale.append(name)
                if name not in self.stale:
                    log.warning(
                        "consumer %r has not been seen for %.0f s (over consumer_timeout %g s) and holds the "
                        "Site log for every consumer: `dbsync consumers drop %s` if it is gone",
                        name,
                        seen_ago,
                        self.timeout,
                        name,
                    )
        for name in self.stale:
            if name not in stale:
                log.info("consumer %r is back (or dropped); no longer stale", name)
        self.stale = tuple(stale)

    async def _verified(self, agent: asyncpg.Connection) -> str | None:
        try:
            mark = await agent.fetchval(VERIFIED_SNAPSHOT.asyncpg, self.verified_for)
        except asyncpg.UndefinedTableError:
            if not self._no_mark_table:
                log.warning("retention paused: the Agent DB lacks dbsync.verify_mark (run `dbsync migrate`)")
            self._no_mark_table = True
            return None
        self._no_mark_table = False
        return None if mark is None else str(mark)
