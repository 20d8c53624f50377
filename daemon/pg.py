"""asyncpg connections for the daemon, opened from any libpq DSN, failing with one clear line."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from dbsync.config import check_dsn, describe_dsn, redact_dsn
from dbsync.db import SAFE_SESSION, first_line
from dbsync.errors import ConfigError, ConnectError
from dbsync.pooler import BACKEND_PID, check_own_session

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
    conn = await _open(kwargs, dsn, role)
    try:
        # The pooler probe first: through a transaction-mode pooler a SET would stay behind on a
        # shared server. Then SAFE_SESSION, before any other query (dbsync.db.SAFE_SESSION).
        await refuse_transaction_pooler(conn, kwargs, dsn, role)
        await conn.execute(SAFE_SESSION)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def _open(kwargs: dict[str, Any], dsn: str, role: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(**kwargs)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = redact_dsn(first_line(exc)) if str(exc) else type(exc).__name__
        raise ConnectError(f"cannot connect to the {role} DB ({describe_dsn(dsn)}): {reason}") from None


async def _backend_pid(conn: asyncpg.Connection) -> int:
    """The backend's pid through COPY: the simple query protocol, no prepared statement (through
    a transaction-mode pooler one would collide with another client's, or vanish)."""
    out = bytearray()

    async def collect(data: bytes) -> None:
        out.extend(data)

    await conn.copy_from_query(BACKEND_PID, output=collect)
    return int(out)


async def refuse_transaction_pooler(conn: asyncpg.Connection, kwargs: dict[str, Any], dsn: str, role: str) -> None:
    """dbsync.pooler's probe, with a second short connection made like `conn`."""
    first = await _backend_pid(conn)
    probe = await _open(kwargs, dsn, role)
    try:
        other = await _backend_pid(probe)
    finally:
        try:
            await probe.close(timeout=2)
        except Exception:  # noqa: BLE001 - the probe is done with; a slow close must not fail the session
            probe.terminate()
    check_own_session(role, dsn, first, other, await _backend_pid(conn))
