"""The deep check: which rows differ between the Site DB and the Agent DB, proven while both move.

1. First pass, one scan per side (both sides at once): rows are put in B buckets by a range of
   their key (a single integer key: a differing bucket is then read through the key index) or
   else by a hash of it; each side returns (bucket, rows, sum of row hashes). Buckets that
   disagree are listed row by row as (key, row hash), and the lists are compared. Only hashes
   and the keys of differing buckets cross the network.
2. A first-pass difference may be a change in flight. Each round of the recheck pins a Site
   snapshot S and reads the candidates' Site hashes in it, waits until the Agent DB has applied
   everything visible in S, then reads the candidates' Agent hashes. A key that still differs is
   drift when the log holds no later event for it (from a transaction S does not see) and both
   its hashes are the ones seen in the previous observation; otherwise it goes to the next
   round. Keys still unsure after the last round are reported as unsettled, never as equal.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from dbsync import rls
from dbsync import tables as registry
from dbsync.catchup import CatchUp
from dbsync.db import display_name
from dbsync.errors import DbsyncError, SchemaError
from dbsync.keyops import key_equality
from dbsync.protocol import NOT_IN_SNAPSHOT
from dbsync.rowhash import (
    BUCKET_PLANNING,
    HashQueries,
    TableShape,
    choose_hash,
    integer_key,
    key_defs,
    key_match,
    prepare,
    raw,
)
from dbsync.status import require_schema

log = logging.getLogger("dbsync.reconcile")

# Rows per bucket the first pass aims at: small enough that listing a differing bucket is cheap,
# large enough that the bucket lists stay small (1M rows: 2,048 buckets).
ROWS_PER_BUCKET = 512
MAX_BUCKETS = 1 << 16
RECHECK_ROUNDS = 5

REPLICATED = """
SELECT table_id, schema_name, table_name, key_columns, {selection} FROM dbsync.replicated_tables
WHERE removed_at IS NULL AND (%(schema)s::text IS NULL OR (schema_name = %(schema)s AND table_name = %(name)s))
ORDER BY schema_name, table_name
"""

ESTIMATE = "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = %(rel)s::regclass"

# Events logged for %(table_id)s by transactions not visible in %(snap)s: changes still in flight.
# (dbsync.log_keys turns each logged key into a JSON object of text values.)
RECENT = f"""
l.table_id = %(table_id)s
  AND {NOT_IN_SNAPSHOT}
"""
MOVING_KEYS = """
SELECT DISTINCT c.key
FROM unnest(%(keys)s::text[]) AS c(key)
CROSS JOIN LATERAL json_to_record(c.key::json) AS k({defs})
JOIN (SELECT r.* FROM dbsync.sync_log l
      JOIN dbsync.replicated_tables t ON t.table_id = l.table_id
      CROSS JOIN LATERAL dbsync.log_keys(l.pk, l.keys, t.key_columns) AS lk
      CROSS JOIN LATERAL json_to_record(lk.key) AS r({defs})
      WHERE {recent}) AS r ON {match}
