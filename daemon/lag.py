"""How far behind a direction is, measured by the daemon itself, on a connection of its own.

The count is `dbsync status`'s query (dbsync.protocol.PENDING) on the capturing side's log, fed
the daemon's in-memory progress instead of the applying side's row, so it costs that side
nothing. It runs on its own connection: lag is worth most exactly when the replication
connections are failing. Site -> Agent measures against the Site DB's log; write-back
(Agent -> Site) against the Agent DB's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from dbsync.daemon import pg
from dbsync.daemon.consume import ApplyProgress
from dbsync.db import first_line
from dbsync.errors import DbsyncError
from dbsync.protocol import PENDING

log = logging.getLogger("dbsync.daemon")

# An answer slower than this is as good as none.
QUERY_TIMEOUT = 5.0


@dataclass(frozen=True)
class Lag:
    events: int
    seconds: float


class LagProbe:
    def __init__(self, site_dsn: str, role: str = "Site") -> None:
        self.site_dsn = site_dsn  # the capturing side's: the Agent DB's for write-back
        self.role = role
        self.conn: asyncpg.Connection | None = None
        # Why the last measurement failed (one line, no password), or None.
        self.error: str | None = None

    @property
    def site_reachable(self) -> bool:
        return self.error is None and self.conn is not None

    async def measure(self, progress: ApplyProgress | None) -> Lag | None:
        """The lag behind `progress`; with None, only checks that the Site DB answers."""
        try:
            conn = await self._connection()
            if progress is None:
                await conn.fetchval("SELECT 1", timeout=QUERY_TIMEOUT)
                self.error = None
                return None
            row = await conn.fetchrow(
                PENDING.asyncpg,
                progress.prev_snapshot,
                progress.batch_snapshot,
                progress.batch_cursor,
                timeout=QUERY_TIMEOUT,
            )
        except (DbsyncError, asyncpg.PostgresError, *pg.CONNECTION_ERRORS) as exc:
            if first_line(exc) != self.error:  # once per change: /readyz says only "lag unknown"
                what = "the lag" if self.role == "Site" else "the write-back lag"
                log.warning("cannot measure %s: %s", what, first_line(exc))
            self.error = first_line(exc)
            await self.close()
            return None
        assert row is not None
        self.error = None
        return Lag(events=int(row["events"]), seconds=max(float(row["seconds"] or 0.0), 0.0))

    async def _connection(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await pg.connect(
                self.site_dsn, self.role, server_settings={"application_name": "dbsync-monitor"}
            )
        return self.conn

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=2)
            except (Exception, TimeoutError):  # noqa: BLE001 - closing a broken link
                conn.terminate()
