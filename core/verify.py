"""The full verification's record on the Agent DB (sql/agent/0003_agent_verify.sql).

The daemon writes it (dbsync.daemon.verify); `dbsync status` reads it. Keys are JSON objects of
the key columns' text, as `reconcile --deep` reports them; row values are never stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from dbsync.reconcile import TableDiff

HAS_RECORD = "SELECT pg_catalog.to_regclass('dbsync.verify_mismatches') IS NOT NULL"

START_PROGRESS = "INSERT INTO dbsync.verify_progress (source) VALUES (%(source)s) ON CONFLICT (source) DO NOTHING"
READ_PROGRESS = """
SELECT pass_started_at, schema_name, table_name, last_key, rows_checked, last_pass_started_at,
       last_pass_finished_at,
       extract(epoch FROM last_pass_started_at + make_interval(secs => %(interval)s) - now())::float8,
       extract(epoch FROM now() - last_pass_finished_at)::float8
FROM dbsync.verify_progress WHERE source = %(source)s
"""
BEGIN_PASS = """
UPDATE dbsync.verify_progress
SET pass_started_at = now(), schema_name = NULL, table_name = NULL, last_key = NULL, rows_checked = 0,
    updated_at = now()
WHERE source = %(source)s
"""
ADVANCE = """
UPDATE dbsync.verify_progress
SET schema_name = %(schema)s, table_name = %(name)s, last_key = %(last_key)s,
    rows_checked = rows_checked + %(rows)s, updated_at = now()
WHERE source = %(source)s AND pass_started_at IS NOT NULL
"""
END_PASS = """
UPDATE dbsync.verify_progress
SET last_pass_started_at = pass_started_at, last_pass_finished_at = now(), pass_started_at = NULL,
    schema_name = NULL, table_name = NULL, last_key = NULL, updated_at = now()
WHERE source = %(source)s AND pass_started_at IS NOT NULL
"""

RECORD = """
INSERT INTO dbsync.verify_mismatches (source, table_id, table_name, key, kind)
SELECT %(source)s, %(table_id)s, %(table)s, m.key, m.kind
FROM unnest(%(keys)s::text[], %(kinds)s::text[]) AS m(key, kind)
ON CONFLICT (source, table_id, key) DO UPDATE SET kind = excluded.kind
RETURNING (xmax = 0) AS new
"""
CLEAR = """
DELETE FROM dbsync.verify_mismatches WHERE source = %(source)s AND table_id = %(table_id)s AND key = ANY (%(keys)s)
"""
OPEN = "SELECT table_id, table_name, key, kind FROM dbsync.verify_mismatches WHERE source = %(source)s ORDER BY 1, 3"
OPEN_COUNTS = """
SELECT table_name, kind, count(*) FROM dbsync.verify_mismatches WHERE source = %(source)s GROUP BY 1, 2 ORDER BY 1, 2
"""
SOME_KEYS = """
SELECT table_name, kind, key FROM dbsync.verify_mismatches WHERE source = %(source)s
ORDER BY table_name, found_at, key LIMIT %(limit)s
"""

KINDS = ("missing", "extra", "changed")


@dataclass(frozen=True)
class Progress:
    pass_started_at: datetime | None
    schema: str | None
    table: str | None
    last_key: str | None
    rows_checked: int
    last_pass_started_at: datetime | None
    last_pass_finished_at: datetime | None
    seconds_to_next_pass: float | None  # None: no pass has run yet (one is due)
    seconds_since_pass: float | None


def read_progress(agent: psycopg.Connection, source: str, interval: float = 0.0) -> Progress | None:
    row = agent.execute(READ_PROGRESS, {"source": source, "interval": interval}).fetchone()
    return None if row is None else Progress(*row)


def proven(diff: TableDiff) -> dict[str, str]:
    """key -> kind of the differences `diff` proves (unsettled keys are not proven)."""
    return {key: kind for kind in KINDS for key in getattr(diff, kind)}


def record(agent: psycopg.Connection, source: str, diff: TableDiff, found: dict[str, str]) -> int:
    """Store the mismatches `found` (key -> kind) of diff's table; returns how many are new."""
    if not found:
        return 0
    params = {
        "source": source,
        "table_id": diff.table_id,
        "table": diff.table,
        "keys": list(found),
        "kinds": list(found.values()),
    }
    return sum(1 for (new,) in agent.execute(RECORD, params).fetchall() if new)


def clear(agent: psycopg.Connection, source: str, table_id: int, keys: Iterable[str]) -> None:
    agent.execute(CLEAR, {"source": source, "table_id": table_id, "keys": list(keys)})


def open_mismatches(agent: psycopg.Connection, source: str) -> dict[int, dict[str, tuple[str, str]]]:
    """table_id -> {key: (table label, kind)} of every stored mismatch."""
    out: dict[int, dict[str, tuple[str, str]]] = {}
    for table_id, label, key, kind in agent.execute(OPEN, {"source": source}).fetchall():
        out.setdefault(table_id, {})[key] = (label, kind)
    return out


@dataclass(frozen=True)
class VerifyStatus:
    """What `dbsync status` says of the full verification."""

    mismatches: int
    by_table: dict[str, dict[str, int]] = field(default_factory=dict)
    keys: list[dict[str, Any]] = field(default_factory=list)  # the first few: table, kind, key
    progress: Progress | None = None


def read_verify_status(agent: psycopg.Connection, source: str, limit: int = 20) -> VerifyStatus | None:
    """None when the Agent DB predates the verification's tables."""
    if agent.execute(HAS_RECORD).fetchone() != (True,):
        return None
    by_table: dict[str, dict[str, int]] = {}
    for table, kind, n in agent.execute(OPEN_COUNTS, {"source": source}).fetchall():
        by_table.setdefault(table, {})[kind] = int(n)
    keys = [
        {"table": t, "kind": k, "key": key}
        for t, k, key in agent.execute(SOME_KEYS, {"source": source, "limit": limit}).fetchall()
    ]
    total = sum(sum(kinds.values()) for kinds in by_table.values())
    return VerifyStatus(total, by_table, keys, read_progress(agent, source))
