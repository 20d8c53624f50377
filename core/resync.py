"""Calls of the Site DB's resync functions (sql/site/0002_site_resync.sql), one short
transaction per call, at READ COMMITTED, retried when a lock is not granted in time.

The lock timeout sits below the server's deadlock_timeout (1 s by default): when a resync and an
application transaction wait for each other, the resync gives up and retries before deadlock
detection could pick the application's transaction as the victim.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import psycopg
from psycopg import sql

from dbsync.db import first_line
from dbsync.errors import DbsyncError, SchemaError
from dbsync.rls import from_error, is_rls_error

log = logging.getLogger("dbsync.resync")

LOCK_TIMEOUT = "500ms"
ATTEMPTS = 20


class ResyncError(DbsyncError):
    """The Site DB refused or kept blocking a resync."""


def regclass(conn: psycopg.Connection, schema: str, name: str) -> str:
    return sql.Identifier(schema, name).as_string(conn)


def call(site: psycopg.Connection, statement: str, params: tuple[Any, ...], what: str) -> Any:
    """Run `statement` (one resync function call) in its own transaction; returns its value."""
    delay = 0.05
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with site.transaction():
                site.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                site.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                row = site.execute(statement, params).fetchone()
            assert row is not None
            return row[0]
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            if attempt == ATTEMPTS:
                raise ResyncError(
                    f"{what}: other transactions kept holding locks for {ATTEMPTS} attempts; try again later"
                ) from None
            log.debug("%s: lock not granted (attempt %d); retrying", what, attempt)
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 2.0)
        except psycopg.errors.UndefinedFunction as exc:
            if "dbsync." not in first_line(exc):  # e.g. an operator the function's own statements lack
                raise ResyncError(f"{what}: {first_line(exc)}") from None
            raise SchemaError("the Site DB lacks the resync functions: run `dbsync migrate`") from None
        except psycopg.Error as exc:
            if is_rls_error(exc):  # the function's owner would see only some rows
                raise from_error(exc, "Site") from None
            raise ResyncError(f"{what}: {first_line(exc).removeprefix('dbsync: ')}") from None
    raise AssertionError("unreachable")


def resync_keys(
    site: psycopg.Connection, schema: str, name: str, keys: list[str], chunk: int = 1000
) -> tuple[int, int]:
    """Log the current state of the rows with `keys` (JSON key objects); (updated, deleted)."""
    updated = deleted = 0
    rel = regclass(site, schema, name)
    for start in range(0, len(keys), chunk):
        part = "[" + ",".join(keys[start : start + chunk]) + "]"
        result = call(
            site, "SELECT dbsync.resync_keys(%s::regclass, %s::json)", (rel, part), f"resync of {schema}.{name}"
        )
        updated += int(result["updated"])
        deleted += int(result["deleted"])
    return updated, deleted
