"""`dbsync`: the command group, logging, and the one place errors become exit codes."""

from __future__ import annotations

import sys

import asyncpg
import click
import psycopg

from dbsync.cli import backfill, demo, logs, migrate, reconcile, retry, run, status, tables
from dbsync.db import first_line
from dbsync.errors import DbsyncError

# The name pip knows dbsync by (pyproject.toml [project].name); --version reads its metadata.
DISTRIBUTION = "dbsync-pg"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="DBSYNC_LOG_LEVEL",
)
@click.option(
    "--log-format",
    type=click.Choice(logs.FORMATS),
    default="text",
    show_default=True,
    envvar="DBSYNC_LOG_FORMAT",
    help="json: one JSON object per line, for log collectors.",
)
@click.version_option(package_name=DISTRIBUTION, prog_name="dbsync")
def cli(log_level: str, log_format: str) -> None:
    """Replicate a Site PostgreSQL database to an Agent PostgreSQL database."""
    logs.setup(log_level, log_format)


cli.add_command(migrate.migrate)
cli.add_command(tables.tables)
cli.add_command(run.run)
cli.add_command(status.status)
cli.add_command(retry.retry)
cli.add_command(reconcile.reconcile)
cli.add_command(backfill.backfill_cmd)
cli.add_command(demo.demo)


def database_error(exc: BaseException) -> str:
    """One line for a database error that reached the top: what it means, then its own words."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    message = first_line(exc)
    if sqlstate == "42501":
        return f"permission denied: {message} (docs/dba.md lists the grants dbsync needs)"
    if sqlstate in ("42P01", "42883", "3F000") and "dbsync" in message:
        return f"{message}: is the database migrated? run `dbsync migrate`"
    return f"database error: {message}"


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except DbsyncError as exc:
        logs.fatal(str(exc))
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("dbsync: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see {exc.ctx.command_path} --help)"
        logs.fatal(exc.format_message() + hint)
        sys.exit(exc.exit_code)
    except (psycopg.Error, asyncpg.PostgresError) as exc:
        logs.fatal(database_error(exc))
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
