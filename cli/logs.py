"""Logging for every command: human-readable lines, or one JSON object per line for collectors.

Both formats pass the finished line through redact_dsn, a last guard in case some message (or
a driver's traceback) ever quotes a connection string: messages are meant to be safe already.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from dbsync.config import redact_dsn

_format = "text"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact_dsn(super().format(record))


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message"[, "exception"]}; time is UTC, ISO 8601."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_dsn(record.getMessage()),
        }
        if record.exc_info:
            line["exception"] = redact_dsn(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


def setup(level: str, fmt: str) -> None:
    global _format
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # asyncpg logs a full traceback when a listener connection dies; we report it ourselves.
    logging.getLogger("asyncpg").setLevel(logging.CRITICAL)
    # httpx logs every request with its full URL, and a webhook URL's path is often its token.
    # yoyo narrates every migration step at INFO; `dbsync migrate` prints what it applied.
    for name in ("httpx", "httpcore", "yoyo"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fatal(message: str) -> None:
    """The one line a failing command ends with: plain text, or a JSON log line."""
    if _format == "json":
        logging.getLogger("dbsync").error("%s", message)
    else:
        print(f"dbsync: error: {message}", file=sys.stderr)
