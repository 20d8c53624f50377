"""Connections for the CLI (psycopg) with failures turned into one clear line."""

from __future__ import annotations

import os
import re
import weakref
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from dbsync.config import describe_dsn, redact_dsn
from dbsync.errors import ConnectError
from dbsync.pooler import BACKEND_PID, check_own_session

# Seconds to wait for a connection when neither the DSN nor PGCONNECT_TIMEOUT says (libpq would
# wait forever).
DEFAULT_CONNECT_TIMEOUT = 10

# What every session dbsync opens runs before anything else but the pooler probe (dbsync.pooler),
# the daemon's too (dbsync.daemon.pg):
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


def timeout_kwargs(dsn: str) -> dict[str, Any]:
    """The connect_timeout to add: the DSN's own, or PGCONNECT_TIMEOUT, wins over our default."""
    try:
        own = "connect_timeout" in conninfo_to_dict(dsn)
    except psycopg.Error:
        own = False  # psycopg.connect reports the malformed DSN
    if own or os.environ.get("PGCONNECT_TIMEOUT"):
        return {}
    return {"connect_timeout": DEFAULT_CONNECT_TIMEOUT}


def _name_kwargs(dsn: str) -> dict[str, Any]:
    """"dbsync" as libpq's fallback_application_name, unless the DSN names one of its own: the
    DSN's application_name (or PGAPPNAME) wins over it, as in libpq."""
    try:
        own = "fallback_application_name" in conninfo_to_dict(dsn)
    except psycopg.Error:
        own = False
    return {} if own else {"fallback_application_name": "dbsync"}


def _open(dsn: str, role: str) -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, autocommit=True, **timeout_kwargs(dsn), **_name_kwargs(dsn))
    except psycopg.Error as exc:
        reason = redact_dsn(first_line(exc))
        raise ConnectError(f"cannot connect to the {role} DB ({describe_dsn(dsn)}): {reason}") from None


def _backend_pid(conn: psycopg.Connection) -> int:
    row = conn.execute(BACKEND_PID).fetchone()
    assert row is not None
    return int(row[0])


def refuse_transaction_pooler(conn: psycopg.Connection, dsn: str, role: str) -> None:
    """dbsync.pooler's probe: `conn` must be in autocommit, so each query is a transaction."""
    first = _backend_pid(conn)
    with _open(dsn, role) as probe:
        other = _backend_pid(probe)
    check_own_session(role, dsn, first, other, _backend_pid(conn))


def connect(dsn: str, role: str, *, autocommit: bool = True, safe: bool = True) -> psycopg.Connection:
    """Open a connection to the `role` ("Site" or "Agent") database.

    `safe=False` keeps the DSN's own search_path: only for migrations, whose SQL creates objects
    where the DBA's search_path says (yoyo's bookkeeping tables, a missing extension)."""
    conn = _open(dsn, role)
    try:
        # Before any SET: through a transaction-mode pooler it would stay on a shared server.
        refuse_transaction_pooler(conn, dsn, role)
        if safe:
            row = conn.execute("SHOW search_path").fetchone()
            _user_paths[conn] = str(row[0]) if row else '"$user", public'
            conn.execute(SAFE_SESSION)
        conn.autocommit = autocommit
    except BaseException:
        conn.close()
        raise
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
        row = conn.execute("SELECT pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid", (name,)).fetchone()
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
