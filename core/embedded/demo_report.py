"""What `dbsync demo` found: reconcile's deep check of both sides, and the summary it prints."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg

from dbsync.catchup import CatchUp
from dbsync.config import Settings
from dbsync.db import connect, first_line
from dbsync.embedded.cluster import SERVICE_USER, LocalCluster
from dbsync.errors import DbsyncError
from dbsync.reconcile import Comparer, TableDiff, deep_check, targets

if TYPE_CHECKING:
    from dbsync.embedded.demo import DemoOptions

TABLES = ("public.conversations", "public.leads", "public.whatsapp_messages")


class CompareError(DbsyncError):
    """The Site and Agent tables could not be read for the comparison."""


@dataclass(frozen=True)
class TableCheck:
    """The deep reconcile check of one table (what `dbsync reconcile --deep` reports)."""

    table: str
    site_rows: int
    agent_rows: int
    missing: int = 0
    extra: int = 0
    changed: int = 0

    @property
    def identical(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    @classmethod
    def of(cls, diff: TableDiff) -> TableCheck:
        return cls(
            diff.table, diff.site_rows, diff.agent_rows,
            len(diff.missing), len(diff.extra), len(diff.changed) + len(diff.unsettled),
        )


def compare(site_dsn: str, agent_dsn: str, tables: Sequence[str] = TABLES) -> list[TableCheck]:
    """Run reconcile's deep check on the demo's tables (hashes compared inside each database)."""
    settings = Settings(site_dsn=site_dsn, agent_dsn=agent_dsn)
    with connect(site_dsn, "Site") as site, connect(agent_dsn, "Agent") as agent:
        try:
            comparer = Comparer(site, agent)
            try:
                catchup = CatchUp(site, agent, settings, timeout=30, apply=True)
                return [TableCheck.of(deep_check(comparer, catchup, t)) for t in targets(site, agent, list(tables))]
            finally:
                comparer.close()
        except psycopg.Error as exc:
            raise CompareError(f"cannot compare the Site and Agent tables: {first_line(exc)}") from exc


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class WriteBack:
    """The Agent -> Site direction: what the automation did, and whether it reached the Site."""

    stages: dict[str, int]  # lead stage changes by the stage moved to
    transactions: int
    lags_ms: list[float]  # ascending
    behind: int
    # Leads in a stage only the Agent's automation sets, on each side: equal, and not 0, when
    # write-back works (the Site's app never moves a stage).
    site_moved: int
    agent_moved: int


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
    write_back: WriteBack | None = None
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
        f"{c.get('status', 0)} delivery status callbacks "
        f"({c.get('failed', 0)} of them simulated WhatsApp delivery failures), "
        f"{c.get('crm', 0)} agent actions ({c.get('lead_edits', 0)} emails filed on leads the automation closed)"
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
        behind = r.behind + (r.write_back.behind if r.write_back else 0)
        caught = f"NOT caught up: {behind} events still behind after the deadline"
    lines.append(f"  Events applied     {r.events} ({r.events / max(span, 1e-9):.1f}/s), {caught}")
    lines.extend(_lag("Replication lag", r.lags_ms))
    if r.write_back is not None:
        lines.extend(_write_back(r.write_back, seconds, span))
    if r.parked:
        lines.append(f"  Parked events      {r.parked} (rejected where they were to be applied; see `dbsync status`)")
    width = max(len(check.table) for check in r.checks)
    for check in r.checks:
        verdict = (
            "yes"
            if check.identical
            else f"no ({check.missing} missing, {check.extra} extra, {check.changed} changed on the Agent)"
        )
        lines.append(f"  {check.table:<{width}}  {check.site_rows:>7} rows  Site and Agent are identical: {verdict}")
    lines.extend(_kept(r.kept))
    lines.extend(_next(r.kept))
    return "\n".join(lines)


_QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def _lag(name: str, lags_ms: list[float]) -> list[str]:
    if not lags_ms:
        return []
    lag = "  ".join(f"{q_name} {percentile(lags_ms, q):.1f} ms" for q_name, q in _QUANTILES)
    return [f"  {name:<17}  {lag}  max {lags_ms[-1]:.1f} ms"]


def _write_back(w: WriteBack, seconds: float, span: float) -> list[str]:
    stages = ", ".join(f"{w.stages[s]} {s}" for s in ("contacted", "qualified", "won", "lost") if w.stages.get(s))
    events = len(w.lags_ms)
    return [
        f"  Agent automation   {w.transactions} transactions ({w.transactions / seconds:.1f}/s), "
        f"lead stages moved to: {stages or 'none'}",
        f"  Written back       {events} events applied to the Site DB ({events / max(span, 1e-9):.1f}/s)",
        *_lag("Write-back lag", w.lags_ms),
        f"  Write-back check   leads in a stage only the automation sets: {w.agent_moved} on the Agent DB, "
        f"{w.site_moved} on the Site DB",
    ]


def _next(kept: list[tuple[str, LocalCluster]]) -> list[str]:
    """What to try next: with the clusters kept, commands for them; otherwise how to keep them."""
    if not kept:
        return [
            "Next: `dbsync demo --keep` leaves both clusters running, to look at them with `dbsync status`,",
            "      `dbsync reconcile --deep` or psql; `dbsync demo --help` lists the traffic options.",
        ]
    (site, cluster), (agent, _) = kept
    dsns = f"--site-dsn '{site}' --agent-dsn '{agent}'"
    return [
        "Next, with the clusters kept:",
        f"  dbsync status {dsns}    # exits 1, 'no active daemon', until a dbsync run applies",
        f"  dbsync run {dsns}    # both ways (leads back from the Agent); change the Site DB with:",
        f"  {cluster.bindir / 'psql'} '{site}'",
        f"  dbsync reconcile --deep {dsns}",
    ]


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
