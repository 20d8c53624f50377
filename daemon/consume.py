"""The consumption rule: which sync-log events to apply next, and in what order.

Sequence numbers are handed out before commit, so "everything up to the highest seq seen" is not
a safe mark: a transaction holding seq 10 may commit after the one holding seq 11. dbsync uses
the snapshot difference instead (as PgQ does):

* every event carries its transaction's xid (`txid`);
* the Agent DB records the Site snapshot `prev` in which everything visible has been applied;
* a batch is every event whose transaction is visible in a new snapshot `snap` and was not
  visible in `prev`, applied in `seq` order.

A transaction still running at `snap` is simply not visible yet: it is neither skipped nor
waited for, and its events arrive in the batch of the first snapshot that sees it committed.
A rolled-back transaction never becomes visible and stalls nothing.

Per-row order holds because PostgreSQL's row locks order conflicting writers: the second
writer's trigger runs after the first has committed, so it takes a larger seq, and any snapshot
that sees the second also sees the first.

A batch can be large (a backlog, a transaction that changed a million rows); it is read in pages
bounded by count and bytes, and the page cursor is stored with the applied rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from dbsync.protocol import INITIAL_SNAPSHOT, committed_between

PREV = "$1::text::pg_snapshot"

# One statement, one snapshot: `snap` is the statement's own snapshot, so the bounds are computed
# over exactly the rows `snap` sees. The txid index finds the events of transactions that
# started after `prev` and of those that were running at `prev`.
OPEN_BATCH = f"""
WITH s AS (SELECT pg_catalog.pg_current_snapshot() AS snap)
SELECT s.snap::text AS snap, b.lo, b.hi, b.events
FROM s CROSS JOIN LATERAL (
    SELECT min(l.seq) AS lo, max(l.seq) AS hi, count(*) AS events
    FROM dbsync.sync_log l
    WHERE ((l.txid >= pg_catalog.pg_snapshot_xmax($1::text::pg_snapshot)
            AND l.txid < pg_catalog.pg_snapshot_xmax(s.snap))
           OR l.txid = ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip($1::text::pg_snapshot))))
      AND {committed_between("l.txid", PREV, "s.snap")}
) b
"""

# The next page of the open batch, in seq order, at most $5 events and, past the first event,
# at most $6 bytes of stored row images. next_seq on the last row says whether more follow.
# Only the last event of each key in the page carries its row image (unless $7): the apply
# writes the last image per key, so the others are neither converted, sent nor held.
READ_PAGE = f"""
SELECT seq, table_id, op, pk,
       CASE WHEN $7 OR lead(seq) OVER (PARTITION BY table_id, pk ORDER BY seq) IS NULL
            THEN dbsync.image_json(row_image)::text END AS row_image,
       captured_at, next_seq
FROM (
    SELECT l.*,
           row_number() OVER w AS rn,
           lead(l.seq) OVER w AS next_seq,
           sum(coalesce(pg_catalog.pg_column_size(l.row_image), 0)) OVER w
             - coalesce(pg_catalog.pg_column_size(l.row_image), 0) AS bytes_before
    FROM (
        SELECT seq, table_id, op::text AS op, dbsync.image_json(pk)::text AS pk, row_image, captured_at
        FROM dbsync.sync_log
        WHERE seq > $3 AND seq <= $4
          AND {committed_between("txid", PREV, "$2::text::pg_snapshot")}
        ORDER BY seq
        LIMIT $5 + 1
    ) l
    WINDOW w AS (ORDER BY l.seq)
) p
WHERE rn <= $5 AND (rn = 1 OR bytes_before <= $6)
ORDER BY seq
"""


@dataclass(frozen=True)
class ApplyProgress:
    """What the Agent DB has applied; mirrors a row of dbsync.apply_progress."""

    prev_snapshot: str = INITIAL_SNAPSHOT
    batch_snapshot: str | None = None
    batch_hi: int | None = None
    batch_cursor: int | None = None
    applied_seq: int = 0
    events_applied: int = 0

    @property
    def in_batch(self) -> bool:
        return self.batch_snapshot is not None


@dataclass(frozen=True)
class Page:
    events: list[asyncpg.Record]
    more: bool


async def open_batch(site: asyncpg.Connection, progress: ApplyProgress) -> tuple[ApplyProgress, int, str]:
    """Take a new snapshot; returns the progress with the batch opened, its event count, and
    the snapshot itself.

    When nothing new is visible the progress comes back unchanged (with no batch): there is
    nothing to record, and `prev` still describes exactly what has been applied.
    """
    row = await site.fetchrow(OPEN_BATCH, progress.prev_snapshot)
    assert row is not None
    if row["lo"] is None:
        return progress, 0, row["snap"]
    opened = replace(progress, batch_snapshot=row["snap"], batch_hi=row["hi"], batch_cursor=row["lo"] - 1)
    return opened, int(row["events"]), row["snap"]


async def read_page(
    site: asyncpg.Connection, progress: ApplyProgress, limit: int, max_bytes: int, *, every_image: bool = False
) -> Page:
    """The page at the progress's cursor. Row images come only with the last event of each key,
    or with every event when `every_image` (event-by-event apply); the page is the same."""
    assert progress.in_batch
    rows = await site.fetch(
        READ_PAGE,
        progress.prev_snapshot,
        progress.batch_snapshot,
        progress.batch_cursor,
        progress.batch_hi,
        limit,
        max_bytes,
        every_image,
    )
    more = bool(rows) and rows[-1]["next_seq"] is not None
    return Page(events=list(rows), more=more)


def advance(progress: ApplyProgress, page: Page) -> ApplyProgress:
    """The progress once `page` is applied: the cursor moves on, or the batch closes."""
    applied = max([progress.applied_seq, *(e["seq"] for e in page.events)])
    counted = progress.events_applied + len(page.events)
    if page.more:
        return replace(progress, batch_cursor=page.events[-1]["seq"], applied_seq=applied, events_applied=counted)
    assert progress.batch_snapshot is not None
    return ApplyProgress(prev_snapshot=progress.batch_snapshot, applied_seq=applied, events_applied=counted)


def progress_from_row(row: Any) -> ApplyProgress:
    return ApplyProgress(
        prev_snapshot=row["prev_snapshot"],
        batch_snapshot=row["batch_snapshot"],
        batch_hi=row["batch_hi"],
        batch_cursor=row["batch_cursor"],
        applied_seq=row["applied_seq"],
        events_applied=row["events_applied"],
    )
