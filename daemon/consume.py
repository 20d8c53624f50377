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
from datetime import datetime
from typing import Any

import asyncpg

from dbsync.errors import ProgressError
from dbsync.protocol import INITIAL_SNAPSHOT, committed_between

PREV = "$1::text::pg_snapshot"

# One statement, one snapshot: `snap` is the statement's own snapshot, so the bounds are computed
# over exactly the rows `snap` sees. The txid index finds the events of transactions that
# started after `prev` and of those that were running at `prev`.
OPEN_BATCH = f"""
WITH s AS (SELECT pg_catalog.pg_current_snapshot() AS snap)
SELECT s.snap::text AS snap, b.lo, b.hi, b.events,
       pg_catalog.pg_snapshot_xmax(s.snap)::text AS next_xid,
       pg_catalog.pg_snapshot_xmax($2::text::pg_snapshot)::text AS applied_xmax
FROM s CROSS JOIN LATERAL (
    SELECT min(l.seq) AS lo, max(l.seq) AS hi, sum(coalesce(pg_catalog.array_length(l.keys, 1), 1)) AS events
    FROM dbsync.sync_log l
    WHERE ((l.txid >= pg_catalog.pg_snapshot_xmax($1::text::pg_snapshot)
            AND l.txid < pg_catalog.pg_snapshot_xmax(s.snap))
           OR l.txid = ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip($1::text::pg_snapshot))))
      AND {committed_between("l.txid", PREV, "s.snap")}
) b
"""

# A small batch whole, in one statement and so at one snapshot (read_rows is STABLE from
# 0007_site_stable_read: it reads at the calling statement's snapshot): OPEN_BATCH's row, then,
# when the batch holds at most $3 events, one row per event with its row image (NULL when the key
# is absent at the snapshot; the event columns are NULL when there is nothing or too much).
# Each distinct key of a table is read once, by its place in that table's key list. An insert-only
# table's event (no key, 0008_site_identity) carries its row's image in the log: never read back.
SMALL_BATCH = f"""
WITH b AS ({OPEN_BATCH}),
page AS (
    SELECT l.seq, l.table_id, l.op::text AS op, k.key_no, k.key::text AS pk, l.captured_at, l.txid::text AS txid,
           CASE WHEN l.pk IS NULL AND l.keys IS NULL THEN dbsync.key_json(l.row_image)::text END AS appended
    FROM b
    JOIN dbsync.sync_log l ON l.seq >= b.lo AND l.seq <= b.hi
    JOIN dbsync.replicated_tables r ON r.table_id OPERATOR(pg_catalog.=) l.table_id
    LEFT JOIN LATERAL dbsync.log_keys(l.pk, l.keys, r.key_columns) AS k ON true
    WHERE b.events <= $3 AND {committed_between("l.txid", PREV, "b.snap::pg_catalog.pg_snapshot")}
),
keyed AS (
    SELECT d.table_id, d.pk, pg_catalog.row_number() OVER (PARTITION BY d.table_id ORDER BY d.pk) AS ord
    FROM (SELECT DISTINCT table_id, pk FROM page WHERE pk IS NOT NULL) d
),
found AS (
    SELECT g.table_id, f.ord, f.image
    FROM (SELECT table_id, pg_catalog.json_agg(pk::json ORDER BY ord) AS keys FROM keyed GROUP BY table_id) g
    CROSS JOIN LATERAL dbsync.read_rows(g.table_id, g.keys) AS f
)
SELECT b.snap, b.lo, b.hi, b.events, b.next_xid, b.applied_xmax,
       p.seq, p.table_id, p.op, p.key_no, p.pk, p.captured_at, p.txid,
       coalesce(f.image::text, p.appended) AS image
FROM b
LEFT JOIN page p ON true
LEFT JOIN keyed k ON k.table_id OPERATOR(pg_catalog.=) p.table_id AND k.pk OPERATOR(pg_catalog.=) p.pk
LEFT JOIN found f ON f.table_id OPERATOR(pg_catalog.=) k.table_id AND f.ord OPERATOR(pg_catalog.=) k.ord
ORDER BY p.seq, p.key_no
"""

# Whether the Site's read_rows reads at its caller's snapshot (0007_site_stable_read applied).
READS_AT_CALLER = """
SELECT p.provolatile = 's' FROM pg_catalog.pg_proc p
WHERE p.oid = pg_catalog.to_regprocedure('dbsync.read_rows(integer, json)')
"""

