"""Test helpers: database pairs, waiting on conditions, comparing both sides, running the daemon."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dbsync.config import Settings
from dbsync.daemon.runner import Replicator
from dbsync.embedded.cluster import LocalCluster

T = TypeVar("T")
WHATSAPP_TABLES = ("public.conversations", "public.leads", "public.whatsapp_messages")


@dataclass
class Server:
    admin_dsn: str
    cluster: LocalCluster | None

    def dsn_for(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)


@dataclass
class DbPair:
    site_dsn: str
    agent_dsn: str
    site_server: Server
    agent_server: Server
    _conns: list[psycopg.Connection] = field(default_factory=list)

    def site(self) -> psycopg.Connection:
        conn = psycopg.connect(self.site_dsn, autocommit=True)
        self._conns.append(conn)
        return conn

    def agent(self) -> psycopg.Connection:
        conn = psycopg.connect(self.agent_dsn, autocommit=True)
        self._conns.append(conn)
        return conn

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {"site_dsn": self.site_dsn, "agent_dsn": self.agent_dsn,
                                  "retry_initial": 0.05, "retry_max": 0.5, "poll_interval": 0.5}
        values.update(overrides)
        return Settings(**values)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DBSYNC_SITE_DSN"] = self.site_dsn
        env["DBSYNC_AGENT_DSN"] = self.agent_dsn
        return env

    def close(self) -> None:
        for conn in self._conns:
            conn.close()


# One row per logged key after a seq, in log order: (seq, txid, table_id, op, key, row image), the
# key and the image (events written before key-only capture, and resync's) as JSON text. A log
# row of a statement carries many keys (`keys`); a row trigger's one (`pk`); a TRUNCATE none.
LOGGED_KEYS = """
SELECT l.seq, l.txid::text, l.table_id, l.op::text, k.key::text, dbsync.key_json(l.row_image)::text
FROM dbsync.sync_log l
JOIN dbsync.replicated_tables r USING (table_id)
LEFT JOIN LATERAL dbsync.log_keys(l.pk, l.keys, r.key_columns) AS k ON true
WHERE l.seq > %s
ORDER BY l.seq, k.key_no
"""


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def sync_once(pair: DbPair, **overrides: Any) -> Replicator:
    """Run the daemon in-process with --once semantics."""
    replicator = Replicator(pair.settings(**overrides))
    asyncio.run(replicator.run(once=True))
    return replicator


def rows_of(dsn: str, table: str) -> list[str]:
    """Every row as PostgreSQL's own text, in key order, with exact float output."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The name resolves in the test's search_path; everything after runs in pg_catalog alone,
        # so functions a test's hostile role planted in public never run here (tests/test_hijack.py).
        table = str(conn.execute("SELECT %s::regclass::oid", (table,)).fetchone()[0])  # type: ignore[index]
        conn.execute("SET search_path = pg_catalog, pg_temp")
        table = str(conn.execute("SELECT %s::oid::regclass::text", (table,)).fetchone()[0])  # type: ignore[index]
        conn.execute("SET extra_float_digits = 3")
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET IntervalStyle = 'postgres'")
        conn.execute("SET DateStyle = 'ISO, YMD'")
        conn.execute("SET bytea_output = 'hex'")
        keys = conn.execute(
            "SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord) FROM pg_index i "
            "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (table,),
        ).fetchone()[0]  # type: ignore[index]
        cols = conn.execute(
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attname) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,),
        ).fetchone()[0]  # type: ignore[index]
        if keys is None:  # no primary key (identity or insert-only tables): the rows as a sorted multiset
            return sorted(r[0] for r in conn.execute(f"SELECT ROW({cols})::text FROM {table} t").fetchall())
        return [r[0] for r in conn.execute(f"SELECT ROW({cols})::text FROM {table} t ORDER BY {keys}").fetchall()]


def assert_same(pair: DbPair, tables: Iterable[str] = WHATSAPP_TABLES) -> None:
    for table in tables:
        site, agent = rows_of(pair.site_dsn, table), rows_of(pair.agent_dsn, table)
        if site != agent:
            only_site = [r for r in site if r not in set(agent)][:3]
            only_agent = [r for r in agent if r not in set(site)][:3]
            raise AssertionError(
                f"{table} differs: site {len(site)} rows, agent {len(agent)} rows; "
                f"only on site e.g. {only_site}; only on agent e.g. {only_agent}"
            )


# For each table (by oid): its name and its columns in rows_of's order.
_SHAPES = """
SELECT u.oid::regclass::text,
       (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attname) FROM pg_attribute
        WHERE attrelid = u.oid AND attnum > 0 AND NOT attisdropped)
FROM unnest(%s::oid[]) WITH ORDINALITY u(oid, ord) ORDER BY u.ord
"""


