"""asyncpg connections for the daemon, opened from any libpq DSN (dbsync.daemon.dsn), failing
with one clear line."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from dbsync.config import describe_dsn, redact_dsn
from dbsync.daemon.dsn import connect_kwargs
from dbsync.db import SAFE_SESSION, first_line
from dbsync.errors import ConnectError
from dbsync.pooler import BACKEND_PID, check_own_session

# Errors that mean "the connection is gone or unusable, or the statement was cut short":
# reconnect and retry, nothing is wrong with the data. Class 57 includes 57014 query_canceled on
# purpose: a statement_timeout, an operator's pg_cancel_backend and the cancel asyncpg sends at
# io_timeout say nothing about the row being written, so it is retried, never parked as bad.
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
# The same, by SQLSTATE class: 08 connection exception, 57 operator intervention.
TRANSIENT_CLASSES = ("08", "57")


def is_transient(exc: BaseException) -> bool:
    """Retry `exc` on a new connection (never park an event for it, never call it stuck)?"""
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith(TRANSIENT_CLASSES)


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
    except asyncpg.TargetServerAttributeNotMatched:
        reason = f"no server in the DSN is {kwargs['target_session_attrs']} (target_session_attrs)"
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
