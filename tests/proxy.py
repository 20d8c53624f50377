"""A TCP proxy for fault tests: put it between the daemon and a database, then break the link.

    with Proxy("127.0.0.1", 5432) as proxy:
        dsn = proxy.route(dsn)   # the same DSN, through the proxy
        proxy.cut()              # every open connection dies at once, both ways (RST)
        proxy.stall()            # connections stay open but no byte moves, new ones included
        proxy.resume()
        proxy.reject()           # new connections are refused (nothing listens on the port)
        proxy.accept()
        proxy.hold_eof()         # a side that closes is not seen closing by the other (a lost FIN)
        proxy.release_eof()

It runs an asyncio loop in a daemon thread; the public methods are called from the test's
thread and return once the proxy is in the new state.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

from psycopg.conninfo import make_conninfo

T = TypeVar("T")
CHUNK = 64 * 1024


class _Link:
    """One client connection and, once made, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.closed = asyncio.Event()

    def abort(self) -> None:
        """Drop both sides at once, without flushing (the peers see a reset)."""
        self.closed.set()
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()

    def close(self) -> None:
        """Close both sides after flushing what was already forwarded."""
        self.closed.set()
        for writer in (self.client, self.upstream):
            if writer is not None and not writer.transport.is_closing():
                writer.close()


class Proxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.accepted = 0  # connections accepted so far (a reconnect shows up here)
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._eof_flowing: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-proxy", daemon=True)

    # -- control, from the test's thread ---------------------------------------------------
    def start(self) -> Self:
        self._thread.start()
        self._call(self._start())
        return self

    def route(self, dsn: str) -> str:
        """`dsn` with its host and port replaced by the proxy's."""
        return make_conninfo(dsn, host=self.host, port=str(self.port))

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return self._call(self._count())

    def cut(self) -> int:
        """Close every open connection both ways at once; returns how many. New ones are accepted."""
        return self._call(self._cut())

    def stall(self) -> None:
        """Stop forwarding bytes in both directions, on open and new connections alike."""
        self._call(self._set_flowing(False))

    def resume(self) -> None:
        self._call(self._set_flowing(True))

    def hold_eof(self) -> None:
        """Bytes still flow, but when one end closes, the other is not told (until release_eof or
        cut): the peer keeps a half-dead connection, as when a FIN is lost on the way."""
        self._call(self._set_event("eof", False))

    def release_eof(self) -> None:
        self._call(self._set_event("eof", True))

    def reject(self) -> None:
        """Refuse new connections (the port stops listening); open ones carry on."""
        self._call(self._stop_listening())

    def accept(self) -> None:
        self._call(self._listen())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # -- inside the loop -------------------------------------------------------------------
    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._eof_flowing = asyncio.Event()
        self._eof_flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        # The same port every time, so that DSNs routed earlier stay valid.
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()  # closes the listening socket; open connections are not touched
            self._server = None

    async def _count(self) -> int:
        return len(self._links)

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        return len(links)

    async def _set_flowing(self, flowing: bool) -> None:
        await self._set_event("bytes", flowing)

    async def _set_event(self, which: str, on: bool) -> None:
        event = self._flowing if which == "bytes" else self._eof_flowing
        assert event is not None
        if on:
            event.set()
        else:
            event.clear()

    async def _shutdown(self) -> None:
        await self._stop_listening()
        # Aborted links end their own handlers (cancelling them would upset asyncio.streams).
        await self._cut()
        await self._set_event("bytes", True)
        await self._set_event("eof", True)
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    async def _wait_flowing(self, link: _Link, event: asyncio.Event | None = None) -> bool:
        """Wait while stalled (or `event` is clear); False when the link was closed meanwhile."""
        event = event or self._flowing
        assert event is not None
        if not event.is_set():
            flowing = asyncio.ensure_future(event.wait())
            closed = asyncio.ensure_future(link.closed.wait())
            try:
                await asyncio.wait({flowing, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                flowing.cancel()
                closed.cancel()
        return not link.closed.is_set()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(client_writer)
        self._links.add(link)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            # A new connection stalls too: it reaches the server only once bytes flow again.
            if not await self._wait_flowing(link):
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the server is down: the client sees its connection closed
            link.upstream = upstream_writer
            if link.closed.is_set():  # cut while connecting
                upstream_writer.transport.abort()
                return
            await asyncio.gather(
                self._pump(client_reader, upstream_writer, link),
                self._pump(upstream_reader, client_writer, link),
            )
        finally:
            if not link.closed.is_set():
                link.close()
            self._links.discard(link)
            self._handlers.discard(handler)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while not link.closed.is_set():
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""  # a reset counts as the end of the stream
                # Bytes, and the end of the stream, wait here while the link is stalled: a stalled
                # network delivers neither.
                if not await self._wait_flowing(link):
                    return
                if not data:
                    # The end of the stream also waits while EOFs are held.
                    await self._wait_flowing(link, self._eof_flowing)
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            # One direction ended (EOF, reset or cut): the other cannot be used any more either.
            with contextlib.suppress(Exception):
                link.close()
