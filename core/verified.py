"""The incremental verification's mark (sql/agent/0004_agent_verified_mark.sql), written once.

The daemon's verifier (psycopg, dbsync.daemon.verify_keys) moves it; the daemon's retention
(asyncpg, dbsync.daemon.retention) deletes from the Site's sync log only the events behind it;
`dbsync status` shows it. The mark is a Site snapshot: an event is verified when its transaction
is visible in verified_snapshot, or visible in the pass's target_snapshot with seq <= pass_cursor
(the consumption rule's shape, dbsync.protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbsync.protocol import Statement, committed_between

HAS_MARK = "SELECT pg_catalog.to_regclass('dbsync.verify_mark') IS NOT NULL"

# The first mark is what the apply stands at: the keys applied before verify_interval was set are
# the full verification's to compare.
START_MARK = """
INSERT INTO dbsync.verify_mark (source, verified_snapshot)
SELECT source, prev_snapshot FROM dbsync.apply_progress WHERE source = %(source)s
ON CONFLICT (source) DO NOTHING
"""
READ_MARK = """
SELECT verified_snapshot::text, target_snapshot::text, pass_cursor, pass_hi, verified_seq, keys_verified,
       extract(epoch FROM now() - coalesce(pass_started_at, verified_at))::float8
FROM dbsync.verify_mark WHERE source = %(source)s
"""
# The pass's target: what the apply stands at now (every event its prev_snapshot sees is applied).
APPLIED_SNAPSHOT = "SELECT prev_snapshot::text FROM dbsync.apply_progress WHERE source = %(source)s"
BEGIN_PASS = """
UPDATE dbsync.verify_mark
SET target_snapshot = %(target)s::text::pg_snapshot, pass_cursor = %(cursor)s, pass_hi = %(hi)s,
    pass_started_at = now()
WHERE source = %(source)s AND target_snapshot IS NULL
"""
ADVANCE = """
UPDATE dbsync.verify_mark
SET pass_cursor = %(cursor)s, verified_seq = greatest(verified_seq, %(cursor)s),
    keys_verified = keys_verified + %(keys)s
WHERE source = %(source)s AND target_snapshot::text = %(target)s
"""
END_PASS = """
UPDATE dbsync.verify_mark
SET verified_snapshot = target_snapshot, verified_seq = greatest(verified_seq, coalesce(pass_hi, 0)),
    target_snapshot = NULL, pass_cursor = NULL, pass_hi = NULL, pass_started_at = NULL, verified_at = now()
WHERE source = %(source)s AND target_snapshot::text = %(target)s
"""

# What retention may delete up to (NULL: no mark yet, delete nothing).
VERIFIED_SNAPSHOT = Statement(
    "SELECT verified_snapshot::text FROM dbsync.verify_mark WHERE source = %(source)s", "source"
)

_VERIFIED = "%(verified)s::text::pg_catalog.pg_snapshot"
_TARGET = "%(target)s::text::pg_catalog.pg_snapshot"
_IN_PASS = committed_between("l.txid", _VERIFIED, _TARGET)

# The seq bounds of a pass, through the txid index: transactions that started after the mark,
# and those that were running at it (OPEN_BATCH's shape).
PASS_BOUNDS = f"""
SELECT min(l.seq), max(l.seq), coalesce(sum(coalesce(pg_catalog.array_length(l.keys, 1), 1)), 0)::bigint
FROM dbsync.sync_log l
WHERE ((l.txid >= pg_catalog.pg_snapshot_xmax({_VERIFIED}) AND l.txid < pg_catalog.pg_snapshot_xmax({_TARGET}))
       OR l.txid = ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip({_VERIFIED}))))
  AND {_IN_PASS}
"""

# The pass's next keys in seq order: whole log rows while fewer than %(keys)s keys come before
# them. A TRUNCATE comes with a NULL key: it has none to compare (the full verification covers it).
PASS_KEYS = f"""
SELECT p.seq, p.table_id, k.key::text
FROM (
    SELECT l.*, pg_catalog.sum(l.n) OVER (ORDER BY l.seq) AS upto
    FROM (
        SELECT l.seq, l.table_id, l.pk, l.keys, coalesce(pg_catalog.array_length(l.keys, 1), 1) AS n
        FROM dbsync.sync_log l
        WHERE l.seq > %(cursor)s AND l.seq <= %(hi)s AND {_IN_PASS}
        ORDER BY l.seq
        LIMIT %(keys)s
    ) l
) p
JOIN dbsync.replicated_tables r ON r.table_id OPERATOR(pg_catalog.=) p.table_id
LEFT JOIN LATERAL dbsync.log_keys(p.pk, p.keys, r.key_columns) AS k ON true
WHERE p.upto OPERATOR(pg_catalog.-) p.n < %(keys)s
ORDER BY p.seq, k.key_no
"""


@dataclass(frozen=True)
class Mark:
    verified_snapshot: str
    target_snapshot: str | None  # None: no pass in progress
    pass_cursor: int | None
    pass_hi: int | None
    verified_seq: int
    keys_verified: int
    seconds_since: float  # since the pass in progress began, or since the last one ended


# For `dbsync status`, whose role may not read the mark (it is the daemon's).
CAN_READ_MARK = """
SELECT pg_catalog.to_regclass('dbsync.verify_mark') IS NOT NULL
       AND pg_catalog.has_table_privilege('dbsync.verify_mark', 'SELECT')
"""


def read_verified_seq(agent: Any, source: str) -> int | None:
    """The mark's verified_seq for `dbsync status` (a psycopg connection); None: no mark."""
    if agent.execute(CAN_READ_MARK).fetchone() != (True,):
        return None
    row = agent.execute(READ_MARK, {"source": source}).fetchone()
    return None if row is None else int(row[4])
