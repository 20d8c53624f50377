"""A minimal HTTP/1.1 listener for /metrics, /healthz and /readyz.

GET and HEAD only, one request per connection, answered from memory: a scrape never waits on a
database. Anything a framework would add (keep-alive, chunking, TLS) is not needed by a metrics
scraper or a health probe; put a proxy in front for more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from functools import partial
from http import HTTPStatus

from dbsync.errors import ConfigError

log = logging.getLogger("dbsync.daemon")

# (status, content type, body)
Response = tuple[int, str, str]
Handler = Callable[[], Response]

READ_TIMEOUT = 5.0
MAX_REQUEST = 16 * 1024


def parse_address(value: str) -> tuple[str, int]:
    """Split "host:port" or "[v6 address]:port"."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"http must be host:port (for example 127.0.0.1:9187), got {value!r}")
    return host, int(port)


async def serve(address: str, routes: Mapping[str, Handler]) -> asyncio.Server:
    host, port = parse_address(address)
    try:
        server = await asyncio.start_server(partial(_handle, routes), host, port, limit=MAX_REQUEST)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    log.info("serving /metrics, /healthz and /readyz on http://%s", address)
    return server


async def _handle(routes: Mapping[str, Handler], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            return
        method, path = _request_line(head)
        extra: dict[str, str] = {}
        if method is None:
            status, ctype, body = 400, "text/plain", "bad request\n"
        elif path not in routes:
            status, ctype, body = 404, "text/plain", "not found\n"
        elif method not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain", "method not allowed\n"
            extra["Allow"] = "GET, HEAD"
        else:
            try:
                status, ctype, body = routes[path]()
            except Exception:
                log.exception("HTTP handler for %s failed", path)
                status, ctype, body = 500, "text/plain", "internal error\n"
        payload = body.encode()
        headers = {
            "Content-Type": ctype,
            "Content-Length": str(len(payload)),
            "Cache-Control": "no-store",
            "Connection": "close",
            **extra,
        }
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if method == "HEAD" else payload))
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def _request_line(head: bytes) -> tuple[str | None, str]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None, ""
    return parts[0], parts[1].split("?", 1)[0]
