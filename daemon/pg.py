"""asyncpg connections for the daemon, opened from any libpq DSN, failing with one clear line."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from dbsync.config import check_dsn, describe_dsn, redact_dsn
from dbsync.db import SAFE_SESSION, first_line
from dbsync.errors import ConfigError, ConnectError

# Errors that mean "the connection is gone or unusable": reconnect, nothing is wrong with the data.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.OperatorInterventionError,
    ConnectError,
)

_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


def connect_kwargs(dsn: str, what: str) -> dict[str, Any]:
    """asyncpg only parses URLs; translate a libpq DSN of either form into keyword arguments."""
    parts = check_dsn(dsn, what)
    kwargs: dict[str, Any] = {}
    for key, target in (("host", "host"), ("user", "user"), ("password", "password"), ("dbname", "database")):
        if key in parts:
            kwargs[target] = parts.pop(key)
    if "port" in parts:
        port = parts.pop("port")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{what}: port must be a number from 1 to 65535, got {port!r}")
        kwargs["port"] = int(port)
    if "sslmode" in parts:
        mode = parts.pop("sslmode")
        if mode not in _SSLMODES:
            raise ConfigError(f"{what}: unknown sslmode {mode!r}")
        kwargs["ssl"] = mode
    if "connect_timeout" in parts:
        timeout = parts.pop("connect_timeout")
        try:
            kwargs["timeout"] = float(timeout)
        except ValueError:
            raise ConfigError(f"{what}: connect_timeout must be a number of seconds, got {timeout!r}") from None
    if "passfile" in parts:
        kwargs["passfile"] = parts.pop("passfile")
    settings = {"application_name": parts.pop("application_name", "dbsync")}
    if "options" in parts:
        raise ConfigError(f"{what}: the 'options' parameter is not supported by the daemon")
    kwargs["server_settings"] = settings
    kwargs.setdefault("timeout", 10.0)
    return kwargs


async def connect(
    dsn: str, role: str, server_settings: dict[str, str] | None = None, io_timeout: float = 30.0
) -> asyncpg.Connection:
    """`io_timeout`: a query that has not answered after this long is on a dead or stalled
    link; it fails, and the caller reconnects (Settings.io_timeout)."""
    kwargs = connect_kwargs(dsn, f"{role.lower()}_dsn")
    kwargs["server_settings"].update(server_settings or {})
    kwargs["command_timeout"] = io_timeout
    try:
        conn = await asyncpg.connect(**kwargs)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = redact_dsn(first_line(exc)) if str(exc) else type(exc).__name__
        raise ConnectError(f"cannot connect to the {role} DB ({describe_dsn(dsn)}): {reason}") from None
    try:
        await conn.execute(SAFE_SESSION)  # before any other query (dbsync.db.SAFE_SESSION)
    except BaseException:
        conn.terminate()
        raise
    return conn
