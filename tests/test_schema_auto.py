"""`auto_add_columns`, and what the daemon does when a Site column is added, renamed, dropped or
retyped. Every test ends with the Site and Agent tables identical."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dbsync.errors import DbsyncError
from dbsync.schema import Column, TableDef, auto_addable
from tests.helpers import Daemon, DbPair, assert_same, dbsync_cmd, replicate, sync_once, wait_until

ITEMS = "public.items"
DDL = "CREATE TABLE public.items (id bigint PRIMARY KEY, title text, score integer NOT NULL DEFAULT 0)"


def _items(*extra: Column) -> TableDef:
    base = (Column("id", "bigint", not_null=True), Column("title", "text"))
    return TableDef("public", "items", (*base, *extra), ("id",), "items_pkey")


# ---- which columns the daemon may add: no server ----


@pytest.mark.unit
def test_only_columns_whose_old_rows_stay_equal_are_added_by_the_daemon() -> None:
    agent = _items()
    site = _items(
        Column("note", "text"),
        Column("tier", "text", not_null=True, default="'silver'::text", has_missing=True),
        Column("total", "integer", generated="s", default="(id * 2)"),
        Column("stamp", "timestamp with time zone", not_null=True, default="clock_timestamp()"),
        Column("n", "integer", True, "nextval('public.items_n_seq'::regclass)", serial=True),
        Column("ident", "bigint", True, identity="a"),
        Column("ref", "text", default="public.new_ref()", calls_out=True, has_missing=True),
    )
    names = ("ref", "ident", "n", "stamp", "total", "tier", "note")  # any order: the Site's is kept
    chosen, refused = auto_addable(site, agent, names)
    assert [c.column for c in chosen] == ["note", "tier", "total"]
    assert all(c.safe and c.statement and "ADD COLUMN" in c.statement for c in chosen)
    assert refused == [
        "column stamp of public.items was not added automatically: its default may differ row by row "
        "(volatile, or the table was rewritten since)",
        "column n of public.items was not added automatically: the Site filled its existing rows from a sequence",
        "column ident of public.items was not added automatically: the Site filled its existing rows from a sequence",
        "column ref of public.items was not added automatically: its default calls a function, operator or "
        "cast that is not built in",
    ]


@pytest.mark.unit
def test_a_column_that_looks_renamed_is_left_to_a_person() -> None:
    site = TableDef("public", "items", (Column("id", "bigint", True), Column("headline", "text")), ("id",))
    agent = TableDef("public", "items", (Column("id", "bigint", True), Column("title", "text")), ("id",))
    chosen, refused = auto_addable(site, agent, ["headline"])
    assert chosen == []
    assert refused == [
        "column headline of public.items was not added automatically: it looks renamed from an Agent column; "
        "rename that column on the Agent DB by hand to keep its values"
    ]
    # A column the Agent has by now (a person added it) is nothing to do.
    assert auto_addable(site, site, ["headline"]) == ([], [])


# ---- the running daemon ----


def _rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def _last_error(pair: DbPair) -> str | None:
    rows = _rows(pair.agent_dsn, "SELECT last_error FROM dbsync.apply_progress WHERE last_error IS NOT NULL")
    return str(rows[0][0]) if rows else None


def _same(pair: DbPair, query: str) -> bool:
    return _rows(pair.site_dsn, query) == _rows(pair.agent_dsn, query)


def _after_row_one(pair: DbPair, *statements: str) -> str:
    """With row 1 applied, run `statements` on the Site; the error the daemon stops with."""
    site = pair.site()
    site.execute("INSERT INTO public.items (id, title) VALUES (1, 'one')")
    wait_until(lambda: _same(pair, "SELECT id FROM public.items"), what="row 1 applied")
    for statement in statements:
        site.execute(statement)
    return wait_until(lambda: _last_error(pair), what="the daemon to stop")


def _log(path: Path) -> str:
    return path.read_text(errors="replace")


def test_the_daemon_adds_a_new_column_and_carries_on(pair: DbPair, tmp_path: Path) -> None:
    replicate(pair, DDL, ITEMS)
    site = pair.site()
    log = tmp_path / "daemon.log"
    with Daemon(pair, "--auto-add-columns", log_path=log):
        site.execute("INSERT INTO public.items (id, title) VALUES (1, 'one'), (2, 'two')")
        wait_until(lambda: _same(pair, "SELECT id, title FROM public.items ORDER BY id"), what="rows 1, 2 applied")
        # Old rows get the default on both sides (stored once: not volatile); a typmod survives.
        # (A stored generated column rewrites the table, after which a default is no longer known
        # to be one value: it comes first here.)
        site.execute("ALTER TABLE public.items ADD COLUMN doubled bigint GENERATED ALWAYS AS (id * 2) STORED")
        site.execute(
            "ALTER TABLE public.items ADD COLUMN tier text NOT NULL DEFAULT 'silver', ADD COLUMN price numeric(8,2)"
        )
        site.execute("INSERT INTO public.items (id, title, tier, price) VALUES (3, 'three', 'gold', 2.5)")
        site.execute("UPDATE public.items SET title = 'uno' WHERE id = 1")
        wait_until(lambda: _same(pair, "SELECT * FROM public.items ORDER BY id"), what="the new columns replicated")
        wait_until(lambda: "added column(s)" in _log(log), what="the log line")
        assert _last_error(pair) is None
    line = next(x for x in _log(log).splitlines() if "added column(s)" in x)
    assert "doubled, tier, price" in line and "public.items" in line, line
    assert _rows(
        pair.agent_dsn,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'public.items'::regclass AND attname = 'price'",
    ) == [("numeric(8,2)",)]
    assert_same(pair, [ITEMS])


def test_a_column_it_must_not_add_stops_it_with_the_reason(pair: DbPair, tmp_path: Path) -> None:
    """A per-row default: the Agent would give its old rows other values. The daemon stops as
    without the setting, naming why; a person adds the column and repairs the table."""
    replicate(pair, DDL, ITEMS)
    with Daemon(pair, "--auto-add-columns", log_path=tmp_path / "daemon.log"):
        error = _after_row_one(
            pair,
            "ALTER TABLE public.items ADD COLUMN stamp timestamptz NOT NULL DEFAULT clock_timestamp()",
            "INSERT INTO public.items (id, title) VALUES (2, 'two')",
        )
        assert "column stamp of public.items was not added automatically" in error, error
        assert "may differ row by row" in error, error
        assert _rows(pair.agent_dsn, "SELECT id FROM public.items") == [(1,)]  # nothing after it
        pair.agent().execute("ALTER TABLE public.items ADD COLUMN stamp timestamptz")
        wait_until(lambda: _rows(pair.agent_dsn, "SELECT count(*) FROM public.items") == [(2,)], what="row 2")
    out = dbsync_cmd("reconcile", "--repair", "--apply", "--table", ITEMS, env=pair.env())
    assert out.returncode == 0, out.stdout + out.stderr
    with Daemon(pair, log_path=tmp_path / "daemon-2.log"):
        wait_until(lambda: _same(pair, "SELECT * FROM public.items ORDER BY id"), what="the repair applied")
    assert_same(pair, [ITEMS])


def test_a_renamed_column_stops_it_until_renamed_on_the_agent(pair: DbPair, tmp_path: Path) -> None:
    replicate(pair, DDL, ITEMS)
    with Daemon(pair, "--auto-add-columns", log_path=tmp_path / "daemon.log"):
        error = _after_row_one(
            pair,
            "ALTER TABLE public.items RENAME COLUMN title TO headline",
            "INSERT INTO public.items (id, headline) VALUES (2, 'two')",
        )
        assert "column headline of public.items was not added automatically: it looks renamed" in error, error
        pair.agent().execute("ALTER TABLE public.items RENAME COLUMN title TO headline")
        wait_until(lambda: _same(pair, "SELECT * FROM public.items ORDER BY id"), what="replication to resume")
        assert _rows(pair.agent_dsn, "SELECT headline FROM public.items ORDER BY id") == [("one",), ("two",)]
    assert_same(pair, [ITEMS])


def test_dropped_and_retyped_columns(pair: DbPair, tmp_path: Path) -> None:
    """Dropped on the Site: new rows leave the Agent's column to its default, and a NOT NULL one
    without a default stops the daemon with the column's name. Retyped: a value the Agent's type
    takes replicates; one it refuses stops the daemon until the Agent's column is retyped too."""
    ddl = (
        "CREATE TABLE public.items (id bigint PRIMARY KEY, title text, score integer NOT NULL DEFAULT 0, "
        "note text, code text NOT NULL)"
    )
    replicate(pair, ddl, ITEMS)
    site = pair.site()
    with Daemon(pair, "--auto-add-columns", log_path=tmp_path / "daemon.log"):
        site.execute("INSERT INTO public.items (id, title, note, code) VALUES (1, 'one', 'n1', 'c1')")
        wait_until(lambda: _same(pair, "SELECT * FROM public.items"), what="row 1 applied")

        site.execute("ALTER TABLE public.items DROP COLUMN note")
        site.execute("INSERT INTO public.items (id, title, code) VALUES (2, 'two', 'c2')")
        wait_until(
            lambda: _rows(pair.agent_dsn, "SELECT id, note FROM public.items ORDER BY id") == [(1, "n1"), (2, None)],
            what="row 2 without the dropped column",
        )

        site.execute("ALTER TABLE public.items DROP COLUMN code")
        site.execute("INSERT INTO public.items (id, title) VALUES (3, 'three')")
        error = wait_until(lambda: _last_error(pair), what="the NOT NULL column the Site no longer fills")
        assert '"code"' in error and "not-null" in error, error
        pair.agent().execute("ALTER TABLE public.items DROP COLUMN code, DROP COLUMN note")
        wait_until(lambda: _same(pair, "SELECT * FROM public.items ORDER BY id"), what="row 3 after the drop")

        site.execute("ALTER TABLE public.items ALTER COLUMN score TYPE bigint")
        site.execute("UPDATE public.items SET score = 7 WHERE id = 1")
        wait_until(lambda: _same(pair, "SELECT * FROM public.items ORDER BY id"), what="a value both types take")
        site.execute("ALTER TABLE public.items ALTER COLUMN score TYPE numeric(6,2)")
        site.execute("UPDATE public.items SET score = 2.5 WHERE id = 2")
        error = wait_until(lambda: _last_error(pair), what="a value the Agent's type refuses")
        assert "integer" in error and "public.items" in error, error
        pair.agent().execute("ALTER TABLE public.items ALTER COLUMN score TYPE numeric(6,2)")
        wait_until(lambda: _same(pair, "SELECT * FROM public.items ORDER BY id"), what="replication to resume")
        wait_until(lambda: _last_error(pair) is None, what="the error to clear")
    assert_same(pair, [ITEMS])


