"""Has the Agent DB applied everything a given Site snapshot saw? Wait until it has.

Reconcile compares two databases that replication keeps changing. It pins a point in the Site's
history (a snapshot), waits until the daemon has applied every event committed by then, and
only then trusts a comparison. The rule is the protocol's (dbsync.protocol.NOT_APPLIED): an event
is applied when its transaction is visible in the stored `prev_snapshot`, or visible in the open
batch's snapshot with seq <= the batch cursor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from dbsync.config import Settings
from dbsync.errors import DbsyncError
from dbsync.protocol import LOCK_CLASS, LOCK_HELD, NO_PROGRESS, PENDING_BY_TABLE, PROGRESS_REPORT

log = logging.getLogger("dbsync.reconcile")

SNAPSHOT = "SELECT pg_current_snapshot()::text"


class CatchUpError(DbsyncError):
    """The daemon did not apply the events a comparison depends on."""


@dataclass(frozen=True)
class Pending:
    events: int
    oldest_seconds: float | None


def pending_by_table(
    site: psycopg.Connection,
    agent: psycopg.Connection,
    source: str,
    snap: str | None = None,
    tables: Sequence[int] | None = None,
) -> dict[int, Pending]:
    row = agent.execute(PROGRESS_REPORT.psycopg, {"source": source}).fetchone()
    prev, batch, cursor = row[:3] if row is not None else NO_PROGRESS
    params = {
        "prev": prev,
        "batch": batch,
        "cursor": cursor,
        "upto": snap,
        "tables": list(tables) if tables is not None else None,
    }
    return {r[0]: Pending(r[1], r[2]) for r in site.execute(PENDING_BY_TABLE.psycopg, params).fetchall()}


def active_daemon(agent: psycopg.Connection, source: str) -> str | None:
    """Who holds the source's lock (as `dbsync status` names it), None when no daemon does."""
    if agent.execute(LOCK_HELD.psycopg, {"cls": LOCK_CLASS, "source": source}).fetchone() != (True,):
        return None
    row = agent.execute(PROGRESS_REPORT.psycopg, {"source": source}).fetchone()
    return None if row is None or row[7] is None else str(row[7])


def site_snapshot(site: psycopg.Connection) -> str:
    row = site.execute(SNAPSHOT).fetchone()
    assert row is not None
    return str(row[0])


class CatchUp:
    """Waits for the daemon; with `apply` set, drains in-process when no daemon is running."""

    def __init__(
        self,
        site: psycopg.Connection,
        agent: psycopg.Connection,
        settings: Settings,
        *,
        timeout: float,
        apply: bool = False,
    ) -> None:
        self.site = site
        self.agent = agent
        self.settings = settings
        self.timeout = timeout
        self.apply = apply

    def behind(self, snap: str, tables: Sequence[int]) -> int:
        found = pending_by_table(self.site, self.agent, self.settings.source, snap, tables)
        return sum(p.events for p in found.values())

    def wait(self, snap: str, tables: Sequence[int]) -> None:
        """Return once every event of `tables` visible in `snap` is applied on the Agent DB."""
        left = self.behind(snap, tables)
        if not left:
            return
        self.start_applying(left)
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while (left := self.behind(snap, tables)) > 0:
            if time.monotonic() > deadline:
                raise CatchUpError(self.too_slow(left))
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def too_slow(self, left: int) -> str:
        return (
            f"the daemon has not applied {left} event(s) within {self.timeout:g} s; "
            "`dbsync status` shows why (or raise --wait)"
        )

    def start_applying(self, left: int) -> None:
        """Make sure something applies the `left` pending events: the active daemon, or this
        process (`apply`). Only the advisory lock and the progress row are read: `dbsync status`
        would also count every log consumer's lag, a scan of the log behind the oldest one."""
        daemon = active_daemon(self.agent, self.settings.source)
        if daemon is not None:
            log.info("waiting for the daemon (%s) to apply %d event(s)", daemon, left)
            return
        if not self.apply:
            raise CatchUpError(
                f"{left} committed event(s) are not applied yet and no daemon is running: "
                "start the daemon or run `dbsync run --once`, or pass --apply to apply them here"
            )
        log.info("no active daemon: applying %d pending event(s) in-process", left)
        self._drain()

    def _drain(self) -> None:
        # The one place the library drives daemon code: the apply itself, run here once. It is
        # imported only when used, so comparing (and `dbsync status`) never loads the daemon.
        from dbsync.daemon.runner import run_once

        try:
            asyncio.run(asyncio.wait_for(run_once(self.settings), timeout=self.timeout))
        except TimeoutError:
            raise CatchUpError(f"applying in-process did not finish within {self.timeout:g} s") from None
