"""The daemon's incremental verification: the keys it applied, compared with the Site DB.

Each `verify_interval` a pass takes what the apply stands at (the Agent's prev_snapshot: every
event it sees is applied) as its target, and compares the rows of every key logged between the
verified mark and that target with `reconcile --deep`'s comparison by key
(dbsync.reconcile.check_keys: both sides hashed, candidates rechecked once the Agent DB has
caught up, so a change in flight is never reported). Keys are read from the Site's sync log in
seq order, a chunk at a time, deduplicated per table for the whole pass; after each chunk the
pass's cursor is stored on the Agent DB, and at its end the mark moves to the target
(dbsync.verified). The daemon's retention deletes only the events behind the mark, so a
restarted daemon reads every key after it again: nothing applied is left unverified.

The cost follows the keys changed, not the tables' size, and is bounded: at most
`verify_rows_per_second` keys a second, and at most that times `verify_interval` keys a pass;
the rest of a pass is carried over to the next. It runs in the full verification's thread
(dbsync.daemon.verify), which records, reports and repairs what it finds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg

from dbsync import verified
from dbsync.catchup import CatchUp
from dbsync.config import Settings
from dbsync.errors import SchemaError
from dbsync.reconcile import ComparedTable, Comparer, TableDiff, check_keys

log = logging.getLogger("dbsync.verify")

# Keys read from the log (and compared) per chunk at most.
CHUNK_KEYS = 1000
# Keys remembered per pass to skip a key logged again later in the same pass; past this many,
# a repeated key is compared again (it costs a lookup, never a miss).
MAX_SEEN = 1_000_000


def chunk_keys(rows_per_second: int) -> int:
    """Keys per chunk: a tenth of a second's budget, at least 10, at most CHUNK_KEYS."""
    return max(10, min(CHUNK_KEYS, rows_per_second // 10))


def pass_cap(rows_per_second: int, interval: float) -> int:
    """Keys a pass compares at most before it carries the rest over to the next one."""
    return max(chunk_keys(rows_per_second), int(rows_per_second * interval))


def read_mark(agent: psycopg.Connection, source: str) -> verified.Mark | None:
    row = agent.execute(verified.READ_MARK, {"source": source}).fetchone()
    return None if row is None else verified.Mark(*row)


class KeyVerifier:
    """One pass at a time; `step` does at most one chunk and says when it wants to run again."""

    def __init__(
        self,
        settings: Settings,
        judge: Callable[[Comparer, CatchUp, ComparedTable, TableDiff], None],
        tables: Callable[[Comparer], dict[int, ComparedTable]],
    ) -> None:
        self.settings = settings
        self.judge = judge  # records, reports and (verify_repair) repairs what a check proved
        self.tables = tables  # the replicated tables, read again
        # Read by the service's thread for /metrics.
        self.verified_seq: int | None = None
        self.keys = 0  # keys compared
        self.passes = 0
        self._next_at = 0.0  # monotonic: when the next step is due
        self._round_started = 0.0
        self._round_keys = 0
        self._chosen: dict[int, ComparedTable] = {}
        self._seen: set[tuple[int, str]] = set()
        self._seen_for: str | None = None  # the target whose keys _seen holds
        self._behind = False

    @property
    def interval(self) -> float:
        assert self.settings.verify_interval is not None
        return self.settings.verify_interval

    def start(self, agent: psycopg.Connection) -> None:
        """A new session: the mark exists from now on, and the next step is due at once."""
        if agent.execute(verified.HAS_MARK).fetchone() != (True,):
            raise SchemaError(
                "the Agent DB lacks dbsync.verify_mark (Agent migration 0004_agent_verified_mark): run `dbsync migrate`"
            )
        agent.execute(verified.START_MARK, {"source": self.settings.source})
        self._next_at = 0.0
        self._chosen = {}

    def due_in(self) -> float:
        return max(0.0, self._next_at - time.monotonic())

    def step(self, comparer: Comparer, catchup: CatchUp) -> None:
        """Compare the next chunk of keys, begin a pass, or end one; then set when to go on."""
        s, site, agent = self.settings, comparer.site, comparer.agent
        mark = read_mark(agent, s.source)
        assert mark is not None
        self.verified_seq = mark.verified_seq
        now = time.monotonic()
        if mark.target_snapshot is None:
            mark = self._begin(comparer, mark)
            if mark is None:
                self._next_at = now + self.interval
                return
        assert mark.target_snapshot is not None and mark.pass_cursor is not None and mark.pass_hi is not None
        limit = chunk_keys(s.verify_rows_per_second)
        params = {
            "verified": mark.verified_snapshot,
            "target": mark.target_snapshot,
            "cursor": mark.pass_cursor,
            "hi": mark.pass_hi,
            "keys": limit,
        }
        rows = site.execute(verified.PASS_KEYS, params).fetchall()
        if not rows:
            self._end(agent, mark)
            return
        if self._seen_for != mark.target_snapshot:
            self._seen, self._seen_for = set(), mark.target_snapshot
        by_table: dict[int, set[str]] = {}
        for _, table_id, key in rows:
            if key is not None and (table_id, key) not in self._seen:
                by_table.setdefault(table_id, set()).add(key)
        if any(t not in self._chosen for t in by_table):
            self._chosen = self.tables(comparer)  # a table added since the pass began
        compared = 0
        for table_id, keys in sorted(by_table.items()):
            target = self._chosen.get(table_id)
            if target is None:
                continue  # no longer replicated: nothing to compare it with
            self.judge(comparer, catchup, target, check_keys(comparer, catchup, target, sorted(keys)))
            compared += len(keys)
            if len(self._seen) < MAX_SEEN:
                self._seen.update((table_id, k) for k in keys)
        cursor = int(rows[-1][0])
        agent.execute(
            verified.ADVANCE, {"source": s.source, "target": mark.target_snapshot, "cursor": cursor, "keys": compared}
        )
        self.verified_seq = max(mark.verified_seq, cursor)
        self.keys += compared
        self._round_keys += compared
        took = time.monotonic() - now
        wait = max(0.0, compared / s.verify_rows_per_second - took)
        if self._round_keys >= pass_cap(s.verify_rows_per_second, self.interval):
            if not self._behind:
                log.warning(
                    "incremental verification: %d key(s) compared this interval, the most it may; "
                    "the rest is carried over (raise verify_rows_per_second to keep up)",
                    self._round_keys,
                )
            self._behind = True
            wait = max(wait, self._round_started + self.interval - time.monotonic())
            self._round_started, self._round_keys = time.monotonic() + wait, 0
        self._next_at = time.monotonic() + wait

    def _begin(self, comparer: Comparer, mark: verified.Mark) -> verified.Mark | None:
        """Begin a pass up to what the apply stands at now; None when nothing was applied since."""
        s, site, agent = self.settings, comparer.site, comparer.agent
        row = agent.execute(verified.APPLIED_SNAPSHOT, {"source": s.source}).fetchone()
        target = None if row is None else str(row[0])
        if target is None or target == mark.verified_snapshot:
            return None
        bounds = site.execute(verified.PASS_BOUNDS, {"verified": mark.verified_snapshot, "target": target}).fetchone()
        assert bounds is not None
        lo, hi, _ = bounds
        cursor, top = (0, 0) if lo is None else (int(lo) - 1, int(hi))
        agent.execute(verified.BEGIN_PASS, {"source": s.source, "target": target, "cursor": cursor, "hi": top})
        self._round_started, self._round_keys = time.monotonic(), 0
        self._chosen = self.tables(comparer)
        found = read_mark(agent, s.source)
        assert found is not None
        return found

    def _end(self, agent: psycopg.Connection, mark: verified.Mark) -> None:
        agent.execute(verified.END_PASS, {"source": self.settings.source, "target": mark.target_snapshot})
        self.passes += 1
        self.verified_seq = max(mark.verified_seq, mark.pass_hi or 0)
        self._seen, self._seen_for = set(), None
        if self._behind and self._round_keys < pass_cap(self.settings.verify_rows_per_second, self.interval):
            log.info("incremental verification: caught up with the apply")
            self._behind = False
        log.debug("incremental verification: pass finished, mark at seq %d", self.verified_seq)
        # One pass per interval, counted from when this one began; a long one is followed at once.
        self._next_at = max(time.monotonic(), self._round_started + self.interval)
