"""Apply the SQL migrations in sql/ with yoyo, to the Site DB or the Agent DB, or roll them back.

A chain is the migrations of one role (sql/site: capture, sql/agent: apply). Each database gets
its own role's chain; `dbsync migrate --two-way` also gives each the other one, so that the Agent
DB captures what it changes and the Site DB can apply it (write-back). yoyo records both chains in
one _yoyo_migration table: their ids differ."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import psycopg
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import parse_uri

from dbsync.config import describe_dsn
from dbsync.db import connect, first_line, server_version
from dbsync.errors import MigrationError
from dbsync.protocol import AGENT_SCHEMA_MARK, LOCK_CLASS, SCHEMA_EXISTS, SITE_SCHEMA_MARK

log = logging.getLogger("dbsync.migrations")

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


# yoyo's record of what it applied, read without creating it (yoyo's backend would), in the
# connection's own search_path as yoyo does; and whether any daemon holds a source's lock.
HAS_RECORD = "SELECT pg_catalog.to_regclass('_yoyo_migration') IS NOT NULL"
RECORDED_IDS = "SELECT migration_id FROM _yoyo_migration"
HAS_SCHEMA = "SELECT pg_catalog.to_regnamespace('dbsync') IS NOT NULL"
DAEMON_RUNNING = """
SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = %(cls)s::int4::oid
      AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()))
"""


def _ids(side: str, pack_names: list[str]) -> set[str]:
    return {m.id for m in read_migrations(*(str(d) for d in migration_dirs(side, pack_names)))}


def _backend(dsn: str, *, uninstall: bool = False) -> PostgresqlPsycopgBackend:
    """A yoyo backend on our own connection, so any libpq DSN works (yoyo wants URLs).

    `uninstall`: every migration is to be rolled back, the sync log with them, so a rollback that
    would refuse to strand waiting events (0006_site_key_capture) need not: the session says so
    with `dbsync.uninstall = on`."""

    class Backend(PostgresqlPsycopgBackend):  # type: ignore[misc]  # yoyo has no type hints
        def connect(self, dburi: object) -> psycopg.Connection:
            conn = connect(dsn, "target", safe=False)
            if uninstall:
                conn.execute("SET dbsync.uninstall = on")
                conn.commit()
            return conn

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


def apply(dsn: str, side: str, pack_names: list[str], *, chain: str | None = None) -> list[str]:
    """Apply what is pending on one side; returns the ids applied. `chain`: the other side's
    migrations instead (two-way), without packs."""
    check(dsn, side)
    if chain is not None and chain != side:
        return _run(dsn, chain, [], rollback=False, side=side)
    return _run(dsn, side, pack_names, rollback=False)


def other(side: str) -> str:
    return next(s for s in SIDES if s != side)


# The roles dbsync applies with on a two-way database (sql/site/0013_site_write_back.sql): the
# login role migrating it is the one the daemon connects as with the same settings.
REGISTER_APPLIER = "SELECT dbsync.register_applier(SESSION_USER)"


def apply_two_way(dsn: str, side: str) -> list[str]:
    """Give one side the other side's chain too, and register the migrating role as the one
    dbsync applies with there (its sessions that say so are not captured)."""
    done = apply(dsn, side, [], chain=other(side))
    with connect(dsn, side.capitalize()) as conn:
        conn.execute(REGISTER_APPLIER)
    return done


def two_way(dsn: str, side: str) -> bool:
    """Whether a database also holds the other side's chain (`dbsync migrate --two-way`)."""
    mark = SITE_SCHEMA_MARK if side == "agent" else AGENT_SCHEMA_MARK
    with connect(dsn, side.capitalize()) as conn:
        return bool(conn.execute(SCHEMA_EXISTS.psycopg, {"rel": mark}).fetchone()[0])  # type: ignore[index]


# A migration that changes capture locks the replicated tables and the sync log while the
# application writes them, in whichever order its transactions take them, so it can lose a
# deadlock to a writer. Each migration is one transaction: the one that lost rolled back whole,
# and is run again (the ones before it stay applied).
DEADLOCK_RETRIES = 5