# The next page of the open batch, in seq order: log rows while fewer than $5 keys come before
# them (a log row of a statement carries up to 100 keys), at most $6 log rows and one more (which
# says whether more follow). Each key is one event; rows past the cut come without their keys. An
# insert-only table's log row is one event, its row image `appended` (0008_site_identity).
READ_PAGE = f"""
SELECT p.seq, p.table_id, p.op, k.key_no, k.key::text AS pk, p.captured_at, p.upto OPERATOR(pg_catalog.-) p.n AS before,
       p.txid::text AS txid,
       CASE WHEN p.pk IS NULL AND p.keys IS NULL THEN dbsync.key_json(p.row_image)::text END AS appended
FROM (
    SELECT l.*, pg_catalog.sum(l.n) OVER (ORDER BY l.seq) AS upto
    FROM (
        SELECT seq, txid, table_id, op::text AS op, pk, keys, row_image, captured_at,
               coalesce(pg_catalog.array_length(keys, 1), 1) AS n
        FROM dbsync.sync_log
        WHERE seq > $3 AND seq <= $4
          AND {committed_between("txid", PREV, "$2::text::pg_snapshot")}
        ORDER BY seq
        LIMIT $6 + 1
    ) l
) p
JOIN dbsync.replicated_tables r ON r.table_id OPERATOR(pg_catalog.=) p.table_id
LEFT JOIN LATERAL dbsync.log_keys(p.pk, p.keys, r.key_columns) AS k ON p.upto OPERATOR(pg_catalog.-) p.n < $5
ORDER BY p.seq, k.key_no
"""

# The rows of some keys of one table at the transaction's snapshot (0006_site_key_capture): the
# position of each key present and its row image, JSON of text values.
READ_ROWS = "SELECT ord, image::text FROM dbsync.read_rows($1, $2::text::json)"

# Keys per read_rows call at most; fewer once rows turn out large (see read_page).
READ_GROUP = 1000
FIRST_GROUP = 100


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
class Event:
    """One change in the log, with the row as it stands at the batch's snapshot."""

    seq: int
    table_id: int
    op: str  # I, U, D or T, as captured; the apply goes by `image`
    pk: str | None  # JSON object of the key's text values; None for a TRUNCATE
    captured_at: datetime
    image: str | None = None  # the row at the snapshot; None when the key is absent there
    key_no: int = 0  # the key's place in its log row (which may carry many)
    txid: str | None = None  # the writing transaction (xid8 text), where the page read it

    @property
    def key(self) -> tuple[int, str | None]:
        return self.table_id, self.pk

    @property
    def appended(self) -> bool:
        """An insert-only table's row: no key, the image captured with the insert."""
        return self.pk is None and self.op != "T"


@dataclass(frozen=True)
class Page:
    events: list[Event]
    more: bool

    @property
    def density(self) -> float:
        """Keys per log row: what the next page's log-row bound is sized from."""
        rows = len({e.seq for e in self.events})
        return len(self.events) / rows if rows else 1.0


async def open_batch(
    site: asyncpg.Connection, progress: ApplyProgress, applied: str | None = None
) -> tuple[ApplyProgress, int, str]:
    """Take a new snapshot; returns the progress with the batch opened, its event count, and
    the snapshot itself. Refuses (ProgressError) when the Site's next transaction id is below the
    xmax of `applied` (the newest snapshot the Agent DB has applied in, `prev` by default): every
    new transaction would then look applied. Run first in the batch's REPEATABLE READ transaction, whose snapshot it
    then is: the pages are read, rows included, at that snapshot.

    When nothing new is visible the progress comes back unchanged (with no batch): there is
    nothing to record, and `prev` still describes exactly what has been applied.
    """
    row = await site.fetchrow(OPEN_BATCH, progress.prev_snapshot, applied or progress.prev_snapshot)
    assert row is not None
    return _opened(progress, row)


def _opened(progress: ApplyProgress, row: asyncpg.Record) -> tuple[ApplyProgress, int, str]:
    if int(row["next_xid"]) < int(row["applied_xmax"]):
        raise ProgressError(
            f"the Site DB's transaction ids went back below what the Agent DB has applied (next xid "
            f"{row['next_xid']}, applied up to {row['applied_xmax']}): it was restored from a dump or failed "
            "over to a standby that lost transactions, and new changes would look applied; nothing is applied "
            "until its counter passes the applied one (docs/operations.md, \"Recover after a failover, or a "
            "restore without the epoch step\")"
        )
    if row["lo"] is None:
        return progress, 0, row["snap"]
    opened = replace(progress, batch_snapshot=row["snap"], batch_hi=row["hi"], batch_cursor=row["lo"] - 1)
    return opened, int(row["events"]), row["snap"]


