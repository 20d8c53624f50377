"""What `dbsync demo` found: both sides compared inside PostgreSQL, and the summary it prints."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from dbsync.db import connect, first_line
from dbsync.embedded import SERVICE_USER, LocalCluster
from dbsync.errors import DbsyncError
from dbsync.tables import columns, primary_key

if TYPE_CHECKING:
    from dbsync.demo import DemoOptions

TABLES = ("public.conversations", "public.leads", "public.whatsapp_messages")
# A row's text must not depend on session settings the two connections could disagree on.
SESSION = (
    "SET extra_float_digits = 3",
    "SET TimeZone = 'UTC'",
    "SET DateStyle = 'ISO, YMD'",
    "SET IntervalStyle = 'postgres'",
)
DIGEST = "SELECT count(*), md5(coalesce(string_agg(ROW({cols})::text, E'\\n' ORDER BY {keys}), '')) FROM {table}"


class CompareError(DbsyncError):
    """The Site and Agent tables could not be read for the comparison."""


@dataclass(frozen=True)
class TableCheck:
    table: str
    site_rows: int
    agent_rows: int
    site_md5: str
    agent_md5: str

    @property
    def identical(self) -> bool:
        return (self.site_rows, self.site_md5) == (self.agent_rows, self.agent_md5)


def _digest(conn: psycopg.Connection, schema: str, name: str, cols: list[str], keys: list[str]) -> tuple[int, str]:
    query = sql.SQL(DIGEST).format(
        cols=sql.SQL(", ").join(sql.Identifier(c) for c in cols),
        keys=sql.SQL(", ").join(sql.Identifier(k) for k in keys),
        table=sql.Identifier(schema, name),
    )
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def compare(site_dsn: str, agent_dsn: str, tables: Sequence[str] = TABLES) -> list[TableCheck]:
    """Count and md5 of every table on both sides, the Site's columns in the Site's order on both."""
    with connect(site_dsn, "Site") as site, connect(agent_dsn, "Agent") as agent:
        try:
            for conn in (site, agent):
                for statement in SESSION:
                    conn.execute(statement)
            checks = []
            for label in tables:
                schema, name = label.split(".", 1)
                cols, keys = columns(site, schema, name), primary_key(site, schema, name)
                site_rows, site_md5 = _digest(site, schema, name, cols, keys)
                agent_rows, agent_md5 = _digest(agent, schema, name, cols, keys)
                checks.append(TableCheck(label, site_rows, agent_rows, site_md5, agent_md5))
        except psycopg.Error as exc:
            raise CompareError(f"cannot compare the Site and Agent tables: {first_line(exc)}") from exc
    return checks


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class DemoResult:
    options: DemoOptions
    seed: int
    counts: dict[str, int]
    transactions: int
    traffic_seconds: float
    lags_ms: list[float]  # ascending
    catch_up_seconds: float | None  # None: not caught up before the deadline
    behind: int
    parked: int
    checks: list[TableCheck]
    kept: list[tuple[str, LocalCluster]] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return all(c.identical for c in self.checks)

    @property
    def events(self) -> int:
        return len(self.lags_ms)


def format_summary(r: DemoResult) -> str:
    c = r.counts
    seconds = max(r.traffic_seconds, 1e-9)
    kinds = (
        f"{c.get('outbound', 0)} outbound, {c.get('inbound', 0)} inbound, "
        f"{c.get('status', 0)} status callbacks ({c.get('failed', 0)} failed), "
        f"{c.get('crm', 0)} agent actions ({c.get('stage_changes', 0)} lead stage changes)"
    )
    lines = [
        f"dbsync demo: {r.traffic_seconds:.1f} s of WhatsApp CRM traffic, {r.options.writers} writers, seed {r.seed}",
        f"  Site transactions  {r.transactions} ({r.transactions / seconds:.1f}/s): {kinds}",
    ]
    if r.catch_up_seconds is not None:
        span = r.traffic_seconds + r.catch_up_seconds
        caught = f"caught up {r.catch_up_seconds:.2f} s after traffic stopped"
    else:
        span = r.traffic_seconds
        caught = f"NOT caught up: {r.behind} events still behind after the deadline"
    lines.append(f"  Events applied     {r.events} ({r.events / max(span, 1e-9):.1f}/s), {caught}")
    if r.lags_ms:
        lag = "  ".join(f"{name} {percentile(r.lags_ms, q):.1f} ms" for name, q in _QUANTILES)
        lines.append(f"  Replication lag    {lag}  max {r.lags_ms[-1]:.1f} ms")
    if r.parked:
        lines.append(f"  Parked events      {r.parked} (rejected by the Agent DB; see `dbsync status`)")
    width = max(len(check.table) for check in r.checks)
    for check in r.checks:
        verdict = (
            "yes"
            if check.identical
            else (
                f"no (Site {check.site_rows} rows md5 {check.site_md5[:12]}, "
                f"Agent {check.agent_rows} rows md5 {check.agent_md5[:12]})"
            )
        )
        lines.append(f"  {check.table:<{width}}  {check.site_rows:>7} rows  Site and Agent are identical: {verdict}")
    lines.extend(_kept(r.kept))
    return "\n".join(lines)


_QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def _kept(kept: list[tuple[str, LocalCluster]]) -> list[str]:
    if not kept:
        return []
    lines = ["Clusters left running (--keep):"]
    prefix = f"runuser -u {SERVICE_USER} -- " if os.geteuid() == 0 else ""
    for (dsn, cluster), role in zip(kept, ("Site ", "Agent"), strict=True):
        lines.append(f"  {role} DB  {dsn}")
        lines.append(
            f"            stop: {prefix}{cluster.bindir / 'pg_ctl'} -D {cluster.datadir} stop && rm -rf {cluster.root}"
        )
    return lines
