"""Waking an idle daemon without making busy writers pay for NOTIFY.

A transaction that NOTIFYs takes a database-wide lock at commit: notifying writers commit one
at a time and lose group commit. So the capture trigger only notifies while the doorbell is
armed (dbsync.doorbell), and the daemon arms it only when it has found nothing to do; while it
is busy it reads the log anyway, and it disarms after a short busy streak.

Arming must not lose a wake-up. A writer that read "disarmed" in its trigger and commits after
the daemon's last look would otherwise sleep until the next poll. Such a writer got its xid
before the arm committed (its row was written before its AFTER trigger ran). So after arming
the daemon takes a fresh xid Y and then a snapshot S: S.xmax > Y, so every such writer still
running is in S.xip below Y. That set is the fence; the daemon keeps polling quickly until
every fenced transaction has ended, and only then relies on notifications alone.
"""

from __future__ import annotations

import time

import asyncpg

# Unconditional: the row's trigger mirrors it into the sequence writers read (sql/site/0003).
SET_ARMED = "UPDATE dbsync.doorbell SET armed = $1"
# Autocommit: assigns an xid after the arm committed, and commits.
FRESH_XID = "SELECT pg_catalog.pg_current_xact_id()::text"
SNAPSHOT = "SELECT pg_catalog.pg_current_snapshot()::text"

# Disarm once the daemon has been busy this long: under load, notifications only cost writers.
BUSY_STREAK = 0.05
# Poll interval while fenced transactions may still commit without ringing.
FENCE_POLL = 0.01


def parse_snapshot(text: str) -> tuple[int, int, frozenset[int]]:
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x)


class Doorbell:
    def __init__(self) -> None:
        self.armed = False
        self.fence: frozenset[int] = frozenset()
        self._busy_since: float | None = None

    async def reset(self, site: asyncpg.Connection) -> None:
        """At connect: start disarmed; the loop arms when it first finds nothing to do."""
        await site.execute(SET_ARMED, False)
        self.armed = False
        self.fence = frozenset()
        self._busy_since = None

    async def busy(self, site: asyncpg.Connection) -> None:
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since = now
        elif self.armed and now - self._busy_since > BUSY_STREAK:
            await site.execute(SET_ARMED, False)
            self.armed = False
            self.fence = frozenset()

    async def idle(self, site: asyncpg.Connection, snapshot: str | None) -> float | None:
        """Called when a step found nothing. Returns how long to wait before looking again
        (None: until notified or the poll interval), or 0 to look again at once."""
        self._busy_since = None
        if not self.armed:
            await site.execute(SET_ARMED, True)
            fresh = int(await site.fetchval(FRESH_XID))
            _, _, xip = parse_snapshot(await site.fetchval(SNAPSHOT))
            self.armed = True
            self.fence = frozenset(x for x in xip if x < fresh)
            return 0.0  # look once more: a writer may have committed before the arm
        if self.fence and snapshot is not None:
            _, xmax, xip = parse_snapshot(snapshot)
            self.fence = frozenset(x for x in self.fence if x in xip or x >= xmax)
        return FENCE_POLL if self.fence else None

    async def disarm_quietly(self, site: asyncpg.Connection | None) -> None:
        """On the way out: nobody will be listening."""
        if site is None or site.is_closed():
            return
        try:
            await site.execute(SET_ARMED, False)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass
