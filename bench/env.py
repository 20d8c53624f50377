"""The benchmark's world: two throwaway clusters, template databases, machine facts.

Server settings. LocalCluster.init() writes test-friendly settings (fsync, synchronous_commit
and full_page_writes off). A Site DB in production runs with PostgreSQL's defaults, and the
cost that matters most here (NOTIFY's database-wide lock, held through the commit's WAL flush)
only shows when the flush is real, so every measurement runs DURABLE unless the caller asks
for FAST. Both clusters, and both sides of every comparison, always run the same settings.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from dbsync import migrations
from dbsync.embedded.cluster import LocalCluster, default_bindir

T = TypeVar("T")
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TABLES = ("public.conversations", "public.leads", "public.whatsapp_messages")
SITE_TEMPLATE = "bench_tmpl_site"
AGENT_TEMPLATE = "bench_tmpl_agent"

# Appended after LocalCluster.init(): the last setting in postgresql.conf wins.
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
# Common to both modes: no checkpoint forced by WAL volume in the middle of a timed phase
# (each timed phase starts right after an explicit CHECKPOINT instead).
COMMON = {"max_wal_size": "'8GB'", "checkpoint_timeout": "'30min'"}


class BenchError(Exception):
    """A benchmark step failed or timed out; the message says which."""


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10, **kwargs)


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll until `predicate` returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Ask a helper process (started with start_new_session) to stop; kill its group if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class Server:
    cluster: LocalCluster

    @property
    def admin_dsn(self) -> str:
        return str(self.cluster.dsn())

    def dsn(self, dbname: str) -> str:
        return str(self.cluster.dsn(dbname))

    def create_db(self, name: str, template: str | None = None) -> str:
        with connect(self.admin_dsn) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                stmt += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
            conn.execute(stmt)
        return self.dsn(name)

    def drop_db(self, name: str) -> None:
        with connect(self.admin_dsn) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def checkpoint(self) -> None:
        with connect(self.admin_dsn) as conn:
            conn.execute("CHECKPOINT")

    def set_mode(self, settings: dict[str, str]) -> None:
        """Switch fsync/synchronous_commit/full_page_writes at runtime (all reloadable)."""
        with connect(self.admin_dsn) as conn:
            for name, value in settings.items():
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
            conn.execute("SELECT pg_reload_conf()")
            # The reload is asynchronous; a new session sees it once the postmaster has re-read.
            wait_for(lambda: _shows(self.admin_dsn, settings), 10, "the settings reload")
        self.checkpoint()

    def version(self) -> str:
        with connect(self.admin_dsn) as conn:
            return str(conn.execute("SELECT version()").fetchone()[0])  # type: ignore[index]


def _shows(dsn: str, settings: dict[str, str]) -> bool:
    with connect(dsn) as conn:
        return all(
            conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(k))).fetchone()[0] == v  # type: ignore[index]
            for k, v in settings.items()
        )


@dataclass
class World:
    site: Server
    agent: Server
    mode: str  # "durable" or "fast"


def _start(name: str, mode: str, bindir: Path | None, port: int | None) -> LocalCluster:
    cluster = LocalCluster(bindir, name=name)
    if port is not None:
        cluster.port = port  # before init(), which writes it into postgresql.conf
    cluster.init()
    conf = cluster.datadir / "postgresql.conf"
    with conf.open("a") as fh:
        fh.write(f"\n# dbsync benchmark ({mode})\n")
        for key, value in {**(DURABLE if mode == "durable" else FAST), **COMMON}.items():
            fh.write(f"{key} = {value}\n")
    try:
        cluster.start()
    except Exception:
        cluster.destroy()
        raise
    return cluster


@contextmanager
def world(mode: str, bindir: Path | None = None, ports: tuple[int, int] | None = None) -> Iterator[World]:
    """Two clusters (Site, Agent) with the benchmark templates; destroyed however we leave.

    `bindir` picks another PostgreSQL installation than the embedded wheel's (the Londiste
    comparison runs on Debian's PostgreSQL 15); `ports` fixes the two ports instead of free ones."""
    clusters: list[LocalCluster] = []
    site_port, agent_port = ports if ports is not None else (None, None)
    try:
        clusters.append(_start("bench-site", mode, bindir, site_port))
        clusters.append(_start("bench-agent", mode, bindir, agent_port))
        w = World(Server(clusters[0]), Server(clusters[1]), mode)
        _templates(w)
        yield w
    finally:
        for cluster in clusters:
            cluster.destroy()


def _templates(w: World) -> None:
    site_dsn = w.site.create_db(SITE_TEMPLATE)
    migrations.apply(site_dsn, "site", ["whatsapp"])
    with connect(site_dsn) as conn:
        conn.execute((BENCH_DIR / "sql" / "site.sql").read_text())
    agent_dsn = w.agent.create_db(AGENT_TEMPLATE)
    migrations.apply(agent_dsn, "agent", ["whatsapp"])
    with connect(agent_dsn) as conn:
        conn.execute((BENCH_DIR / "sql" / "agent.sql").read_text())


def uncapture(site_dsn: str) -> None:
    """Make a Site database a plain one: the same tables, no dbsync triggers."""
    with connect(site_dsn) as conn:
        for table in TABLES:
            conn.execute("SELECT dbsync.remove_table(%s::regclass)", (table,))
        left = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE 'dbsync%'"
        ).fetchone()[0]  # type: ignore[index]
        if left:
            raise BenchError("dbsync triggers are still installed after remove_table")


def table_digest(dsn: str) -> dict[str, list[int]]:
    """Row count and an order-free hash of every row's text, per replicated table."""
    out: dict[str, list[int]] = {}
    with connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET extra_float_digits = 3")
        for table in TABLES:
            name = sql.SQL(table)
            count, digest = conn.execute(
                sql.SQL("SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0) FROM {} t").format(name)
            ).fetchone()  # type: ignore[misc]
            out[table] = [int(count), int(digest)]
    return out


# -- machine facts --------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_facts() -> dict[str, Any]:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines() if ln.startswith("model name")),
        platform.processor() or "?",
    )
    mem_kb = next((int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines() if ln.startswith("MemTotal:")), 0)
    dirty = [ln for ln in _git("status", "--porcelain").splitlines() if ln]
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "postgres_bindir": str(default_bindir()),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_files": dirty,
        "loadavg_start": _read("/proc/loadavg").split()[:3],
    }
