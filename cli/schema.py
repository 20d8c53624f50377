"""`dbsync schema diff [--apply]`: the statements the Agent DB needs to match the Site DB."""

from __future__ import annotations

import json
import shlex

import click

from dbsync import schema
from dbsync.cli.options import connection_options, json_option
from dbsync.config import load_settings
from dbsync.db import connect


@click.group("schema")
def schema_group() -> None:
    """Compare the replicated tables' definitions on the Site DB and the Agent DB."""


@schema_group.command("diff")
@connection_options
@json_option
@click.option("--apply", "do_apply", is_flag=True, help="Run the safe statements (adding tables and columns).")
def diff(config_file: str | None, site_dsn: str | None, agent_dsn: str | None, as_json: bool, do_apply: bool) -> None:
    """Print the statements that make every replicated table on the Agent DB take the Site DB's
    rows: missing tables and columns, type, NOT NULL, default and key differences.

    The output is SQL: statements --apply runs are plain, the others are commented out with the
    reason. --apply runs the safe ones (CREATE TABLE, ADD COLUMN) on the Agent DB in one
    transaction; it never drops, retypes or rewrites a value.

    Exit status: 0 no difference (left), 1 differences, 2 error."""
    settings = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn).require("site_dsn", "agent_dsn")
    assert settings.site_dsn and settings.agent_dsn
    with connect(settings.site_dsn, "Site") as site, connect(settings.agent_dsn, "Agent") as agent:
        reports = schema.diff(site, agent)
        changes = [c for r in reports for c in r.changes]
        applied = schema.apply(agent, changes) if do_apply else []
    left = [c for c in changes if c.differs and c not in applied]
    if as_json:
        out = {
            "in_sync": not left,
            "tables": {r.table: [{**c.as_dict(), "applied": c in applied} for c in r.changes] for r in reports},
            "applied": [c.statement for c in applied],
        }
        click.echo(json.dumps(out, indent=2))
    else:
        _print(reports, applied, do_apply)
    if left:
        raise SystemExit(1)


def _print(reports: list[schema.TableReport], applied: list[schema.Change], do_apply: bool) -> None:
    """SQL a DBA can review and run: the statements --apply runs plain, the others commented out,
    then the notes (what differs but does not matter for replication)."""
    changes = [c for r in reports for c in r.changes]
    differing = [c for c in changes if c.differs]
    for change in differing:
        done = change in applied
        click.echo(f"-- {change.table}: {'applied: ' if done else ''}{change.note}")
        if change.statement:
            runs = change.safe and (done or not do_apply)
            click.echo(("" if runs else "-- ") + change.statement)
    for change in changes:
        if not change.differs:
            click.echo(f"-- note: {change.table}: {change.note}")
    safe = [c for c in differing if c.safe]
    tables = {c.table for c in differing}
    if not differing:
        click.echo(f"-- no difference in {len(reports)} replicated table(s)")
        return
    summary = f"-- {len(differing)} difference(s) in {len(tables)} of {len(reports)} table(s)"
    if do_apply:
        summary += f": applied {len(applied)} statement(s) in one transaction, left {len(differing) - len(applied)}"
        if any(c.kind != "missing_table" for c in applied):
            summary += (
                "; rows the Agent DB already held got each new column's default as the Agent computes it (or NULL): "
                "`dbsync reconcile --table NAME` shows any that differ from the Site, --repair fixes them"
            )
        created = [shlex.quote(c.table) for c in applied if c.kind == "missing_table"]
        if created:
            summary += f"; copy the rows the Site DB already holds: `dbsync backfill {' '.join(created)}`"
    else:
        summary += (
            f": `dbsync schema diff --apply` runs the {len(safe)} plain statement(s), "
            f"{len(differing) - len(safe)} are to do by hand"
        )
    click.echo(summary)
