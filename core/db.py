"""Connections for the CLI (psycopg) with failures turned into one clear line."""

from __future__ import annotations

import re
import weakref

import psycopg

from dbsync.config import describe_dsn, redact_dsn
from dbsync.errors import ConnectError

# What every session dbsync opens runs before anything else (the daemon's too, dbsync.daemon.pg):
# * names resolve in pg_catalog only (pg_temp is never searched for functions or operators), so
#   no function or operator another role created in public can shadow one dbsync calls, even a
#   bare `=` or unnest() in a catalog query (CVE-2018-1058 is this class);
# * a query that row-level security would filter fails instead of silently seeing fewer rows:
#   dbsync must see every row of a table or none.
# Plain SET statements, not startup parameters: poolers refuse startup parameters they do not know.
SAFE_SESSION = "SET search_path = pg_catalog, pg_temp; SET row_security = off"

# The search_path each connection had before SAFE_SESSION, to resolve table names as the user
# typed them (resolve_table below): a name means what it means in the user's own psql.
_user_paths: weakref.WeakKeyDictionary[psycopg.Connection, str] = weakref.WeakKeyDictionary()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def connect(dsn: str, role: str, *, autocommit: bool = True, safe: bool = True) -> psycopg.Connection:
    """Open a connection to the `role` ("Site" or "Agent") database.

    `safe=False` keeps the DSN's own search_path: only for migrations, whose SQL creates objects
    where the DBA's search_path says (yoyo's bookkeeping tables, a missing extension)."""
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10)
    except psycopg.Error as exc:
        reason = redact_dsn(first_line(exc))
        raise ConnectError(f"cannot connect to the {role} DB ({describe_dsn(dsn)}): {reason}") from None
    conn.execute("SET application_name = 'dbsync'")
    if safe:
        row = conn.execute("SHOW search_path").fetchone()
        _user_paths[conn] = str(row[0]) if row else '"$user", public'
        conn.execute(SAFE_SESSION)
        if not autocommit:
            conn.commit()
    return conn


def user_search_path(conn: psycopg.Connection) -> str:
    """The search_path the connection had before dbsync made it safe."""
    return _user_paths.get(conn, '"$user", public')


def resolve_table_oid(conn: psycopg.Connection, name: str) -> int | None:
    """The oid of a table name as the user typed it, looked up in the user's search_path.

    Only this one lookup runs under that path; its function is qualified and takes text, so an
    object planted in a schema of that path cannot take its place."""
    saved = conn.execute("SHOW search_path").fetchone()
    conn.execute("SELECT pg_catalog.set_config('search_path', %s, false)", (user_search_path(conn),))
    try:
        row = conn.execute(
            "SELECT pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid", (name,)
        ).fetchone()
    finally:
        conn.execute(
            "SELECT pg_catalog.set_config('search_path', %s, false)",
            (str(saved[0]) if saved else "pg_catalog, pg_temp",),
        )
    return int(row[0]) if row and row[0] is not None else None


def server_version(conn: psycopg.Connection) -> int:
    return int(conn.info.server_version)


_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")


def quote_ident(*parts: str) -> str:
    """A qualified identifier, every part quoted, needing no connection (what psycopg's
    `sql.Identifier(...).as_string(None)` gives from 3.2 on; 3.1 refuses without a connection)."""
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


def display_name(*parts: str) -> str:
    """schema.table as a user would type it: quoted only where PostgreSQL needs quotes."""
    return ".".join(p if _PLAIN.fullmatch(p) else '"' + p.replace('"', '""') + '"' for p in parts)