def test_the_setting_is_read_like_the_others(pair: DbPair, tmp_path: Path) -> None:
    env = pair.env() | {"DBSYNC_AUTO_ADD_COLUMNS": "maybe"}
    out = dbsync_cmd("run", "--once", env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .endswith("environment DBSYNC_AUTO_ADD_COLUMNS: auto_add_columns must be true or false, got 'maybe'")
    ), out.stderr


def test_an_agent_role_that_may_not_alter_the_table_gets_one_line(pair: DbPair) -> None:
    replicate(pair, DDL, ITEMS)
    role = f"dbsync_applier_{os.getpid()}"
    agent = pair.agent()
    agent.execute(f"DROP ROLE IF EXISTS {role}")
    agent.execute(f"CREATE ROLE {role} LOGIN")
    try:
        for stmt in (
            f"GRANT USAGE ON SCHEMA dbsync, public TO {role}",
            f"GRANT SELECT, INSERT, UPDATE ON dbsync.apply_progress TO {role}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON dbsync.parked_events, public.items TO {role}",
        ):
            agent.execute(stmt)
        site = pair.site()
        site.execute("ALTER TABLE public.items ADD COLUMN note text")
        site.execute("INSERT INTO public.items (id, title, note) VALUES (1, 'one', 'n')")
        limited = replace(pair, agent_dsn=make_conninfo(pair.agent_dsn, user=role))
        with pytest.raises(DbsyncError) as caught:
            sync_once(limited, auto_add_columns=True)
        message = str(caught.value)
        assert message.startswith("auto_add_columns: ") and "must be owner of table items" in message, message
        assert "\n" not in message
        assert _rows(pair.agent_dsn, "SELECT count(*) FROM public.items") == [(0,)]
        agent.execute("ALTER TABLE public.items ADD COLUMN note text")  # the owner does it
        sync_once(limited, auto_add_columns=True)
    finally:
        agent.execute(f"DROP OWNED BY {role}")
        agent.execute(f"DROP ROLE {role}")
    assert_same(pair, [ITEMS])
