"""`dbsync consumers`: the Agent DBs consuming the Site DB's log, their lag, and dropping one."""

from __future__ import annotations

import json

import click

from dbsync.cli.options import connection_options, consumer_timeout_option, json_option
from dbsync.config import load_settings
from dbsync.db import connect


@click.group()
def consumers() -> None:
    """List, register or drop the consumers of the Site DB's log."""


@consumers.command("list")
@connection_options
@json_option
@consumer_timeout_option
def list_cmd(
    config_file: str | None, site_dsn: str | None, agent_dsn: str | None, as_json: bool, consumer_timeout: float | None
) -> None:
    """Show every consumer, what it has not applied yet, and when it was last seen.

    Exits 1 when one is stale (not seen for consumer_timeout seconds) or missed history."""
    from dbsync.consumers import read_consumers

    settings = load_settings(config_file, site_dsn=site_dsn, consumer_timeout=consumer_timeout)
    settings.require("site_dsn")
    assert settings.site_dsn
    with connect(settings.site_dsn, "Site") as site:
        found = read_consumers(site, settings.consumer_timeout)
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in found], indent=2))
    elif not found:
        click.echo("no consumers registered")
    else:
        width = max(len(c.name) for c in found)
        click.echo(f"{'consumer':<{width}}  {'events behind':>13}  {'seconds behind':>14}  {'last seen':>12}  state")
        for c in found:
            state = "STALE" if c.stale else "ok"
            if c.missed_history:
                state += ", missed history: run `dbsync backfill`"
            click.echo(
                f"{c.name:<{width}}  {c.events_behind:>13}  {c.seconds_behind:>14.1f}  "
                f"{c.seconds_since_seen:>10.0f} s  {state}"
            )
    if any(c.problems for c in found):
        raise SystemExit(1)


@consumers.command("add")
@connection_options
@click.argument("name", required=False)
@click.option("--source", default=None, help="The source whose default consumer name to register (default: site).")
@click.option("--role", default=None, help="The Site role its daemon logs in as (default: the connecting role).")
def add_cmd(
    config_file: str | None,
    site_dsn: str | None,
    agent_dsn: str | None,
    name: str | None,
    source: str | None,
    role: str | None,
) -> None:
    """Register consumer NAME, so the Site keeps its log for it from now on.

    Without NAME: the consumer name the daemon with these settings uses (it needs the Agent DSN),
    registered at what that Agent DB has applied. Run it before the new daemon's first start
    while the others keep running: nothing written from then on is pruned before it has it."""
    from dbsync.consumers import add_consumer, agent_consumer_name
    from dbsync.protocol import INITIAL_SNAPSHOT, READ_PROGRESS

    settings = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn, source=source)
    settings.require("site_dsn")
    assert settings.site_dsn
    applied = INITIAL_SNAPSHOT
    if name is None and settings.consumer:
        name = settings.consumer
    if name is None:
        settings.require("agent_dsn")
        assert settings.agent_dsn
        with connect(settings.agent_dsn, "Agent") as agent:
            name = agent_consumer_name(agent, settings.source, None)
            row = agent.execute(READ_PROGRESS.psycopg, {"source": settings.source}).fetchone()
            if row is not None:
                applied = row[0]
    with connect(settings.site_dsn, "Site") as site:
        known, missed = add_consumer(site, name, role, applied)
    if known:
        click.echo(f"consumer {name} was registered already; nothing changed")
    else:
        click.echo(f"consumer {name} is registered; the Site log is kept until it has applied it")
    if missed:
        click.echo(
            f"consumer {name} may have missed events pruned before it registered: copy the tables with "
            "`dbsync backfill` (docs/operations.md, Topologies)",
            err=True,
        )


@consumers.command("drop")
@connection_options
@click.argument("name")
def drop_cmd(config_file: str | None, site_dsn: str | None, agent_dsn: str | None, name: str) -> None:
    """Forget consumer NAME: the Site log is no longer kept for it.

    Stop its daemon first: a daemon that still runs registers itself again."""
    from dbsync.consumers import drop_consumer

    settings = load_settings(config_file, site_dsn=site_dsn)
    settings.require("site_dsn")
    assert settings.site_dsn
    with connect(settings.site_dsn, "Site") as site:
        drop_consumer(site, name)
    click.echo(f"consumer {name} is dropped; the Site log is no longer kept for it")


@consumers.command("backfilled")
@connection_options
@click.argument("name")
def backfilled_cmd(config_file: str | None, site_dsn: str | None, agent_dsn: str | None, name: str) -> None:
    """Record that NAME's tables were copied with `dbsync backfill`: clears its missed history.

    A consumer registered after events it needed were pruned is reported until then."""
    from dbsync.consumers import clear_missed

    settings = load_settings(config_file, site_dsn=site_dsn)
    settings.require("site_dsn")
    assert settings.site_dsn
    with connect(settings.site_dsn, "Site") as site:
        clear_missed(site, name)
    click.echo(f"consumer {name} has its history now; no longer reported as missing any")