# same() polls through one connection per database, kept between calls (a new backend costs more
# than the fingerprint of a few thousand rows); close_poll_connections() closes them after each test.
_poll_conns: dict[str, psycopg.Connection] = {}
_poll_lock = threading.Lock()


def close_poll_connections() -> None:
    with _poll_lock:
        for conn in _poll_conns.values():
            conn.close()
        _poll_conns.clear()


def _fingerprints(dsn: str, tables: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The server's version and encoding and, per table, its row count and the sum of the hashes
    of rows_of's text of each row, computed in the database: two numbers a table come back."""
    with _poll_lock:
        for retry in (False, True):
            conn = _poll_conns.get(dsn)
            kept = conn is not None and not conn.closed and not conn.broken
            if conn is None or not kept:
                conn = _poll_conns[dsn] = psycopg.connect(dsn, autocommit=True)
            try:
                return _fingerprints_on(conn, tables)
            except psycopg.OperationalError:
                if not conn.broken:
                    raise
                conn.close()
                del _poll_conns[dsn]
                if retry or not kept:
                    raise  # a new connection failed: the server is down, as rows_of would find
        raise AssertionError("unreachable")


def _fingerprints_on(conn: psycopg.Connection, tables: list[str]) -> tuple[str, list[tuple[int, int]]]:
    # As in rows_of: names resolve in the test's search_path, the rest runs in pg_catalog alone.
    conn.execute("RESET search_path")
    oids, encoding = conn.execute(
        "SELECT array_agg(t::regclass::oid ORDER BY ord), current_setting('server_encoding') "
        "FROM unnest(%s::text[]) WITH ORDINALITY u(t, ord)",
        (tables,),
    ).fetchone()  # type: ignore[misc]
    conn.execute(
        "SET search_path = pg_catalog, pg_temp; SET extra_float_digits = 3; SET TimeZone = 'UTC'; "
        "SET IntervalStyle = 'postgres'; SET DateStyle = 'ISO, YMD'; SET bytea_output = 'hex'"
    )
    parts = [
        f'SELECT {i}, count(*), coalesce(sum(hashtext(ROW({cols})::text COLLATE "C")), 0) FROM {table} t'
        for i, (table, cols) in enumerate(conn.execute(_SHAPES, (oids,)).fetchall())
    ]
    rows = conn.execute(" UNION ALL ".join(parts) + " ORDER BY 1").fetchall()
    return f"{conn.info.server_version} {encoding}", [(int(n), int(h)) for _, n, h in rows]


def same(pair: DbPair, tables: Iterable[str] = WHATSAPP_TABLES) -> bool:
    """Whether the tables are identical on both sides (rows_of's exact comparison), cheap enough to
    poll every few milliseconds: fingerprints computed in each database first (equal rows give
    equal fingerprints on servers of one version and encoding), and the rows are fetched and compared only once
    those agree."""
    tables = list(tables)
    site, agent = _fingerprints(pair.site_dsn, tables), _fingerprints(pair.agent_dsn, tables)
    if site[0] == agent[0] and site[1] != agent[1]:
        return False
    return all(rows_of(pair.site_dsn, t) == rows_of(pair.agent_dsn, t) for t in tables)


SEED_ENV = "DBSYNC_TEST_SEED"


def pick_seed() -> int:
    """The seed of a randomised test: $DBSYNC_TEST_SEED when set (to replay a failure exactly),
    else a new random one. Use it through the `seed` fixture, which reports it when the test fails."""
    value = os.environ.get(SEED_ENV, "").strip()
    return int(value) if value else random.SystemRandom().randrange(1 << 31)


def count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]


def dbsync_cmd(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbsync", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


class Daemon:
    """`dbsync run` as a real subprocess, so it can be SIGKILLed."""

    def __init__(self, pair: DbPair, *extra: str, log_path: Path | None = None) -> None:
        env = pair.env()
        env["DBSYNC_RETRY_INITIAL"] = "0.05"
        env["DBSYNC_RETRY_MAX"] = "0.5"
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dbsync", "run", "--poll-interval", "0.5", *extra],
            env=env,
            stdout=self._log,
            stderr=self._log,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 10) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        if self.log_path:
            self._log.close()  # type: ignore[union-attr]

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def replicate(pair: DbPair, ddl: str, *tables: str, agent_ddl: str | None = None) -> None:
    """Create tables on both sides (`agent_ddl` when the Agent's definition differs), then capture
    `tables` on the Site."""
    pair.site().execute(ddl)
    pair.agent().execute(agent_ddl if agent_ddl is not None else ddl)
    site = pair.site()
    for table in tables:
        site.execute("SELECT dbsync.add_table(%s::regclass)", (table,))
