"""Write-back (issue 12, items 1 and 2): `dbsync migrate --two-way` gives each database the other
side's chain, `tables add --from agent` captures the Agent's changes, one `dbsync run` replicates
both directions, and nothing dbsync applies is captured again where it was applied (no echo).

Every row write is counted on both sides by a trigger set ENABLE ALWAYS (it fires under
session_replication_role = replica too), so a change that came back would show as a second write
on the side it started from.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dbsync import migrations
from dbsync.daemon.runner import Replicator
from dbsync.embedded.cluster import free_port
from tests.helpers import Daemon, DbPair, assert_same, dbsync_cmd, same, wait_until
from tests.test_privileges import AGENT_GRANTS, SITE_GRANTS

ITEMS = "public.items"
TABLE = f"""
CREATE TABLE {ITEMS} (id bigint PRIMARY KEY, v text NOT NULL, stage text, score int);
CREATE TABLE public.writes (id bigint NOT NULL);
CREATE FUNCTION public.count_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.writes VALUES (CASE TG_OP WHEN 'DELETE' THEN OLD.id ELSE NEW.id END);
    RETURN NULL;
END $$;
CREATE TRIGGER count_write AFTER INSERT OR UPDATE OR DELETE ON {ITEMS}
    FOR EACH ROW EXECUTE FUNCTION public.count_write();
ALTER TABLE {ITEMS} ENABLE ALWAYS TRIGGER count_write;
"""


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc.stdout


def writes(dsn: str, low: int = 0, high: int = 1 << 62) -> int:
    """Row writes of the items table on one database (of the keys low..high)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(
            conn.execute("SELECT count(*) FROM public.writes WHERE id BETWEEN %s AND %s", (low, high)).fetchone()[0]  # type: ignore[index]
        )


def logged(dsn: str, after: int = 0) -> int:
    """Log rows of the items table in a database's sync log, of those after seq `after`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(
            conn.execute(  # type: ignore[index]
                "SELECT count(*) FROM dbsync.sync_log l JOIN dbsync.replicated_tables r USING (table_id) "
                "WHERE r.table_name = 'items' AND l.seq > %s",
                (after,),
            ).fetchone()[0]
        )


def last_seq(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM dbsync.sync_log").fetchone()[0])  # type: ignore[index]


def objects(dsn: str) -> set[str]:
    """Everything in the dbsync schema: relations and functions by name."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname::text FROM pg_class c WHERE c.relnamespace = to_regnamespace('dbsync') "
            "UNION ALL SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = to_regnamespace('dbsync')"
        ).fetchall()
    return {r[0] for r in rows}


SKIP_TRIGGER = "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'dbsync.sync_log'::regclass AND NOT tgisinternal"
APPLIERS = "SELECT count(*) FROM dbsync.appliers WHERE role_name = session_user"


def two_way(pair: DbPair) -> None:
    env = pair.env()
    ok(dbsync_cmd("migrate", "--two-way", env=env))
    pair.site().execute(TABLE)
    pair.agent().execute(TABLE)
    ok(dbsync_cmd("tables", "add", ITEMS, env=env))
    ok(dbsync_cmd("tables", "add", "--from", "agent", "--agent-owns", "stage,score", ITEMS, env=env))


def both_ways(pair: DbPair) -> None:
    """Each direction applies everything committed by now, in-process (`dbsync run --once`)."""
    settings = pair.settings()
    asyncio.run(Replicator(settings).run(once=True))
    asyncio.run(Replicator(settings.write_back()).run(once=True))


