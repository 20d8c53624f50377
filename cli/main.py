"""`dbsync`: the command group, logging, and the one place errors become exit codes."""

from __future__ import annotations

import logging
import sys

import click

from dbsync.cli import migrate, retry, run, status, tables
from dbsync.errors import DbsyncError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="DBSYNC_LOG_LEVEL",
)
@click.version_option(package_name="dbsync")
def cli(log_level: str) -> None:
    """Replicate a Site PostgreSQL database to an Agent PostgreSQL database."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # asyncpg logs a full traceback when a listener connection dies; we report it ourselves.
    logging.getLogger("asyncpg").setLevel(logging.CRITICAL)


cli.add_command(migrate.migrate)
cli.add_command(tables.tables)
cli.add_command(run.run)
cli.add_command(status.status)
cli.add_command(retry.retry)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except DbsyncError as exc:
        click.echo(f"dbsync: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("dbsync: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
