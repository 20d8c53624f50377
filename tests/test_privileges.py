"""The daemon runs with the least privileges docs/dba.md documents, on both databases."""

from __future__ import annotations

import os

import psycopg
from psycopg.conninfo import make_conninfo

from tests.helpers import DbPair, assert_same, sync_once

SITE_GRANTS = """
GRANT USAGE ON SCHEMA dbsync TO {role};
GRANT SELECT ON dbsync.sync_log TO {role};
GRANT SELECT ON dbsync.replicated_tables TO {role};
GRANT SELECT ON SEQUENCE dbsync.sync_log_seq TO {role};
GRANT SELECT, UPDATE ON dbsync.doorbell TO {role};
GRANT EXECUTE ON FUNCTION dbsync.read_rows(integer, json) TO {role};
GRANT SELECT ON dbsync.consumers TO {role};
GRANT EXECUTE ON FUNCTION dbsync.register_consumer(text, text, name) TO {role};
GRANT EXECUTE ON FUNCTION dbsync.consumer_applied(text, text) TO {role};
GRANT EXECUTE ON FUNCTION dbsync.prune_log(integer) TO {role};
"""

AGENT_GRANTS = """
GRANT USAGE ON SCHEMA dbsync TO {role};
GRANT SELECT, INSERT, UPDATE ON dbsync.apply_progress TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON dbsync.parked_events TO {role};
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON public.conversations, public.leads, public.whatsapp_messages TO {role};
"""


def _role(conn: psycopg.Connection, name: str) -> None:
    conn.execute(f"DROP ROLE IF EXISTS {name}")
    conn.execute(f"CREATE ROLE {name} LOGIN")


def test_daemon_runs_without_superuser(pair: DbPair) -> None:
    tag = f"{os.getpid()}_{abs(hash(pair.site_dsn)) % 100000}"
    reader, applier = f"dbsync_reader_{tag}", f"dbsync_applier_{tag}"
    site, agent = pair.site(), pair.agent()
    _role(site, reader)
    _role(agent, applier)
    try:
        for stmt in SITE_GRANTS.format(role=reader).strip().splitlines():
            site.execute(stmt)
        for stmt in AGENT_GRANTS.format(role=applier).strip().splitlines():
            agent.execute(stmt)
        site.execute("INSERT INTO conversations (phone_number) VALUES ('+4915100000001')")
        site.execute(
            "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction, content) "
            "VALUES ('wamid.1', 1, '+4915100000001', 'inbound', 'hallo')"
        )
        site.execute("UPDATE whatsapp_messages SET status = 'read'")
        limited = DbPair(
            site_dsn=make_conninfo(pair.site_dsn, user=reader),
            agent_dsn=make_conninfo(pair.agent_dsn, user=applier),
            site_server=pair.site_server,
            agent_server=pair.agent_server,
        )
        replicator = sync_once(limited)
        assert replicator.stats.events == 3
        assert_same(pair)
        # The reader prunes through dbsync.prune_log only, and cannot read row data elsewhere.
        with psycopg.connect(limited.site_dsn, autocommit=True) as conn:
            try:
                conn.execute("SELECT * FROM public.whatsapp_messages")
                raise AssertionError("the Site reader role can read application tables")
            except psycopg.errors.InsufficientPrivilege:
                pass
    finally:
        for conn, role in ((site, reader), (agent, applier)):
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