"""
RECENT_TRUNCATE = "SELECT EXISTS (SELECT 1 FROM dbsync.sync_log l WHERE {recent} AND l.op = 'T')"


class ReconcileError(DbsyncError):
    """A comparison could not be completed (it never reports "in sync" then)."""


class UnknownTable(SchemaError):
    """A table named on the command line is not replicated."""


@dataclass(frozen=True)
class ComparedTable:
    table_id: int
    site: TableShape
    agent: TableShape

    @property
    def insert_only(self) -> bool:
        """No key (0008_site_identity): compared as a multiset of rows (check_appended)."""
        return not self.site.keys

    @property
    def label(self) -> str:
        return self.site.label


@dataclass
class TableDiff:
    """The proven differences of one table; keys are JSON objects of the key columns (text)."""

    table: str
    table_id: int
    site_rows: int = 0
    agent_rows: int = 0
    missing: list[str] = field(default_factory=list)  # on the Site, not on the Agent
    extra: list[str] = field(default_factory=list)  # on the Agent, not on the Site
    changed: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)  # kept changing; could not be verified

    @property
    def differs(self) -> bool:
        return bool(self.missing or self.extra or self.changed or self.unsettled)

    def keys(self) -> list[str]:
        return [*self.missing, *self.extra, *self.changed, *self.unsettled]


def targets(
    site: psycopg.Connection,
    agent: psycopg.Connection,
    names: Sequence[str],
    where: tuple[str, str] = ("Site", "Agent"),
) -> list[ComparedTable]:
    """The replicated tables to compare (all when `names` is empty), checked on both sides.
    `where` names the source and the target database for messages (write-back: Agent, Site)."""
    require_schema(site, agent)
    # Before 0009_site_filters every table replicates all its columns and rows.
    selection = "column_list, row_filter" if registry.has_filters(site) else "NULL::text[], NULL::text"
    replicated = REPLICATED.format(selection=selection)
    rows: list[tuple[Any, ...]] = []
    if names:
        for name in names:
            schema, table = registry.resolve(site, name, where[0])
            found = site.execute(replicated, {"schema": schema, "name": table}).fetchall()
            if not found:
                raise UnknownTable(f"table {display_name(schema, table)} is not replicated (see `dbsync tables list`)")
            rows.extend(r for r in found if r not in rows)
    else:
        rows = site.execute(replicated, {"schema": None, "name": None}).fetchall()
    chosen = [
        _compared_table(site, agent, r[0], r[1], r[2], tuple(r[3]), registry.Selection(_tuple(r[4]), r[5]), where[1])
        for r in rows
    ]
    # Both sides are read as this command's roles: they must see every row, or the rows a policy
    # hides would be reported as differences (and repaired away).
    names_of = [(t.site.schema, t.site.name) for t in chosen]
    rls.require_all_rows(site, names_of, where[0])
    rls.require_all_rows(agent, names_of, where[1])
    return chosen


def _tuple(names: list[str] | None) -> tuple[str, ...] | None:
    return None if names is None else tuple(names)


def _compared_table(
    site: psycopg.Connection,
    agent: psycopg.Connection,
    table_id: int,
    schema: str,
    name: str,
    keys: tuple[str, ...],
    selection: registry.Selection = registry.EVERYTHING,
    target: str = "Agent",
) -> ComparedTable:
    """Both sides compare the replicated columns only; the Site's rows through the row filter."""
    label = display_name(schema, name)
    columns = tuple(
        c for c in registry.columns(site, schema, name) if selection.columns is None or c in selection.columns
    )
    if not keys:  # insert-only: no key to describe
        return ComparedTable(
            table_id, TableShape(schema, name, keys, columns, ""), TableShape(schema, name, keys, columns, "")
        )
    try:
        agent_columns = registry.columns(agent, schema, name)
    except psycopg.errors.UndefinedTable:
        raise SchemaError(f"table {label} does not exist on the {target} DB") from None
    lacking = [c for c in columns if c not in agent_columns]
    if lacking:
        raise SchemaError(f"table {label} on the {target} DB lacks column(s) {', '.join(lacking)}")
    return ComparedTable(
        table_id,
        TableShape(
            schema,
            name,
            keys,
            columns,
            key_defs(site, schema, name, keys),
            key_equality(site, schema, name, keys),
            selection.where,
        ),
        TableShape(
            schema, name, keys, columns, key_defs(agent, schema, name, keys), key_equality(agent, schema, name, keys)
        ),
    )


class Comparer:
    """Runs the comparison's statements on both sides at once (one thread per side)."""

    def __init__(self, site: psycopg.Connection, agent: psycopg.Connection) -> None:
        prepare(site)
        prepare(agent)
        self.site = site
        self.agent = agent
        self.hash_template = choose_hash(site, agent)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dbsync-compare")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def both(
        self, site_query: sql.Composed, agent_query: sql.Composed, params: dict[str, Any], *, setup: Sequence[str] = ()
    ) -> tuple[list[Any], list[Any]]:
        on_site = self._pool.submit(_fetch, self.site, site_query, params, setup)
        on_agent = self._pool.submit(_fetch, self.agent, agent_query, params, setup)
        return on_site.result(), on_agent.result()

    def queries(self, target: ComparedTable) -> tuple[HashQueries, HashQueries]:
        return HashQueries(target.site, self.hash_template), HashQueries(target.agent, self.hash_template)


