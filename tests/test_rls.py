"""Row-level security: dbsync sees every row of a replicated table, or refuses with one line.

The table has RLS enabled and forced on both sides, with a policy that shows a role only its own
rows. Real roles with real grants: an application writer on the Site, the daemon's roles, an
engineer's role for the CLI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dbsync.db import connect
from dbsync.resync import call
from dbsync.rls import RowSecurityError
from tests.helpers import Daemon, DbPair, assert_same, dbsync_cmd, same, sync_once, wait_until
from tests.test_privileges import SITE_GRANTS

T = "public.secret"
TABLE = f"""
CREATE TABLE {T} (id integer PRIMARY KEY, owner_name text NOT NULL, body text);
ALTER TABLE {T} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {T} FORCE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON {T} USING (owner_name = current_user);
"""

AGENT_GRANTS = f"""
GRANT USAGE ON SCHEMA dbsync TO {{role}};
GRANT SELECT, INSERT, UPDATE ON dbsync.apply_progress TO {{role}};
GRANT SELECT, INSERT, UPDATE, DELETE ON dbsync.parked_events TO {{role}};
GRANT USAGE ON SCHEMA public TO {{role}};
GRANT SELECT, INSERT, UPDATE, DELETE ON {T} TO {{role}}
"""


@dataclass
class Roles:
    app: str  # writes the Site table; a policy shows it every row
    reader: str  # the daemon's Site role
    applier: str  # the daemon's Agent role
    engineer: str  # runs the CLI; subject to the policy on both sides


def _run(conn: psycopg.Connection, script: str) -> None:
    for statement in script.strip().split(";\n"):
        if statement.strip():
            conn.execute(statement)


@pytest.fixture
def roles(pair: DbPair) -> Iterator[Roles]:
    tag = f"{os.getpid()}_{abs(hash(pair.site_dsn)) % 100000}"
    r = Roles(f"rls_app_{tag}", f"rls_reader_{tag}", f"rls_applier_{tag}", f"rls_eng_{tag}")
    site, agent = pair.site(), pair.agent()
    for conn in (site, agent):
        _run(conn, TABLE)
    site.execute(f"SELECT dbsync.add_table('{T}'::regclass)")
    made: list[tuple[psycopg.Connection, str]] = []
    for conn, name in ((site, r.app), (site, r.reader), (site, r.engineer), (agent, r.applier), (agent, r.engineer)):
        conn.execute(f"DROP ROLE IF EXISTS {name}")
        conn.execute(f"CREATE ROLE {name} LOGIN")
        made.append((conn, name))
    try:
        site.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {T} TO {r.app}")
        site.execute(f"CREATE POLICY app_all ON {T} TO {r.app} USING (true) WITH CHECK (true)")
        for stmt in SITE_GRANTS.format(role=r.reader).strip().splitlines():
            site.execute(stmt)
        _run(agent, AGENT_GRANTS.format(role=r.applier))
        # The engineer reads the table and dbsync's state on both sides.
        for stmt in SITE_GRANTS.format(role=r.engineer).strip().splitlines():
            site.execute(stmt)
        site.execute(f"GRANT SELECT ON {T} TO {r.engineer}")
        site.execute(f"GRANT SELECT ON dbsync.backfill_state TO {r.engineer}")
        site.execute(f"GRANT EXECUTE ON FUNCTION dbsync.backfill_step(regclass, integer) TO {r.engineer}")
        _run(agent, AGENT_GRANTS.format(role=r.engineer))
        yield r
    finally:
        for conn, name in made:
            conn.execute(f"DROP OWNED BY {name}")
            conn.execute(f"DROP ROLE {name}")


def as_roles(pair: DbPair, site_role: str, agent_role: str) -> DbPair:
    return DbPair(
        site_dsn=make_conninfo(pair.site_dsn, user=site_role),
        agent_dsn=make_conninfo(pair.agent_dsn, user=agent_role),
        site_server=pair.site_server,
        agent_server=pair.agent_server,
    )


def write_as_app(pair: DbPair, roles: Roles, first: int, last: int) -> None:
    """Rows of several owners, written by the application role through RLS."""
    with psycopg.connect(make_conninfo(pair.site_dsn, user=roles.app), autocommit=True) as app:
        app.execute(
            f"INSERT INTO {T} SELECT g, CASE WHEN g %% 3 = 0 THEN %s ELSE 'someone_' || g %% 5 END, 'body ' || g "
            "FROM generate_series(%s::int, %s::int) g",
            (roles.engineer, first, last),
        )


def rls_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "row-level security" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("how", ["bypassrls", "owner"])
def test_daemon_roles_that_see_every_row_replicate_everything(pair: DbPair, roles: Roles, how: str) -> None:
    agent = pair.agent()
    if how == "bypassrls":
        agent.execute(f"ALTER ROLE {roles.applier} BYPASSRLS")
    else:  # the owner sees every row once FORCE is off
        agent.execute(f"ALTER TABLE {T} OWNER TO {roles.applier}")
        agent.execute(f"ALTER TABLE {T} NO FORCE ROW LEVEL SECURITY")
    write_as_app(pair, roles, 1, 30)
    with psycopg.connect(make_conninfo(pair.site_dsn, user=roles.app), autocommit=True) as app:
        app.execute(f"UPDATE {T} SET body = 'changed' WHERE id <= 10")
        app.execute(f"DELETE FROM {T} WHERE id BETWEEN 11 AND 15")
    replicator = sync_once(as_roles(pair, roles.reader, roles.applier))
    assert replicator.stats.parked == 0
    assert_same(pair, [T])
    assert pair.agent().execute(f"SELECT count(*) FROM {T}").fetchone() == (25,)


def test_cli_role_under_a_policy_refuses_instead_of_reporting_hidden_rows(pair: DbPair, roles: Roles) -> None:
    write_as_app(pair, roles, 1, 30)
    sync_once(pair)
    assert_same(pair, [T])
    engineer = as_roles(pair, roles.engineer, roles.engineer)
    for args in (("--deep",), ("--deep", "--repair"), ()):
        proc = dbsync_cmd("reconcile", "--table", T, *args, env=engineer.env())
        assert proc.returncode == 2, proc.stdout + proc.stderr
        line = rls_line(proc.stderr)
        assert f"role {roles.engineer}" in line and "public.secret" in line and "BYPASSRLS" in line, line
        assert "extra" not in proc.stdout and "missing" not in proc.stdout, proc.stdout
        assert "Traceback" not in proc.stderr

    # The backfill reads through the Site's SECURITY DEFINER functions: as their owner (here a
    # superuser) it logs every row, never only the rows the engineer's policy shows.
    proc = dbsync_cmd("backfill", T, env=engineer.env())
    site = pair.site()
    logged = site.execute(
        "SELECT count(DISTINCT l.pk::text) FROM dbsync.sync_log l JOIN dbsync.replicated_tables r USING (table_id) "
        "WHERE r.table_name = 'secret' AND l.op = 'U'"
    ).fetchone()
    if proc.returncode == 0:
        assert logged == (30,), (logged, proc.stderr)
    else:
        assert logged == (0,), (logged, proc.stderr)
        rls_line(proc.stderr)
    sync_once(pair)
    assert_same(pair, [T])


OWNER_GRANTS = """
GRANT USAGE ON SCHEMA dbsync TO {role};
GRANT ALL ON ALL TABLES IN SCHEMA dbsync TO {role};
GRANT ALL ON ALL SEQUENCES IN SCHEMA dbsync TO {role};
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dbsync TO {role};
GRANT SELECT, UPDATE ON public.secret TO {role};
ALTER FUNCTION dbsync.backfill_step(regclass, integer) OWNER TO {role};
ALTER FUNCTION dbsync.resync_range(regclass, json, integer) OWNER TO {role};
ALTER FUNCTION dbsync.resync_keys(regclass, json) OWNER TO {role}
"""


def test_backfill_and_repair_refuse_when_the_resync_functions_owner_is_under_a_policy(
    pair: DbPair, roles: Roles
) -> None:
    write_as_app(pair, roles, 1, 30)
    sync_once(pair)
    site = pair.site()
    owner = f"{roles.app}_fnowner"
    site.execute(f"DROP ROLE IF EXISTS {owner}")
    site.execute(f"CREATE ROLE {owner}")
    try:
        _run(site, OWNER_GRANTS.format(role=owner))
        seq_before = site.execute("SELECT count(*) FROM dbsync.sync_log").fetchone()
        proc = dbsync_cmd("backfill", T, env=pair.env())
        assert proc.returncode == 2, proc.stdout + proc.stderr
        line = rls_line(proc.stderr)
        assert f"role {owner}" in line and "resync functions" in line and "BYPASSRLS" in line, line
        pair.agent().execute(f"DELETE FROM {T} WHERE id = 3")
        proc = dbsync_cmd("reconcile", "--deep", "--repair", "--apply", env=pair.env())
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"role {owner}" in rls_line(proc.stderr)

        # Past the up-front check, the function itself refuses (row_security = off inside it).
        with connect(pair.site_dsn, "Site") as conn, pytest.raises(RowSecurityError, match="on table secret"):
            call(conn, "SELECT dbsync.backfill_step(%s::regclass, 1000)", (T,), "backfill")
        assert site.execute("SELECT count(*) FROM dbsync.sync_log").fetchone() == seq_before

        site.execute(f"ALTER ROLE {owner} BYPASSRLS")  # the fix: now it reads every row
        proc = dbsync_cmd("reconcile", "--deep", "--repair", "--apply", env=pair.env())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_same(pair, [T])
    finally:
        site.execute(f"REASSIGN OWNED BY {owner} TO CURRENT_USER")
        site.execute(f"DROP OWNED BY {owner}")
        site.execute(f"DROP ROLE {owner}")


@pytest.mark.parametrize("fix", ["no-force", "bypassrls"])
def test_daemon_agent_role_under_forced_rls_stops_and_resumes_after_the_fix(
    pair: DbPair, roles: Roles, fix: str, tmp_path: Path
) -> None:
    agent = pair.agent()
    agent.execute(f"ALTER TABLE {T} OWNER TO {roles.applier}")  # owner, but FORCE is on
    write_as_app(pair, roles, 1, 20)
    limited = as_roles(pair, roles.reader, roles.applier)
    log = tmp_path / "daemon.log"

    def status() -> str:
        proc = dbsync_cmd("status", "--json", env=pair.env())
        return proc.stdout

    with Daemon(limited, "--poison-policy", "park", log_path=log):
        wait_until(lambda: "row-level security" in status(), 30, what="the RLS line in dbsync status")
        report = json.loads(status())
        text = json.dumps(report)
        assert f"role {roles.applier}" in text and "public.secret" in text and "BYPASSRLS" in text, text
        assert report.get("parked_events", 0) == 0, report
        assert wait_until(lambda: "row-level security" in log.read_text(), 10, what="the RLS line in the log")
        assert "Traceback" not in log.read_text()
        assert agent.execute("SELECT count(*) FROM dbsync.parked_events").fetchone() == (0,)
        assert agent.execute(f"SELECT count(*) FROM {T}").fetchone() == (0,)

        if fix == "no-force":
            agent.execute(f"ALTER TABLE {T} NO FORCE ROW LEVEL SECURITY")
        else:
            agent.execute(f"ALTER ROLE {roles.applier} BYPASSRLS")
        write_as_app(pair, roles, 21, 25)
        wait_until(lambda: same(pair, [T]), 30, what="replication to resume")
    assert agent.execute("SELECT count(*) FROM dbsync.parked_events").fetchone() == (0,)
    assert_same(pair, [T])


def test_forced_rls_switched_on_under_a_running_daemon_stops_it_without_parking(
    pair: DbPair, roles: Roles, tmp_path: Path
) -> None:
    """The daemon checked the table when it first applied it; RLS forced later is met by the
    apply itself: the server's refusal stops the daemon the same way, and nothing is parked."""
    agent = pair.agent()
    agent.execute(f"ALTER TABLE {T} OWNER TO {roles.applier}")
    agent.execute(f"ALTER TABLE {T} NO FORCE ROW LEVEL SECURITY")
    log = tmp_path / "daemon.log"
    with Daemon(as_roles(pair, roles.reader, roles.applier), "--poison-policy", "park", log_path=log):
        write_as_app(pair, roles, 1, 10)
        wait_until(lambda: same(pair, [T]), 30, what="initial replication")
        agent.execute(f"ALTER TABLE {T} FORCE ROW LEVEL SECURITY")
        write_as_app(pair, roles, 11, 20)
        with psycopg.connect(make_conninfo(pair.site_dsn, user=roles.app), autocommit=True) as app:
            app.execute(f"DELETE FROM {T} WHERE id <= 3")
        wait_until(lambda: "row-level security" in log.read_text(), 30, what="the RLS line in the log")
        line = rls_line(log.read_text())
        assert f"role {roles.applier}" in line and "public.secret" in line and "Agent DB" in line, line
        assert agent.execute("SELECT count(*) FROM dbsync.parked_events").fetchone() == (0,)
        agent.execute(f"ALTER TABLE {T} NO FORCE ROW LEVEL SECURITY")
        wait_until(lambda: same(pair, [T]), 30, what="replication to resume")
    assert agent.execute("SELECT count(*) FROM dbsync.parked_events").fetchone() == (0,)
    assert_same(pair, [T])


def test_rls_on_the_site_log_stops_the_daemon_with_the_line_naming_the_site(pair: DbPair, roles: Roles) -> None:
    """The daemon's Site reads (dbsync's own tables) are refused the same way, and say where."""
    agent = pair.agent()
    agent.execute(f"ALTER ROLE {roles.applier} BYPASSRLS")
    write_as_app(pair, roles, 1, 5)
    site = pair.site()
    site.execute("ALTER TABLE dbsync.sync_log ENABLE ROW LEVEL SECURITY")  # the owner's capture still writes
    try:
        with pytest.raises(RowSecurityError) as caught:
            sync_once(as_roles(pair, roles.reader, roles.applier))
        line = str(caught.value)
        assert f"role {roles.reader}" in line and "dbsync.sync_log" in line and "Site DB" in line, line
        assert agent.execute("SELECT count(*) FROM dbsync.parked_events").fetchone() == (0,)
    finally:
        site.execute("ALTER TABLE dbsync.sync_log DISABLE ROW LEVEL SECURITY")
    sync_once(as_roles(pair, roles.reader, roles.applier))
    assert_same(pair, [T])
