"""`dbsync`: the command group, logging, and the one place errors become exit codes.

Commands are imported when they run (or show their own help): `dbsync --help` and a mistyped
command load neither database driver nor the daemon.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from dbsync.errors import DbsyncError

# --log-format: plain lines, or one JSON object per line (dbsync.cli.logs).
LOG_FORMATS = ("text", "json")

# name -> (module:attribute, the first line of its help). The short help is here so that the
# command list needs no import; tests/test_cli_startup.py checks it matches each command's own.
COMMANDS: dict[str, tuple[str, str]] = {
    "backfill": (
        "dbsync.cli.backfill:backfill_cmd",
        "Copy the existing rows of the replicated tables NAMES to the Agent DB.",
    ),
    "consumers": (
        "dbsync.cli.consumers:consumers",
        "List, register or drop the consumers of the Site DB's log.",
    ),
    "demo": (
        "dbsync.cli.demo:demo",
        "Replicate a simulated WhatsApp CRM between two throwaway clusters, then prove both sides match.",
    ),
    "migrate": (
        "dbsync.cli.migrate:migrate",
        "Apply pending migrations to every database configured (Site, Agent, or both).",
    ),
    "reconcile": ("dbsync.cli.reconcile:reconcile", "Check that the Agent DB matches the Site DB."),
    "retry": ("dbsync.cli.retry:retry", "Re-apply parked events, key by key in log order."),
    "run": ("dbsync.cli.run:run", "Replicate continuously until SIGTERM or SIGINT."),
    "schema": (
        "dbsync.cli.schema:schema_group",
        "Compare the replicated tables' definitions on the Site DB and the Agent DB.",
    ),
    "status": ("dbsync.cli.status:status", "Show the high-water mark, the newest log sequence and the lag."),
    "tables": ("dbsync.cli.tables:tables", "Install or remove capture on Site DB tables."),
}

# The name pip knows dbsync by (pyproject.toml [project].name); --version reads its metadata.
DISTRIBUTION = "dbsync-pg"


# Bare `dbsync`: click 8.2+ raises this to show the usage (earlier ones print it and exit).
_NO_ARGS: tuple[type[click.UsageError], ...] = tuple(
    e for e in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if e is not None
)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name][0].split(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [
            (name, click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit)) for name in sorted(COMMANDS)
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="DBSYNC_LOG_LEVEL",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    envvar="DBSYNC_LOG_FORMAT",
    help="json: one JSON object per line, for log collectors.",
)
@click.version_option(package_name=DISTRIBUTION, prog_name="dbsync")
def cli(log_level: str, log_format: str) -> None:
    """Replicate a Site PostgreSQL database to an Agent PostgreSQL database."""
    from dbsync.cli import logs

    logs.setup(log_level, log_format)


def _driver_error(exc: BaseException) -> bool:
    """A psycopg or asyncpg error (only a loaded driver can have raised one)."""
    for module, name in (("psycopg", "Error"), ("asyncpg", "PostgresError")):
        loaded: Any = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def database_error(exc: BaseException) -> str:
    """One line for a database error that reached the top: what it means, then its own words."""
    from dbsync.db import first_line
    from dbsync.rls import from_error, is_rls_error

    sqlstate = getattr(exc, "sqlstate", None) or ""
    message = first_line(exc)
    if is_rls_error(exc):
        return str(from_error(exc, None))
    if sqlstate == "42501":
        return f"permission denied: {message} (docs/dba.md lists the grants dbsync needs)"
    if sqlstate in ("42P01", "42883", "3F000") and "dbsync" in message:
        return f"{message}: is the database migrated? run `dbsync migrate`"
    return f"database error: {message}"


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except DbsyncError as exc:
        _fatal(str(exc))
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("dbsync: aborted", err=True)
        sys.exit(130)
    except _NO_ARGS as exc:
        click.echo(exc.format_message())  # bare `dbsync`: the usage, not an error
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see {exc.ctx.command_path} --help)"
        _fatal(exc.format_message() + hint)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if not _driver_error(exc):
            raise
        _fatal(database_error(exc))
        sys.exit(2)


def _fatal(message: str) -> None:
    from dbsync.cli import logs

    logs.fatal(message)


if __name__ == "__main__":
    main()
