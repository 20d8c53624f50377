"""Options shared by several commands, defined once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

# --log-format: plain lines, or one JSON object per line (dbsync.cli.logs).
LOG_FORMATS = ("text", "json")

F = TypeVar("F", bound=Callable[..., Any])


def connection_options(func: F) -> F:
    func = click.option("--agent-dsn", envvar="DBSYNC_AGENT_DSN", show_envvar=True, help="Agent DB connection string.")(
        func
    )
    func = click.option("--site-dsn", envvar="DBSYNC_SITE_DSN", show_envvar=True, help="Site DB connection string.")(
        func
    )
    func = click.option(
        "--config",
        "config_file",
        envvar="DBSYNC_CONFIG",
        show_envvar=True,
        type=click.Path(dir_okay=False),
        help="TOML settings file (flags and environment win over it).",
    )(func)
    return func


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)
