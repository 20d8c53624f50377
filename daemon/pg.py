"""asyncpg connections for the daemon, opened from any libpq DSN (dbsync.daemon.dsn), failing
with one clear line."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from typing import Any

import asyncpg

from dbsync.config import describe_dsn, redact_dsn
from dbsync.daemon.dsn import connect_kwargs
from dbsync.db import SAFE_SESSION, first_line
from dbsync.errors import ConnectError
from dbsync.pooler import BACKEND_PID, check_own_session

log = logging.getLogger("dbsync.daemon")

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
    close_on_session_end(conn)
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


# -- the end of a session ---------------------------------------------------------------------
# A server that ends a session (pg_terminate_backend, idle_session_timeout, a shutdown) sends an
# ErrorResponse of severity FATAL, or PANIC, and closes the socket; nothing follows it. asyncpg
# keeps a statement in flight waiting for the ReadyForQuery that never comes until the close
# reaches it, and an idle session looks alive until its next statement. When the close is lost
# on the way (a lost FIN, a middlebox that keeps the client's side open), that is io_timeout of
# a stalled daemon. The guard below sees the FATAL arrive and closes the transport at once:
# asyncpg then fails the statement with ConnectionDoesNotExistError naming the server's error,
# and runs the connection's termination listeners.

# Bytes of the stream kept to find the last message in: a FATAL ErrorResponse (severity, code,
# message, context, file, line, routine) fits many times over.
TAIL = 8192
_ENDS_SESSION = (b"FATAL", b"PANIC")
# What a severity field of either ends with, and the bytes either side of a seam between two
# receives that can hold part of one.
_MARKS = tuple(s + b"\0" for s in _ENDS_SESSION)
_SEAM = max(len(m) for m in _MARKS) - 1


def ends_session(tail: bytes) -> bool:
    """Does `tail`, the last bytes received, end with a whole ErrorResponse that ends the session?

    An ErrorResponse is 'E', its int32 length (itself included), then fields (a code byte and a
    NUL-terminated text) and a NUL. The non-localized severity 'V' is read, or 'S' when the
    server sends no 'V' (before PostgreSQL 9.6)."""
    start = len(tail)
    while (start := tail.rfind(b"E", 0, start)) >= 0:
        body = tail[start + 5 :]
        if len(tail) - start >= 6 and struct.unpack_from("!i", tail, start + 1)[0] == len(body) + 4:
            fields = _fields(body)
            if fields is not None:
                return fields.get(b"V", fields.get(b"S")) in _ENDS_SESSION
    return False


def _fields(body: bytes) -> dict[bytes, bytes] | None:
    """The fields of an ErrorResponse body, or None when `body` is not one."""
    if not body.endswith(b"\0\0"):
        return None
    fields: dict[bytes, bytes] = {}
    for item in body[:-2].split(b"\0"):
        if not item:
            return None
        fields[item[:1]] = item[1:]
    return fields if b"C" in fields else None


class _SessionEndGuard(asyncio.Protocol):
    """Passes everything between the transport and asyncpg's protocol; aborts the transport once
    the server has sent a FATAL ErrorResponse (see ends_session)."""

    def __init__(self, transport: asyncio.Transport, inner: asyncio.Protocol) -> None:
        self.transport = transport
        self.inner = inner
        # The last TAIL bytes received, as the chunks they came in (oldest first, not copied),
        # each with whether a marker ends in it; `_marked` counts those.
        self._chunks: deque[tuple[bytes, bool]] = deque()
        self._held = 0
        self._marked = 0
        self._edge = b""  # the last bytes received, for a marker across two receives

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)
        chunk = bytes(data)
        seam = self._edge + chunk[:_SEAM]
        self._edge = chunk[-_SEAM:] if len(chunk) >= _SEAM else (self._edge + chunk)[-_SEAM:]
        marked = any(m in chunk or m in seam for m in _MARKS)
        self._chunks.append((chunk, marked))
        self._held += len(chunk)
        self._marked += marked
        while self._held - len(self._chunks[0][0]) >= TAIL:
            old, was_marked = self._chunks.popleft()
            self._held -= len(old)
            self._marked -= was_marked
        # The tail is joined and parsed only while a marker is in it: copying and scanning all
        # of it on every receive was a few percent of the daemon's CPU under small batches.
        if self._marked and ends_session(b"".join(c for c, _ in self._chunks)[-TAIL:]):
            self.transport.abort()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def close_on_session_end(conn: asyncpg.Connection) -> bool:
    """Put the guard between `conn`'s transport and its protocol; False when asyncpg's
    connection no longer looks as expected (tests/test_session_end.py then fails): the daemon
    still recovers, after io_timeout."""
    transport = getattr(conn, "_transport", None)  # asyncpg has no public handle on it
    inner = getattr(conn, "_protocol", None)
    if (
        isinstance(transport, asyncio.Transport)
        and isinstance(inner, asyncio.Protocol)
        and transport.get_protocol() is inner
    ):
        transport.set_protocol(_SessionEndGuard(transport, inner))
        return True
    log.warning("cannot watch this connection for the end of its session; a lost close waits for io_timeout")
    return False
