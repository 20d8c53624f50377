"""Column lists and row filters (sql/site/0009_site_filters.sql, `dbsync tables add --columns /
--where`, `dbsync tables alter`): what is left out never reaches the Agent DB, rows entering and
leaving the filter are inserted and deleted there, and a filter can only call built-in code."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from yoyo import read_migrations

from dbsync import migrations
from tests.helpers import Daemon, DbPair, dbsync_cmd, sync_once, wait_until

pytestmark = pytest.mark.usefixtures("pair")

SITE_DDL = """
CREATE TYPE public.tstate AS ENUM ('open', 'closed');
CREATE TABLE public.tickets (
    id integer PRIMARY KEY,
    tenant integer NOT NULL,
    state public.tstate NOT NULL DEFAULT 'open',
    title text,
    secret text
);
"""
# The Agent has no column for the secret: were it ever read and sent, the apply would fail.
AGENT_DDL = """
CREATE TYPE public.tstate AS ENUM ('open', 'closed');
CREATE TABLE public.tickets (
    id integer PRIMARY KEY,
    tenant integer NOT NULL,
    state public.tstate NOT NULL DEFAULT 'open',
    title text
);
"""
COLUMNS = "id,tenant,state,title"
LISTED = "id, tenant, state, title"


def _setup(pair: DbPair) -> tuple[psycopg.Connection, psycopg.Connection]:
    site, agent = pair.site(), pair.agent()
    site.execute(SITE_DDL)
    agent.execute(AGENT_DDL)
    return site, agent


def _cli(pair: DbPair, *args: str) -> str:
    result = dbsync_cmd(*args, env=pair.env())
    assert result.returncode == 0, f"dbsync {' '.join(args)} failed: {result.stdout}{result.stderr}"
    return result.stdout


def _refused(pair: DbPair, *args: str) -> str:
    result = dbsync_cmd(*args, env=pair.env())
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _site_rows(pair: DbPair, where: str) -> list[tuple[object, ...]]:
    with psycopg.connect(pair.site_dsn, autocommit=True) as conn:
        return conn.execute(f"SELECT {LISTED} FROM public.tickets WHERE {where} ORDER BY id").fetchall()


def _agent_rows(pair: DbPair) -> list[tuple[object, ...]]:
    with psycopg.connect(pair.agent_dsn, autocommit=True) as conn:
        return conn.execute(f"SELECT {LISTED} FROM public.tickets ORDER BY id").fetchall()


def assert_log_holds_no_secret(site: psycopg.Connection) -> int:
    """Backfill and repair log row images too (unread by the daemon): never an unlisted column.
    Returns how many images the log holds."""
    images, with_secret = site.execute(
        "SELECT count(row_image), count(*) FILTER (WHERE row_image ? 'secret') FROM dbsync.sync_log"
    ).fetchone()  # type: ignore[misc]
    assert with_secret == 0
    return int(images)


def assert_filtered(pair: DbPair, where: str = "true") -> None:
    """The Agent holds exactly the listed columns of the Site rows that match."""
    assert _agent_rows(pair) == _site_rows(pair, where)


def test_set_table_filter_sql(pair: DbPair) -> None:
    site, _ = _setup(pair)
    site.execute("SELECT dbsync.add_table('public.tickets'::regclass)")
    site.execute(
        "SELECT dbsync.set_table_filter('public.tickets'::regclass, %s, %s)",
        (["title", "id", "tenant", "state"], "tenant = 1 AND state <> 'closed'"),
    )
    row = site.execute("SELECT column_list, row_filter FROM dbsync.replicated_tables WHERE table_name = 'tickets'")
    cols, where = row.fetchone()  # type: ignore[misc]
    assert cols == ["id", "tenant", "state", "title"]
    assert "tenant = 1" in where, where
    site.execute("INSERT INTO public.tickets VALUES (1, 1, 'open', 'a', 's1'), (2, 2, 'open', 'b', 's2')")
    tid = site.execute("SELECT table_id FROM dbsync.replicated_tables WHERE table_name = 'tickets'").fetchone()[0]  # type: ignore[index]
    images = site.execute(
        'SELECT ord, image::text FROM dbsync.read_rows(%s, \'[{"id": "1"}, {"id": "2"}]\')', (tid,)
    ).fetchall()
    assert len(images) == 1 and images[0][0] == 1
    assert json.loads(images[0][1]) == {"id": "1", "tenant": "1", "state": "open", "title": "a"}


def _read(site: psycopg.Connection, ids: list[int]) -> dict[int, dict[str, str]]:
    tid = site.execute("SELECT table_id FROM dbsync.replicated_tables WHERE table_name = 'tickets'").fetchone()[0]  # type: ignore[index]
    keys = json.dumps([{"id": str(i)} for i in ids])
    rows = site.execute("SELECT ord, image::text FROM dbsync.read_rows(%s, %s::json)", (tid, keys)).fetchall()
    return {ids[o - 1]: json.loads(image) for o, image in rows}


def test_renamed_table_is_read_the_general_way_with_the_same_selection(pair: DbPair) -> None:
    site, _ = _setup(pair)
    site.execute("SELECT dbsync.add_table('public.tickets'::regclass)")
    site.execute("SELECT dbsync.set_table_filter('public.tickets'::regclass, %s, %s)", (["id", "title"], "tenant = 1"))
    site.execute("INSERT INTO public.tickets VALUES (1, 1, 'open', 'a', 's1'), (2, 2, 'open', 'b', 's2')")
    assert _read(site, [1, 2]) == {1: {"id": "1", "title": "a"}}
    site.execute("ALTER TABLE public.tickets RENAME TO tickets_renamed")  # the reader no longer applies
    reads = site.execute("SELECT reader_reads FROM dbsync.replicated_tables WHERE table_name = 'tickets'")
    assert reads.fetchone()[0] == "public.tickets"  # type: ignore[index]
    assert _read(site, [1, 2]) == {1: {"id": "1", "title": "a"}}


def test_columns_never_leave_the_site_and_backfill_copies_only_them(pair: DbPair) -> None:
    site, agent = _setup(pair)
    site.execute(
        "INSERT INTO public.tickets SELECT g, g % 3, 'open', 't' || g, 'secret ' || g FROM generate_series(1, 40) g"
    )
    out = _cli(pair, "tables", "add", "--columns", COLUMNS, "public.tickets", "--backfill", "--chunk-size", "7")
    assert "columns: id, tenant, state, title" in out
    assert assert_log_holds_no_secret(site) == 40
    sync_once(pair)
    assert_filtered(pair)
    site.execute("UPDATE public.tickets SET title = 'new', secret = 'changed' WHERE id <= 5")
    site.execute("INSERT INTO public.tickets VALUES (100, 1, 'closed', 'x', 'hidden')")
    site.execute("DELETE FROM public.tickets WHERE id = 7")
    sync_once(pair)
    assert_filtered(pair)
    # An UPDATE of the unlisted column alone still reads the row, never the secret.
    site.execute("UPDATE public.tickets SET secret = 'again' WHERE id = 9")
    sync_once(pair)
    assert_filtered(pair)
    assert _cli(pair, "reconcile", "--table", "public.tickets")  # exit 0: in sync
    listed = json.loads(_cli(pair, "tables", "list", "--json"))
    (tickets,) = [t for t in listed if t["table"] == "public.tickets"]
    assert tickets["columns"] == ["id", "tenant", "state", "title"] and tickets["where"] is None
    assert "columns: id, tenant, state, title" in _cli(pair, "tables", "list")
    # The daemon's reads: nothing it reads names the secret.
    for image in _read(site, list(range(1, 101))).values():
        assert "secret" not in image
    del agent


def test_where_rows_enter_and_leave_under_the_running_daemon(pair: DbPair) -> None:
    site, agent = _setup(pair)
    site.execute("INSERT INTO public.tickets SELECT g, g % 3, 'open', 't' || g, 's' FROM generate_series(1, 30) g")
    where = "tenant = 1 AND state = 'open'"
    out = _cli(pair, "tables", "add", "--columns", COLUMNS, "--where", where, "public.tickets", "--backfill")
    assert "where: " in out
    with Daemon(pair):
        wait_until(lambda: _agent_rows(pair) == _site_rows(pair, where), what="the backfill of the matches")
        assert len(_agent_rows(pair)) == 10
        site.execute("UPDATE public.tickets SET state = 'closed' WHERE id IN (1, 4)")  # leave the filter
        site.execute("UPDATE public.tickets SET tenant = 1 WHERE id IN (2, 3)")  # enter it
        site.execute("INSERT INTO public.tickets VALUES (200, 1, 'open', 'in', 's'), (201, 2, 'open', 'out', 's')")
        site.execute("UPDATE public.tickets SET title = 'edited' WHERE tenant = 1")  # a statement, many keys
        site.execute("DELETE FROM public.tickets WHERE id = 7")
        wait_until(lambda: _agent_rows(pair) == _site_rows(pair, where), what="rows entering and leaving")
        ids = [r[0] for r in _agent_rows(pair)]
        assert 1 not in ids and 4 not in ids and 2 in ids and 3 in ids and 200 in ids and 201 not in ids
        # Alter: a wider filter while the daemon runs; the resync brings in the new matches.
        out = _cli(pair, "tables", "alter", "--where", "tenant IN (1, 2)", "public.tickets")
        assert "now replicating" in out
        wider = "tenant IN (1, 2)"
        wait_until(lambda: _agent_rows(pair) == _site_rows(pair, wider), what="the wider filter")
        # Narrower again: rows that stopped matching are deleted on the Agent.
        _cli(pair, "tables", "alter", "--where", "tenant = 2", "public.tickets")
        wait_until(lambda: _agent_rows(pair) == _site_rows(pair, "tenant = 2"), what="the narrower filter")
        _cli(pair, "tables", "alter", "--no-where", "public.tickets")
        wait_until(lambda: _agent_rows(pair) == _site_rows(pair, "true"), what="every row again")
    assert_filtered(pair)
    del agent


def test_reconcile_and_repair_respect_the_selection(pair: DbPair) -> None:
    site, agent = _setup(pair)
    site.execute("INSERT INTO public.tickets SELECT g, g % 2, 'open', 't' || g, 's' FROM generate_series(1, 50) g")
    _cli(pair, "tables", "add", "--columns", COLUMNS, "--where", "tenant = 1", "public.tickets", "--backfill")
    sync_once(pair)
    assert_filtered(pair, "tenant = 1")
    _cli(pair, "reconcile", "--table", "public.tickets")  # exit 0: the unmatched rows are not "missing"
    site.execute("UPDATE public.tickets SET secret = 'x' || id")  # unlisted: no difference either
    sync_once(pair)
    _cli(pair, "reconcile", "--table", "public.tickets")
    # Drift: a non-matching row on the Agent, a matching one missing, one changed.
    agent.execute("INSERT INTO public.tickets VALUES (2, 0, 'open', 't2')")
    agent.execute("DELETE FROM public.tickets WHERE id = 3")
    agent.execute("UPDATE public.tickets SET title = 'tampered' WHERE id = 5")
    result = dbsync_cmd("reconcile", "--json", "--table", "public.tickets", env=pair.env())
    assert result.returncode == 1, result.stdout + result.stderr
    site.execute("DELETE FROM dbsync.sync_log")  # applied; only the repair's events follow
    _cli(pair, "reconcile", "--repair", "--apply", "--table", "public.tickets")
    assert assert_log_holds_no_secret(site) >= 1
    assert_filtered(pair, "tenant = 1")
    _cli(pair, "reconcile", "--table", "public.tickets")


def test_each_refusal_is_one_clear_line(pair: DbPair) -> None:
    site, _ = _setup(pair)
    site.execute("CREATE TABLE public.other (id integer PRIMARY KEY)")
    pair.agent().execute("CREATE TABLE public.other (id integer PRIMARY KEY)")
    site.execute("CREATE FUNCTION public.mine(integer) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true'")
    add = ("tables", "add")
    cases = {
        ("--columns", "tenant,title"): "must include its key column(s) id",
        ("--columns", "id,nope"): "has no column(s) nope",
        ("--columns", "id,secret"): "on the Agent DB lacks column(s) secret",
        ("--where", "tenant = 1; DROP TABLE public.other"): "contains a semicolon",
        ("--where", "tenant"): "not a boolean expression",
        ("--where", "nope = 1"): "not a boolean expression",
        ("--where", "id IN (SELECT id FROM public.other)"): "not a boolean expression",
        ("--where", "count(*) > 1"): "not a boolean expression",
        ("--where", "row_number() OVER () > 1"): "not a boolean expression",
        ("--where", "generate_series(1, id) > 1"): "not a boolean expression",
        ("--where", "random() < 0.5"): "immutable",
        ("--where", "title::timestamptz > now()"): "immutable",
        ("--where", "public.mine(id)"): "built-in functions",
        ("--where", "id OPERATOR(public.=) 1"): "not a boolean expression",
        ("--where", "true) UNION SELECT (1"): "not a boolean expression",
        ("--where", "true), CHECK (false"): "not one boolean expression",
        ("--where", "true)) PARTITION BY RANGE ((id"): "not one boolean expression",
        ("--where", "true)) WITH (fillfactor = 50) --"): "not one boolean expression",
    }
    for args, expected in cases.items():
        listing = () if args[0] == "--columns" else ("--columns", COLUMNS)
        line = _refused(pair, *add, *listing, *args, "public.tickets")
        assert expected in line, (args, line)
        listed = json.loads(_cli(pair, "tables", "list", "--json"))
        assert "public.tickets" not in [t["table"] for t in listed], args  # all or nothing
    assert "one table" in _refused(pair, *add, "--where", "id > 1", "public.tickets", "public.other")
    _cli(pair, *add, "public.tickets", "--columns", COLUMNS)
    assert "nothing to change" in _refused(pair, "tables", "alter", "public.tickets")
    assert "lacks column(s) secret" in _refused(pair, "tables", "alter", "--all-columns", "public.tickets")
    assert "contradict" in _refused(pair, "tables", "alter", "--where", "true", "--no-where", "public.tickets")
    assert "not replicated" in _refused(pair, "tables", "alter", "--where", "true", "public.other")
    # A refused alter leaves the selection as it was.
    listed = json.loads(_cli(pair, "tables", "list", "--json"))
    (tickets,) = [t for t in listed if t["table"] == "public.tickets"]
    assert tickets["columns"] == ["id", "tenant", "state", "title"] and tickets["where"] is None


def test_a_table_added_again_starts_with_everything(pair: DbPair) -> None:
    site, agent = _setup(pair)
    agent.execute("ALTER TABLE public.tickets ADD COLUMN secret text")
    _cli(pair, "tables", "add", "--columns", COLUMNS, "--where", "tenant = 1", "public.tickets")
    _cli(pair, "tables", "remove", "public.tickets")
    _cli(pair, "tables", "add", "public.tickets")
    listed = json.loads(_cli(pair, "tables", "list", "--json"))
    (tickets,) = [t for t in listed if t["table"] == "public.tickets"]
    assert tickets["columns"] is None and tickets["where"] is None
    site.execute("INSERT INTO public.tickets VALUES (1, 2, 'open', 'a', 's1')")
    assert _read(site, [1]) == {1: {"id": "1", "tenant": "2", "state": "open", "title": "a", "secret": "s1"}}


def test_set_table_filter_is_not_for_public(pair: DbPair) -> None:
    site = pair.site()
    rows = site.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'dbsync'::regnamespace "
        "AND p.proname IN ('set_table_filter', 'check_row_filter', 'reader_statement', 'resync_image_columns') "
        "AND has_function_privilege('public', p.oid, 'EXECUTE')"
    ).fetchall()
    assert rows == []


def test_rollback_returns_to_readers_of_every_column_and_row(pair: DbPair) -> None:
    site, _ = _setup(pair)
    site.execute("SELECT dbsync.add_table('public.tickets'::regclass)")
    site.execute("SELECT dbsync.set_table_filter('public.tickets'::regclass, %s, %s)", (["id"], "tenant = 1"))
    site.execute("INSERT INTO public.tickets VALUES (1, 1, 'open', 'a', 's1'), (2, 2, 'open', 'b', 's2')")
    assert _read(site, [1, 2]) == {1: {"id": "1"}}
    shipped = read_migrations(*(str(d) for d in migrations.migration_dirs("site", ["whatsapp"])))
    with migrations._backend(pair.site_dsn) as backend, backend.lock():
        backend.rollback_migrations(shipped.filter(lambda m: m.id == "0009_site_filters"))
    assert set(_read(site, [1, 2])) == {1, 2} and "secret" in _read(site, [1])[1]
    assert site.execute("SELECT to_regproc('dbsync.set_table_filter')").fetchone() == (None,)
    assert migrations.apply(pair.site_dsn, "site", ["whatsapp"]) == ["0009_site_filters"]
    assert set(_read(site, [1, 2])) == {1, 2}  # upgraded again: no selection until one is set


def test_full_verification_ranges_and_keys_see_only_matching_rows(pair: DbPair) -> None:
    """The daemon's full verification (check_range) and the incremental one (check_keys)."""
    from dbsync.catchup import CatchUp
    from dbsync.db import connect
    from dbsync.reconcile import Comparer, check_keys, check_range, targets

    site, agent = _setup(pair)
    site.execute("INSERT INTO public.tickets SELECT g, g % 3, 'open', 't' || g, 's' FROM generate_series(1, 90) g")
    _cli(pair, "tables", "add", "--columns", COLUMNS, "--where", "tenant = 1", "public.tickets", "--backfill")
    sync_once(pair)
    agent.execute("INSERT INTO public.tickets VALUES (3, 0, 'open', 'not a match')")  # extra
    agent.execute("DELETE FROM public.tickets WHERE id = 4")  # missing
    found: set[tuple[str, str]] = set()
    with connect(pair.site_dsn, "Site") as s, connect(pair.agent_dsn, "Agent") as a:
        comparer = Comparer(s, a)
        try:
            catchup = CatchUp(s, a, pair.settings(), timeout=10)
            (target,) = [t for t in targets(s, a, ["public.tickets"])]
            assert target.site.columns == ("id", "tenant", "state", "title")
            after, total = None, 0
            while True:
                checked = check_range(comparer, catchup, target, after, 7)
                total += checked.diff.site_rows
                for kind in ("missing", "extra", "changed", "unsettled"):
                    found |= {(kind, key) for key in getattr(checked.diff, kind)}
                if checked.upto is None:
                    break
                after = checked.upto
            assert total == 30
            keys = [json.dumps({"id": str(i)}) for i in range(1, 11)]
            diff = check_keys(comparer, catchup, target, keys)
            assert (diff.missing, diff.extra, diff.changed) == (['{"id" : "4"}'], ['{"id" : "3"}'], [])
        finally:
            comparer.close()
    assert found == {("missing", '{"id" : "4"}'), ("extra", '{"id" : "3"}')}


