"""The consumers of a Site DB's log (fan-out): who they are, what they have applied, who is gone.

Each daemon is one consumer of its Site DB's log, named by the `consumer` setting, by default
"<source>@<Agent database>/<Agent cluster id>": stable across restarts and DSN changes, and
different for every Agent DB. The log is kept until every registered consumer has applied it
(sql/site/0010_site_consumers), so a consumer that is gone holds it back: it is reported once it
has not been seen for `consumer_timeout` seconds, and `dbsync consumers drop` frees the log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

from dbsync.errors import DbsyncError, SchemaError
from dbsync.protocol import (
    AGENT_IDENTITY,
    AGENT_NAME_ONLY,
    CLEAR_MISSED,
    CONSUMER_EXISTS,
    CONSUMER_LAG,
    CONSUMERS_MARK,
    DROP_CONSUMER,
    INITIAL_SNAPSHOT,
    REGISTER_CONSUMER,
    SCHEMA_EXISTS,
)


class ConsumerError(DbsyncError):
    exit_code = 1


def default_name(source: str, database: str, cluster: str | None) -> str:
    """The consumer name of `source` on the Agent DB `database` of cluster `cluster`."""
    return f"{source}@{database}/{cluster}" if cluster else f"{source}@{database}"


def agent_consumer_name(agent: psycopg.Connection, source: str, configured: str | None) -> str:
    """The consumer name a daemon with these settings uses (dbsync.daemon.runner does the same)."""
    if configured:
        return configured
    try:
        with agent.transaction():
            row = agent.execute(AGENT_IDENTITY.psycopg).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        row = agent.execute(AGENT_NAME_ONLY.psycopg).fetchone()
    assert row is not None
    return default_name(source, row[0], row[1])


@dataclass(frozen=True)
class ConsumerLag:
    name: str
    reporter: str
    registered_at: datetime
    seen_at: datetime
    seconds_since_seen: float
    events_behind: int
    seconds_behind: float
    missed_history: bool
    stale: bool

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
        return out

    @property
    def problems(self) -> list[str]:
        out = []
        if self.stale:
            out.append(
                f"consumer {self.name} not seen for {self.seconds_since_seen:.0f} s; it holds the Site log "
                f"({self.events_behind} events): `dbsync consumers drop {self.name}` if it is gone"
            )
        if self.missed_history:
            out.append(
                f"consumer {self.name} registered after events it needed were pruned: run `dbsync backfill`, "
                f"then `dbsync consumers backfilled {self.name}`"
            )
        return out


def has_registry(site: psycopg.Connection) -> bool:
    return site.execute(SCHEMA_EXISTS.psycopg, {"rel": CONSUMERS_MARK}).fetchone() == (True,)


def read_consumers(site: psycopg.Connection, timeout: float) -> list[ConsumerLag]:
    """Every registered consumer and its lag; [] on a Site DB older than the registry."""
    if not has_registry(site):
        return []
    out = []
    for name, reporter, _snap, registered, seen, missed, seen_ago, events, seconds in site.execute(
        CONSUMER_LAG.psycopg
    ).fetchall():
        seen_ago = max(seen_ago or 0.0, 0.0)
        out.append(
            ConsumerLag(
                name=name,
                reporter=reporter,
                registered_at=registered,
                seen_at=seen,
                seconds_since_seen=round(seen_ago, 3),
                events_behind=events,
                seconds_behind=round(max(seconds or 0.0, 0.0), 3),
                missed_history=missed,
                stale=seen_ago > timeout,
            )
        )
    return out


def _require_registry(site: psycopg.Connection) -> None:
    if not has_registry(site):
        raise SchemaError("the Site DB has no consumer registry: run `dbsync migrate` first")


def add_consumer(
    site: psycopg.Connection, name: str, reporter: str | None = None, applied: str = INITIAL_SNAPSHOT
) -> tuple[bool, bool]:
    """Register `name` as having applied what `applied` sees (by default nothing), so the log is
    kept for it from now on. Returns (whether it was registered already, whether it may have
    missed events pruned before it registered: then it needs `dbsync backfill`). A registered
    consumer is left as it is."""
    _require_registry(site)
    known = site.execute(CONSUMER_EXISTS.psycopg, {"name": name}).fetchone() is not None
    row = site.execute(REGISTER_CONSUMER.psycopg, {"name": name, "snapshot": applied, "reporter": reporter}).fetchone()
    assert row is not None
    return known, bool(row[0])


def drop_consumer(site: psycopg.Connection, name: str) -> None:
    _require_registry(site)
    if site.execute(DROP_CONSUMER.psycopg, {"name": name}).fetchone() is None:
        raise _unknown(name)


def clear_missed(site: psycopg.Connection, name: str) -> None:
    """Record that `name`'s tables were copied (`dbsync backfill`): it no longer misses history."""
    _require_registry(site)
    if site.execute(CLEAR_MISSED.psycopg, {"name": name}).fetchone() is None:
        raise _unknown(name)


def _unknown(name: str) -> ConsumerError:
    return ConsumerError(f"no consumer {name!r} is registered on the Site DB (see `dbsync consumers list`)")
