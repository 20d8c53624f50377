"""Options shared by several commands, defined once."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click
from click.core import ParameterSource

from dbsync.config import Settings, dsn_has_password

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("dbsync")

# (parameter, flag, environment variable) of each DSN.
DSN_OPTIONS = (("site_dsn", "--site-dsn", "DBSYNC_SITE_DSN"), ("agent_dsn", "--agent-dsn", "DBSYNC_AGENT_DSN"))


def connection_options(func: F) -> F:
    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        warn_of_passwords_in_flags(kwargs)
        return func(*args, **kwargs)

    wrapped: Callable[..., Any] = command
    wrapped = click.option(
        "--agent-dsn", envvar="DBSYNC_AGENT_DSN", show_envvar=True, help="Agent DB connection string."
    )(wrapped)
    wrapped = click.option("--site-dsn", envvar="DBSYNC_SITE_DSN", show_envvar=True, help="Site DB connection string.")(
        wrapped
    )
    wrapped = click.option(
        "--config",
        "config_file",
        envvar="DBSYNC_CONFIG",
        show_envvar=True,
        type=click.Path(dir_okay=False),
        help="TOML settings file (flags and environment win over it).",
    )(wrapped)
    return cast(F, wrapped)


def warn_of_passwords_in_flags(values: dict[str, Any]) -> None:
    """Any local user can read a process's arguments (`ps`, /proc): one warning per command
    when a DSN given by flag carries a password, naming the ways that keep it private."""
    ctx = click.get_current_context()
    given = [
        (flag, env)
        for name, flag, env in DSN_OPTIONS
        if values.get(name)
        and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
        and dsn_has_password(values[name])
    ]
    if not given:
        return
    flags = " and ".join(flag for flag, _ in given)
    envs = " and ".join(env for _, env in given)
    log.warning(
        "%s carr%s a password, which is visible to other users in `ps`: put the DSN in %s or the config "
        "file, or the password in ~/.pgpass or a passfile= (see docs/operations.md)",
        flags,
        "y" if len(given) > 1 else "ies",
        envs,
    )


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)


def consumer_timeout_option(func: F) -> F:
    return click.option(
        "--consumer-timeout",
        type=float,
        metavar="SECONDS",
        default=None,
        help="A consumer not seen for this long is reported as stale (default 3600).",
    )(func)


def origin_option(help_text: str) -> Callable[[F], F]:
    """--from site|agent: which side's changes (agent: write-back, `dbsync migrate --two-way`)."""
    option: Callable[[F], F] = click.option(
        "--from", "origin", type=click.Choice(["site", "agent"]), default="site", show_default=True, help=help_text
    )
    return option


def direction(settings: Settings, origin: str) -> tuple[Settings, str, str]:
    """The settings of the direction that carries `origin`'s changes, and the names of its source
    and target databases for messages: with --from agent the Agent DB is read and the Site DB
    applied to (Settings.write_back), and every message still calls each database by its name."""
    if origin == "agent":
        return settings.write_back(), "Agent", "Site"
    return settings, "Site", "Agent"
