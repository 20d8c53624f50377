"""Apply the SQL migrations in sql/ with yoyo, to the Site DB or the Agent DB."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import psycopg
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import parse_uri

from dbsync.config import describe_dsn
from dbsync.db import connect, first_line, server_version
from dbsync.errors import MigrationError

SIDES = ("site", "agent")
MIN_SERVER_VERSION = 130000


def sql_root() -> Path:
    return Path(str(resources.files("dbsync.sql")))


def packs() -> list[str]:
    return sorted(p.name for p in (sql_root() / "packs").iterdir() if p.is_dir())


def migration_dirs(side: str, pack_names: list[str]) -> list[Path]:
    dirs = [sql_root() / side]
    for name in pack_names:
        if name not in packs():
            raise MigrationError(f"unknown pack {name!r}; available: {', '.join(packs())}")
        dirs.append(sql_root() / "packs" / name / side)
    return dirs


def _backend(dsn: str) -> PostgresqlPsycopgBackend:
    """A yoyo backend on our own connection, so any libpq DSN works (yoyo wants URLs)."""

    class Backend(PostgresqlPsycopgBackend):  # type: ignore[misc]  # yoyo has no type hints
        def connect(self, dburi: object) -> psycopg.Connection:
            return connect(dsn, "target", safe=False)

    backend = Backend(parse_uri("postgresql+psycopg://"), "_yoyo_migration")
    backend.init_database()
    return backend


def check(dsn: str, side: str) -> None:
    """The database answers and runs a PostgreSQL dbsync supports."""
    role = side.capitalize()
    with connect(dsn, role) as conn:
        version = server_version(conn)
    if version < MIN_SERVER_VERSION:
        raise MigrationError(
            f"the {role} DB ({describe_dsn(dsn)}) runs PostgreSQL {version // 10000}; dbsync needs 13 or newer"
        )


def apply(dsn: str, side: str, pack_names: list[str]) -> list[str]:
    """Apply what is pending on one side; returns the ids applied."""
    role = side.capitalize()
    check(dsn, side)
    migrations = read_migrations(*(str(d) for d in migration_dirs(side, pack_names)))
    try:
        with _backend(dsn) as backend, backend.lock():
            todo = backend.to_apply(migrations)
            backend.apply_migrations(todo)
    except psycopg.Error as exc:
        raise MigrationError(f"migration on the {role} DB ({describe_dsn(dsn)}) failed: {first_line(exc)}") from None
    return [m.id for m in todo]


def applied(dsn: str, side: str, pack_names: list[str]) -> list[str]:
    migrations = read_migrations(*(str(d) for d in migration_dirs(side, pack_names)))
    with _backend(dsn) as backend:
        return [m.id for m in migrations if backend.is_applied(m)]
