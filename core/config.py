"""Settings: one typed object built from flags, the environment and a TOML file, in that order."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from dbsync.errors import ConfigError

ENV_PREFIX = "DBSYNC_"
POISON_POLICIES = ("stop", "park")


@dataclass(frozen=True)
class Settings:
    site_dsn: str | None = None
    agent_dsn: str | None = None
    # Consumer identity on the Agent DB; one row of dbsync.apply_progress per source.
    source: str = "site"
    batch_size: int = 10000
    # Poll even without a notification, in case one is lost (seconds).
    poll_interval: float = 1.0
    # Reconnect backoff (seconds): first delay, cap.
    retry_initial: float = 0.2
    retry_max: float = 10.0
    # Seconds before a query on a stalled link is abandoned and the connection remade.
    io_timeout: float = 30.0
    # What to do with an event the Agent DB rejects: "stop" (retry until fixed, skip nothing)
    # or "park" (move it and later events for its key to dbsync.parked_events, carry on).
    poison_policy: str = "stop"
    # Lag (seconds) above which status reports unhealthy and alerts fire.
    lag_threshold: float = 5.0
    # `dbsync run` only: where to serve /metrics, /healthz and /readyz ("host:port"), and the
    # URL that alerts are POSTed to. Both off by default.
    http: str | None = None
    alert_webhook: str | None = None
    config_file: Path | None = field(default=None, compare=False)

    def require(self, *names: str) -> Settings:
        for name in names:
            if not getattr(self, name):
                env = ENV_PREFIX + name.upper()
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} is not set: pass {flag}, set {env}, or put {name} in the config file")
        return self


_TYPES = {f.name: f.type for f in fields(Settings)}


def _coerce(name: str, value: Any, origin: str) -> Any:
    kind = _TYPES[name]
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            out: Any = int(value)
            if out <= 0:
                raise ValueError
            return out
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if out <= 0:
                raise ValueError
            return out
        if kind.startswith("str"):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {name} must be a positive {kind.split(' ')[0]}, got {value!r}") from None
    return value


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Flags (overrides that are not None) beat the environment, which beats the file."""
    values: dict[str, Any] = {}
    path = config_file or os.environ.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(_read_toml(Path(path)))
    for name in _TYPES:
        if name == "config_file":
            continue
        env = os.environ.get(ENV_PREFIX + name.upper())
        if env not in (None, ""):
            values[name] = _coerce(name, env, f"environment {ENV_PREFIX + name.upper()}")
    for name, value in overrides.items():
        if value is not None:
            if name not in _TYPES:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = _coerce(name, value, "option --" + name.replace("_", "-"))
    settings = Settings(config_file=Path(path) if path else None, **values)
    if settings.poison_policy not in POISON_POLICIES:
        raise ConfigError(
            f"poison_policy must be one of {', '.join(POISON_POLICIES)}, got {settings.poison_policy!r}"
        )
    for dsn_name in ("site_dsn", "agent_dsn"):
        dsn = getattr(settings, dsn_name)
        if dsn:
            check_dsn(dsn, dsn_name)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    # Accept either a flat file or a [dbsync] table, not both (a key beside the table would
    # be silently ignored).
    table = raw.get("dbsync", raw)
    if "dbsync" in raw and len(raw) > 1:
        others = ", ".join(sorted(k for k in raw if k != "dbsync"))
        raise ConfigError(f"config file {path}: put every setting under [dbsync] or none; found also {others}")
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [dbsync] must be a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _TYPES or name == "config_file":
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        out[name] = _coerce(name, value, f"config file {path}")
    return out


def check_dsn(dsn: str, what: str = "dsn") -> dict[str, str]:
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except Exception:  # noqa: BLE001 - psycopg's message may quote the password
        # Not echoed: a malformed string may hold a password where no pattern can find it.
        raise ConfigError(
            f"{what} is not a valid PostgreSQL connection string (not shown, it may hold a password)"
        ) from None


_URL_PASSWORD = re.compile(r"(?P<pre>://[^:/@]*:)[^@]*(?P<at>@)")
_KV_PASSWORD = re.compile(r"(?P<pre>\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for messages and logs."""
    out = _URL_PASSWORD.sub(r"\g<pre>***\g<at>", dsn)
    out = re.sub(r"([?&]password=)[^&]*", r"\1***", out, flags=re.IGNORECASE)
    return _KV_PASSWORD.sub(r"\g<pre>***", out)


def describe_dsn(dsn: str) -> str:
    """A short, password-free name for a database: user@host:port/dbname."""
    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001
        return redact_dsn(dsn)
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    db = parts.get("dbname") or parts.get("user") or "?"
    user = parts.get("user")
    return f"{str(user) + '@' if user else ''}{host}:{port}/{db}"


def with_overrides(settings: Settings, **values: Any) -> Settings:
    return replace(settings, **{k: v for k, v in values.items() if v is not None})