async def read_small_batch(
    site: asyncpg.Connection, progress: ApplyProgress, applied: str | None, limit: int
) -> tuple[ApplyProgress, int, str, Page | None]:
    """open_batch, and when the batch holds at most `limit` events, its one page too, rows
    included, in one round trip (SMALL_BATCH). Run outside a transaction: the statement's own
    snapshot is the batch's. Returns what open_batch does and the page; the page is None when
    the batch is empty or larger than `limit` (then read it with open_batch in a REPEATABLE READ
    transaction: this batch's snapshot ends with the statement)."""
    rows = await site.fetch(SMALL_BATCH, progress.prev_snapshot, applied or progress.prev_snapshot, limit)
    opened, count, snap = _opened(progress, rows[0])
    if count == 0 or count > limit:
        return opened, count, snap, None
    events = [
        Event(r["seq"], r["table_id"], r["op"], r["pk"], r["captured_at"], r["image"], r["key_no"] or 0, r["txid"])
        for r in rows
    ]
    return opened, count, snap, Page(events=events, more=False)


async def read_page(
    site: asyncpg.Connection, progress: ApplyProgress, limit: int, max_bytes: int, rows_hint: int | None = None
) -> Page:
    """The page at the progress's cursor, each event with its row read at the transaction's
    snapshot: at most `limit` events (keys; a first log row of more is taken whole) and, past the
    first group of keys read, about `max_bytes` of row images. Keys are read in groups sized from
    the rows seen so far, so a page of large rows stops early instead of being held whole; a page
    always ends at a log row's end. `rows_hint` bounds the log rows looked at (see
    Page.density)."""
    assert progress.in_batch
    rows = await site.fetch(
        READ_PAGE,
        progress.prev_snapshot,
        progress.batch_snapshot,
        progress.batch_cursor,
        progress.batch_hi,
        limit,
        rows_hint or limit,
    )
    seqs = list(dict.fromkeys(r["seq"] for r in rows))
    keep = [r for r in rows if r["before"] < limit]
    more = len(keep) < len(rows) or len(seqs) > (rows_hint or limit)
    if len(seqs) > (rows_hint or limit):
        keep = [r for r in keep if r["seq"] != seqs[-1]]
    events: list[Event] = []
    size = 0
    group = FIRST_GROUP
    start = 0
    while start < len(keep):
        end = min(len(keep), start + group)
        while end < len(keep) and keep[end]["seq"] == keep[end - 1]["seq"]:
            end += 1  # a page ends at a log row's end
        part = keep[start:end]
        images = await _read_rows(site, part)
        for r in part:
            image = images.get((r["table_id"], r["pk"])) if r["pk"] is not None else r["appended"]
            events.append(
                Event(r["seq"], r["table_id"], r["op"], r["pk"], r["captured_at"], image, r["key_no"] or 0, r["txid"])
            )
        size += sum(len(i) for i in images.values()) + sum(len(r["appended"] or "") for r in part)
        start = end
        if start < len(keep) and size >= max_bytes:
            more = True
            break
        average = size / max(1, len(events))
        group = max(1, min(READ_GROUP, int((max_bytes - size) / average) if average else READ_GROUP))
    return Page(events=events, more=more)


async def _read_rows(site: asyncpg.Connection, rows: list[asyncpg.Record]) -> dict[tuple[int, str], str]:
    """(table id, pk) -> row image, for the keys of `rows` present at the snapshot."""
    keys: dict[int, dict[str, None]] = {}
    for r in rows:
        if r["pk"] is not None:
            keys.setdefault(r["table_id"], {})[r["pk"]] = None
    images: dict[tuple[int, str], str] = {}
    for table_id, pks in keys.items():
        ordered = list(pks)
        for found in await site.fetch(READ_ROWS, table_id, "[" + ",".join(ordered) + "]"):
            images[table_id, ordered[found["ord"] - 1]] = found["image"]
    return images


def advance(progress: ApplyProgress, page: Page) -> ApplyProgress:
    """The progress once `page` is applied: the cursor moves on, or the batch closes."""
    applied = max([progress.applied_seq, *(e.seq for e in page.events)])
    counted = progress.events_applied + len(page.events)
    if page.more:
        return replace(progress, batch_cursor=page.events[-1].seq, applied_seq=applied, events_applied=counted)
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
