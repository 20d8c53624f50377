"""`dbsync tables add|remove` with several tables: all or nothing, and a backfill that stops half-way
says exactly where things stand and what to run.

A half-added set is worse than a refused one: rerunning the same command says "already replicated"
and the rows the first table already held never reach the Agent DB.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys

import psycopg
import pytest

from tests.helpers import DbPair, assert_same, count, dbsync_cmd, sync_once, wait_until

WHATSAPP = ["public.conversations", "public.leads", "public.whatsapp_messages"]


def installed(site: psycopg.Connection, table: str) -> tuple[int, int]:
    """(dbsync triggers on the table, its live rows in dbsync.replicated_tables)."""
    row = site.execute(
        "SELECT (SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname LIKE 'dbsync%%'), "
        "(SELECT count(*) FROM dbsync.replicated_tables WHERE relid = to_regclass(%s) AND removed_at IS NULL)",
        (table, table),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def replicated(pair: DbPair) -> list[str]:
    proc = dbsync_cmd("tables", "list", "--json", env=pair.env())
    assert proc.returncode == 0, proc.stderr
    return [t["table"] for t in json.loads(proc.stdout)]


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error line (progress lines of a backfill may come before it)."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dbsync: ")]
    assert len(errors) == 1 and proc.stderr.splitlines()[-1] == errors[0], proc.stderr
    return errors[0]


def make_table(pair: DbPair, name: str, rows: int = 0, *, site_only: str = "", agent: bool = True) -> None:
    ddl = f"CREATE TABLE {name} (id integer PRIMARY KEY, v text)"
    pair.site().execute(site_only or ddl)
    if agent:
        pair.agent().execute(ddl)
    if rows:
        pair.site().execute(f"INSERT INTO {name} SELECT g, 'row ' || g FROM generate_series(1, %s) g", (rows,))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param("public.nopk", "has no primary key", id="no-primary-key"),
        pytest.param("public.siteonly", "does not exist on the Agent DB", id="missing-on-agent"),
        pytest.param("public.nowhere", "does not exist on the Site DB", id="missing-on-site"),
        pytest.param("public.leads", "already replicated", id="already-replicated"),
    ],
)
def test_add_checks_every_table_before_installing_any(pair: DbPair, bad: str, reason: str) -> None:
    make_table(pair, "public.good", rows=30)
    if bad == "public.nopk":
        make_table(pair, bad, site_only="CREATE TABLE public.nopk (id integer, v text)")
    elif bad == "public.siteonly":
        make_table(pair, bad, agent=False)

    proc = dbsync_cmd("tables", "add", "--backfill", "good", bad, env=pair.env())

    line = error_line(proc)
    assert bad in line and reason in line and "no table was added" in line, line
    assert "replicating" not in proc.stdout and "backfill" not in proc.stdout, proc.stdout
    assert installed(pair.site(), "public.good") == (0, 0)
    assert replicated(pair) == WHATSAPP

    # Without the bad table the same command goes through, and good's existing rows arrive.
    proc = dbsync_cmd("tables", "add", "--backfill", "good", env=pair.env())
    assert proc.returncode == 0, proc.stderr
    assert "public.good: backfill complete: 30 rows" in proc.stdout
    sync_once(pair)
    assert count(pair.agent_dsn, "public.good") == 30


def test_add_reports_every_problem_in_one_line(pair: DbPair) -> None:
    make_table(pair, "public.nopk", site_only="CREATE TABLE public.nopk (id integer, v text)")
    make_table(pair, "public.good")
    line = error_line(dbsync_cmd("tables", "add", "nopk", "good", "nowhere", "public.nopk", env=pair.env()))
    assert "public.nopk has no primary key" in line and "'nowhere' does not exist on the Site DB" in line, line
    assert line.count("has no primary key") == 1, line  # named twice, said once
    assert line.endswith("no table was added"), line
    assert installed(pair.site(), "public.good") == (0, 0)


def test_add_installs_capture_on_all_tables_or_none(pair: DbPair) -> None:
    """A failure the checks cannot see (here a trigger of that name already there) undoes the
    tables installed before it in the same command."""
    make_table(pair, "public.first")
    make_table(pair, "public.clash")
    pair.site().execute(
        "CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END';"
        "CREATE TRIGGER dbsync_capture_update AFTER UPDATE ON public.clash FOR EACH ROW EXECUTE FUNCTION public.noop()"
    )
    line = error_line(dbsync_cmd("tables", "add", "first", "clash", env=pair.env()))
    assert "cannot add public.clash" in line and "already exists" in line and "no table was added" in line, line
    assert installed(pair.site(), "public.first") == (0, 0)
    assert replicated(pair) == WHATSAPP


def test_add_names_a_table_once_however_it_is_spelled(pair: DbPair) -> None:
    make_table(pair, "public.good")
    proc = dbsync_cmd("tables", "add", "good", "public.good", '"public"."good"', env=pair.env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["replicating public.good (key: id)"]


def backfill_blocked_on(pair: DbPair, watcher: psycopg.Connection) -> int | None:
    """The pid of a backfill chunk waiting for a row lock, if there is one."""
    row = watcher.execute(
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%%backfill_step%%'"
    ).fetchone()
    return int(row[0]) if row else None


@pytest.mark.parametrize("fault", ["connection-lost", "interrupted"])
def test_backfill_stopping_after_capture_says_what_is_done_and_what_to_run(pair: DbPair, fault: str) -> None:
    """Capture is installed on all three tables, a's rows are copied, b's copy stops half-way
    (its Site connection is cut, or the user presses Ctrl-C): the last line says so, and the command it
    names finishes the job."""
    for name in ("public.a", "public.b", "public.c"):
        make_table(pair, name, rows=500)
    blocker = pair.site()
    blocker.execute("BEGIN")
    # A row lock that lets `tables add` install its triggers but holds the copy of b at row 250.
    blocker.execute("SELECT * FROM public.b WHERE id = 250 FOR UPDATE")
    with subprocess.Popen(
        [sys.executable, "-m", "dbsync", "tables", "add", "--backfill", "--chunk-size", "100", "a", "b", "c"],
        env=pair.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            watcher = pair.site()
            pid = wait_until(lambda: backfill_blocked_on(pair, watcher), 60, what="backfill of b waiting on the lock")
            if fault == "connection-lost":
                watcher.execute("SELECT pg_terminate_backend(%s)", (pid,))
            else:
                proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    blocker.execute("COMMIT")

    assert proc.returncode == (2 if fault == "connection-lost" else 130), stderr
    assert "Traceback" not in stderr, stderr
    line = stderr.splitlines()[-1]
    assert line.startswith("dbsync: error: backfill of public.b "), line
    assert ("failed: terminating connection" if fault == "connection-lost" else "interrupted") in line, line
    assert "capture is installed on public.a, public.b, public.c" in line, line
    assert "rows of public.a are queued" in line, line
    assert "public.b, public.c are not yet" in line, line
    assert "public.a: backfill complete: 500 rows" in stdout, stdout
    assert replicated(pair) == sorted([*WHATSAPP, "public.a", "public.b", "public.c"])

    # The command the line names, run as written, copies the rest.
    command = shlex.split(line.split("`")[1])
    assert command[:2] == ["dbsync", "backfill"], line
    done = dbsync_cmd(*command[1:], env=pair.env())
    assert done.returncode == 0, done.stderr
    assert "public.b: backfill complete: 500 rows" in done.stdout
    assert "public.c: backfill complete: 500 rows" in done.stdout
    sync_once(pair)
    assert_same(pair, ["public.a", "public.b", "public.c"])


def test_paused_backfill_names_the_command_that_resumes_it(pair: DbPair) -> None:
    make_table(pair, "public.a", rows=300)
    proc = dbsync_cmd("tables", "add", "--backfill", "--chunk-size", "100", "--max-chunks", "1", "a", env=pair.env())
    assert proc.returncode == 0, proc.stderr
    assert "public.a: backfill paused after 100 rows; run `dbsync backfill public.a` to resume" in proc.stdout


def test_remove_is_all_or_nothing(pair: DbPair) -> None:
    for bad, reason in (
        ("notifications", "public.notifications is not replicated"),
        ("nowhere", "'nowhere' does not exist on the Site DB"),
    ):
        line = error_line(dbsync_cmd("tables", "remove", "conversations", bad, env=pair.env()))
        assert reason in line and line.endswith("no table was removed"), line
        assert installed(pair.site(), "public.conversations") == (4, 1)  # insert, update, delete, truncate
    assert replicated(pair) == WHATSAPP

    proc = dbsync_cmd("tables", "remove", "conversations", "leads", "public.leads", env=pair.env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "no longer replicating public.conversations",
        "no longer replicating public.leads",
    ]
    assert replicated(pair) == ["public.whatsapp_messages"]
    assert installed(pair.site(), "public.leads") == (0, 0)
