"""The daemon's incremental verification: the keys it applied, compared with the Site DB.

Each `verify_interval` a pass takes what the apply stands at (the Agent's prev_snapshot: every
event it sees is applied) as its target, and compares the rows of every key logged between the
verified mark and that target with `reconcile --deep`'s comparison by key
(dbsync.reconcile.check_keys: both sides hashed, candidates rechecked once the Agent DB has
caught up, so a change in flight is never reported). The pass's keys are taken in seq order, a
chunk at a time, deduplicated per table for the whole pass; after each chunk the pass's cursor is
stored on the Agent DB, and at its end the mark moves to the target (dbsync.verified).

The keys come from the apply path in memory (HandedKeys): the runner hands over each page as it
read it from the Site's log, before the apply could leave anything out, so a lost apply is still
found. A pass takes the batches that chain from the verified mark; where memory has no such chain
(after a restart, past its cap, a batch applied by another process) the pass reads its keys from
the Site's sync log instead. The daemon's retention deletes only the events behind the mark, so
a restarted daemon reads every key after it again: nothing applied is left unverified.

The cost follows the keys changed, not the tables' size, and is bounded: at most
`verify_rows_per_second` keys a second, and at most that times `verify_interval` keys a pass;
the rest of a pass is carried over to the next. It runs in the full verification's thread
(dbsync.daemon.verify), which records, reports and repairs what it finds.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg

from dbsync import verified
from dbsync.catchup import CatchUp
from dbsync.config import Settings
from dbsync.daemon.consume import Event
from dbsync.errors import SchemaError
from dbsync.reconcile import ComparedTable, Comparer, TableDiff, check_keys

log = logging.getLogger("dbsync.verify")

# Keys read from the log (and compared) per chunk at most.
CHUNK_KEYS = 1000
# Keys remembered per pass to skip a key logged again later in the same pass; past this many,
# a repeated key is compared again (it costs a lookup, never a miss).
MAX_SEEN = 1_000_000
# Keys the apply path may hand over and the verifier not have taken yet; past this many, memory is
# emptied and the passes read their keys from the log until a new chain starts.
MAX_HANDED = 200_000

# A pass's key, as the log holds it: (seq, table_id, key; None for a TRUNCATE or an insert-only row).
KeyRow = tuple[int, int, str | None]


@dataclass
class Batch:
    """One batch's keys, as its pages were read from the Site: events committed after `prev` and
    visible in `snap` (the consumption rule)."""

    prev: str
    snap: str
    expected: int  # the batch's events, as opening it counted them in the log
    rows: list[KeyRow] = field(default_factory=list)


class HandedKeys:
    """The keys the apply path read, handed to the verifier in memory, bounded.

    The runner calls `page` (from its event loop) after each page commits on the Agent DB; the
    verifier's thread calls `take`. A batch counts once its last page is handed over and its pages
    held every event the batch opened with (so a page the reader shortened is never trusted: the
    pass then reads the log). Batches chain: a batch starts at the snapshot the one before ended
    at; a gap (a restart, another process's batch, the cap passed) ends the chain."""

    def __init__(self, cap: int = MAX_HANDED) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._batches: list[Batch] = []
        self._open: Batch | None = None
        self._held = 0
        self.latest: str | None = None  # the snapshot the last complete batch ended at
        self.handed = 0  # batches taken from memory, for tests and the bench
        self.overflows = 0

    def page(self, prev: str, snap: str, events: Sequence[Event], more: bool, expected: int) -> None:
        with self._lock:
            if self._open is None or (self._open.prev, self._open.snap) != (prev, snap):
                # A batch opened again (a reconnect) starts over at a new snapshot.
                self._open = Batch(prev, snap, expected)
            rows = [(ev.seq, ev.table_id, ev.pk) for ev in events]
            self._open.rows.extend(rows)
            self._held += len(rows)
            if not more:
                done, self._open = self._open, None
                if len(done.rows) == done.expected:
                    self._batches.append(done)
                    self.latest = done.snap
                else:
                    self._held -= len(done.rows)
                    self.latest = None
            if self._held > self.cap:
                if not self.overflows:
                    log.info(
                        "incremental verification: more than %d key(s) handed over and not verified yet; "
                        "passes read their keys from the Site's log until they catch up",
                        self.cap,
                    )
                self.overflows += 1
                self._batches, self._open, self._held, self.latest = [], None, 0, None

    def take(self, since: str) -> tuple[str, list[KeyRow]] | None:
        """The batches that chain from `since`: the snapshot they end at and their keys in seq
        order; None when memory holds no batch starting there. What came before is dropped."""
        with self._lock:
            start = next((i for i, b in enumerate(self._batches) if b.prev == since), None)
            if start is None:
                return None
            end = start
            while end + 1 < len(self._batches) and self._batches[end + 1].prev == self._batches[end].snap:
                end += 1
            taken = self._batches[start : end + 1]
            self._drop(end + 1)
            self.handed += 1
        rows = sorted((r for b in taken for r in b.rows), key=lambda r: r[0])
        return taken[-1].snap, rows

    def forget(self, upto: str) -> None:
        """A pass up to `upto` reads the log: the batches up to it are not wanted any more."""
        with self._lock:
            end = next((i for i, b in enumerate(self._batches) if b.snap == upto), None)
            if end is not None:
                self._drop(end + 1)

    def _drop(self, n: int) -> None:
        self._held -= sum(len(b.rows) for b in self._batches[:n])
        del self._batches[:n]


def next_rows(rows: list[KeyRow], seqs: list[int], cursor: int, keys: int) -> list[KeyRow]:
    """PASS_KEYS from memory: the rows after `cursor`, whole log rows (one seq) while fewer than
    `keys` keys come before them."""
    start = bisect.bisect_right(seqs, cursor)
    end = start
    while end < len(rows) and (end - start < keys or rows[end][0] == rows[end - 1][0]):
        end += 1
    return rows[start:end]


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
        # The apply path's keys (the runner hands them over), and the pass that reads them: its
        # target (the mark's text), its rows and their seqs.
        self.handed = HandedKeys()
        self._memory: tuple[str, list[KeyRow], list[int]] | None = None
        self.log_reads = 0  # statements that read keys (or a pass's bounds) from the Site's log
        self._from_log: bool | None = None  # where the last pass took its keys (logged when it changes)

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
        if self._memory is not None and self._memory[0] == mark.target_snapshot:
            rows = next_rows(self._memory[1], self._memory[2], mark.pass_cursor, limit)
        else:
            self.log_reads += 1
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
        """Begin a pass up to what the apply stands at now; None when nothing was applied since.

        The keys handed over by the apply path make the pass when they chain from the mark;
        otherwise the pass reads them from the log, up to what the Agent DB has applied."""
        s, site, agent = self.settings, comparer.site, comparer.agent
        rows: list[KeyRow] | None = None
        chain = self.handed.take(mark.verified_snapshot)
        if chain is not None:
            target, rows = chain
            cursor, top = (rows[0][0] - 1, rows[-1][0]) if rows else (0, 0)
        elif self.handed.latest == mark.verified_snapshot:
            return None  # memory is as far as the mark: the next batch is not handed over yet
        else:
            row = agent.execute(verified.APPLIED_SNAPSHOT, {"source": s.source}).fetchone()
            applied = None if row is None else str(row[0])
            if applied is None or applied == mark.verified_snapshot:
                return None
            target = applied
            self.log_reads += 1
            bounds = site.execute(
                verified.PASS_BOUNDS, {"verified": mark.verified_snapshot, "target": target}
            ).fetchone()
            assert bounds is not None
            lo, hi, _ = bounds
            cursor, top = (0, 0) if lo is None else (int(lo) - 1, int(hi))
            self.handed.forget(target)
        agent.execute(verified.BEGIN_PASS, {"source": s.source, "target": target, "cursor": cursor, "hi": top})
        self._round_started, self._round_keys = time.monotonic(), 0
        self._chosen = self.tables(comparer)
        found = read_mark(agent, s.source)
        assert found is not None and found.target_snapshot is not None
        self._memory = None if rows is None else (found.target_snapshot, rows, [r[0] for r in rows])
        if self._from_log != (rows is None):
            self._from_log = rows is None
            log.info(
                "incremental verification: %s",
                "this pass reads its keys from the Site's log (none handed over from the mark on)"
                if rows is None
                else "passes take the keys the apply read",
            )
        return found

    def _end(self, agent: psycopg.Connection, mark: verified.Mark) -> None:
        agent.execute(verified.END_PASS, {"source": self.settings.source, "target": mark.target_snapshot})
        self.passes += 1
        self.verified_seq = max(mark.verified_seq, mark.pass_hi or 0)
        self._seen, self._seen_for = set(), None
        self._memory = None
        if self._behind and self._round_keys < pass_cap(self.settings.verify_rows_per_second, self.interval):
            log.info("incremental verification: caught up with the apply")
            self._behind = False
        log.debug("incremental verification: pass finished, mark at seq %d", self.verified_seq)
        # One pass per interval, counted from when this one began; a long one is followed at once.
        self._next_at = max(time.monotonic(), self._round_started + self.interval)
