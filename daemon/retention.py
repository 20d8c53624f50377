"""Log retention: delete applied events from the Site's sync log, a little at a time.

An event is applied once its transaction is visible in the Agent's stored prev_snapshot; only
those are deleted, so nothing a consumer still needs goes. Deletes run in short chunks between
pages (row locks only, never a table lock), and autovacuum is tuned on the log table by the
Site migration, so the log neither grows nor bloats without bound.

With the incremental verification on (`verify_interval`), the events behind the verified mark
(dbsync.verified) are deleted instead: the keys a restarted daemon has yet to verify are still in
the log. Without a mark yet, nothing is deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg

from dbsync.protocol import PRUNE
from dbsync.verified import VERIFIED_SNAPSHOT

log = logging.getLogger("dbsync.daemon")


class Retention:
    def __init__(
        self, interval: float = 2.0, chunk: int = 10_000, budget: float = 0.1, *, verified_for: str | None = None
    ) -> None:
        self.interval = interval
        self.chunk = chunk
        self.budget = budget
        self._next = 0.0
        self._pruned_for: str | None = None
        self.deleted = 0
        # The source whose verified mark holds pruning back (None: the apply's progress does).
        self.verified_for = verified_for
        self._no_mark_table = False

    async def maybe_prune(
        self,
        site: asyncpg.Connection,
        prev_snapshot: str,
        durable: Callable[[], Awaitable[None]] | None = None,
        agent: asyncpg.Connection | None = None,
    ) -> int:
        """Delete applied events if due; returns how many were deleted.

        `durable` returns once `prev_snapshot` is durable on the Agent DB (Applier.make_durable);
        it is awaited before anything is deleted, when the Agent commits asynchronously. With
        `verified_for`, the verified mark is read on `agent` and used instead of prev_snapshot."""
        now = time.monotonic()
        if now < self._next:
            return 0
        if self.verified_for is not None:
            assert agent is not None
            self._next = now + self.interval
            mark = await self._verified(agent)
            if mark is None:
                return 0
            prev_snapshot = mark
        if prev_snapshot == self._pruned_for:
            return 0
        if durable is not None:
            await durable()
        self._next = now + self.interval
        deadline = now + self.budget
        deleted = 0
        while True:
            status = await site.execute(PRUNE.asyncpg, prev_snapshot, self.chunk)
            n = int(status.split()[-1])
            deleted += n
            if n < self.chunk or time.monotonic() > deadline:
                break
        if n < self.chunk:
            # Everything applied as of this snapshot is gone; nothing to do until it moves.
            self._pruned_for = prev_snapshot
        self.deleted += deleted
        return deleted

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
