"""The CLI's contract, each command run as a real `python -m dbsync` subprocess.

What a user types and what they get back: exit codes, the lines printed, the settings
precedence (flag > DBSYNC_* environment > TOML file), and for every bad input one line on stderr
starting with "dbsync: error:", no traceback, and never the password of a DSN.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dbsync import migrations
from dbsync.embedded.cluster import free_port
from tests.helpers import Daemon, DbPair, Server, assert_same, count, dbsync_cmd, wait_until

# Every DSN a bad-input test passes carries this password; it must never be printed.
SECRET = "hunter2secret"


# -- running the command -------------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any DBSYNC_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBSYNC_")}
    env.update(extra)
    return env


def dbsync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return dbsync_cmd(*args, env=clean_env(**(env or {})))


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


# What the warning about a password given by flag says (once, before anything else).
PS_WARNING = "visible to other users in `ps`"


def error_lines(stderr: str) -> list[str]:
    """stderr without the warning about a password on the command line (at most one)."""
    lines = stderr.splitlines()
    warnings = [line for line in lines if PS_WARNING in line]
    assert len(warnings) <= 1, stderr
    return [line for line in lines if PS_WARNING not in line]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *expect: str) -> str:
    """A clean failure: non-zero exit, exactly one stderr line (besides the warning about a
    password given by flag), no traceback, no password."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"exit 0\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in out, proc.stderr
    assert SECRET not in out, out
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("dbsync: error: "), lines[0]
    for text in expect:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def toml_str(value: str) -> str:
    # A TOML basic string is JSON's string syntax for everything these tests put in one.
    return json.dumps(value)


def with_password(dsn: str, password: str = SECRET) -> str:
    return make_conninfo(dsn, password=password)


def closed_port_dsn() -> str:
    """A DSN for 127.0.0.1 on a port nothing listens on."""
    return f"host=127.0.0.1 port={free_port()} dbname=nowhere user=nobody password={SECRET} connect_timeout=5"


def command_lines(site: str | None, agent: str | None) -> dict[str, list[str]]:
    """Every command that takes DSNs, with these DSNs (None: not passed)."""
    dsns: list[str] = []
    if site is not None:
        dsns += ["--site-dsn", site]
    if agent is not None:
        dsns += ["--agent-dsn", agent]
    return {
        "migrate": ["migrate", *dsns],
        "tables add": ["tables", "add", "public.leads", *dsns],
        "tables remove": ["tables", "remove", "public.leads", *dsns],
        "tables list": ["tables", "list", *dsns],
        "status": ["status", *dsns],
        "status --json": ["status", "--json", *dsns],
        "run --once": ["run", "--once", *dsns],
    }


COMMANDS = list(command_lines(None, None))


