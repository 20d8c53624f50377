"""The initial copy: the rows already in a Site table, sent through the sync log while writes go on.

The table is walked in key order, one chunk per transaction (dbsync.backfill_step): each row of
the chunk is logged as a 'U' event with its current image, read FOR SHARE, so it lands in the log
in order with the writers' own events (see sql/site/0002_site_resync.sql). The position is
stored with the chunk, so an interrupted backfill resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from dbsync import rls
from dbsync import tables as registry
from dbsync.db import display_name
from dbsync.errors import DbsyncError
from dbsync.resync import call, regclass

STEP = "SELECT dbsync.backfill_step(%s::regclass, %s)"
RESET = "SELECT dbsync.backfill_reset(%s::regclass)"
ESTIMATE = "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = %s::regclass"


class BackfillError(DbsyncError):
    """A backfill could not run."""


@dataclass(frozen=True)
class BackfillProgress:
    table: str
    rows: int  # rows logged by the last chunk
    rows_done: int
    estimate: int  # planner's row estimate of the table (0 when unknown)
    finished: bool
    chunks: int  # chunks done by this run


def backfill(
    site: psycopg.Connection,
    name: str,
    *,
    chunk_size: int = 5000,
    restart: bool = False,
    max_chunks: int | None = None,
    on_chunk: Callable[[BackfillProgress], None] | None = None,
    where: str = "Site",
) -> BackfillProgress:
    """Copy `name` (or resume its copy); returns where it stopped. `where` names the database
    `site` is, for messages: the Agent DB for a write-back table."""
    if chunk_size < 1:
        raise BackfillError("the chunk size must be positive")
    schema, table = registry.resolve(site, name, where)
    label = display_name(schema, table)
    rel = regclass(site, schema, table)
    if _insert_only(site, rel):
        raise BackfillError(
            f"{label} is replicated insert-only: its existing rows are copied once, by `dbsync tables add "
            "--insert-only --backfill` (in the transaction that installs its capture); a later copy would "
            "duplicate every row inserted since"
        )
    rls.require_definer_reads_all(site, [(schema, table)], "backfill")
    if restart:
        call(site, RESET, (rel,), f"backfill of {label}")
    estimate = int(site.execute(ESTIMATE, (rel,)).fetchone()[0])  # type: ignore[index]
    chunks = 0
    while True:
        step = call(site, STEP, (rel, chunk_size), f"backfill of {label}")
        if step["finished"] and step["rows"] == 0 and chunks == 0:
            progress = BackfillProgress(label, 0, int(step["rows_done"]), estimate, True, 0)
            break
        chunks += 1
        progress = BackfillProgress(
            label, int(step["rows"]), int(step["rows_done"]), estimate, bool(step["finished"]), chunks
        )
        if on_chunk is not None:
            on_chunk(progress)
        if progress.finished or (max_chunks is not None and chunks >= max_chunks):
            break
    return progress


def _insert_only(site: psycopg.Connection, rel: str) -> bool:
    row = site.execute(
        "SELECT insert_only FROM dbsync.replicated_tables WHERE relid = %s::regclass AND removed_at IS NULL", (rel,)
    ).fetchone()
    return bool(row and row[0])
