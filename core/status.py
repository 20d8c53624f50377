"""How far behind the Agent DB is: read from both databases, computed in one place."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from dbsync.consumers import read_consumers as read_log_consumers
from dbsync.db import display_name
from dbsync.errors import SchemaError
from dbsync.protocol import (
    AGENT_SCHEMA_MARK,
    COUNT_PARKED,
    INITIAL_SNAPSHOT,
    LOCK_CLASS,
    LOCK_HELD,
    PENDING,
    PROGRESS_REPORT,
    SCHEMA_EXISTS,
    SITE_SCHEMA_MARK,
    no_schema,
)
from dbsync.tables import partition_drift
from dbsync.verified import read_verified_seq
from dbsync.verify import VerifyStatus, read_verify_status

NEWEST = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM dbsync.sync_log_seq"
# Every consumer the Agent DB has progress for.
CONSUMERS = (
    "SELECT source, events_applied, updated_at, active_holder, last_error FROM dbsync.apply_progress ORDER BY source"
)


@dataclass(frozen=True)
class Status:
    source: str
    high_water_mark: int
    newest_seq: int
    events_behind: int
    seconds_behind: float
    events_applied: int
    oldest_pending_at: datetime | None
    last_applied_capture_at: datetime | None
    progress_updated_at: datetime | None
    batch_open: bool
    tables: list[str]
    active_daemon: str | None
    parked_events: int
    last_error: str | None
    last_error_at: datetime | None
    lag_threshold: float
    problems: list[str]
    # Rows the daemon's full verification found differing, not yet equal again (0 when it is
    # off, or the Agent DB predates it), and where it stands (None: never run).
    verify_mismatches: int = 0
    verify: dict[str, Any] | None = None
    # Every consumer of the Site DB's log (fan-out) and its lag (dbsync.consumers.ConsumerLag).
    consumers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["healthy"] = self.healthy
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
        return out


@dataclass(frozen=True)
class Consumer:
    """What the Agent DB alone says of a source. Its lag needs that source's own Site DB, which
    may be another than the one at hand (one source per replicated Site DB)."""

    source: str
    events_applied: int
    progress_updated_at: datetime | None
    active_daemon: str | None
    parked_events: int
    last_error: str | None
    problems: list[str]

    @property
    def healthy(self) -> bool:
        return not self.problems


def read_consumers(agent: psycopg.Connection) -> list[Consumer]:
    out = []
    for source, applied, updated, holder, last_error in agent.execute(CONSUMERS).fetchall():
        active = agent.execute(LOCK_HELD.psycopg, {"cls": LOCK_CLASS, "source": source}).fetchone()[0]  # type: ignore[index]
        parked = agent.execute(COUNT_PARKED.psycopg, {"source": source}).fetchone()[0]  # type: ignore[index]
        out.append(
            Consumer(
                source=source,
                events_applied=applied,
                progress_updated_at=updated,
                active_daemon=holder if active else None,
                parked_events=parked,
                last_error=last_error,
                problems=_problems(active, parked, last_error),
            )
        )
    return out


def _problems(active: bool, parked: int, last_error: str | None, lag: str | None = None) -> list[str]:
    problems = []
    if not active:
        problems.append("no active daemon")
    if lag is not None:
        problems.append(lag)
    if parked:
        problems.append(f"{parked} parked event(s)")
    if last_error:
        problems.append(f"apply is failing: {last_error}")
    return problems


def require_schema(site: psycopg.Connection, agent: psycopg.Connection) -> None:
    """Refuse, in one line, a Site or Agent DB that `dbsync migrate` has not prepared."""
    for conn, role, rel in ((site, "Site", SITE_SCHEMA_MARK), (agent, "Agent", AGENT_SCHEMA_MARK)):
        if conn.execute(SCHEMA_EXISTS.psycopg, {"rel": rel}).fetchone() != (True,):
            raise SchemaError(no_schema(role))


def write_back_installed(site: psycopg.Connection, agent: psycopg.Connection) -> bool:
    """Whether the Agent DB captures and the Site DB applies (`dbsync migrate --two-way`)."""
    return all(
        conn.execute(SCHEMA_EXISTS.psycopg, {"rel": rel}).fetchone() == (True,)
        for conn, rel in ((agent, SITE_SCHEMA_MARK), (site, AGENT_SCHEMA_MARK))
    )


def read_status(
    site: psycopg.Connection,
    agent: psycopg.Connection,
    source: str,
    lag_threshold: float = 5.0,
    consumer_timeout: float = 3600.0,
) -> Status:
    require_schema(site, agent)
    row = agent.execute(PROGRESS_REPORT.psycopg, {"source": source}).fetchone()
    if row is None:
        row = (INITIAL_SNAPSHOT, None, None, 0, 0, None, None, None, None, None)
    prev, batch, cursor, hwm, applied, last_cap, updated, holder, last_error, last_error_at = row
    active = agent.execute(LOCK_HELD.psycopg, {"cls": LOCK_CLASS, "source": source}).fetchone()[0]  # type: ignore[index]
    parked = agent.execute(COUNT_PARKED.psycopg, {"source": source}).fetchone()[0]  # type: ignore[index]
    newest = site.execute(NEWEST).fetchone()[0]  # type: ignore[index]
    pending = site.execute(PENDING.psycopg, {"prev": prev, "batch": batch, "cursor": cursor}).fetchone()
    assert pending is not None
    tables = [
        display_name(r[0], r[1])
        for r in site.execute(
            "SELECT schema_name, table_name FROM dbsync.replicated_tables WHERE removed_at IS NULL ORDER BY 1, 2"
        ).fetchall()
    ]
    seconds = round(max(pending[2] or 0.0, 0.0), 3)
    over = f"lag {seconds:.1f} s is over the threshold of {lag_threshold:g} s" if seconds > lag_threshold else None
    problems = _problems(active, parked, last_error, over)
    problems.extend(partition_drift(site))
    verify = read_verify_status(agent, source)
    verified_seq = read_verified_seq(agent, source) if verify is not None else None
    if verify is not None and verify.mismatches:
        problems.append(
            f"{verify.mismatches} row(s) differ between the Site and Agent DBs (verification; "
            "see docs/operations.md, Verification)"
        )
    log_consumers = read_log_consumers(site, consumer_timeout)
    for consumer in log_consumers:
        problems.extend(consumer.problems)
    return Status(
        source=source,
        high_water_mark=hwm,
        newest_seq=newest,
        events_behind=pending[0],
        seconds_behind=seconds,
        events_applied=applied,
        oldest_pending_at=pending[1],
        last_applied_capture_at=last_cap,
        progress_updated_at=updated,
        batch_open=batch is not None,
        tables=tables,
        active_daemon=holder if active else None,
        parked_events=parked,
        last_error=last_error,
        last_error_at=last_error_at,
        lag_threshold=lag_threshold,
        problems=problems,
        verify_mismatches=verify.mismatches if verify is not None else 0,
        verify=_verify_dict(verify, verified_seq)
        if verify is not None and (verify.progress or verify.mismatches or verified_seq is not None)
        else None,
        consumers=[c.as_dict() for c in log_consumers],
    )


def _verify_dict(v: VerifyStatus, verified_seq: int | None) -> dict[str, Any]:
    p = v.progress
    running = p is not None and p.pass_started_at is not None
    return {
        "verified_seq": verified_seq,
        "mismatched_rows": v.by_table,
        "mismatched_keys": [{**k, "key": json.loads(k["key"])} for k in v.keys],
        "pass_started_at": _iso(p.pass_started_at) if p else None,
        "pass_table": display_name(p.schema, p.table) if running and p and p.schema and p.table else None,
        "pass_rows_checked": p.rows_checked if running and p else None,
        "last_pass_started_at": _iso(p.last_pass_started_at) if p else None,
        "last_pass_finished_at": _iso(p.last_pass_finished_at) if p else None,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
