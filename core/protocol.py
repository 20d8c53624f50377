"""The Site/Agent protocol, written once: what the daemon, the library and the CLI agree on.

The daemon (asyncpg) and the library and CLI (psycopg) read and write the same rows: the sync
log on the Site DB, the progress row and the parked events on the Agent DB, the advisory lock
that makes one daemon the active one. Their statements live here, each written once with
psycopg's named placeholders; `Statement.asyncpg` is the same text for asyncpg, numbered in the
order the statement declares its parameters.

The visibility rule (dbsync.daemon.consume explains it): an event belongs to the batch of
snapshot `snap` when its transaction is committed in `snap` and was not in `prev`; it is
applied once its transaction is visible in the stored prev_snapshot, or visible in the open
batch's snapshot with seq <= the batch cursor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dbsync.db import display_name

# Advisory lock space of the active daemon: (LOCK_CLASS, hashtext(source)), a session lock on
# the Agent DB.
LOCK_CLASS = 0x64627379  # "dbsy"
# The doorbell channel on the Site DB (sql/site: the log's statement trigger notifies it).
CHANNEL = "dbsync"
# Nothing is visible in it: the first batch takes every committed event.
INITIAL_SNAPSHOT = "3:3:"
# A relation each side's migration creates: when it is missing, so is the schema.
SITE_SCHEMA_MARK = "dbsync.sync_log"
AGENT_SCHEMA_MARK = "dbsync.apply_progress"
# Said by the daemon's session on the database it applies to: its writes there are the other
# side's changes, not to be captured back (honoured only for the roles in dbsync.appliers,
# sql/site/0013_site_write_back.sql). Session-level: the applying link is a session (it holds
# the source's advisory lock), never a transaction-mode pooler.
APPLY_MARK = "SET dbsync.applying = on"


@dataclass(frozen=True)
class ReplicatedTable:
    """A table dbsync replicates, as the Site's registry (dbsync.replicated_tables) names it.

    Each use adds its own facts around it: the apply path's ApplyTable (the Agent table's
    columns and types), reconcile's ComparedTable (each side's key types), and `columns` here
    when `tables add` has read the Site table's columns."""

    table_id: int
    schema: str
    name: str
    keys: tuple[str, ...]
    columns: tuple[str, ...] = ()
    # The unique index standing in for a primary key (`tables add --identity`), when there is one.
    identity: str | None = None
    # Replicated insert-only (no key; `keys` is empty): rows travel as images, never read back.
    insert_only: bool = False

    @property
    def label(self) -> str:
        return display_name(self.schema, self.name)

    @property
    def mode(self) -> str:
        """How rows are matched: "primary key", "identity" or "insert-only"."""
        return "insert-only" if self.insert_only else "identity" if self.identity else "primary key"


_NAMED = re.compile(r"%\((\w+)\)s|%%|%")


class Statement:
    """One SQL statement written with %(name)s placeholders, for psycopg and asyncpg alike.

    `names` is the asyncpg parameter order ($1 is names[0]); every placeholder must be one of
    them, and each of them must be used. A literal % is written %%, as psycopg wants it.
    """

    __slots__ = ("asyncpg", "names", "psycopg")

    def __init__(self, text: str, *names: str) -> None:
        self.psycopg = text
        self.names = names
        self.asyncpg = to_asyncpg(text, names)

    def __repr__(self) -> str:
        return f"Statement({self.psycopg!r}, {', '.join(map(repr, self.names))})"


def to_asyncpg(text: str, names: tuple[str, ...]) -> str:
    """`text` with %(name)s as $n (n: the name's place in `names`) and %% as %."""
    numbers = {name: i for i, name in enumerate(names, start=1)}
    if len(numbers) != len(names):
        raise ValueError(f"a parameter is declared twice: {names}")
    used: set[str] = set()

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            if match.group(0) == "%%":
                return "%"
            raise ValueError(f"a lone % (write %% for a literal one) in: {text.strip()[:60]}")
        if name not in numbers:
            raise ValueError(f"parameter {name!r} is not declared in: {text.strip()[:60]}")
        used.add(name)
        return f"${numbers[name]}"

    out = _NAMED.sub(number, text)
    unused = [n for n in names if n not in used]
    if unused:
        raise ValueError(f"declared parameter(s) {', '.join(unused)} not used in: {text.strip()[:60]}")
    return out


