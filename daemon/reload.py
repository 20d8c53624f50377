"""SIGHUP: read the settings again and take what can change while the daemon runs.

The live settings are read at each use (a page, a wait, a lag check, an alert), so swapping
them is enough. Everything else shapes the process itself (connections, the source's lock, the
listener, the backoff) and keeps its old value until a restart; the log says which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from dbsync.config import Settings, read_config_file
from dbsync.daemon.alerts import check_url, describe_url
from dbsync.daemon.dsn import connect_kwargs
from dbsync.daemon.http import parse_address
from dbsync.errors import DbsyncError

log = logging.getLogger("dbsync.daemon")

LIVE = (
    "batch_size",
    "poll_interval",
    "lag_threshold",
    "log_level",
    "alert_webhook",
    "poison_policy",
    "verify_rows_per_second",
    "verify_repair",
    "auto_add_columns",
)
# Never shown with a value: a DSN may hold a password.
_SECRET = ("site_dsn", "agent_dsn")


def check(settings: Settings) -> Settings:
    """What `dbsync run` refuses at start, refused the same way on a reload."""
    settings.require(*_SECRET)
    for name in _SECRET:
        connect_kwargs(getattr(settings, name), name)  # a parameter the daemon cannot honour
    if settings.http:
        parse_address(settings.http)
    if settings.alert_webhook:
        check_url(settings.alert_webhook)
    return settings


@dataclass(frozen=True)
class Reload:
    """The settings to run with from now on, and what differs from the ones before."""

    settings: Settings
    changed: dict[str, Any]  # live settings that take their new value
    restart: list[str]  # settings that changed but keep their old value until a restart

    def lines(self) -> list[str]:
        """The log lines that report it (never a DSN, nor a webhook's path)."""
        if not self.changed and not self.restart:
            return ["configuration reloaded: nothing changed"]
        out = []
        if self.changed:
            shown = ", ".join(f"{name}={show(name, value)}" for name, value in self.changed.items())
            out.append(f"configuration reloaded: {shown}")
        if self.restart:
            needs = "needs" if len(self.restart) == 1 else "need"
            out.append(
                f"configuration reload: {', '.join(self.restart)} changed but {needs} a restart; "
                "the old value stays in use until then"
            )
        return out


def diff(old: Settings, new: Settings) -> Reload:
    changed: dict[str, Any] = {}
    restart: list[str] = []
    for f in fields(Settings):
        if f.name == "config_file" or getattr(old, f.name) == getattr(new, f.name):
            continue
        if f.name in LIVE:
            changed[f.name] = getattr(new, f.name)
        else:
            restart.append(f.name)
    return Reload(replace(old, **changed), changed, restart)


def show(name: str, value: Any) -> str:
    if value is None:
        return "off"
    if name == "alert_webhook":
        return describe_url(str(value)) + "/..."  # the path is often the webhook's token
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def shadowed(settings: Settings) -> list[str]:
    """Settings the file sets to a value a flag or the environment overrides (they win)."""
    if settings.config_file is None:
        return []
    try:
        in_file = read_config_file(settings.config_file)
    except DbsyncError:
        return []
    return [name for name, value in in_file.items() if getattr(settings, name) != value]


class Reloader:
    """Builds the new settings with `load` (the start's flags, the environment, the file)."""

    def __init__(self, load: Callable[[], Settings]) -> None:
        self.load = load

    def __call__(self, current: Settings) -> Reload | None:
        """The reload to apply, or None when the file is refused (logged; nothing changes)."""
        try:
            new = check(self.load())
        except DbsyncError as exc:
            log.error("configuration reload refused, the old settings stay in use: %s", exc)
            return None
        if new.config_file is None:
            log.warning(
                "configuration reload: there is no config file (--config, DBSYNC_CONFIG) and a running "
                "process cannot re-read its flags or environment: nothing changed"
            )
            return None
        plan = diff(current, new)
        for line in plan.lines():
            log.info("%s", line)
        overridden = shadowed(new)
        if overridden:
            log.warning(
                "configuration reload: %s in the config file %s overridden by a flag or the environment",
                ", ".join(overridden),
                "is" if len(overridden) == 1 else "are",
            )
        return plan
