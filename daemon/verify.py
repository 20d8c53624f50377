"""The daemon's full verification: every replicated table compared with the Site DB, all the time.

Each `full_verify_interval` a pass walks every replicated table in key order, one range of rows
at a time, with `reconcile --deep`'s comparison (dbsync.reconcile.check_range: row hashes
computed in each database, candidates rechecked once the Agent DB has caught up, so a change in
flight is never reported). It reads at most `verify_rows_per_second` rows a second from each
database. Where the pass stands is stored on the Agent DB after every range, so a restarted
daemon resumes it; so are the rows found differing, until a recheck finds them equal (after a
repair through the sync log, with `verify_repair`, or by `dbsync reconcile --repair`).

With `verify_interval`, the same thread also runs the incremental verification
(dbsync.daemon.verify_keys: the keys the daemon applied, compared each interval); what either
finds is recorded, reported and repaired here, the same way.

It runs in a thread of its own with its own connections (the comparison is psycopg code), and
only while this daemon is the active one. A database failure never stops replication: it is
logged once and retried with backoff. A bug (any other exception) stops the daemon, as a failed
helper of the service does, rather than leaving it running without its verification.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg

from dbsync import tables as registry
from dbsync import verify as record
from dbsync.catchup import CatchUp
from dbsync.config import Settings
from dbsync.daemon.backoff import Backoff
from dbsync.daemon.verify_keys import KeyVerifier
from dbsync.db import connect, first_line
from dbsync.errors import DbsyncError, SchemaError
from dbsync.reconcile import ComparedTable, Comparer, Seen, TableDiff, check_range, recheck, targets
from dbsync.repair import repair

log = logging.getLogger("dbsync.verify")

# How long a comparison waits for the daemon to apply what it depends on.
CATCHUP_TIMEOUT = 60.0
# Rows per range: a tenth of a second's budget, within these bounds.
MIN_RANGE, MAX_RANGE = 10, 5000
# Every statement of the verification is small (one range, one key list): one that runs longer
# than this is cancelled by the server, and the verification starts its session again.
STATEMENT_TIMEOUT = "60s"
# The comparison by key joins a JSON list of keys with the table; planned for 100 keys, a table of
# some thousand rows looked cheaper read whole into a hash join (through its key index) than looked
# up key by key, so every chunk of keys read the whole table: its cost followed the table's size,
# not the keys changed (EXPLAIN ANALYZE on the bench's 1,000 conversations: 1,000 rows read for
# 300 keys). The verification's statements are all small lookups: nested loops over key indexes.
KEYED_JOINS = ("SET enable_hashjoin = off", "SET enable_mergejoin = off")
# Rows found differing (or changing) are compared again at most this often.
RECHECK_EVERY = 30.0
# Keys named per log line; the rest are counted.
LOGGED_KEYS = 20


class OwnApply(CatchUp):
    """The verification's wait for the apply, which runs in this very process (the verification
    runs only while its daemon is the active one): it polls what is left to apply, nothing else
    (no look for the active daemon)."""

    def start_applying(self, left: int) -> None:
        pass

    def too_slow(self, left: int) -> str:
        return f"the apply has not applied {left} event(s) within {self.timeout:g} s"


def range_rows(rows_per_second: int) -> int:
    return max(MIN_RANGE, min(MAX_RANGE, rows_per_second // 10))


def budget_wait(rows: int, rows_per_second: int, took: float) -> float:
    """Seconds to wait after comparing `rows` in `took` seconds, to keep to the budget."""
    return max(0.0, rows / rows_per_second - took)


@dataclass(frozen=True)
class Mismatch:
    table: str
    kind: str


class Verifier:
    """Runs passes while `is_active()`; the service reads its counters for /metrics and alerts."""

    def __init__(self, settings: Settings, is_active: Callable[[], bool]) -> None:
        assert settings.full_verify_interval is not None or settings.verify_interval is not None
        self.settings = settings
        self.is_active = is_active
        self.stop = threading.Event()
        # Read by the service's thread: each is replaced whole, never changed in place.
        self.open: dict[tuple[int, str], Mismatch] = {}
        self.found = 0  # mismatches found (a key counts again if it differs again after clearing)
        self.repaired = 0
        self.rows = 0
        self.passes = 0
        self.last_pass_finished_at: float | None = None  # Unix time (it survives restarts)
        self.problem: str | None = None
        self._unsure: dict[int, set[str]] = {}  # kept changing: rechecked before they are judged
        self._rechecked_at = 0.0
        self._overran = False
        # Called (in this thread) with the open mismatches each time they change, and with the
        # exception that ended the thread, if a bug did.
        self.on_change: Callable[[dict[tuple[int, str], Mismatch]], object] | None = None
        self.on_crash: Callable[[BaseException], object] | None = None
        self._thread: threading.Thread | None = None
        self._chosen: tuple[datetime | None, dict[int, registry.Selection], dict[int, ComparedTable]] | None = None
        self._full_next = 0.0  # monotonic: when the full verification's next step is due
        self.keys = KeyVerifier(settings, self._judge, self._all_tables) if settings.verify_interval else None

    # -- the thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dbsync-verify", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop; a comparison in progress is left to the process's exit if it takes longer."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = Backoff(self.settings.retry_initial, max(self.settings.retry_max, 5.0))
        while not self.stop.is_set():
            if not self.is_active():
                self.stop.wait(0.5)
                continue
            try:
                self._session()
                backoff.reset()
            except (DbsyncError, psycopg.Error) as exc:
                message = first_line(exc)
                if message != self.problem:
                    log.error("verification: %s; retrying", message)
                    self.problem = message
                self.stop.wait(backoff.next_delay())
            except Exception as exc:
                if self.on_crash is None:
                    raise
                self.on_crash(exc)
                return

    def _session(self) -> None:
        s = self.settings
        assert s.site_dsn and s.agent_dsn
        with connect(s.site_dsn, "Site") as site, connect(s.agent_dsn, "Agent") as agent:
            if agent.execute(record.HAS_RECORD).fetchone() != (True,):
                raise SchemaError(
                    "the Agent DB lacks dbsync.verify_progress (Agent migration 0003_agent_verify): "
                    "run `dbsync migrate`"
                )
            for conn in (site, agent):
                conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
                for statement in KEYED_JOINS:
                    conn.execute(statement)
            comparer = Comparer(site, agent)
            try:
                catchup = OwnApply(site, agent, s, timeout=CATCHUP_TIMEOUT)
                agent.execute(record.START_PROGRESS, {"source": s.source})
                if self.keys is not None:
                    self.keys.start(agent)
                self._load_open(agent)
                self._chosen = None
                self._full_next = 0.0
                while not self.stop.is_set() and self.is_active():
                    self.stop.wait(self._turn(comparer, catchup))
            finally:
                comparer.close()

    def _turn(self, comparer: Comparer, catchup: CatchUp) -> float:
        """Run whichever verification is due (at most one step of each); seconds until the next."""
        waits = [1.0]
        if self.settings.full_verify_interval is not None:
            if time.monotonic() >= self._full_next:
                self._full_next = time.monotonic() + self._cycle(comparer, catchup)
            waits.append(self._full_next - time.monotonic())
        elif (self.open or self._unsure) and time.monotonic() - self._rechecked_at >= self._recheck_every():
            self._recheck_open(comparer, catchup, self._all_tables(comparer))
        if self.keys is not None:
            if self.keys.settings is not self.settings:
                self.keys.settings = self.settings  # reloaded
            if self.keys.due_in() == 0:
                self.keys.step(comparer, catchup)
                self._working()
            waits.append(self.keys.due_in())
        return max(0.0, min(waits))

    def _working(self) -> None:
        if self.problem is not None:
            log.info("verification: working again")
            self.problem = None

    def _all_tables(self, comparer: Comparer) -> dict[int, ComparedTable]:
        return {t.table_id: t for t in targets(comparer.site, comparer.agent, [])}

    # -- one step: a range of rows, or a wait for the next pass ----------------------------------
    def _cycle(self, comparer: Comparer, catchup: CatchUp) -> float:
        """One step of the full verification; returns seconds to wait before the next."""
        s, agent = self.settings, comparer.agent
        assert s.full_verify_interval is not None
        progress = record.read_progress(agent, s.source, s.full_verify_interval)
        assert progress is not None
        if progress.last_pass_finished_at is not None:
            self.last_pass_finished_at = progress.last_pass_finished_at.timestamp()
        chosen = self._targets(comparer, progress)
        self._recheck_open(comparer, catchup, chosen)
        self._working()
        if progress.pass_started_at is None:
            due = progress.seconds_to_next_pass
            if due is not None and due > 0:
                return min(due, 1.0)
            self._note_overrun(progress)
            agent.execute(record.BEGIN_PASS, {"source": s.source})
            log.info("full verification: pass started (%d table(s))", len(chosen))
            return 0.0
        target, after = _resume(sorted(chosen.values(), key=_order), progress)
        if target is None:
            agent.execute(record.END_PASS, {"source": s.source})
            self.passes += 1
            self.last_pass_finished_at = time.time()
            log.info("full verification: pass finished, %d row(s) compared", progress.rows_checked)
            return 0.0
        started = time.monotonic()
        checked = check_range(comparer, catchup, target, after, range_rows(s.verify_rows_per_second))
        self._judge(comparer, catchup, target, checked.diff)
        agent.execute(
            record.ADVANCE,
            {
                "source": s.source,
                "schema": target.site.schema,
                "name": target.site.name,
                "last_key": checked.upto if checked.upto is not None else _END,
                "rows": checked.rows,
            },
        )
        self.rows += checked.rows
        return budget_wait(checked.rows, s.verify_rows_per_second, time.monotonic() - started)

    def _note_overrun(self, progress: record.Progress) -> None:
        """Say once (until passes keep up again) that passes take longer than the interval."""
        assert self.settings.full_verify_interval is not None
        if progress.last_pass_finished_at is None or progress.last_pass_started_at is None:
            return
        took = (progress.last_pass_finished_at - progress.last_pass_started_at).total_seconds()
        over = took > self.settings.full_verify_interval
        if over and not self._overran:
            log.warning(
                "full verification: a pass took %.1f s, more than full_verify_interval (%g s): the next starts "
                "at once; raise verify_rows_per_second or the interval",
                took,
                self.settings.full_verify_interval,
            )
        self._overran = over

    def _targets(self, comparer: Comparer, progress: record.Progress) -> dict[int, ComparedTable]:
        """The replicated tables, read again for each pass (and each session), and as soon as a
        column list or row filter changes (`dbsync tables alter`): a range compared under the old
        one would report the rows the alter moves in or out as differences."""
        selections = registry.selections(comparer.site)
        if self._chosen is None or self._chosen[:2] != (progress.pass_started_at, selections):
            found = targets(comparer.site, comparer.agent, [])
            self._chosen = (progress.pass_started_at, selections, {t.table_id: t for t in found})
        return self._chosen[2]

    def _judge(self, comparer: Comparer, catchup: CatchUp, target: ComparedTable, diff: TableDiff) -> None:
        """Record what a comparison proved (and repair it with verify_repair); keys that kept
        changing wait for the next recheck. Only keys not already known are logged."""
        if diff.unsettled:
            self._unsure.setdefault(target.table_id, set()).update(diff.unsettled)
        found = record.proven(diff)
        if not found:
            return
        known = {k for t, k in self.open if t == target.table_id}
        self.found += record.record(comparer.agent, self.settings.source, diff, found)
        self._log_found(target.label, {k: v for k, v in found.items() if k not in known})
        self._set_open(target.table_id, {k: Mismatch(target.label, v) for k, v in found.items()})
        if self.settings.verify_repair:
            self._repair(comparer, catchup, target, diff)

    def _repair(self, comparer: Comparer, catchup: CatchUp, target: ComparedTable, diff: TableDiff) -> None:
        fixed = repair(comparer, catchup, target, diff)
        left = set(record.proven(fixed.after))
        done = [k for k in record.proven(diff) if k not in left]
        self.repaired += len(done)
        log.warning(
            "verification: %s: repaired %d row(s) through the sync log (%d upsert(s), %d delete(s)); %d still differ",
            target.label,
            len(done),
            fixed.updated,
            fixed.deleted,
            len(left),
        )
        self._resolve(comparer, target, done)

    def _recheck_open(self, comparer: Comparer, catchup: CatchUp, chosen: dict[int, ComparedTable]) -> None:
        """Compare again the keys found differing (or changing) before: a key equal now is cleared."""
        now = time.monotonic()
        if not (self.open or self._unsure):
            return
        if now - self._rechecked_at < self._recheck_every():
            return
        self._rechecked_at = now
        tables = {table_id for table_id, _ in self.open} | set(self._unsure)
        if not tables <= chosen.keys():
            chosen = self._all_tables(comparer)  # registered since the pass began, or gone
        for table_id in sorted(tables):
            target = chosen.get(table_id)
            keys = {k for t, k in self.open if t == table_id} | self._unsure.pop(table_id, set())
            if target is None:  # no longer replicated: nothing to compare it with
                self._resolve(comparer, None, sorted(keys), table_id=table_id)
                continue
            # Nothing seen yet: a key that still differs must differ the same way in two rounds.
            unseen: Seen = {key: (None, None) for key in keys}
            diff = recheck(comparer, catchup, target, unseen, TableDiff(target.label, table_id))
            still = record.proven(diff)
            equal = [k for k in keys if k not in still and k not in diff.unsettled]
            self._resolve(comparer, target, equal)
            if still or diff.unsettled:
                fresh = TableDiff(target.label, table_id)
                for key, kind in still.items():
                    getattr(fresh, kind).append(key)
                fresh.unsettled.extend(diff.unsettled)
                self._judge(comparer, catchup, target, fresh)

    def _recheck_every(self) -> float:
        s = self.settings
        intervals = [i for i in (s.full_verify_interval, s.verify_interval) if i is not None]
        return min([*intervals, RECHECK_EVERY])

    # -- the record --------------------------------------------------------------------------------
    def _load_open(self, agent: psycopg.Connection) -> None:
        stored = record.open_mismatches(agent, self.settings.source)
        self.open = {
            (table_id, key): Mismatch(label, kind)
            for table_id, keys in stored.items()
            for key, (label, kind) in keys.items()
        }
        if self.open:
            log.warning("verification: %d row(s) found differing earlier are rechecked", len(self.open))
        self._changed()

    def _set_open(self, table_id: int, found: dict[str, Mismatch]) -> None:
        merged = dict(self.open)
        merged.update({(table_id, k): m for k, m in found.items()})
        self.open = merged
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.open)

    def _resolve(
        self, comparer: Comparer, target: ComparedTable | None, keys: list[str], *, table_id: int | None = None
    ) -> None:
        table_id = target.table_id if target is not None else table_id
        assert table_id is not None
        cleared = [k for k in keys if (table_id, k) in self.open]
        if not cleared:
            return
        record.clear(comparer.agent, self.settings.source, table_id, cleared)
        label = target.label if target is not None else self.open[table_id, cleared[0]].table
        self.open = {tk: m for tk, m in self.open.items() if not (tk[0] == table_id and tk[1] in cleared)}
        self._changed()
        shown = ", ".join(cleared[:LOGGED_KEYS]) + (
            f" and {len(cleared) - LOGGED_KEYS} more" if len(cleared) > LOGGED_KEYS else ""
        )
        log.info("verification: %s: row(s) equal again: %s", label, shown)

    def _log_found(self, label: str, found: dict[str, str]) -> None:
        for n, (key, kind) in enumerate(sorted(found.items())):
            if n == LOGGED_KEYS:
                log.warning("verification: %s: ... and %d more row(s) differ", label, len(found) - LOGGED_KEYS)
                break
            log.warning("verification: %s: row %s %s", label, key, _WHAT[kind])


_WHAT = {
    "missing": "is missing on the Agent DB",
    "extra": "is on the Agent DB but not on the Site DB",
    "changed": "differs between the Site and Agent DBs",
}
# last_key of a table whose last range has been compared: the pass moves on to the next table.
_END = "end"


def _order(target: ComparedTable) -> tuple[str, str]:
    return target.site.schema, target.site.name


def _resume(tables: list[ComparedTable], progress: record.Progress) -> tuple[ComparedTable | None, str | None]:
    """The table and the key after which the pass goes on (None, None: the pass is complete)."""
    if progress.table is None or progress.schema is None:
        return (tables[0], None) if tables else (None, None)
    at = (progress.schema, progress.table)
    for target in tables:
        if _order(target) == at and progress.last_key != _END:
            return target, progress.last_key
        if _order(target) > at:
            return target, None
    return None, None