def visible(txid: str, snapshot: str) -> str:
    """SQL: the transaction `txid` is committed in `snapshot` (both SQL expressions)."""
    return f"pg_catalog.pg_visible_in_snapshot({txid}, {snapshot})"


def visible_in(txid: str, snapshot: str) -> bool:
    """pg_visible_in_snapshot, for an xid8 and a pg_snapshot as text ("xmin:xmax:xip,..."): committed
    (or rolled back) before the snapshot was taken. The apply path uses it to tell which of an
    insert-only table's rows an interrupted batch already applied (dbsync.daemon.apply.Replay)."""
    xmin, xmax, running = snapshot.split(":")
    xid = int(txid)
    if xid < int(xmin):
        return True
    if xid >= int(xmax):
        return False
    return xid not in {int(x) for x in running.split(",") if x}


def committed_between(txid: str, prev: str, snap: str) -> str:
    """SQL, the visibility rule: committed in `snap`, and not in `prev`."""
    return f"{visible(txid, snap)} AND NOT {visible(txid, prev)}"


def _snapshot(name: str) -> str:
    return f"%({name})s::text::pg_catalog.pg_snapshot"


# Events of `l` not yet applied behind the progress (prev, batch, cursor): not visible in prev,
# and not already applied as part of the open batch (visible in batch with seq <= cursor). The
# xmin bound lets the txid index skip what prev has long seen.
NOT_APPLIED = f"""l.txid >= pg_catalog.pg_snapshot_xmin({_snapshot("prev")})
  AND NOT {visible("l.txid", _snapshot("prev"))}
  AND NOT ({_snapshot("batch")} IS NOT NULL
           AND {visible("l.txid", _snapshot("batch"))}
           AND l.seq <= %(cursor)s::bigint)"""

# Events of `l` whose transactions `snap` does not see (still running at it, or later).
NOT_IN_SNAPSHOT = f"""l.txid >= pg_catalog.pg_snapshot_xmin({_snapshot("snap")})
  AND NOT {visible("l.txid", _snapshot("snap"))}"""

SCHEMA_EXISTS = Statement("SELECT pg_catalog.to_regclass(%(rel)s::text) IS NOT NULL", "rel")


def no_schema(role: str) -> str:
    """The one line when `role`'s DB (Site or Agent) lacks dbsync's schema."""
    return f"the {role} DB has no dbsync schema: run `dbsync migrate` first"


# -- the sync log (Site) -----------------------------------------------------------------------

# Committed events not yet applied, with the age of the oldest (`dbsync status`, the daemon's
# lag probe).
PENDING = Statement(
    f"""
SELECT coalesce(sum(coalesce(pg_catalog.array_length(l.keys, 1), 1)), 0)::bigint AS events,
       min(l.captured_at) AS oldest,
       extract(epoch FROM pg_catalog.clock_timestamp() - min(l.captured_at))::float8 AS seconds
FROM dbsync.sync_log l
WHERE {NOT_APPLIED}
""",
    "prev",
    "batch",
    "cursor",
)

# The same, per table, among the events visible in %(upto)s (the current snapshot when null).
PENDING_BY_TABLE = Statement(
    f"""
SELECT l.table_id, sum(coalesce(pg_catalog.array_length(l.keys, 1), 1))::bigint,
       extract(epoch FROM pg_catalog.clock_timestamp() - min(l.captured_at))::float8
FROM dbsync.sync_log l
WHERE {NOT_APPLIED}
  AND (%(upto)s::text IS NULL OR {visible("l.txid", _snapshot("upto"))})
  AND (%(tables)s::int[] IS NULL OR l.table_id = ANY (%(tables)s::int[]))
GROUP BY l.table_id
""",
    "prev",
    "batch",
    "cursor",
    "upto",
    "tables",
)

