"""The WhatsApp pack installed two-way (issue 12, item 5): `dbsync migrate --pack whatsapp
--two-way` registers `leads` for write-back with the Agent owning stage and score, as a DBA
without superuser; a one-way install stays one-way."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dbsync.daemon.runner import Replicator
from tests.helpers import DbPair, dbname, dbsync_cmd

REGISTERED = (
    "SELECT schema_name, table_name, conflict, agent_owns FROM dbsync.replicated_tables "
    "WHERE removed_at IS NULL ORDER BY 1, 2"
)


@pytest.fixture
def dba_pair(bare_pair: DbPair) -> Iterator[DbPair]:
    """Empty databases owned by a role that is not a superuser, as a managed service's DBA has."""
    role = f"dbsync_dba_{os.getpid()}"
    dsns = []
    servers = (bare_pair.site_server, bare_pair.agent_server)
    for dsn, server in zip((bare_pair.site_dsn, bare_pair.agent_dsn), servers, strict=True):
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                conn.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER")
            conn.execute(f"ALTER DATABASE {dbname(dsn)} OWNER TO {role}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"ALTER SCHEMA public OWNER TO {role}")
        dsns.append(make_conninfo(dsn, user=role))
    yield DbPair(dsns[0], dsns[1], bare_pair.site_server, bare_pair.agent_server)


def ok(*args: str, pair: DbPair) -> str:
    proc = dbsync_cmd(*args, env=pair.env())
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc.stdout


def registered(dsn: str) -> list[tuple[str, str, str, list[str]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [tuple(r) for r in conn.execute(REGISTERED).fetchall()]  # type: ignore[misc]


def test_two_way_pack_registers_leads_for_write_back_without_superuser(dba_pair: DbPair) -> None:
    pair = dba_pair
    with psycopg.connect(pair.agent_dsn, autocommit=True) as conn:
        assert not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]  # type: ignore[index]

    # One way first: the Agent DB gets no capture, nothing is registered for write-back.
    out = ok("migrate", "--pack", "whatsapp", pair=pair)
    assert "write-back" not in out, out
    with psycopg.connect(pair.agent_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('dbsync.sync_log') IS NULL").fetchone()[0]  # type: ignore[index]

    out = ok("migrate", "--pack", "whatsapp", "--two-way", pair=pair)
    assert "agent DB: public.leads registered for write-back (Agent -> Site; the Agent owns stage, score)" in out, out
    assert registered(pair.agent_dsn) == [("public", "leads", "site-wins", ["stage", "score"])]
    assert [r[:2] for r in registered(pair.site_dsn)] == [
        ("public", "conversations"),
        ("public", "leads"),
        ("public", "whatsapp_messages"),
    ]
    again = ok("migrate", "--pack", "whatsapp", "--two-way", pair=pair)
    assert again.count("nothing pending") == 2 and "registered" not in again, again

    # And it works: a lead made on the Site reaches the Agent, whose automation's stage comes back.
    with psycopg.connect(pair.site_dsn, autocommit=True) as site:
        site.execute("INSERT INTO public.leads (id, phone_number, name) VALUES (1, '+4915100000001', 'Lena')")
    settings = pair.settings()
    asyncio.run(Replicator(settings).run(once=True))
    with psycopg.connect(pair.agent_dsn, autocommit=True) as agent:
        agent.execute("UPDATE public.leads SET stage = 'qualified', score = 30 WHERE id = 1")
    asyncio.run(Replicator(settings.write_back()).run(once=True))
    with psycopg.connect(pair.site_dsn, autocommit=True) as site:
        row = site.execute("SELECT name, stage, score FROM public.leads WHERE id = 1").fetchone()
    assert row == ("Lena", "qualified", 30)

    out = ok("migrate", "--rollback", "--pack", "whatsapp", pair=pair)
    for dsn in (pair.site_dsn, pair.agent_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT to_regnamespace('dbsync') IS NULL").fetchone()[0], out  # type: ignore[index]
            assert conn.execute("SELECT to_regclass('public.leads') IS NULL").fetchone()[0], out  # type: ignore[index]