# -- installing ------------------------------------------------------------------------------------
def test_two_way_install_registers_and_uninstalls_both_chains(pair: DbPair) -> None:
    env = pair.env()
    agent_only = objects(pair.agent_dsn)
    with psycopg.connect(pair.site_dsn, autocommit=True) as conn:  # one-way: capture as it was
        assert conn.execute(SKIP_TRIGGER).fetchone()[0] == 0  # type: ignore[index]
    out = ok(dbsync_cmd("migrate", "--two-way", env=env))
    assert "0001_agent_core" in out.splitlines()[0] and "0001_site_core" in out.splitlines()[1], out
    for dsn in (pair.site_dsn, pair.agent_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('dbsync.sync_log') IS NOT NULL").fetchone()[0]  # type: ignore[index]
            assert conn.execute("SELECT to_regclass('dbsync.apply_progress') IS NOT NULL").fetchone()[0]  # type: ignore[index]
            assert conn.execute(APPLIERS).fetchone()[0] == 1  # type: ignore[index]
            assert conn.execute(SKIP_TRIGGER).fetchone()[0] == 1  # type: ignore[index]
    again = ok(dbsync_cmd("migrate", "--two-way", env=env))
    assert again.count("nothing pending") == 2, again

    # The Site chain rolled back alone leaves the Agent chain exactly as it was.
    migrations._run(pair.agent_dsn, "site", [], rollback=True, side="agent")
    assert objects(pair.agent_dsn) == agent_only
    ok(dbsync_cmd("migrate", "--two-way", "--agent-dsn", pair.agent_dsn, "--site-dsn", pair.site_dsn))

    out = ok(dbsync_cmd("migrate", "--rollback", "--pack", "whatsapp", env=env))
    assert "0001_site_core" in out and "0001_agent_core" in out, out
    for dsn in (pair.site_dsn, pair.agent_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT to_regnamespace('dbsync') IS NULL").fetchone()[0]  # type: ignore[index]
            assert conn.execute("SELECT count(*) FROM _yoyo_migration").fetchone()[0] == 0  # type: ignore[index]


def test_two_way_needs_both_databases(pair: DbPair) -> None:
    proc = dbsync_cmd("migrate", "--two-way", "--site-dsn", pair.site_dsn)
    assert proc.returncode != 0 and "--site-dsn and --agent-dsn" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def hostile(pair: DbPair) -> Iterator[str]:
    role = f"dbsync_hostile_{os.getpid()}"
    conns = [
        psycopg.connect(pair.site_server.admin_dsn, autocommit=True),
        psycopg.connect(pair.agent_server.admin_dsn, autocommit=True),
    ]
    for conn in conns:
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN")
    for dsn in (pair.site_dsn, pair.agent_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {role}")
    yield role
    for dsn in (pair.site_dsn, pair.agent_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
    for conn in conns:
        conn.execute(f"DROP ROLE {role}")
        conn.close()


@pytest.mark.parametrize("attack", ["planted", "granted"])
def test_a_schema_someone_else_can_create_in_is_refused(bare_pair: DbPair, attack: str) -> None:
    """A role plants schema dbsync, with the other chain's mark table in it, before the install
    (planted); or the DBA's schema lets it create objects there (granted): refused, one line."""
    role = f"dbsync_hostile_{os.getpid()}"
    admin = psycopg.connect(bare_pair.agent_server.admin_dsn, autocommit=True)
    admin.execute(f"DROP ROLE IF EXISTS {role}")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    agent = bare_pair.agent()
    try:
        if attack == "planted":
            agent.execute(f"GRANT CREATE ON DATABASE {agent.info.dbname} TO {role}")
            with psycopg.connect(make_conninfo(bare_pair.agent_dsn, user=role), autocommit=True) as conn:
                conn.execute("CREATE SCHEMA dbsync; CREATE TABLE dbsync.sync_log (seq bigint)")
        else:
            ok(dbsync_cmd("migrate", "--agent-dsn", bare_pair.agent_dsn))
            agent.execute(f"GRANT CREATE ON SCHEMA dbsync TO {role}")
        proc = dbsync_cmd("migrate", "--two-way", "--site-dsn", bare_pair.site_dsn, "--agent-dsn", bare_pair.agent_dsn)
        assert proc.returncode != 0, proc.stdout
        assert "refusing to install into it" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert agent.execute("SELECT to_regclass('dbsync.replicated_tables') IS NULL").fetchone()[0]  # type: ignore[index]
    finally:
        agent.execute(f"DROP OWNED BY {role}")
        admin.execute(f"DROP ROLE {role}")
        admin.close()


def test_tables_add_from_agent_needs_two_way(pair: DbPair) -> None:
    pair.site().execute(TABLE)
    pair.agent().execute(TABLE)
    proc = dbsync_cmd("tables", "add", "--from", "agent", ITEMS, env=pair.env())
    assert proc.returncode != 0 and "dbsync migrate --two-way" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_tables_add_from_agent_stores_and_validates_the_policy(pair: DbPair) -> None:
    env = pair.env()
    ok(dbsync_cmd("migrate", "--two-way", env=env))
    pair.site().execute(TABLE)
    pair.agent().execute(TABLE)
    for bad, says in ((["--agent-owns", "id"], "part of the key"), (["--agent-owns", "nope"], "no column")):
        proc = dbsync_cmd("tables", "add", "--from", "agent", *bad, ITEMS, env=env)
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    proc = dbsync_cmd("tables", "add", "--from", "agent", "--conflict", "nobody-wins", ITEMS, env=env)
    assert proc.returncode != 0
    pair.agent().execute("CREATE TABLE public.agent_only (id int PRIMARY KEY)")
    proc = dbsync_cmd("tables", "add", "--from", "agent", "public.agent_only", env=env)
    assert proc.returncode != 0 and "does not exist on the Site DB" in proc.stderr, proc.stderr
    out = ok(
        dbsync_cmd("tables", "add", "--from", "agent", "--conflict", "latest", "--agent-owns", "stage", ITEMS, env=env)
    )
    assert "from agent" in out and "conflict: latest, agent owns: stage (stored, not enforced yet)" in out, out
    ok(dbsync_cmd("tables", "add", ITEMS, env=env))
    listed = json.loads(ok(dbsync_cmd("tables", "list", "--json", env=env)))
    directions = {(t["table"], t["from"]) for t in listed}
    assert (ITEMS, "site") in directions and (ITEMS, "agent") in directions
    back = next(t for t in listed if t["from"] == "agent")
    assert back["conflict"] == "latest" and back["agent_owns"] == ["stage"]
    text = ok(dbsync_cmd("tables", "list", env=env))
    assert f"{ITEMS}\tfrom agent, key: id, conflict: latest" in text, text
    out = ok(dbsync_cmd("tables", "remove", "--from", "agent", ITEMS, env=env))
    assert out.strip() == f"no longer replicating {ITEMS} from the Agent DB", out
    listed = json.loads(ok(dbsync_cmd("tables", "list", "--json", env=env)))
    assert [(t["table"], t["from"]) for t in listed] == [
        ("public.conversations", "site"),
        ("public.items", "site"),
        ("public.leads", "site"),
        ("public.whatsapp_messages", "site"),
    ]


# -- no echo -----------------------------------------------------------------------------------------
def test_each_side_s_write_arrives_once_and_never_comes_back(pair: DbPair) -> None:
    """As the superuser the tests run as: the daemon may set session_replication_role."""
    two_way(pair)
    _no_echo(pair, pair)


def _no_echo(admin: DbPair, daemon: DbPair) -> None:
    site, agent = admin.site(), admin.agent()
    site.execute(f"INSERT INTO {ITEMS} VALUES (1, 'from site', NULL, NULL)")
    agent.execute(f"INSERT INTO {ITEMS} VALUES (2, 'from agent', 'new', 1)")
    assert (writes(admin.site_dsn), writes(admin.agent_dsn)) == (1, 1)
    marks = last_seq(admin.site_dsn), last_seq(admin.agent_dsn)
    for _ in range(3):  # more rounds than an echo needs to come back
        both_ways(daemon)
    assert_same(admin, [ITEMS])
    # Each side wrote its own row once and the other side's once; nothing was logged back.
    assert (writes(admin.site_dsn), writes(admin.agent_dsn)) == (2, 2)
    assert (logged(admin.site_dsn, marks[0]), logged(admin.agent_dsn, marks[1])) == (0, 0)
    # An update and a delete, one on each side (different rows: conflicts are issue 12 item 3).
    site.execute(f"UPDATE {ITEMS} SET v = 'site edit' WHERE id = 1")
    agent.execute(f"DELETE FROM {ITEMS} WHERE id = 2")
    marks = last_seq(admin.site_dsn), last_seq(admin.agent_dsn)
    for _ in range(3):
        both_ways(daemon)
    assert_same(admin, [ITEMS])
    assert (writes(admin.site_dsn), writes(admin.agent_dsn)) == (4, 4)
    assert (logged(admin.site_dsn, marks[0]), logged(admin.agent_dsn, marks[1])) == (0, 0)


@pytest.fixture
def limited(pair: DbPair) -> Iterator[DbPair]:
    """The daemon's roles with the documented grants and nothing more: neither may set
    session_replication_role, so only dbsync's own marker keeps applied rows from being captured."""
    two_way(pair)
    tag = f"{os.getpid()}_{abs(hash(pair.site_dsn)) % 100000}"
    roles = {"site": f"dbsync_s_{tag}", "agent": f"dbsync_a_{tag}"}
    conns = {"site": pair.site(), "agent": pair.agent()}
    for side, conn in conns.items():
        role = roles[side]
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN")
        # Both directions on each database: it is read from (capture) and applied to.
        for stmt in (SITE_GRANTS + AGENT_GRANTS).format(role=role).strip().splitlines():
            conn.execute(stmt)
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {ITEMS} TO {role}")
        conn.execute(f"GRANT INSERT ON public.writes TO {role}")  # the counting trigger's
        conn.execute("SELECT dbsync.register_applier(%s)", (role,))
    yield DbPair(
        site_dsn=make_conninfo(pair.site_dsn, user=roles["site"]),
        agent_dsn=make_conninfo(pair.agent_dsn, user=roles["agent"]),
        site_server=pair.site_server,
        agent_server=pair.agent_server,
    )
    for side, conn in conns.items():
        conn.execute(f"DROP OWNED BY {roles[side]}")
        conn.execute(f"DROP ROLE {roles[side]}")


def test_no_echo_without_session_replication_role(pair: DbPair, limited: DbPair) -> None:
    with (
        psycopg.connect(limited.agent_dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SET session_replication_role = replica")
    _no_echo(pair, limited)


def test_the_marker_cannot_be_forged_by_an_application_role(pair: DbPair, limited: DbPair, hostile: str) -> None:
    """An application role that sets dbsync.applying (and even SET ROLE to a role it is granted)
    is captured all the same: only the registered login role's sessions are dbsync's apply."""
    for conn in (pair.site(), pair.agent()):
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {ITEMS} TO {hostile}")
        conn.execute(f"GRANT INSERT ON public.writes TO {hostile}")
    with psycopg.connect(make_conninfo(pair.agent_dsn, user=hostile), autocommit=True) as app:
        app.execute("SET dbsync.applying = on")
        app.execute(f"INSERT INTO {ITEMS} VALUES (10, 'hidden?', NULL, NULL)")
        with app.transaction():
            app.execute("SET LOCAL dbsync.applying = on")
            app.execute(f"UPDATE {ITEMS} SET v = 'hidden too?' WHERE id = 10")
    with psycopg.connect(make_conninfo(pair.site_dsn, user=hostile), autocommit=True) as app:
        app.execute("SELECT set_config('dbsync.applying', 'on', false)")
        app.execute(f"INSERT INTO {ITEMS} VALUES (11, 'hidden?', NULL, NULL)")
    assert logged(pair.agent_dsn) == 2 and logged(pair.site_dsn) == 1
    both_ways(limited)
    assert_same(pair, [ITEMS])
    assert {r.split(",")[1] for r in _rows(pair.site_dsn)} == {'"hidden too?"', "hidden?"}


def _rows(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(f"SELECT ROW(t.*)::text FROM {ITEMS} t ORDER BY id")]


# -- under load, with the daemon killed -------------------------------------------------------------
PER_SIDE = 300
AGENT_KEYS = 100001


def test_two_way_load_with_sigkill_ends_equal(pair: DbPair, limited: DbPair, tmp_path: Path) -> None:
    """Writers on both sides, on disjoint keys; one `dbsync run` replicates both directions, is
    SIGKILLed mid-way and started again; both sides end equal, and no change came back: each side
    wrote each of its own keys exactly twice (its insert and its update), whatever was replayed."""
    errors: list[BaseException] = []

    def writer(dsn: str, first: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for k in range(first, first + PER_SIDE):
                    conn.execute(f"INSERT INTO {ITEMS} VALUES (%s, 'v', NULL, 0)", (k,))
                    conn.execute(f"UPDATE {ITEMS} SET score = 1 WHERE id = %s", (k,))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(pair.site_dsn, 1)),
        threading.Thread(target=writer, args=(pair.agent_dsn, AGENT_KEYS)),
    ]
    log = tmp_path / "daemon.log"
    with Daemon(limited, log_path=log) as first:
        for t in threads:
            t.start()
        wait_until(
            lambda: _count(pair.site_dsn, AGENT_KEYS) >= 20 and _count(pair.agent_dsn, 1, PER_SIDE) >= 20,
            what="both directions replicating",
        )
        first.kill()
    port = free_port()
    with Daemon(limited, "--http", f"127.0.0.1:{port}", log_path=log):
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        wait_until(lambda: same(pair, [ITEMS]), timeout=90, what="both sides equal")
        # Each direction is shown: `dbsync status` and the metrics (forward names unchanged).
        proc = dbsync_cmd("status", "--json", env=pair.env())  # as the DBA: the daemon roles lack verify_*
        assert proc.stdout, proc.stderr
        status = json.loads(proc.stdout)
        assert status["source"] == "site" and status["write_back"]["source"] == "agent"
        assert status["write_back"]["tables"] == [ITEMS]
        wait_until(lambda: _metrics(port), what="metrics of both directions: active, connected to both databases")
    assert_same(pair, [ITEMS])
    assert _count(pair.site_dsn) == 2 * PER_SIDE
    assert writes(pair.site_dsn, 1, PER_SIDE) == 2 * PER_SIDE, log.read_text()[-3000:]
    assert writes(pair.agent_dsn, AGENT_KEYS, AGENT_KEYS + PER_SIDE) == 2 * PER_SIDE, log.read_text()[-3000:]
    # Each arrived (at least once: a page replayed after the kill writes its rows again).
    assert writes(pair.agent_dsn, 1, PER_SIDE) >= PER_SIDE
    assert writes(pair.site_dsn, AGENT_KEYS, AGENT_KEYS + PER_SIDE) >= PER_SIDE


def _metrics(port: int) -> set[str] | None:
    """The samples of the metrics page (not its HELP lines), once both directions hold their lock
    and are connected to both databases (a direction connects to its source after taking the lock)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            page = str(response.read().decode())
    except OSError:  # not listening yet
        return None
    samples = {line for line in page.splitlines() if not line.startswith("#")}
    return samples if samples >= WANTED else None


WANTED = {
    "dbsync_active 1",
    "dbsync_write_back_active 1",
    *(
        f'{name}{{database="{db}"}} 1'
        for name in ("dbsync_connected", "dbsync_write_back_connected")
        for db in ("site", "agent")
    ),
}


def _count(dsn: str, low: int = 0, high: int = 1 << 62) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {ITEMS} WHERE id BETWEEN %s AND %s", (low, high)).fetchone()[0])  # type: ignore[index]