# -- the progress row (Agent) ------------------------------------------------------------------

# Creates the source's row on first use.
LOAD_PROGRESS = Statement(
    """
INSERT INTO dbsync.apply_progress (source, prev_snapshot) VALUES (%(source)s, %(prev)s::text::pg_snapshot)
ON CONFLICT (source) DO NOTHING;
""",
    "source",
    "prev",
)

# What the consumer needs to resume.
READ_PROGRESS = Statement(
    """
SELECT prev_snapshot::text AS prev_snapshot, batch_snapshot::text AS batch_snapshot,
       batch_hi, batch_cursor, applied_seq, events_applied
FROM dbsync.apply_progress WHERE source = %(source)s
""",
    "source",
)

# What `dbsync status` shows; the first three columns are the progress (prev, batch, cursor).
PROGRESS_REPORT = Statement(
    """
SELECT prev_snapshot::text, batch_snapshot::text, batch_cursor, applied_seq, events_applied,
       last_captured_at, updated_at, active_holder, last_error, last_error_at
FROM dbsync.apply_progress WHERE source = %(source)s
""",
    "source",
)
# The progress of a source that has never run.
NO_PROGRESS = (INITIAL_SNAPSHOT, None, None)

# The WHERE clause makes a second consumer's write fail instead of applying twice.
SAVE_PROGRESS = Statement(
    """
UPDATE dbsync.apply_progress SET
    prev_snapshot = %(prev)s::text::pg_snapshot,
    batch_snapshot = %(batch)s::text::pg_snapshot,
    batch_hi = %(hi)s,
    batch_cursor = %(cursor)s,
    applied_seq = %(applied_seq)s,
    events_applied = %(events_applied)s,
    last_captured_at = coalesce(%(last_captured_at)s, last_captured_at),
    updated_at = pg_catalog.now(),
    last_error = NULL,
    last_error_at = NULL
WHERE source = %(source)s
  AND prev_snapshot::text = %(was_prev)s
  AND batch_cursor IS NOT DISTINCT FROM %(was_cursor)s
""",
    "source",
    "prev",
    "batch",
    "hi",
    "cursor",
    "applied_seq",
    "events_applied",
    "last_captured_at",
    "was_prev",
    "was_cursor",
)


def save_progress_returning(condition: str = "true") -> str:
    """SAVE_PROGRESS for asyncpg ($1..$10 as declared), moving the row only when `condition` (SQL)
    also holds, and returning 1 for it: the head of the apply path's one-statement page."""
    return f"{SAVE_PROGRESS.asyncpg.rstrip()}\n  AND ({condition})\nRETURNING 1"


# A write that forces a flushed commit record (see Applier.make_durable): a transaction with an
# xid but no WAL of its own commits asynchronously even under synchronous_commit = on.
TOUCH_PROGRESS = Statement(
    "UPDATE dbsync.apply_progress SET updated_at = updated_at WHERE source = %(source)s", "source"
)

RECORD_ERROR = Statement(
    """
UPDATE dbsync.apply_progress SET last_error = %(error)s, last_error_at = pg_catalog.now() WHERE source = %(source)s
""",
    "source",
    "error",
)

# -- the active daemon (Agent) -----------------------------------------------------------------

TRY_LOCK = Statement(
    "SELECT pg_catalog.pg_try_advisory_lock(%(cls)s::int4, pg_catalog.hashtext(%(source)s))", "cls", "source"
)

# Is the source's lock held, by anyone (a two-key advisory lock has objsubid 2)?
LOCK_HELD = Statement(
    """
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 2
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid = %(cls)s::int4::oid AND objid = hashtext(%(source)s)::oid)
""",
    "cls",
    "source",
)

CLAIM = Statement(
    """
UPDATE dbsync.apply_progress SET active_holder = %(holder)s, active_since = pg_catalog.now() WHERE source = %(source)s
""",
    "source",
    "holder",
)