def status_json(pair: DbPair, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = dbsync("status", "--json", "--site-dsn", pair.site_dsn, "--agent-dsn", pair.agent_dsn, *extra, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    st = json.loads(proc.stdout)
    # status exits 1 when unhealthy (for monitoring), 0 otherwise; never anything else.
    assert proc.returncode == (0 if st["healthy"] else 1), (proc.returncode, st)
    return st


def catalog_has(dsn: str, regclass: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (regclass,)).fetchone() == (True,)


# -- dbsync migrate ------------------------------------------------------------------------------
def shipped(*parts: str) -> list[str]:
    """The migration ids under sql/<parts>, in the order yoyo applies them."""
    folder = migrations.sql_root().joinpath(*parts)
    return sorted(p.name.removesuffix(".sql") for p in folder.glob("*.sql") if not p.name.endswith(".rollback.sql"))


def applied_ids(line: str, side: str) -> list[str]:
    prefix, _, ids = line.partition("): ")
    assert prefix.startswith(f"{side} DB ("), line
    return ids.split(", ")


def test_migrate_applies_core_then_nothing_then_pack(bare_pair: DbPair) -> None:
    site, agent = bare_pair.site_dsn, bare_pair.agent_dsn
    first = ok(dbsync("migrate", "--site-dsn", site, "--agent-dsn", agent)).stdout.splitlines()
    assert len(first) == 2
    assert applied_ids(first[0], "site") == shipped("site")
    assert applied_ids(first[1], "agent") == shipped("agent")
    assert catalog_has(site, "dbsync.sync_log") and catalog_has(site, "dbsync.replicated_tables")
    assert catalog_has(agent, "dbsync.apply_progress")
    assert not catalog_has(site, "public.conversations")

    again = ok(dbsync("migrate", "--site-dsn", site, "--agent-dsn", agent)).stdout.splitlines()
    assert [line.split("): ", 1)[1] for line in again] == ["nothing pending", "nothing pending"]

    packed = ok(dbsync("migrate", "--pack", "whatsapp", "--site-dsn", site, "--agent-dsn", agent)).stdout
    assert applied_ids(packed.splitlines()[0], "site") == shipped("packs", "whatsapp", "site")
    assert applied_ids(packed.splitlines()[1], "agent") == shipped("packs", "whatsapp", "agent")
    for table in ("public.conversations", "public.leads", "public.whatsapp_messages"):
        assert catalog_has(site, table) and catalog_has(agent, table)
    assert catalog_has(site, "public.notifications")  # Site only: not replicated
    listed = json.loads(ok(dbsync("tables", "list", "--json", "--site-dsn", site)).stdout)
    assert [t["table"] for t in listed] == ["public.conversations", "public.leads", "public.whatsapp_messages"]


def test_migrate_one_side_only(bare_pair: DbPair) -> None:
    out = ok(dbsync("migrate", env={"DBSYNC_AGENT_DSN": bare_pair.agent_dsn})).stdout.splitlines()
    assert len(out) == 1 and out[0].startswith("agent DB (")
    assert catalog_has(bare_pair.agent_dsn, "dbsync.apply_progress")
    assert not catalog_has(bare_pair.site_dsn, "dbsync.sync_log")


def test_migrate_unknown_pack_changes_nothing(bare_pair: DbPair) -> None:
    proc = dbsync(
        "migrate", "--pack", "nosuchpack", "--site-dsn", bare_pair.site_dsn, "--agent-dsn", bare_pair.agent_dsn
    )
    assert_one_line_error(proc, "nosuchpack", "whatsapp")
    assert proc.stdout == ""
    assert not catalog_has(bare_pair.site_dsn, "dbsync.sync_log")
    assert not catalog_has(bare_pair.agent_dsn, "dbsync.apply_progress")


def connection_env(pair: DbPair) -> dict[str, str]:
    return {"DBSYNC_SITE_DSN": pair.site_dsn, "DBSYNC_AGENT_DSN": pair.agent_dsn}


def dbsync_objects(dsn: str) -> list[str]:
    """What dbsync leaves in a database: its schema, capture triggers, yoyo's record of its ids."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = [f"schema {r[0]}" for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = 'dbsync'")]
        found += [f"trigger {r[0]}" for r in conn.execute("SELECT tgname FROM pg_trigger WHERE tgname LIKE 'dbsync%'")]
        if conn.execute("SELECT to_regclass('_yoyo_migration') IS NOT NULL").fetchone() == (True,):
            found += [f"recorded {r[0]}" for r in conn.execute("SELECT migration_id FROM _yoyo_migration")]
        return found


def test_migrate_rollback_removes_everything_and_apply_works_again(bare_pair: DbPair) -> None:
    site, agent = bare_pair.site_dsn, bare_pair.agent_dsn
    both = ("--site-dsn", site, "--agent-dsn", agent)
    ok(dbsync("migrate", "--pack", "whatsapp", *both))
    # An application table of the user's, replicated, with events in the log.
    with psycopg.connect(site, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, label text)")
        conn.execute("SELECT dbsync.add_table('public.items')")
        conn.execute("INSERT INTO public.items VALUES (1, 'kept')")
        conn.execute("INSERT INTO public.conversations (id, phone_number) VALUES (1, '+1')")
    with psycopg.connect(agent, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, label text)")
    before_site, before_agent = dbsync_objects(site), dbsync_objects(agent)

    # A pack applied but not named, and the two DSNs swapped: refused, nothing changed.
    assert_one_line_error(dbsync("migrate", "--rollback", *both), "pack 'whatsapp' applied", "--pack whatsapp")
    swapped = dbsync("migrate", "--rollback", "--pack", "whatsapp", "--site-dsn", agent, "--agent-dsn", site)
    assert_one_line_error(swapped, "holds dbsync's Agent DB migrations (", "wrong one", "nothing was rolled back")
    assert (dbsync_objects(site), dbsync_objects(agent)) == (before_site, before_agent)

    out = ok(dbsync("migrate", "--rollback", "--pack", "whatsapp", *both)).stdout.splitlines()
    # Newest first: the pack (which depends on the core), then the core migrations in reverse.
    assert applied_ids(out[0].replace("): rolled back ", "): "), "site") == [
        *shipped("packs", "whatsapp", "site"),
        *reversed(shipped("site")),
    ]
    assert applied_ids(out[1].replace("): rolled back ", "): "), "agent") == [
        *shipped("packs", "whatsapp", "agent"),
        *reversed(shipped("agent")),
    ]
    assert dbsync_objects(site) == [] and dbsync_objects(agent) == []
    assert not catalog_has(site, "public.conversations") and not catalog_has(agent, "public.conversations")
    assert count(site, "public.items") == 1  # the user's own table and rows stay; only capture is gone

    again = ok(dbsync("migrate", "--rollback", *both)).stdout.splitlines()
    assert [line.split("): ", 1)[1] for line in again] == ["nothing to roll back", "nothing to roll back"]

    # Installed again from scratch: the same objects, less the user's table until it is added again.
    ok(dbsync("migrate", "--pack", "whatsapp", *both))
    assert sorted(dbsync_objects(agent)) == sorted(before_agent)
    ok(dbsync("tables", "add", "public.items", "--site-dsn", site, "--agent-dsn", agent))
    assert sorted(dbsync_objects(site)) == sorted(before_site)


def test_migrate_rollback_refuses_while_a_daemon_applies(pair: DbPair, tmp_path: Path) -> None:
    with Daemon(pair, log_path=tmp_path / "daemon.log"):
        wait_until(
            lambda: json.loads(dbsync("status", "--json", env=connection_env(pair)).stdout).get("active_daemon"),
            what="the daemon to hold the lock",
        )
        proc = dbsync("migrate", "--rollback", "--pack", "whatsapp", "--agent-dsn", pair.agent_dsn)
        assert_one_line_error(proc, "a dbsync daemon is applying to the Agent DB", "stop every daemon first")
    assert catalog_has(pair.agent_dsn, "dbsync.apply_progress")


def test_migrate_output_never_shows_the_password(bare_pair: DbPair) -> None:
    proc = ok(
        dbsync(
            "migrate",
            "--site-dsn",
            with_password(bare_pair.site_dsn),
            "--agent-dsn",
            with_password(bare_pair.agent_dsn),
        )
    )
    assert SECRET not in proc.stdout + proc.stderr


# -- dbsync tables -------------------------------------------------------------------------------
def test_tables_list_text_and_json(pair: DbPair) -> None:
    text = ok(dbsync("tables", "list", "--site-dsn", pair.site_dsn)).stdout.splitlines()
    assert text == [
        "public.conversations\tkey: id",
        "public.leads\tkey: id",
        "public.whatsapp_messages\tkey: id",
    ]
    listed = json.loads(ok(dbsync("tables", "list", "--json", "--site-dsn", pair.site_dsn)).stdout)
    assert [(t["table"], t["key"]) for t in listed] == [
        ("public.conversations", ["id"]),
        ("public.leads", ["id"]),
        ("public.whatsapp_messages", ["id"]),
    ]
    assert all(isinstance(t["table_id"], int) for t in listed)


def test_tables_add_replicate_remove(pair: DbPair) -> None:
    odd = '"My Schema"."Odd ""Name"""'
    ddl = f'CREATE SCHEMA "My Schema"; CREATE TABLE {odd} (k int, part text, v text, PRIMARY KEY (k, part))'
    pair.site().execute(ddl)
    pair.agent().execute(ddl)
    env = {"DBSYNC_SITE_DSN": pair.site_dsn, "DBSYNC_AGENT_DSN": pair.agent_dsn}

    added = ok(dbsync("tables", "add", odd, env=env)).stdout
    assert added.strip() == f"replicating {odd} (key: k, part)"
    listed = json.loads(ok(dbsync("tables", "list", "--json", env=env)).stdout)
    assert {"table": odd, "key": ["k", "part"]}.items() <= listed[0].items()

    pair.site().execute(f"INSERT INTO {odd} VALUES (1, 'a', 'x'), (2, 'b', 'y')")
    ok(dbsync("run", "--once", env=env))
    assert count(pair.agent_dsn, odd) == 2

    # Removing stops capture; what was logged before is still delivered.
    pair.site().execute(f"UPDATE {odd} SET v = 'z' WHERE k = 1")
    removed = ok(dbsync("tables", "remove", odd, env=env)).stdout
    assert removed.startswith("no longer replicating ")
    pair.site().execute(f"INSERT INTO {odd} VALUES (3, 'c', 'not replicated')")
    ok(dbsync("run", "--once", env=env))
    with psycopg.connect(pair.agent_dsn, autocommit=True) as agent:
        assert agent.execute(f"SELECT k, v FROM {odd} ORDER BY k").fetchall() == [(1, "z"), (2, "y")]
    names = [t["table"] for t in json.loads(ok(dbsync("tables", "list", "--json", env=env)).stdout)]
    assert odd not in names and len(names) == 3


def test_tables_commands_name_a_table_alike(pair: DbPair) -> None:
    odd = '"Odd ""Name"""'
    pair.site().execute(f"CREATE TABLE {odd} (k int PRIMARY KEY)")
    pair.agent().execute(f"CREATE TABLE {odd} (k int PRIMARY KEY)")
    dsns = ["--site-dsn", pair.site_dsn, "--agent-dsn", pair.agent_dsn]
    assert ok(dbsync("tables", "add", odd, *dsns)).stdout.strip() == f"replicating public.{odd} (key: k)"
    assert f"public.{odd}" in [t["table"] for t in json.loads(ok(dbsync("tables", "list", "--json", *dsns)).stdout)]
    assert ok(dbsync("tables", "remove", odd, *dsns)).stdout.strip() == f"no longer replicating public.{odd}"


@pytest.mark.parametrize(
    ("site_ddl", "agent_ddl", "args", "expect"),
    [
        ("", "", ["add", "public.nosuch"], "does not exist on the Site DB"),
        ("", "", ["add", "a.b.c.d"], "not a valid table name"),
        ("CREATE TABLE nokey (a int)", "CREATE TABLE nokey (a int)", ["add", "nokey"], "no primary key"),
        ("CREATE TABLE siteonly (a int PRIMARY KEY)", "", ["add", "siteonly"], "does not exist on the Agent DB"),
        (
            "CREATE TABLE narrow (a int PRIMARY KEY, b text)",
            "CREATE TABLE narrow (a int PRIMARY KEY)",
            ["add", "narrow"],
            "lacks column(s) b",
        ),
        (
            "CREATE TABLE otherkey (a int PRIMARY KEY, b int)",
            "CREATE TABLE otherkey (a int, b int PRIMARY KEY)",
            ["add", "otherkey"],
            "primary key",
        ),
        ("CREATE VIEW v AS SELECT 1 AS a", "", ["add", "v"], "not a table"),
        ("", "", ["add", "public.leads"], "already replicated"),
        ("", "", ["remove", "public.notifications"], "is not replicated"),
        ("", "", ["remove", "public.nosuch"], "does not exist on the Site DB"),
    ],
    ids=[
        "missing",
        "bad-name",
        "no-pk",
        "not-on-agent",
        "agent-lacks-column",
        "key-differs",
        "view",
        "already",
        "remove-unreplicated",
        "remove-missing",
    ],
)
def test_tables_errors_are_one_line(pair: DbPair, site_ddl: str, agent_ddl: str, args: list[str], expect: str) -> None:
    if site_ddl:
        pair.site().execute(site_ddl)
    if agent_ddl:
        pair.agent().execute(agent_ddl)
    proc = dbsync(
        "tables", *args, "--site-dsn", with_password(pair.site_dsn), "--agent-dsn", with_password(pair.agent_dsn)
    )
    assert_one_line_error(proc, expect)
    names = [t["table"] for t in json.loads(ok(dbsync("tables", "list", "--json", "--site-dsn", pair.site_dsn)).stdout)]
    assert names == ["public.conversations", "public.leads", "public.whatsapp_messages"]


# -- dbsync run --once and dbsync status ---------------------------------------------------------
def write_traffic(pair: DbPair) -> int:
    """A few Site transactions on the WhatsApp tables; returns the number of events logged."""
    site = pair.site()
    with site.transaction():
        site.execute("INSERT INTO conversations (id, phone_number) VALUES (1, '+100'), (2, '+200')")
        site.execute(
            "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction, content) "
            "VALUES ('m1', 1, '+100', 'inbound', 'hello')"
        )
    site.execute("UPDATE whatsapp_messages SET status = 'delivered' WHERE message_id = 'm1'")
    site.execute("INSERT INTO leads (phone_number, name, conversation_id) VALUES ('+100', 'Ann', 1)")
    site.execute("DELETE FROM conversations WHERE id = 2")
    site.execute("UPDATE leads SET stage = stage")  # changes nothing: not logged
    return 6


# The log rows write_traffic writes: a statement's keys share one (the two conversations).
TRAFFIC_LOG_ROWS = 5


def test_run_once_replicates_and_exits_zero(pair: DbPair) -> None:
    write_traffic(pair)
    proc = ok(
        dbsync(
            "run", "--once", "--site-dsn", with_password(pair.site_dsn), "--agent-dsn", with_password(pair.agent_dsn)
        )
    )
    assert SECRET not in proc.stdout + proc.stderr
    assert_same(pair)
    # Nothing new: still exit 0, nothing changes.
    ok(dbsync("run", "--once", "--site-dsn", pair.site_dsn, "--agent-dsn", pair.agent_dsn))
    assert_same(pair)


def test_status_before_and_after_a_sync(pair: DbPair) -> None:
    empty = status_json(pair)
    assert (empty["high_water_mark"], empty["newest_seq"], empty["events_behind"], empty["seconds_behind"]) == (
        0,
        0,
        0,
        0,
    )

    events = write_traffic(pair)
    before = status_json(pair)
    assert before["high_water_mark"] == 0
    assert before["newest_seq"] == TRAFFIC_LOG_ROWS
    assert before["events_behind"] == events
    assert before["seconds_behind"] > 0
    assert before["tables"] == ["public.conversations", "public.leads", "public.whatsapp_messages"]

    ok(dbsync("run", "--once", "--site-dsn", pair.site_dsn, "--agent-dsn", pair.agent_dsn))
    after = status_json(pair)
    assert after["high_water_mark"] == TRAFFIC_LOG_ROWS
    assert after["newest_seq"] == TRAFFIC_LOG_ROWS
    assert after["events_behind"] == 0
    assert after["seconds_behind"] == 0
    assert after["events_applied"] == events

    # The text form carries the same numbers.
    proc = dbsync("status", "--site-dsn", with_password(pair.site_dsn), "--agent-dsn", with_password(pair.agent_dsn))
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in proc.stdout.splitlines())
    assert fields["high-water mark"] == str(TRAFFIC_LOG_ROWS)
    assert fields["newest log seq"] == str(TRAFFIC_LOG_ROWS)
    assert fields["events behind"] == "0"
    assert fields["seconds behind"] == "0.000"


def test_status_is_healthy_with_a_daemon_running(pair: DbPair, tmp_path: Path) -> None:
    write_traffic(pair)
    with Daemon(pair, log_path=tmp_path / "daemon.log"):
        st = wait_until(
            lambda: (s := status_json(pair))["events_behind"] == 0 and s["healthy"] and s,
            what="the daemon to catch up and status to report healthy",
        )
    assert st["high_water_mark"] == st["newest_seq"] == TRAFFIC_LOG_ROWS
    assert st["seconds_behind"] == 0
    assert_same(pair)


# -- settings precedence: flag > environment > file ----------------------------------------------
def test_settings_from_flat_toml_file(pair: DbPair, tmp_path: Path) -> None:
    conf = tmp_path / "dbsync.toml"
    conf.write_text(
        f"site_dsn = {toml_str(pair.site_dsn)}\nagent-dsn = {toml_str(pair.agent_dsn)}\n"
        'source = "from_file"\nbatch_size = 10\n'
    )
    assert status_json(pair, "--config", str(conf))["source"] == "from_file"
    # DBSYNC_CONFIG names the file just as well, and it supplies the DSNs on its own.
    proc = dbsync("status", "--json", env={"DBSYNC_CONFIG": str(conf)})
    assert json.loads(proc.stdout)["source"] == "from_file", proc.stderr


def test_settings_from_dbsync_table_and_precedence(pair: DbPair, tmp_path: Path) -> None:
    nowhere = closed_port_dsn()
    conf = tmp_path / "dbsync.toml"
    conf.write_text(
        "[dbsync]\n"
        f"site_dsn = {toml_str(nowhere)}\n"  # beaten by the environment below
        f"agent_dsn = {toml_str(pair.agent_dsn)}\n"
        'source = "from_file"\n'
    )

    def source(*flags: str, **env: str) -> str:
        proc = dbsync("status", "--json", "--config", str(conf), *flags, env=env)
        assert proc.returncode in (0, 1) and proc.stdout, proc.stderr
        return str(json.loads(proc.stdout)["source"])

    assert source(DBSYNC_SITE_DSN=pair.site_dsn) == "from_file"
    assert source(DBSYNC_SITE_DSN=pair.site_dsn, DBSYNC_SOURCE="from_env") == "from_env"
    assert source("--source", "from_flag", DBSYNC_SITE_DSN=pair.site_dsn, DBSYNC_SOURCE="from_env") == "from_flag"
    # An empty variable is as good as unset.
    assert source(DBSYNC_SITE_DSN=pair.site_dsn, DBSYNC_SOURCE="") == "from_file"
    # A DSN flag beats the environment too.
    assert source("--site-dsn", pair.site_dsn, DBSYNC_SITE_DSN=nowhere) == "from_file"
    # Without the environment the file's unreachable DSN is used, and the failure says so.
    assert_one_line_error(dbsync("status", "--config", str(conf)), "cannot connect to the Site DB")


def test_config_flag_beats_dbsync_config(pair: DbPair, tmp_path: Path) -> None:
    env_file, flag_file = tmp_path / "env.toml", tmp_path / "flag.toml"
    for path, name in ((env_file, "env_file"), (flag_file, "flag_file")):
        path.write_text(
            f"site_dsn = {toml_str(pair.site_dsn)}\nagent_dsn = {toml_str(pair.agent_dsn)}\nsource = {toml_str(name)}\n"
        )
    proc = dbsync("status", "--json", "--config", str(flag_file), env={"DBSYNC_CONFIG": str(env_file)})
    assert json.loads(proc.stdout)["source"] == "flag_file", proc.stderr


# -- bad input: one line, non-zero, no traceback, no password ------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_missing_dsn(command: str) -> None:
    proc = dbsync(*command_lines(None, None)[command])
    if command == "migrate":
        assert_one_line_error(proc, "no database to migrate")
    else:
        assert_one_line_error(proc, "site_dsn is not set", "--site-dsn", "DBSYNC_SITE_DSN")


@pytest.mark.parametrize("command", ["tables add", "status", "status --json", "run --once"])
def test_missing_agent_dsn(command: str) -> None:
    proc = dbsync(*command_lines(None, None)[command], env={"DBSYNC_SITE_DSN": closed_port_dsn()})
    assert_one_line_error(proc, "agent_dsn is not set", "--agent-dsn", "DBSYNC_AGENT_DSN")


MALFORMED = {
    "unknown-keyword": f"host=127.0.0.1 dbname=x password={SECRET} bogus_option=1",
    "quoted-password": f"host=127.0.0.1 password='{SECRET} with space' bogus_option=1",
    "unterminated-quote": f"host=127.0.0.1 password={SECRET} dbname='x",
    "url": f"postgresql://someone:{SECRET}@127.0.0.1:5432/x?bogus_option=1",
    "url-query-password": f"postgresql://someone@127.0.0.1:5432/x?password={SECRET}&bogus_option=1",
    "not-a-dsn": "this is not a dsn",
}


def _malformed_cases() -> Iterator[Any]:
    # Every form through a psycopg command and the daemon; two forms through every command.
    for name, dsn in MALFORMED.items():
        for command in COMMANDS:
            if command in ("status", "run --once") or name in ("unknown-keyword", "url"):
                yield pytest.param(command, dsn, id=f"{command}-{name}")
    # A password typed without "password=" cannot be recognised as one, but is still a secret.
    yield pytest.param(
        "status",
        f"host=127.0.0.1 user=someone {SECRET}",
        id="status-password-without-keyword",
    )


@pytest.mark.parametrize(("command", "dsn"), list(_malformed_cases()))
def test_malformed_dsn(command: str, dsn: str) -> None:
    assert_one_line_error(dbsync(*command_lines(dsn, closed_port_dsn())[command]), "site_dsn")


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_dsn_from_environment(name: str) -> None:
    env = {"DBSYNC_SITE_DSN": closed_port_dsn(), "DBSYNC_AGENT_DSN": MALFORMED[name]}
    assert_one_line_error(dbsync("run", "--once", env=env), "agent_dsn")


# The daemon translates DSNs for asyncpg itself; these values pass libpq's parser.
ODD_VALUES = {
    "port-out-of-range": f"host=127.0.0.1 port=99999 dbname=x password={SECRET}",
    "port-not-a-number": f"host=127.0.0.1 port=abc dbname=x password={SECRET}",
    "connect-timeout-not-a-number": f"host=127.0.0.1 port=1 dbname=x password={SECRET} connect_timeout=abc",
    "sslmode-unknown": f"host=127.0.0.1 port=1 dbname=x password={SECRET} sslmode=bogus",
}


def _odd_value_cases() -> Iterator[Any]:
    for name, dsn in ODD_VALUES.items():
        for command in ("migrate", "tables list", "status", "run --once"):
            yield pytest.param(command, dsn, id=f"{command}-{name}")


@pytest.mark.parametrize(("command", "dsn"), list(_odd_value_cases()))
def test_dsn_with_a_bad_value(command: str, dsn: str) -> None:
    assert_one_line_error(dbsync(*command_lines(dsn, dsn)[command]))


@pytest.mark.parametrize("command", COMMANDS)
def test_unreachable_database(command: str) -> None:
    nowhere = closed_port_dsn()
    # Which side is tried first is the command's business; either way the line names it.
    line = assert_one_line_error(
        dbsync(*command_lines(nowhere, nowhere)[command]), "cannot connect to the ", "127.0.0.1"
    )
    assert "Site DB" in line or "Agent DB" in line


@pytest.mark.parametrize("command", ["migrate", "tables add", "status", "run --once"])
def test_unreachable_agent(pair: DbPair, command: str) -> None:
    proc = dbsync(*command_lines(with_password(pair.site_dsn), closed_port_dsn())[command])
    assert_one_line_error(proc, "cannot connect to the Agent DB")


def test_migrate_with_unreachable_agent_is_one_line(bare_pair: DbPair) -> None:
    proc = dbsync("migrate", "--site-dsn", bare_pair.site_dsn, "--agent-dsn", closed_port_dsn())
    assert_one_line_error(proc, "cannot connect to the Agent DB")


BAD_CONFIGS = {
    "missing": None,
    "not-toml": f'site_dsn = "host=127.0.0.1 password={SECRET}\n[[[\n',
    "unknown-key": f'site_dsn = "host=127.0.0.1 password={SECRET}"\nsite_dns = "typo"\n',
    "unknown-key-in-table": f'[dbsync]\nsite_dsn = "host=127.0.0.1 password={SECRET}"\nbogus = 1\n',
    "negative-batch-size": f'site_dsn = "host=127.0.0.1 password={SECRET}"\nbatch_size = -5\n',
    "negative-batch-size-in-table": "[dbsync]\nbatch_size = -5\n",
    "zero-batch-size": "batch_size = 0\n",
    "batch-size-not-a-number": 'batch_size = "lots"\n',
    "negative-poll-interval": "poll_interval = -1.0\n",
    "dbsync-not-a-table": "dbsync = 3\n",
    "not-utf8": b"site_dsn = '\xff\xfe'\n",
}
EXPECT_CONFIG = {
    "missing": "does not exist",
    "not-toml": "not valid TOML",
    "unknown-key": "unknown setting 'site_dns'",
    "unknown-key-in-table": "unknown setting 'bogus'",
    "negative-batch-size": "batch_size",
    "negative-batch-size-in-table": "batch_size",
    "zero-batch-size": "batch_size",
    "batch-size-not-a-number": "batch_size",
    "negative-poll-interval": "poll_interval",
    "dbsync-not-a-table": "table",
    "not-utf8": "not valid TOML",
}


def _config_cases() -> Iterator[Any]:
    # Every problem through the two kinds of command (psycopg and the daemon), and the two most
    # common ones through every command: they share one loader.
    for name in BAD_CONFIGS:
        for command in COMMANDS:
            if command in ("status", "run --once") or name in ("missing", "not-toml"):
                yield pytest.param(command, name, id=f"{command}-{name}")


@pytest.mark.parametrize(("command", "problem"), list(_config_cases()))
def test_bad_config_file(command: str, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "conf" / "dbsync.toml"
    content = BAD_CONFIGS[problem]
    if content is not None:
        path.parent.mkdir()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    nowhere = closed_port_dsn()
    line = assert_one_line_error(
        dbsync(*command_lines(nowhere, nowhere)[command], "--config", str(path)), EXPECT_CONFIG[problem]
    )
    assert "config file" in line and str(path) in line
    # The same file named by DBSYNC_CONFIG.
    assert_one_line_error(
        dbsync(*command_lines(nowhere, nowhere)[command], env={"DBSYNC_CONFIG": str(path)}), EXPECT_CONFIG[problem]
    )


@pytest.mark.parametrize(
    ("args", "env", "expect"),
    [
        (["--batch-size", "-5"], {}, "option --batch-size"),
        (["--batch-size", "0"], {}, "option --batch-size"),
        (["--poll-interval", "-1"], {}, "option --poll-interval"),
        ([], {"DBSYNC_BATCH_SIZE": "-5"}, "DBSYNC_BATCH_SIZE"),
        ([], {"DBSYNC_BATCH_SIZE": "many"}, "DBSYNC_BATCH_SIZE"),
        ([], {"DBSYNC_POLL_INTERVAL": "0"}, "DBSYNC_POLL_INTERVAL"),
        ([], {"DBSYNC_RETRY_MAX": "-1"}, "DBSYNC_RETRY_MAX"),
        ([], {"DBSYNC_IO_TIMEOUT": "abc"}, "DBSYNC_IO_TIMEOUT"),
    ],
    ids=[
        "flag-negative",
        "flag-zero",
        "flag-poll",
        "env-negative",
        "env-not-a-number",
        "env-poll",
        "env-retry",
        "env-io-timeout",
    ],
)
def test_bad_numbers_from_flags_and_environment(args: list[str], env: dict[str, str], expect: str) -> None:
    nowhere = closed_port_dsn()
    proc = dbsync("run", "--once", "--site-dsn", nowhere, "--agent-dsn", nowhere, *args, env=env)
    assert_one_line_error(proc, expect)


# -- a server that requires a password -----------------------------------------------------------
PW_ROLE = "dbsync_pw_test"
RIGHT_PASSWORD = "correct-horse-battery"


def _require_password(server: Server, role: str, on: bool) -> None:
    assert server.cluster is not None
    hba = server.cluster.datadir / "pg_hba.conf"
    line = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
    text = hba.read_text().replace(line, "")
    hba.write_text(line + text if on else text)  # rewritten in place: owner and mode stay
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def password_role(servers: tuple[Server, Server]) -> Iterator[str]:
    """A role that must log in with a password on both servers (the clusters trust everyone else)."""
    if any(s.cluster is None for s in servers):
        pytest.skip("servers given by DSN: their authentication setup is not ours to change")
    for server in servers:
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {PW_ROLE}")
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"CREATE ROLE {PW_ROLE} LOGIN PASSWORD '{RIGHT_PASSWORD}'")
        _require_password(server, PW_ROLE, True)

    def refused(server: Server, password: str) -> bool:
        try:
            psycopg.connect(make_conninfo(server.admin_dsn, user=PW_ROLE, password=password)).close()
        except psycopg.OperationalError as exc:
            return "password authentication failed" in str(exc)
        return False

    for server in servers:
        wait_until(functools.partial(refused, server, SECRET), timeout=10, what="pg_hba.conf to require a password")
        assert not refused(server, RIGHT_PASSWORD)
    yield PW_ROLE
    for server in servers:
        _require_password(server, PW_ROLE, False)
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {PW_ROLE}")


@pytest.mark.parametrize("command", COMMANDS)
def test_wrong_password(pair: DbPair, password_role: str, command: str) -> None:
    wrong_site = make_conninfo(pair.site_dsn, user=password_role, password=SECRET)
    line = assert_one_line_error(
        dbsync(*command_lines(wrong_site, pair.agent_dsn)[command]),
        "cannot connect to the Site DB",
        "password authentication failed",
    )
    assert password_role in line
    # No password at all: also one line.
    no_password = make_conninfo(pair.site_dsn, user=password_role)
    assert_one_line_error(dbsync(*command_lines(no_password, pair.agent_dsn)[command]), "cannot connect")


@pytest.mark.parametrize("command", ["tables add", "status", "run --once"])
def test_wrong_agent_password(pair: DbPair, password_role: str, command: str) -> None:
    wrong_agent = make_conninfo(pair.agent_dsn, user=password_role, password=SECRET)
    proc = dbsync(*command_lines(pair.site_dsn, wrong_agent)[command])
    assert_one_line_error(proc, "cannot connect to the Agent DB", "password authentication failed")


# -- databases that are reachable but not ready --------------------------------------------------
@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "migrate"])
def test_unmigrated_databases(bare_pair: DbPair, command: str) -> None:
    bare_pair.site().execute("CREATE TABLE public.leads (id int PRIMARY KEY)")
    bare_pair.agent().execute("CREATE TABLE public.leads (id int PRIMARY KEY)")
    proc = dbsync(*command_lines(with_password(bare_pair.site_dsn), with_password(bare_pair.agent_dsn))[command])
    line = assert_one_line_error(proc)
    if command.startswith(("status", "run")):
        assert "dbsync migrate" in line


