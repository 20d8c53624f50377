"""Row-level security: dbsync reads every row of a replicated table, or refuses.

A role subject to a policy sees only the rows the policy shows it, silently. Every session dbsync
opens runs with row_security = off (dbsync.db.SAFE_SESSION), so such a read fails instead
(SQLSTATE 42501). This module checks up front, from the catalog, so that a command refuses before
it does any work, and turns the server's error into the same one line where the check could not
run first.

A role sees every row when RLS is not enabled on the table, when it is a superuser or has
BYPASSRLS, or when it owns the table (is a member of the owner) and FORCE ROW LEVEL SECURITY is
off: PostgreSQL's own rule (check_enable_rls), which row_security_active() applies to the
current user.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import psycopg
from psycopg import sql

from dbsync.db import display_name, first_line
from dbsync.errors import SchemaError

FIX = (
    "it must own the table (without FORCE ROW LEVEL SECURITY) or have BYPASSRLS "
    "(on Supabase the postgres role has BYPASSRLS)"
)


class RowSecurityError(SchemaError):
    """Row-level security would hide rows from a role that must read them all.

    A configuration problem, like a missing column: never a bad row to park."""


def refusal(
    table: str, role: str | None, where: str | None, reads: str = "dbsync must read every row"
) -> RowSecurityError:
    who = f"role {role}" if role else "dbsync's role"
    on = f" on the {where} DB" if where else ""
    return RowSecurityError(f"row-level security on table {table} hides rows from {who}{on}; {reads}: {FIX}")


# The current user's view: the tables among %(rels)s (oids) whose rows RLS would filter.
FILTERED_FOR_ME = """
SELECT n.nspname, c.relname, current_user::text
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE c.oid OPERATOR(pg_catalog.=) ANY (%(rels)s::pg_catalog.oid[]) AND pg_catalog.row_security_active(c.oid)
ORDER BY n.nspname, c.relname
"""

# The same rule for the owner of a SECURITY DEFINER function %(fn)s (a regprocedure text).
FILTERED_FOR_DEFINER = """
SELECT n.nspname, c.relname, r.rolname::text
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
JOIN pg_catalog.pg_roles r
  ON r.oid OPERATOR(pg_catalog.=) (SELECT p.proowner FROM pg_catalog.pg_proc p
                                   WHERE p.oid OPERATOR(pg_catalog.=) %(fn)s::pg_catalog.regprocedure)
WHERE c.oid OPERATOR(pg_catalog.=) ANY (%(rels)s::pg_catalog.oid[])
  AND c.relrowsecurity AND NOT r.rolsuper AND NOT r.rolbypassrls
  AND (c.relforcerowsecurity OR NOT pg_catalog.pg_has_role(r.oid, c.relowner, 'USAGE'))
ORDER BY n.nspname, c.relname
"""

# The Site functions that read replicated tables for backfill and repair (sql/site/0002, 0004).
RESYNC_FUNCTION = "dbsync.resync_range(pg_catalog.regclass, pg_catalog.json, integer)"


def _oids(conn: psycopg.Connection, tables: Sequence[tuple[str, str]]) -> list[int]:
    out = []
    for schema, name in tables:
        row = conn.execute(
            "SELECT pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid",
            (sql.Identifier(schema, name).as_string(conn),),
        ).fetchone()
        if row and row[0] is not None:
            out.append(int(row[0]))
    return out


def require_all_rows(conn: psycopg.Connection, tables: Sequence[tuple[str, str]], where: str) -> None:
    """Refuse unless this connection's role reads every row of `tables` (schema, name)."""
    row = conn.execute(FILTERED_FOR_ME, {"rels": _oids(conn, tables)}).fetchone()
    if row is not None:
        raise refusal(display_name(row[0], row[1]), row[2], where)


def require_definer_reads_all(site: psycopg.Connection, tables: Sequence[tuple[str, str]], what: str) -> None:
    """Refuse unless the owner of the Site's resync functions reads every row of `tables`."""
    row = site.execute(FILTERED_FOR_DEFINER, {"rels": _oids(site, tables), "fn": RESYNC_FUNCTION}).fetchone()
    if row is not None:
        raise refusal(
            display_name(row[0], row[1]),
            row[2],
            "Site",
            f"it owns dbsync's resync functions, and {what} must read every row",
        )


_POLICY_TABLE = re.compile(r'row.level security policy for table "((?:[^"]|"")*)"')


def is_rls_error(exc: BaseException) -> bool:
    """The server refused a read that row-level security would have filtered (row_security off)."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    text = str(exc)
    return sqlstate == "42501" and ("row-level security" in text or "row level security" in text)


def error_table(exc: BaseException) -> str | None:
    """The table the server's RLS error names (without its schema)."""
    match = _POLICY_TABLE.search(first_line(exc))
    return match.group(1).replace('""', '"') if match else None


def from_error(exc: BaseException, where: str | None, role: str | None = None) -> RowSecurityError:
    """The one line for the server's RLS error."""
    table = error_table(exc)
    return refusal(display_name(table) if table else "(unnamed)", role, where)


# Where the daemon meets the error: the table of that name whose rows RLS filters for this role.
LOCATE_ASYNCPG = """
SELECT n.nspname, c.relname, current_user::pg_catalog.text
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE c.relname OPERATOR(pg_catalog.=) $1::pg_catalog.name AND pg_catalog.row_security_active(c.oid)
ORDER BY n.nspname LIMIT 1
"""

ACTIVE_ASYNCPG = "SELECT pg_catalog.row_security_active($1::pg_catalog.oid), current_user::pg_catalog.text"