HOLDER = Statement("SELECT active_holder FROM dbsync.apply_progress WHERE source = %(source)s", "source")

# -- parked events (Agent) ---------------------------------------------------------------------

COUNT_PARKED = Statement("SELECT count(*) FROM dbsync.parked_events WHERE source = %(source)s", "source")

PARKED_BY_TABLE = Statement(
    "SELECT table_id, count(*) FROM dbsync.parked_events WHERE source = %(source)s GROUP BY 1", "source"
)

PARK = Statement(
    """
INSERT INTO dbsync.parked_events (source, seq, key_no, table_id, table_name, op, pk, row_image, captured_at, error)
VALUES (%(source)s, %(seq)s, %(key_no)s, %(table_id)s, %(table_name)s, %(op)s, %(pk)s::text::json,
        %(row_image)s::text::json, %(captured_at)s, %(error)s)
ON CONFLICT (source, seq, key_no) DO UPDATE SET error = EXCLUDED.error, parked_at = pg_catalog.now()
""",
    "source",
    "seq",
    "key_no",
    "table_id",
    "table_name",
    "op",
    "pk",
    "row_image",
    "captured_at",
    "error",
)

# Which of the given (table_id, pk) keys have an event parked.
PARKED_KEYS = Statement(
    """
SELECT DISTINCT p.table_id, p.pk::text AS pk
FROM dbsync.parked_events p
JOIN ROWS FROM (pg_catalog.unnest(%(table_ids)s::int[]), pg_catalog.unnest(%(pks)s::text[])) AS k(table_id, pk)
  ON p.table_id = k.table_id AND p.pk::text = k.pk
WHERE p.source = %(source)s
""",
    "source",
    "table_ids",
    "pks",
)

# A TRUNCATE at seq supersedes whatever was parked for the table before it.
DROP_SUPERSEDED = Statement(
    "DELETE FROM dbsync.parked_events WHERE source = %(source)s AND table_id = %(table_id)s AND seq < %(seq)s",
    "source",
    "table_id",
    "seq",
)

# `dbsync retry` flags events; the daemon re-applies every parked event of a flagged key.
REQUEST_RETRY = Statement(
    """
UPDATE dbsync.parked_events SET retry_requested = true
WHERE source = %(source)s AND (%(table)s::text IS NULL OR table_name = %(table)s)
""",
    "source",
    "table",
)

RETRY_REQUESTED = Statement(
    "SELECT EXISTS (SELECT 1 FROM dbsync.parked_events WHERE source = %(source)s AND retry_requested)", "source"
)

COUNT_RETRY_REQUESTED = Statement(
    "SELECT count(*) FROM dbsync.parked_events WHERE source = %(source)s AND retry_requested", "source"
)

RETRY_CANDIDATES = Statement(
    """
SELECT seq, key_no, table_id, op, pk::text AS pk, row_image::text AS row_image, captured_at
FROM dbsync.parked_events
WHERE source = %(source)s AND ((table_id, pk::text) IN (
    SELECT table_id, pk::text FROM dbsync.parked_events WHERE source = %(source)s AND retry_requested)
    -- an insert-only table's row has no key: it is retried on its own
    OR (pk IS NULL AND op <> 'T' AND retry_requested))
ORDER BY seq, key_no
""",
    "source",
)

# Parked events are (seq, key_no) pairs: one log row may carry many keys.
_PARKED_PAIRS = (
    "(seq, key_no) IN (SELECT * FROM ROWS FROM (pg_catalog.unnest(%(seqs)s::bigint[]), "
    "pg_catalog.unnest(%(key_nos)s::int[])))"
)

UNPARK = Statement(
    f"DELETE FROM dbsync.parked_events WHERE source = %(source)s AND {_PARKED_PAIRS}", "source", "seqs", "key_nos"
)

RETRY_FAILED = Statement(
    f"""
UPDATE dbsync.parked_events SET retry_requested = false, error = %(error)s, parked_at = pg_catalog.now()
WHERE source = %(source)s AND {_PARKED_PAIRS}
""",
    "source",
    "seqs",
    "key_nos",
    "error",
)

