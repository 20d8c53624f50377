"""Log retention: delete applied events from the Site's sync log, a little at a time.

An event is applied once its transaction is visible in the Agent's stored prev_snapshot; only
those are deleted, so nothing a consumer still needs goes. Deletes run in short chunks between
pages (row locks only, never a table lock), and autovacuum is tuned on the log table by the
Site migration, so the log neither grows nor bloats without bound.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import asyncpg

from dbsync.protocol import PRUNE


class Retention:
    def __init__(self, interval: float = 2.0, chunk: int = 10_000, budget: float = 0.1) -> None:
        self.interval = interval
        self.chunk = chunk
        self.budget = budget
        self._next = 0.0
        self._pruned_for: str | None = None
        self.deleted = 0

    async def maybe_prune(
        self, site: asyncpg.Connection, prev_snapshot: str, durable: Callable[[], Awaitable[None]] | None = None
    ) -> int:
        """Delete applied events if due; returns how many were deleted.

        `durable` returns once `prev_snapshot` is durable on the Agent DB (Applier.make_durable);
        it is awaited before anything is deleted, when the Agent commits asynchronously."""
        now = time.monotonic()
        if now < self._next or prev_snapshot == self._pruned_for:
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
