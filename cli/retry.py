"""`dbsync retry`: ask the daemon to re-apply parked events once their cause is fixed."""

from __future__ import annotations

import time

import click

from dbsync.cli.options import connection_options, direction, origin_option
from dbsync.config import load_settings
from dbsync.db import connect
from dbsync.errors import DbsyncError, SchemaError
from dbsync.protocol import AGENT_SCHEMA_MARK, COUNT_PARKED, COUNT_RETRY_REQUESTED, REQUEST_RETRY, SCHEMA_EXISTS


class RetryIncomplete(DbsyncError):
    exit_code = 1


@click.command()
@connection_options
@click.option("--table", default=None, help="Only events of this table (schema.table).")
@click.option(
    "--wait",
    "wait_seconds",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for the daemon to process the request (0: do not wait).",
)
@click.option(
    "--source", default=None, help="The direction's source name (default: site, or with --from agent: agent)."
)
@origin_option("Whose changes: agent for the write-back direction, whose parked events are on the Site DB.")
def retry(
    config_file: str | None,
    site_dsn: str | None,
    agent_dsn: str | None,
    table: str | None,
    wait_seconds: float,
    source: str | None,
    origin: str,
) -> None:
    """Re-apply parked events, key by key in log order. The running daemon does the work."""
    named = {"write_back_source" if origin == "agent" else "source": source}
    loaded = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn, **named)
    settings, _, target = direction(loaded.require("agent_dsn" if origin == "site" else "site_dsn"), origin)
    assert settings.agent_dsn
    with connect(settings.agent_dsn, target) as db:
        if origin == "agent" and db.execute(SCHEMA_EXISTS.psycopg, {"rel": AGENT_SCHEMA_MARK}).fetchone() != (True,):
            raise SchemaError("the Site DB applies no write-back: run `dbsync migrate --two-way` first")
        flagged = db.execute(REQUEST_RETRY.psycopg, {"source": settings.source, "table": table}).rowcount
        if flagged == 0:
            click.echo("no parked events to retry")
            return
        click.echo(f"asked the daemon to retry {flagged} parked event(s)")
        deadline = time.monotonic() + wait_seconds
        while wait_seconds > 0 and time.monotonic() < deadline:
            if db.execute(COUNT_RETRY_REQUESTED.psycopg, {"source": settings.source}).fetchone() == (0,):
                break
            time.sleep(0.2)
        else:
            if wait_seconds > 0:
                raise RetryIncomplete("the daemon has not processed the retry yet: is `dbsync run` running?")
            return
        left = db.execute(COUNT_PARKED.psycopg, {"source": settings.source}).fetchone()[0]  # type: ignore[index]
    if left:
        raise RetryIncomplete(f"{left} event(s) are still parked; `dbsync status` shows why")
    click.echo("all parked events applied")
