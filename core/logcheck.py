"""The fast check: is the Agent DB caught up with the sync log, and is anything stuck?

Reads positions only, never table rows: status (high-water mark, newest seq, events behind,
parked events, the daemon), committed events not applied yet per table, and the transactions
still open on the Site DB that have written events (those events are invisible until commit, so
they hold their table's changes back for as long as the transaction stays open).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from dbsync.catchup import pending_by_table
from dbsync.db import display_name
from dbsync.protocol import PARKED_BY_TABLE
from dbsync.status import Status, read_status

TABLES = "SELECT table_id, schema_name, table_name, removed_at IS NULL FROM dbsync.replicated_tables"

# A transaction that inserted into the log holds RowExclusiveLock on it until it ends. Its start
# time is only visible with pg_read_all_stats (or as the same role); the age is null otherwise.
OPEN_WRITERS = """
SELECT count(*), extract(epoch FROM clock_timestamp() - min(a.xact_start))::float8
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.relation = 'dbsync.sync_log'::regclass
  AND l.mode = 'RowExclusiveLock' AND l.granted AND l.pid <> pg_backend_pid()
"""


@dataclass(frozen=True)
class TableLog:
    table: str
    pending_events: int
    oldest_pending_seconds: float | None
    parked_events: int


@dataclass(frozen=True)
class LogReport:
    status: Status
    tables: list[TableLog]
    open_writers: int
    oldest_open_writer_seconds: float | None

    @property
    def problems(self) -> list[str]:
        """What keeps the Agent DB from matching the Site DB beyond normal lag: parked events, a
        failing apply, lag over the threshold, or events waiting with no daemon to apply them."""
        found = [p for p in self.status.problems if p != "no active daemon"]
        if self.status.active_daemon is None and self.status.events_behind:
            found.append(f"{self.status.events_behind} event(s) wait and no daemon is running")
        return found

    @property
    def in_sync(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_sync": self.in_sync,
            "problems": self.problems,
            "status": self.status.as_dict(),
            "open_writers": self.open_writers,
            "oldest_open_writer_seconds": self.oldest_open_writer_seconds,
            "tables": [asdict(t) for t in self.tables],
        }


def log_check(site: psycopg.Connection, agent: psycopg.Connection, source: str, lag_threshold: float) -> LogReport:
    status = read_status(site, agent, source, lag_threshold)
    pending = pending_by_table(site, agent, source)
    parked: dict[int, int] = dict(agent.execute(PARKED_BY_TABLE.psycopg, {"source": source}).fetchall())
    shown = [
        (tid, schema, name)
        for tid, schema, name, active in site.execute(TABLES).fetchall()
        if active or tid in pending or tid in parked
    ]
    tables = [
        TableLog(
            display_name(schema, name),
            pending[tid].events if tid in pending else 0,
            round(pending[tid].oldest_seconds or 0.0, 3) if tid in pending else None,
            int(parked.get(tid, 0)),
        )
        for tid, schema, name in sorted(shown, key=lambda t: (t[1], t[2]))
    ]
    writers, oldest = site.execute(OPEN_WRITERS).fetchone() or (0, None)
    return LogReport(status, tables, int(writers), round(oldest, 3) if oldest is not None else None)