@pytest.mark.parametrize("command", ["tables list", "status", "status --json", "run --once"])
def test_role_without_privileges(pair: DbPair, command: str) -> None:
    with psycopg.connect(pair.site_server.admin_dsn, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'dbsync_nobody'").fetchone() is None:
            conn.execute("CREATE ROLE dbsync_nobody LOGIN")
    site = make_conninfo(pair.site_dsn, user="dbsync_nobody", password=SECRET)
    assert_one_line_error(dbsync(*command_lines(site, pair.agent_dsn)[command]), "permission denied")


# Everything a migration creates, as text: relations, dbsync's functions (with their bodies),
# constraints and triggers.
CATALOG_SHAPE = """
SELECT coalesce(string_agg(x, E'\\n' ORDER BY x), '') FROM (
    SELECT 'rel ' || oid::regclass::text || ' ' || relkind::text AS x FROM pg_class
     WHERE relnamespace IN (SELECT oid FROM pg_namespace WHERE nspname IN ('dbsync', 'public'))
    UNION ALL
    SELECT 'fn ' || p.oid::regprocedure::text || ' ' || md5(pg_get_functiondef(p.oid)) FROM pg_proc p
     WHERE pronamespace IN (SELECT oid FROM pg_namespace WHERE nspname = 'dbsync') AND prokind <> 'a'
    UNION ALL
    SELECT 'con ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
      FROM pg_constraint WHERE connamespace IN (SELECT oid FROM pg_namespace WHERE nspname IN ('dbsync', 'public'))
    UNION ALL
    SELECT 'trg ' || tgrelid::regclass::text || ' ' || tgname FROM pg_trigger WHERE NOT tgisinternal
) s
"""


@pytest.mark.parametrize("side", migrations.SIDES)
def test_every_migration_rolls_back_exactly(bare_pair: DbPair, side: str) -> None:
    """Applied one at a time (core and the WhatsApp pack), then rolled back one at a time: each
    rollback returns the catalog to exactly what it was before its migration."""
    from yoyo import read_migrations

    dsn = bare_pair.site_dsn if side == "site" else bare_pair.agent_dsn
    shipped_ms = read_migrations(*(str(d) for d in migrations.migration_dirs(side, ["whatsapp"])))
    with psycopg.connect(dsn, autocommit=True) as conn:

        def shape() -> str:
            return str(conn.execute(CATALOG_SHAPE).fetchone()[0])  # type: ignore[index]

        with migrations._backend(dsn) as backend, backend.lock():
            todo = list(backend.to_apply(shipped_ms))  # in dependency order
            assert len(todo) >= 2

            def just(mid: str) -> Any:
                return shipped_ms.filter(lambda m: m.id == mid)

            before = []
            for migration in todo:
                before.append(shape())
                backend.apply_migrations(just(migration.id))
            applied = shape()
            for migration, expected in zip(reversed(todo), reversed(before), strict=True):
                backend.rollback_migrations(just(migration.id))
                assert shape() == expected, f"rolling back {migration.id} did not restore the catalog"
        assert migrations.apply(dsn, side, ["whatsapp"]) == [m.id for m in todo]
        assert shape() == applied


# -- passwords on the command line ---------------------------------------------------------------
def ran(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """`dbsync status` ran (exit 1: unhealthy, as no daemon runs here)."""
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    return proc


def ps_warnings(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if PS_WARNING in line]


def test_password_in_a_dsn_flag_warns_once(pair: DbPair, tmp_path: Path) -> None:
    """Any local user sees a process's arguments: a password given by flag earns one warning
    naming the safer ways; the same DSNs from the environment or the config file earn none."""
    site, agent = with_password(pair.site_dsn), with_password(pair.agent_dsn)  # trust auth ignores it
    proc = ran(dbsync("status", "--json", "--site-dsn", site, "--agent-dsn", agent))
    [warning] = ps_warnings(proc)
    for way in (
        "--site-dsn",
        "--agent-dsn",
        "DBSYNC_SITE_DSN",
        "DBSYNC_AGENT_DSN",
        "pgpass",
        "passfile",
        "config file",
    ):
        assert way in warning, warning
    assert SECRET not in proc.stdout + proc.stderr
    json.loads(proc.stdout)  # stdout untouched

    # One side only: named alone. URL forms count too.
    url = f"postgresql://nobody:{SECRET}@127.0.0.1:{free_port()}/x"
    [warning] = ps_warnings(dbsync("status", "--site-dsn", pair.site_dsn, "--agent-dsn", agent))
    assert "--agent-dsn" in warning and "--site-dsn" not in warning
    query = f"postgresql://nobody@127.0.0.1:{free_port()}/x?password={SECRET}"
    assert ps_warnings(dbsync("tables", "list", "--site-dsn", query))
    assert ps_warnings(dbsync("tables", "list", "--site-dsn", url))
    # Also in JSON logs, as one JSON record.
    proc = dbsync("--log-format", "json", "status", "--site-dsn", site, "--agent-dsn", agent)
    [warning] = ps_warnings(proc)
    assert json.loads(warning)["level"] == "warning"

    # No password in the flags, or the password from the environment or the file: no warning.
    assert not ps_warnings(ran(dbsync("status", "--site-dsn", pair.site_dsn, "--agent-dsn", pair.agent_dsn)))
    assert not ps_warnings(ran(dbsync("status", env={"DBSYNC_SITE_DSN": site, "DBSYNC_AGENT_DSN": agent})))
    conf = tmp_path / "dbsync.toml"
    conf.write_text(f"site_dsn = {toml_str(site)}\nagent_dsn = {toml_str(agent)}\n")
    assert not ps_warnings(ran(dbsync("status", "--config", str(conf))))
    assert not ps_warnings(ran(dbsync("status", env={"DBSYNC_CONFIG": str(conf)})))
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:*:{SECRET}\n")
    passfile.chmod(0o600)
    with_passfile = make_conninfo(pair.site_dsn, passfile=str(passfile))
    assert not ps_warnings(ran(dbsync("status", "--site-dsn", with_passfile, "--agent-dsn", pair.agent_dsn)))


# Passwords that libpq can mangle into a host or database name, which its errors quote:
# (DSN, the password as typed and as decoded).
HARD_PASSWORDS = {
    "url-unencoded-at": ("postgresql://someone:Mj4@Leak77@127.0.0.1:{port}/nowhere?connect_timeout=5", ("Mj4@Leak77",)),
    "url-unencoded-at-colon-slash": (
        "postgresql://someone:Mj4@Le:ak/77@127.0.0.1:{port}/nowhere?connect_timeout=5",
        ("Mj4@Le:ak/77",),
    ),
    "url-percent-encoded": (
        "postgresql://someone:Mj4%40Leak77@127.0.0.1:{port}/nowhere?connect_timeout=5",
        ("Mj4%40Leak77", "Mj4@Leak77"),
    ),
    "url-query": ("postgresql://someone@127.0.0.1:{port}/nowhere?password=Mj4Leak77&connect_timeout=5", ("Mj4Leak77",)),
    "kv-quoted": (
        "host=127.0.0.1 port={port} user=someone password='Mj4 @Leak77' dbname=nowhere connect_timeout=5",
        ("Mj4 @Leak77",),
    ),
}


def assert_no_fragment(text: str, secrets: tuple[str, ...]) -> None:
    for secret in secrets:
        leaked = sorted(secret[i : i + 3] for i in range(len(secret) - 2) if secret[i : i + 3] in text)
        assert not leaked, f"{leaked} of {secret!r} in:\n{text}"


@pytest.mark.parametrize("command", ["status", "run --once", "migrate"])
@pytest.mark.parametrize("form", list(HARD_PASSWORDS))
def test_failed_connection_shows_no_part_of_the_password(form: str, command: str) -> None:
    template, secrets = HARD_PASSWORDS[form]
    dsn = template.format(port=free_port())
    env = {"DBSYNC_SITE_DSN": dsn, "DBSYNC_AGENT_DSN": dsn}
    for args, extra in ((command_lines(dsn, dsn)[command], None), (command.split(), env)):
        proc = dbsync(*args, env=extra)
        assert_one_line_error(proc)
        assert_no_fragment(proc.stdout + proc.stderr, secrets)
