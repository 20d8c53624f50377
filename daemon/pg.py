"""asyncpg connections for the daemon, opened from any libpq DSN, failing with one clear line."""

from __future__ import annotations

import asyncio

import asyncpg

from dbsync.config import describe_dsn, redact_dsn
from dbsync.daemon.dsn import connect_kwargs
from dbsync.db import SAFE_SESSION, first_line
from dbsync.errors import ConnectError

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
    except asyncpg.TargetServerAttributeNotMatched:
        reason = f"no server in the DSN is {kwargs['target_session_attrs']} (target_session_attrs)"
        raise ConnectError(f"cannot connect to the {role} DB ({describe_dsn(dsn)}): {reason}") from None
    try:
        await conn.execute(SAFE_SESSION)  # before any other query (dbsync.db.SAFE_SESSION)
    except BaseException:
        conn.terminate()
        raise
    return conn
