"""Connections for the CLI (psycopg) with failures turned into one clear line."""

from __future__ import annotations

import re

import psycopg

from dbsync.config import describe_dsn, redact_dsn
from dbsync.errors import ConnectError


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def connect(dsn: str, role: str, *, autocommit: bool = True) -> psycopg.Connection:
    """Open a connection to the `role` ("Site" or "Agent") database."""
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10)
    except psycopg.Error as exc:
        reason = redact_dsn(first_line(exc))
        raise ConnectError(f"cannot connect to the {role} DB ({describe_dsn(dsn)}): {reason}") from None
    conn.execute("SET application_name = 'dbsync'")
    return conn


def server_version(conn: psycopg.Connection) -> int:
    return int(conn.info.server_version)


_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")


def display_name(*parts: str) -> str:
    """schema.table as a user would type it: quoted only where PostgreSQL needs quotes."""
    return ".".join(p if _PLAIN.fullmatch(p) else '"' + p.replace('"', '""') + '"' for p in parts)
