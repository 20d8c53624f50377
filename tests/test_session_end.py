"""A server that ends a session sends a FATAL error, then closes: the daemon's connection must
fail at once on the FATAL, not when the close arrives (it may never: a lost FIN), and not after
io_timeout.

These run asyncpg for real through tests/proxy.py, which holds the close back; they fail if
asyncpg changes the internals dbsync.daemon.pg.close_on_session_end relies on.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from dbsync.daemon import pg
from tests.helpers import DbPair
from tests.proxy import Proxy

IO_TIMEOUT = 30.0  # far above what the tests allow: recovering by io_timeout fails them
PROMPT = 5.0


def _active(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row == ("active",)


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Poll `predicate` with the event loop running (the statement must be sent meanwhile)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _terminate(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def _connect(proxy: Proxy, dsn: str) -> asyncpg.Connection:
    return await pg.connect(proxy.route(dsn), "Site", io_timeout=IO_TIMEOUT)


def test_fatal_mid_statement_fails_the_statement_at_once(pair: DbPair) -> None:
    """pg_terminate_backend while a statement runs; the socket's close is held back."""

    async def scenario() -> None:
        with Proxy("127.0.0.1", _port(pair.site_dsn)) as proxy:
            conn = await _connect(proxy, pair.site_dsn)
            pid = conn.get_server_pid()
            proxy.hold_eof()
            query = asyncio.ensure_future(conn.fetchval("SELECT pg_catalog.pg_sleep(60)"))
            await _until(lambda: _active(pair.site_dsn, pid), "the statement to run")
            _terminate(pair.site_dsn, pid)
            started = asyncio.get_running_loop().time()
            with pytest.raises(pg.CONNECTION_ERRORS) as caught:
                await asyncio.wait_for(query, PROMPT)
            assert not isinstance(caught.value, asyncio.TimeoutError), "the FATAL was not noticed"
            assert asyncio.get_running_loop().time() - started < PROMPT
            assert "terminating connection due to administrator command" in str(caught.value)
            assert pg.is_transient(caught.value)
            assert conn.is_closed()
            proxy.release_eof()

    asyncio.run(scenario())


def test_fatal_to_an_idle_session_closes_it_at_once(pair: DbPair) -> None:
    """The idle daemon's Site session is ended: its termination listener (which wakes the
    daemon to reconnect) runs now, not at the next statement."""

    async def scenario() -> None:
        with Proxy("127.0.0.1", _port(pair.site_dsn)) as proxy:
            conn = await _connect(proxy, pair.site_dsn)
            ended = asyncio.Event()
            conn.add_termination_listener(lambda _: ended.set())
            proxy.hold_eof()
            _terminate(pair.site_dsn, conn.get_server_pid())
            await asyncio.wait_for(ended.wait(), PROMPT)
            assert conn.is_closed()
            proxy.release_eof()

    asyncio.run(scenario())


def test_errors_that_do_not_end_the_session_leave_it_open(pair: DbPair) -> None:
    """An ERROR whose text says FATAL, and rows that do, are only that."""

    async def scenario() -> None:
        with Proxy("127.0.0.1", _port(pair.site_dsn)) as proxy:
            conn = await _connect(proxy, pair.site_dsn)
            with pytest.raises(asyncpg.RaiseError):
                await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'FATAL'; END $$")
            assert tuple(await conn.fetchrow("SELECT 'FATAL', 'x'")) == ("FATAL", "x")
            assert await conn.fetchval("SELECT 1") == 1
            assert not conn.is_closed()
            await conn.close()

    asyncio.run(scenario())


def _port(dsn: str) -> int:
    return int(psycopg.conninfo.conninfo_to_dict(dsn).get("port") or 5432)


# -- recognising the message ------------------------------------------------------------------
def _error(severity: bytes, *, localized: bool = True, code: bytes = b"57P01") -> bytes:
    fields = (b"S" + severity + b"\0" if localized else b"") + b"V" + severity + b"\0"
    fields += b"C" + code + b"\0" + b"Mterminating connection due to administrator command\0\0"
    return b"E" + struct.pack("!i", len(fields) + 4) + fields


ROW = b"D" + struct.pack("!ih", 11, 1) + struct.pack("!i", 1) + b"E"
READY = b"Z\0\0\0\x05I"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("tail", "ends"),
    [
        (ROW + _error(b"FATAL"), True),
        (_error(b"PANIC"), True),
        (_error(b"FATAL", localized=False), True),
        (_error(b"ERROR", code=b"P0001"), False),  # a statement's error: ReadyForQuery follows
        (_error(b"FATAL") + READY, False),  # not the last message
        (_error(b"FATAL")[:-3], False),  # not all of it yet
        (ROW + b"SFATAL\0VFATAL\0C57P01\0\0", False),  # no message starts there
        (b"", False),
    ],
)
def test_ends_session(tail: bytes, ends: bool) -> None:
    assert pg.ends_session(tail) is ends


class _Inner(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def _guard_fed(*chunks: bytes) -> bool:
    """Whether the guard aborts its transport once `chunks` have arrived, one receive each."""
    transport = _Transport()
    guard = pg._SessionEndGuard(transport, _Inner())  # type: ignore[arg-type]
    for chunk in chunks:
        guard.data_received(chunk)
    return transport.aborted


@pytest.mark.unit
@pytest.mark.parametrize("severity", [b"FATAL", b"PANIC"])
def test_the_guard_sees_a_fatal_split_anywhere_across_receives(severity: bytes) -> None:
    """The guard parses its tail only while a marker is in it: a marker cut in two by a receive,
    a message whose end comes receives after its marker, a message behind 20 kB of rows."""
    for before in (b"", ROW, ROW * 2000):
        stream = before + _error(severity)
        for cut in range(len(before), len(stream)):
            assert _guard_fed(stream[:cut], stream[cut:]), (len(before), cut)
    assert _guard_fed(*(bytes([b]) for b in ROW + _error(severity)))


@pytest.mark.unit
def test_the_guard_lets_ordinary_traffic_through() -> None:
    assert not _guard_fed(*([ROW * 30] * 1000), _error(b"ERROR", code=b"P0001"), READY)
    # A marker in row data is not a message, and ages out of the tail.
    assert not _guard_fed(b"xxFATAL\0yy" * 3, *([ROW * 30] * 100))
    assert not _guard_fed(_error(b"FATAL") + READY)