# Of the given seqs (one page), the parked ones by table and op.
PARKED_IN_PAGE = Statement(
    """
SELECT table_name, op, count(*) AS n FROM dbsync.parked_events
WHERE source = %(source)s AND seq = ANY (%(seqs)s::bigint[]) GROUP BY table_name, op
""",
    "source",
    "seqs",
)

# -- retention (Site) --------------------------------------------------------------------------

# Up to %(chunk)s applied events (visible in the Agent's prev_snapshot), deleted.
PRUNE = Statement(
    f"""
WITH doomed AS (
    SELECT seq FROM dbsync.sync_log l
    WHERE {visible("l.txid", _snapshot("prev"))}
    ORDER BY seq
    LIMIT %(chunk)s
)
DELETE FROM dbsync.sync_log l USING doomed d WHERE l.seq = d.seq
""",
    "prev",
    "chunk",
)

# -- consumers of the log (Site; sql/site/0010_site_consumers) ---------------------------------

CONSUMERS_MARK = "dbsync.consumers"

# The Agent DB's identity, for a consumer's default name: its database and its cluster's system
# identifier (NULL where pg_control_system() is not allowed).
AGENT_IDENTITY = Statement(
    """
SELECT pg_catalog.current_database()::text,
       (SELECT s.system_identifier::text FROM pg_catalog.pg_control_system() s)
"""
)
AGENT_NAME_ONLY = Statement("SELECT pg_catalog.current_database()::text, NULL::text")

# Registers the consumer at what it has applied, unless registered; returns its missed_history.
REGISTER_CONSUMER = Statement(
    "SELECT dbsync.register_consumer(%(name)s::text, %(snapshot)s::text, %(reporter)s::name)",
    "name",
    "snapshot",
    "reporter",
)

# The consumer has applied everything visible in %(snapshot)s; false when it is not registered.
CONSUMER_APPLIED = Statement("SELECT dbsync.consumer_applied(%(name)s::text, %(snapshot)s::text)", "name", "snapshot")

# Up to %(chunk)s events every registered consumer has applied, deleted; returns how many.
PRUNE_APPLIED = Statement("SELECT dbsync.prune_log(%(chunk)s::int4)", "chunk")

# Every consumer with its lag: the events not visible in its applied snapshot, the age of the
# oldest of them, and how long since it was last seen.
CONSUMER_LAG = Statement(
    f"""
SELECT c.name, c.reporter::text, c.applied_snapshot::text, c.registered_at, c.seen_at, c.missed_history,
       extract(epoch FROM pg_catalog.clock_timestamp() - c.seen_at)::float8 AS seen_ago,
       p.events, p.seconds
FROM dbsync.consumers c
CROSS JOIN LATERAL (
    SELECT coalesce(sum(coalesce(pg_catalog.array_length(l.keys, 1), 1)), 0)::bigint AS events,
           extract(epoch FROM pg_catalog.clock_timestamp() - min(l.captured_at))::float8 AS seconds
    FROM dbsync.sync_log l
    WHERE l.txid >= pg_catalog.pg_snapshot_xmin(c.applied_snapshot) AND NOT {visible("l.txid", "c.applied_snapshot")}
) p
ORDER BY c.name
"""
)

# How long since each consumer was last seen (the daemon's cheap look for stale ones).
CONSUMERS_SEEN = Statement(
    "SELECT name, extract(epoch FROM pg_catalog.clock_timestamp() - seen_at)::float8 FROM dbsync.consumers"
)

CONSUMER_EXISTS = Statement("SELECT 1 FROM dbsync.consumers WHERE name = %(name)s", "name")

# `dbsync consumers backfilled`: its tables were copied, the history it missed is there now.
CLEAR_MISSED = Statement(
    "UPDATE dbsync.consumers SET missed_history = false WHERE name = %(name)s RETURNING name", "name"
)

DROP_CONSUMER = Statement("DELETE FROM dbsync.consumers WHERE name = %(name)s RETURNING name", "name")