def _fetch(conn: psycopg.Connection, query: sql.Composed, params: dict[str, Any], setup: Sequence[str]) -> list[Any]:
    with conn.transaction():
        for statement in setup:
            conn.execute(statement)
        return list(conn.execute(query, params).fetchall())


def bucket_count(site: psycopg.Connection, agent: psycopg.Connection, target: ComparedTable) -> int:
    rel = sql.Identifier(target.site.schema, target.site.name).as_string(site)
    rows = max(int(conn.execute(ESTIMATE, {"rel": rel}).fetchone()[0]) for conn in (site, agent))  # type: ignore[index]
    wanted = max(1, rows // ROWS_PER_BUCKET)
    return min(MAX_BUCKETS, 1 << math.ceil(math.log2(wanted))) if wanted > 1 else 16


def first_pass(comparer: Comparer, target: ComparedTable) -> tuple[TableDiff, dict[str, tuple[int | None, int | None]]]:
    """Candidate differences: key -> (site hash, agent hash), None where the row is absent."""
    site_q, agent_q = comparer.queries(target)
    buckets = bucket_count(comparer.site, comparer.agent, target)
    params: dict[str, Any] = {"mask": buckets - 1}
    ranges = key_ranges(comparer, target, buckets)
    if ranges is not None:
        params.update(ranges)
        sums = (site_q.range_buckets(), agent_q.range_buckets())
    else:
        sums = (site_q.buckets(), agent_q.buckets())
    on_site, on_agent = comparer.both(*sums, params, setup=BUCKET_PLANNING)
    site_b = {b: (n, h) for b, n, h in on_site}
    agent_b = {b: (n, h) for b, n, h in on_agent}
    diff = TableDiff(
        target.label, target.table_id, sum(n for n, _ in site_b.values()), sum(n for n, _ in agent_b.values())
    )
    differing = sorted(b for b in site_b.keys() | agent_b.keys() if site_b.get(b) != agent_b.get(b))
    log.info("%s: %d of %d bucket(s) differ", target.label, len(differing), buckets)
    if not differing:
        return diff, {}
    if ranges is not None:
        lo, width = ranges["lo"], ranges["width"]
        params["lows"] = [INT8_MIN if b == 0 else lo + b * width for b in differing]
        params["highs"] = [INT8_MAX if b == buckets - 1 else lo + (b + 1) * width - 1 for b in differing]
        on_site, on_agent = comparer.both(site_q.rows_in_ranges(), agent_q.rows_in_ranges(), params)
    else:
        params["buckets"] = differing
        on_site, on_agent = comparer.both(site_q.rows_in_buckets(), agent_q.rows_in_buckets(), params)
    return diff, _differing_keys(on_site, on_agent)


INT8_MIN, INT8_MAX = -(1 << 63), (1 << 63) - 1


def key_ranges(comparer: Comparer, target: ComparedTable, buckets: int) -> dict[str, int] | None:
    """lo and width of key-range buckets for a single integer key on both sides; None: hash buckets.

    The bounds span both sides' keys; a span too wide for int8 arithmetic falls back to hashes."""
    if not (integer_key(target.site) and integer_key(target.agent)):
        return None
    site_q, agent_q = comparer.queries(target)
    on_site, on_agent = comparer.both(site_q.key_bounds(), agent_q.key_bounds(), {})
    lows = [r[0][0] for r in (on_site, on_agent) if r[0][0] is not None]
    highs = [r[0][1] for r in (on_site, on_agent) if r[0][1] is not None]
    if not lows or max(highs) - min(lows) >= 1 << 62:
        return None
    lo = min(lows)
    return {"lo": lo, "width": max(1, -(-(max(highs) - lo + 1) // buckets))}


def _differing_keys(on_site: Iterable[Any], on_agent: Iterable[Any]) -> dict[str, tuple[int | None, int | None]]:
    site_rows = dict(on_site)
    agent_rows = dict(on_agent)
    return {
        key: (site_rows.get(key), agent_rows.get(key))
        for key in site_rows.keys() | agent_rows.keys()
        if site_rows.get(key) != agent_rows.get(key)
    }


Seen = dict[str, tuple[int | None, int | None]]

# The planner takes a key list for 100 rows whatever its length, and on a small table reads the
# whole table to join it: by a sequential scan, or (with those off) by a full scan of the key index
# into a hash or merge join (5 keys of a 2,000-row table read 2,000 rows). Each key is looked up in
# the key index instead (a nested loop), so the rows read are the keys asked for, however small or
# large the table.
KEY_LOOKUPS = (
    "SET LOCAL enable_seqscan = off",
    "SET LOCAL enable_bitmapscan = off",
    "SET LOCAL enable_hashjoin = off",
    "SET LOCAL enable_mergejoin = off",
)


def recheck(comparer: Comparer, catchup: CatchUp, target: ComparedTable, seen: Seen, diff: TableDiff) -> TableDiff:
    """Keep the keys that still differ once the Agent DB has caught up; fill `diff` with them.

    `seen` holds each key's last observed (Site hash, Agent hash). A key is drift when it differs
    in a round, the log holds no later change to it, and both hashes are the ones seen before:
    the last condition still holds when the daemon has already deleted an applied event from
    the log (retention), which would otherwise hide that the Agent DB was ahead of the snapshot.
    """
    site_q, agent_q = comparer.queries(target)
    seen = dict(seen)
    pending = sorted(seen)
    for round_no in range(1, RECHECK_ROUNDS + 1):
        if not pending:
            break
        params: dict[str, Any] = {"keys": "[" + ",".join(pending) + "]"}
        with comparer.site.transaction():
            comparer.site.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            snap = comparer.site.execute("SELECT pg_current_snapshot()::text").fetchone()[0]  # type: ignore[index]
            for statement in KEY_LOOKUPS:
                comparer.site.execute(statement)
            site_rows = comparer.site.execute(site_q.rows_by_key(), params).fetchall()
        catchup.wait(snap, [target.table_id])
        with comparer.agent.transaction():
            for statement in KEY_LOOKUPS:
                comparer.agent.execute(statement)
            agent_rows = comparer.agent.execute(agent_q.rows_by_key(), params).fetchall()
        differing = _differing_keys(site_rows, agent_rows)
        moving = moving_keys(comparer.site, target, snap, sorted(differing)) if differing else set()
        log.info(
            "%s: recheck round %d: %d of %d key(s) still differ, %d of them changing",
            target.label,
            round_no,
            len(differing),
            len(pending),
            len(moving),
        )
        unsure = set(moving)
        for key, (site_hash, agent_hash) in sorted(differing.items()):
            if key in moving or seen.get(key) != (site_hash, agent_hash):
                seen[key] = (site_hash, agent_hash)
                unsure.add(key)
            elif agent_hash is None:
                diff.missing.append(key)
            elif site_hash is None:
                diff.extra.append(key)
            else:
                diff.changed.append(key)
        pending = sorted(unsure)
    diff.unsettled.extend(pending)
    for keys_of_kind in (diff.missing, diff.extra, diff.changed, diff.unsettled):
        keys_of_kind.sort(key=_key_order)
    return diff


def _key_order(key: str) -> tuple[Any, ...]:
    """Keys in the order of their values (10 after 9), not of their JSON text."""
    out: list[tuple[int, Any]] = []
    for value in json.loads(key, parse_float=Decimal).values():
        if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
            out.append((0, Decimal(value)))
        elif isinstance(value, str):
            out.append((1, value))
        else:
            out.append((2, json.dumps(value, default=str)))
    return tuple(out)


def moving_keys(site: psycopg.Connection, target: ComparedTable, snap: str, keys: list[str]) -> set[str]:
    """The keys among `keys` with a logged change that `snap` does not see (all, after a truncate)."""
    params = {"table_id": target.table_id, "snap": snap, "keys": keys}
    recent = sql.SQL(RECENT)
    if site.execute(sql.SQL(RECENT_TRUNCATE).format(recent=recent), params).fetchone() == (True,):
        return set(keys)
    match = key_match(target.site, "r", "k")
    query = sql.SQL(MOVING_KEYS).format(defs=raw(target.site.key_defs), recent=recent, match=match)
    return {r[0] for r in site.execute(query, params).fetchall()}


def deep_check(
    comparer: Comparer,
    catchup: CatchUp,
    target: ComparedTable,
) -> TableDiff:
    if target.insert_only:
        return check_appended(comparer, catchup, target)
    diff, candidates = first_pass(comparer, target)
    if not candidates:
        return diff
    log.info("%s: %d candidate difference(s); rechecking once the daemon has caught up", target.label, len(candidates))
    return recheck(comparer, catchup, target, candidates, diff)


def check_appended(comparer: Comparer, catchup: CatchUp, target: ComparedTable) -> TableDiff:
    """An insert-only table, compared as a multiset: how many copies of each row (by row hash)
    each side holds.

    The Site table only grows (its capture refuses UPDATE, DELETE and TRUNCATE) and the Agent
    DB applies only what the Site committed, so with S1 a Site snapshot the Agent has caught up
    with, and S2 one taken after the Agent was read, a row in sync has Site(S1) <= Agent <=
    Site(S2) copies. Fewer than Site(S1) is rows missing, more than Site(S2) rows extra: proven,
    however fast rows arrive, with no recheck rounds. Buckets of row hashes first, then the
    hashes of the buckets that differ. A difference is reported as {"row_hash", "copies"}: there
    is no key to name a row by."""
    site_q, agent_q = comparer.queries(target)
    mask = bucket_count(comparer.site, comparer.agent, target) - 1
    params: dict[str, Any] = {"mask": mask}

    def site_read(query: sql.Composed) -> tuple[str, list[Any]]:
        with comparer.site.transaction():
            comparer.site.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            snap = comparer.site.execute("SELECT pg_current_snapshot()::text").fetchone()[0]  # type: ignore[index]
            return str(snap), list(comparer.site.execute(query, params).fetchall())

    snap, low = site_read(site_q.appended_buckets())
    catchup.wait(snap, [target.table_id])
    agent = {b: (int(n), h) for b, n, h in comparer.agent.execute(agent_q.appended_buckets(), params).fetchall()}
    _, high = site_read(site_q.appended_buckets())
    lows, highs = ({b: (int(n), h) for b, n, h in rows} for rows in (low, high))
    diff = TableDiff(target.label, target.table_id, sum(n for n, _ in lows.values()), sum(n for n, _ in agent.values()))
    differing = sorted(b for b in lows.keys() | agent.keys() if agent.get(b) not in (lows.get(b), highs.get(b)))
    log.info("%s: %d of %d bucket(s) of row hashes differ", target.label, len(differing), mask + 1)
    if not differing:
        return diff
    params["buckets"] = differing
    snap, low = site_read(site_q.appended_hashes())
    catchup.wait(snap, [target.table_id])
    on_agent: dict[int, int] = {h: int(n) for h, n in comparer.agent.execute(agent_q.appended_hashes(), params)}
    _, high = site_read(site_q.appended_hashes())
    site_low, site_high = ({h: int(n) for h, n in rows} for rows in (low, high))
    for h in sorted(site_low.keys() | site_high.keys() | on_agent.keys()):
        held = on_agent.get(h, 0)
        if held < site_low.get(h, 0):
            diff.missing.append(json.dumps({"row_hash": str(h), "copies": site_low[h] - held}))
        elif held > site_high.get(h, 0):
            diff.extra.append(json.dumps({"row_hash": str(h), "copies": held - site_high.get(h, 0)}))
    return diff


def check_keys(comparer: Comparer, catchup: CatchUp, target: ComparedTable, keys: Sequence[str]) -> TableDiff:
    """The deep check of the rows with these keys only (JSON key objects, as the log holds them).

    Each side reads the rows by key (its key index serves every lookup), both at once, so the
    cost follows the number of keys, not the table's size: the daemon's incremental verification
    checks the keys it applied this way. Candidates are rechecked by `recheck`, as in `deep_check`.
    """
    if target.insert_only:
        raise ReconcileError(f"{target.label} is insert-only: its rows have no keys (compare it with check_appended)")
    diff = TableDiff(target.label, target.table_id)
    if not keys:
        return diff
    site_q, agent_q = comparer.queries(target)
    params: dict[str, Any] = {"keys": "[" + ",".join(keys) + "]"}
    on_site, on_agent = comparer.both(site_q.rows_by_key(), agent_q.rows_by_key(), params, setup=KEY_LOOKUPS)
    diff.site_rows, diff.agent_rows = len(on_site), len(on_agent)
    candidates = _differing_keys(on_site, on_agent)
    if not candidates:
        return diff
    log.info("%s: %d of %d key(s) differ; rechecking", target.label, len(candidates), len(keys))
    return recheck(comparer, catchup, target, candidates, diff)


@dataclass(frozen=True)
class RangeCheck:
    """One key range of a table, compared: its proven differences and where the next one starts."""

    diff: TableDiff
    upto: str | None  # the range's last key (JSON); None: it ran to the end of the table
    rows: int  # rows compared (the larger side's count)


def check_range(
    comparer: Comparer, catchup: CatchUp, target: ComparedTable, after: str | None, rows: int
) -> RangeCheck:
    """The deep check of the `rows` keys after `after` (None: from the table's first key).

    The range ends at a key read on the Site DB; the last range of a table has no end, so rows
    the Agent DB has beyond the Site's last key are compared too. Candidates are rechecked by
    `recheck`, exactly as `deep_check` does for a whole table.

    Each side reads the range in its own key order. Should the two orders differ (text keys
    under different collations), consecutive ranges still cover every Agent row at least once;
    a row placed in different ranges on the two sides is only a candidate, which the recheck
    (by key) finds equal.

    An insert-only table has no key to range over, nor one to recheck a row by: it is left out
    (one empty range), and `reconcile --deep` compares it (check_appended)."""
    if target.insert_only:
        log.debug("%s is insert-only: the ranged verification leaves it to `dbsync reconcile --deep`", target.label)
        return RangeCheck(TableDiff(target.label, target.table_id), None, 0)
    site_q, agent_q = comparer.queries(target)
    params: dict[str, Any] = {"after": after, "skip": rows - 1}
    with comparer.site.transaction():
        row = comparer.site.execute(site_q.range_end(after is not None), params).fetchone()
    upto = None if row is None else str(row[0])
    params["upto"] = upto
    has_after, has_upto = after is not None, upto is not None
    on_site, on_agent = comparer.both(
        site_q.range_sum(has_after, has_upto), agent_q.range_sum(has_after, has_upto), params
    )
    site_rows, agent_rows = int(on_site[0][0]), int(on_agent[0][0])
    diff = TableDiff(target.label, target.table_id, site_rows, agent_rows)
    counted = max(site_rows, agent_rows)
    if on_site[0] == on_agent[0]:
        return RangeCheck(diff, upto, counted)
    on_site, on_agent = comparer.both(
        site_q.rows_in_range(has_after, has_upto), agent_q.rows_in_range(has_after, has_upto), params
    )
    candidates = _differing_keys(on_site, on_agent)
    if candidates:
        log.info("%s: %d candidate difference(s) in a key range; rechecking", target.label, len(candidates))
        recheck(comparer, catchup, target, candidates, diff)
    return RangeCheck(diff, upto, counted)


def render_keys(keys: Sequence[str], limit: int) -> list[Any]:
    """Keys for the JSON report, as objects; a non-integer number becomes a string (exact digits)."""
    return [json.loads(k, parse_float=str) for k in keys[:limit]]