def test_the_daemons_full_verification_respects_the_selection(pair: DbPair, tmp_path: Path) -> None:
    """A clean pass over a filtered table with a column list reports nothing; a non-matching row
    planted on the Agent is found, and --verify-repair removes it; after an alter, the passes
    compare under the new filter."""
    from dbsync.embedded.cluster import free_port
    from tests.test_service import metrics, ready, scrape_when
    from tests.test_verify import verify_daemon

    site, agent = _setup(pair)
    site.execute("INSERT INTO public.tickets SELECT g, g % 3, 'open', 't' || g, 's' FROM generate_series(1, 60) g")
    _cli(pair, "tables", "add", "--columns", COLUMNS, "--where", "tenant = 1", "public.tickets", "--backfill")
    port = free_port()
    with verify_daemon(pair, port, tmp_path / "daemon.log", "--verify-repair"):
        wait_until(lambda: ready(port), what="/readyz 200")
        wait_until(lambda: _agent_rows(pair) == _site_rows(pair, "tenant = 1"), what="the matches replicated")
        passes = wait_until(
            lambda: scrape_when(port, lambda m: m.get("dbsync_verify_passes_total", 0) >= 2), what="clean passes"
        )["dbsync_verify_passes_total"]
        assert metrics(port)["dbsync_verify_mismatches_total"] == 0
        agent.execute("INSERT INTO public.tickets VALUES (3, 0, 'open', 'not a match')")
        wait_until(lambda: _agent_rows(pair) == _site_rows(pair, "tenant = 1"), what="the extra row repaired")
        wait_until(lambda: metrics(port)["dbsync_verify_repaired_total"] == 1, what="the repair counted")
        _cli(pair, "tables", "alter", "--where", "tenant = 2", "public.tickets")
        wait_until(lambda: _agent_rows(pair) == _site_rows(pair, "tenant = 2"), what="the new filter applied")
        wait_until(
            lambda: scrape_when(port, lambda m: m.get("dbsync_verify_passes_total", 0) >= passes + 3),
            timeout=60,
            what="passes after the alter",
        )
        # Rows the alter moved may be seen differing until its resync is applied; none stays open.
        wait_until(lambda: metrics(port)["dbsync_verify_open_mismatches"] == 0, what="no open mismatch")
    assert_filtered(pair, "tenant = 2")


def test_schema_diff_compares_only_the_listed_columns(pair: DbPair) -> None:
    """The Agent lacks the unlisted secret: no difference. A listed column it lacks is one, and
    a column the Site gains off the list is none of the Agent's business."""
    site, agent = _setup(pair)
    _cli(pair, "tables", "add", "--columns", COLUMNS, "public.tickets")
    out = json.loads(_cli(pair, "schema", "diff", "--json"))
    assert out["tables"]["public.tickets"] == [] or not any(c["differs"] for c in out["tables"]["public.tickets"])
    site.execute("ALTER TABLE public.tickets ADD COLUMN note text")
    changes = json.loads(_cli(pair, "schema", "diff", "--json"))["tables"]["public.tickets"]
    assert all(c["column"] != "note" for c in changes), changes
    agent.execute("ALTER TABLE public.tickets DROP COLUMN title")
    result = dbsync_cmd("schema", "diff", "--json", env=pair.env())
    assert result.returncode == 1, result.stdout + result.stderr
    changes = json.loads(result.stdout)["tables"]["public.tickets"]
    assert [(c["kind"], c["column"]) for c in changes if c["differs"]] == [("missing_column", "title")], changes