def _run(dsn: str, chain: str, pack_names: list[str], *, rollback: bool, side: str | None = None) -> list[str]:
    """Apply what is pending of a chain, or roll back what is applied (newest first), under
    yoyo's lock, on the `side` DB (default: the chain's own)."""
    side = side or chain
    migrations = read_migrations(*(str(d) for d in migration_dirs(chain, pack_names)))
    done: list[str] = []
    try:
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                with _backend(dsn, uninstall=rollback) as backend, backend.lock():
                    todo = backend.to_rollback(migrations) if rollback else backend.to_apply(migrations)
                    for migration in todo:
                        one = todo.filter(lambda m, mid=migration.id: m.id == mid)
                        if rollback:
                            backend.rollback_migrations(one)
                        else:
                            backend.apply_migrations(one)
                        done.append(migration.id)
                break
            except psycopg.errors.DeadlockDetected:
                if attempt == DEADLOCK_RETRIES:
                    raise
                log.warning("a migration lost a deadlock to the writers and rolled back whole; running it again")
    except psycopg.Error as exc:
        what = "rollback" if rollback else "migration"
        raise MigrationError(
            f"{what} on the {side.capitalize()} DB ({describe_dsn(dsn)}) failed: {first_line(exc)}"
        ) from None
    return done


def applied(dsn: str, side: str, pack_names: list[str]) -> list[str]:
    migrations = read_migrations(*(str(d) for d in migration_dirs(side, pack_names)))
    with _backend(dsn) as backend:
        return [m.id for m in migrations if backend.is_applied(m)]


def _recorded(dsn: str, role: str) -> tuple[set[str], bool, bool]:
    """The migration ids yoyo recorded, whether the dbsync schema exists, and whether a daemon runs."""
    with connect(dsn, role, safe=False) as conn:
        ids: set[str] = set()
        if conn.execute(HAS_RECORD).fetchone()[0]:  # type: ignore[index]
            ids = {str(r[0]) for r in conn.execute(RECORDED_IDS)}
        schema = bool(conn.execute(HAS_SCHEMA).fetchone()[0])  # type: ignore[index]
        running = bool(conn.execute(DAEMON_RUNNING, {"cls": LOCK_CLASS}).fetchone()[0])  # type: ignore[index]
    return ids, schema, running


def check_rollback(dsn: str, side: str, pack_names: list[str]) -> bool:
    """Whether there is anything to roll back. Refuses, changing nothing, a rollback of the wrong
    database: one of the other side's, one with a pack applied that was not named, or an Agent DB
    a daemon is applying to."""
    role = side.capitalize()
    check(dsn, side)
    where = f"the {role} DB ({describe_dsn(dsn)})"
    recorded, schema, running = _recorded(dsn, role)
    theirs = recorded & _ids(other(side), packs())
    if theirs and not recorded & _ids(side, packs()):
        raise MigrationError(
            f"{where} holds dbsync's {other(side).capitalize()} DB migrations ({', '.join(sorted(theirs))}), "
            f"not the {role} DB's: is the DSN the wrong one? nothing was rolled back"
        )
    if schema and not recorded & _ids(side, []):
        raise MigrationError(
            f"{where} has a dbsync schema that `dbsync migrate` did not create (yoyo has no record of it); "
            "nothing was rolled back"
        )
    for name in packs():
        if name not in pack_names and recorded & _ids(side, [name]) - _ids(side, []):
            raise MigrationError(
                f"{where} also has the pack {name!r} applied: add --pack {name} to roll it back too "
                "(that drops its tables); nothing was rolled back"
            )
    if running and (side == "agent" or recorded & _ids("agent", [])):
        raise MigrationError(
            f"a dbsync daemon is applying to {where}: stop every daemon first; nothing was rolled back"
        )
    return bool(recorded & _ids(side, pack_names))


def rollback(dsn: str, side: str, pack_names: list[str]) -> list[str]:
    """Roll back every dbsync migration applied on one side (and the packs named), newest first:
    the other side's chain first where `--two-way` installed it; returns the ids rolled back."""
    if not check_rollback(dsn, side, pack_names):
        return []  # nothing of dbsync's here: do not let yoyo create its tables either
    recorded, _, _ = _recorded(dsn, side.capitalize())
    done = []
    if recorded & _ids(other(side), []):
        done += _run(dsn, other(side), [], rollback=True, side=side)
    return done + _run(dsn, side, pack_names, rollback=True)
