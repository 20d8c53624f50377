"""`dbsync schema diff [--apply]`: Site and Agent with real differences, then the rows replicate."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from dbsync.schema import Column, TableDef, add_column_sql, column_sql, compare, create_table_sql, retype_sql
from tests.helpers import Daemon, DbPair, dbsync_cmd, replicate, sync_once, wait_until

# ---- statement rendering and comparison: no server ----

ITEMS = TableDef(
    "public",
    "items",
    (
        Column("id", "bigint", not_null=True),
        Column("name", "character varying(20)", not_null=True),
    ),
    ("id",),
    "items_pkey",
)


def _table(*columns: Column, key: tuple[str, ...] = ("id",), schema: str = "public", name: str = "items") -> TableDef:
    return TableDef(schema, name, (Column("id", "bigint", not_null=True), *columns), key, f"{name}_pkey")


@pytest.mark.unit
def test_a_column_definition_quotes_names_and_keeps_types_as_postgresql_writes_them() -> None:
    assert column_sql(Column("Note Text", "character varying(30)")) == '"Note Text" character varying(30)'
    assert column_sql(Column("moods", '"Odd"."Mood"[]', not_null=True, default='\'{}\'::"Odd"."Mood"[]')) == (
        '"moods" "Odd"."Mood"[] DEFAULT \'{}\'::"Odd"."Mood"[] NOT NULL'
    )
    # A serial's sequence and an identity stay on the Site; a generated column keeps its expression.
    assert column_sql(Column("n", "integer", True, "nextval('public.t_n_seq'::regclass)", serial=True)) == (
        '"n" integer NOT NULL'
    )
    assert column_sql(Column("n", "bigint", True, None, identity="a")) == '"n" bigint NOT NULL'
    assert column_sql(Column("g", "integer", False, "(n * 2)", generated="s")) == (
        '"g" integer GENERATED ALWAYS AS ((n * 2)) STORED'
    )


@pytest.mark.unit
def test_not_null_without_a_default_is_added_nullable() -> None:
    plain, deferred = add_column_sql(ITEMS, Column("score", "integer", not_null=True))
    assert plain == 'ALTER TABLE "public"."items" ADD COLUMN "score" integer;' and deferred
    with_default, deferred = add_column_sql(ITEMS, Column("score", "integer", not_null=True, default="7"))
    assert with_default == 'ALTER TABLE "public"."items" ADD COLUMN "score" integer DEFAULT 7 NOT NULL;'
    assert not deferred


@pytest.mark.unit
def test_an_expression_that_calls_out_of_pg_catalog_is_never_run_by_apply() -> None:
    col = Column("ref", "uuid", not_null=True, default="public.new_ref()", calls_out=True)
    plain, deferred = add_column_sql(ITEMS, col)
    assert plain == 'ALTER TABLE "public"."items" ADD COLUMN "ref" uuid;' and deferred
    (change,) = compare(_table(col), _table())
    assert change.safe and change.statement == plain
    assert 'ALTER TABLE "public"."items" ALTER COLUMN "ref" SET DEFAULT public.new_ref();' in change.note
    assert 'ALTER COLUMN "ref" SET NOT NULL' in change.note
    generated = Column("g", "integer", default="public.f(id)", generated="s", calls_out=True)
    assert column_sql(generated) == '"g" integer'


@pytest.mark.unit
def test_create_table_has_every_column_and_the_key() -> None:
    table = _table(Column("Name", "text", default="'x'::text"), schema="Sales", name="Order Lines")
    assert create_table_sql(table) == (
        'CREATE TABLE "Sales"."Order Lines" (\n    "id" bigint NOT NULL,\n'
        '    "Name" text DEFAULT \'x\'::text,\n    PRIMARY KEY ("id")\n);'
    )
    (change,) = compare(table, None)
    assert change.kind == "missing_table" and change.safe and change.statement == create_table_sql(table)


@pytest.mark.unit
def test_retype_casts_with_using() -> None:
    assert retype_sql(ITEMS, Column("Amount", "numeric(12,2)")) == (
        'ALTER TABLE "public"."items" ALTER COLUMN "Amount" TYPE numeric(12,2) USING "Amount"::numeric(12,2);'
    )
    # A collation other than the type's own is part of the column's type.
    site, agent = _table(Column("t", "text", collation='pg_catalog."C"')), _table(Column("t", "text"))
    (change,) = compare(site, agent)
    assert change.kind == "retyped" and not change.safe
    assert (
        change.statement
        == 'ALTER TABLE "public"."items" ALTER COLUMN "t" TYPE text COLLATE pg_catalog."C" USING "t"::text;'
    )


@pytest.mark.unit
def test_a_rename_is_reported_as_both_columns_and_only_the_add_is_safe() -> None:
    site = _table(Column("title", "text"), Column("b", "integer"))
    agent = _table(Column("headline", "text"), Column("b", "integer"))
    by_kind = {c.kind: c for c in compare(site, agent)}
    assert set(by_kind) == {"renamed", "agent_only"}
    renamed, old = by_kind["renamed"], by_kind["agent_only"]
    assert renamed.safe and renamed.statement == 'ALTER TABLE "public"."items" ADD COLUMN "title" text;'
    assert 'RENAME COLUMN "headline" TO "title"' in renamed.note and "by hand" in renamed.note
    assert old.column == "headline" and old.differs and not old.safe and old.statement is None


@pytest.mark.unit
def test_agent_only_columns_that_fill_themselves_are_notes_not_differences() -> None:
    site = _table()
    agent = _table(
        Column("own", "text"),
        Column("stamp", "timestamp with time zone", not_null=True, default="now()"),
        Column("strict", "integer", not_null=True),
    )
    changes = {c.column: c for c in compare(site, agent)}
    assert not changes["own"].differs and "fine for replication" in changes["own"].note
    assert not changes["stamp"].differs
    strict = changes["strict"]
    assert strict.kind == "dropped" and strict.differs and not strict.safe
    assert strict.statement == 'ALTER TABLE "public"."items" ALTER COLUMN "strict" DROP NOT NULL;'


@pytest.mark.unit
def test_type_not_null_default_identity_and_key_differences_are_left_to_a_person() -> None:
    site = _table(
        Column("amount", "bigint"),
        Column("state", "text", not_null=True, default="'new'::text"),
        Column("n", "integer", not_null=True, identity="d"),
        Column("m", "integer"),
        key=("id", "m"),
    )
    agent = _table(
        Column("amount", "integer"),
        Column("state", "text"),
        Column("n", "integer", not_null=True),
        Column("m", "integer", identity="a"),
    )
    changes = compare(site, agent)
    assert not any(c.safe for c in changes)
    got = {(c.kind, c.column): c for c in changes}
    assert got["retyped", "amount"].statement == (
        'ALTER TABLE "public"."items" ALTER COLUMN "amount" TYPE bigint USING "amount"::bigint;'
    )
    assert got["not_null", "state"].statement.endswith('ALTER COLUMN "state" SET NOT NULL;')  # type: ignore[union-attr]
    assert got["default", "state"].statement.endswith("SET DEFAULT 'new'::text;")  # type: ignore[union-attr]
    assert not got["default", "state"].differs  # replicated rows carry the Site's values
    assert not got["identity", "n"].differs  # the Site's identity: replicated rows carry its values
    assert got["identity", "m"].differs  # ALWAYS on the Agent: the daemon never updates it
    assert got["key", None].statement == (
        'ALTER TABLE "public"."items" DROP CONSTRAINT "items_pkey", ADD PRIMARY KEY ("id", "m");'
    )


@pytest.mark.unit
def test_equal_definitions_have_no_change() -> None:
    assert compare(ITEMS, ITEMS) == []


# ---- real clusters ----

TYPES = """
CREATE DOMAIN public.posint AS integer CHECK (VALUE > 0);
CREATE TYPE public.mood AS ENUM ('calm', 'angry');
CREATE SCHEMA "Odd";
CREATE TYPE "Odd"."Mood Type" AS ENUM ('a', 'b');
"""
ITEMS_DDL = (
    TYPES
    + """
CREATE TABLE public.items (id bigint PRIMARY KEY, title text, amount integer, legacy text);
"""
)


def _cli(pair: DbPair, *args: str) -> tuple[int, str, str]:
    result = dbsync_cmd(*args, env=pair.env())
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


def _rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def test_the_whatsapp_tables_as_migrated_have_no_difference(pair: DbPair) -> None:
    code, out, _ = _cli(pair, "schema", "diff")
    assert code == 0, out
    # The pack's Agent tables have neither the Site's defaults nor its identities: notes, both.
    assert out.splitlines()[-1] == "-- no difference in 3 replicated table(s)"
    assert "created_at has default now() on the Site DB and none on the Agent DB, which is fine" in out
    code, out, _ = _cli(pair, "schema", "diff", "--json")
    assert code == 0 and json.loads(out)["in_sync"] is True


def test_added_renamed_retyped_and_dropped_columns(pair: DbPair) -> None:
    replicate(pair, ITEMS_DDL, "public.items")
    site = pair.site()
    site.execute("INSERT INTO public.items (id, title, amount) VALUES (1, 'one', 10), (2, 'two', 20)")
    sync_once(pair)
    # The schema changes on the Site DB: three new columns (a default, a quoted name with a
    # typmod, an array of an enum and a domain), a rename, a retype and a drop.
    site.execute(
        "ALTER TABLE public.items ADD COLUMN score integer NOT NULL DEFAULT 7, "
        'ADD COLUMN "Note Text" varchar(30), ADD COLUMN moods public.mood[], ADD COLUMN qty public.posint'
    )
    site.execute("ALTER TABLE public.items RENAME COLUMN title TO headline")
    site.execute("ALTER TABLE public.items ALTER COLUMN amount TYPE bigint")
    site.execute("ALTER TABLE public.items DROP COLUMN legacy")
    site.execute(
        "INSERT INTO public.items VALUES (3, 'three', 30, 9, 'note 3', '{calm,angry}', 5);"
        "UPDATE public.items SET \"Note Text\" = 'note 1', moods = '{angry}', qty = 1 WHERE id = 1"
    )

    code, out, _ = _cli(pair, "schema", "diff")
    assert code == 1, out
    lines = out.splitlines()
    for statement in (
        'ALTER TABLE "public"."items" ADD COLUMN "score" integer DEFAULT 7 NOT NULL;',
        'ALTER TABLE "public"."items" ADD COLUMN "Note Text" character varying(30);',
        'ALTER TABLE "public"."items" ADD COLUMN "moods" public.mood[];',
        'ALTER TABLE "public"."items" ADD COLUMN "qty" public.posint;',
        'ALTER TABLE "public"."items" ADD COLUMN "headline" text;',  # the rename, as an add
        '-- ALTER TABLE "public"."items" ALTER COLUMN "amount" TYPE bigint USING "amount"::bigint;',
    ):
        assert statement in lines, out
    assert 'RENAME COLUMN "title" TO "headline"' in out and "must be done by hand" in out
    assert "column legacy exists only on the Agent DB" in out and "fine for replication" in out
    assert lines[-1] == (
        "-- 7 difference(s) in 1 of 4 table(s): `dbsync schema diff --apply` runs the 5 plain statement(s), "
        "2 are to do by hand"
    )

    code, out, _ = _cli(pair, "schema", "diff", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["in_sync"] is False and report["applied"] == []
    kinds = sorted((c["kind"], c["column"]) for c in report["tables"]["public.items"])
    assert kinds == [
        ("agent_only", "legacy"),
        ("agent_only", "title"),
        ("missing_column", "Note Text"),
        ("missing_column", "moods"),
        ("missing_column", "qty"),
        ("missing_column", "score"),
        ("renamed", "headline"),
        ("retyped", "amount"),
    ]

    code, out, _ = _cli(pair, "schema", "diff", "--apply")
    assert code == 1, out  # the retype and the renamed column's old name are left
    assert "applied 5 statement(s) in one transaction, left 2" in out
    assert '-- ALTER TABLE "public"."items" ALTER COLUMN "amount" TYPE bigint USING "amount"::bigint;' in out
    agent_columns = _rows(
        pair.agent_dsn,
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'public.items'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    assert agent_columns == [
        ("id", "bigint"),
        ("title", "text"),  # never dropped
        ("amount", "integer"),  # never retyped
        ("legacy", "text"),
        ("headline", "text"),  # added in the Site's order
        ("score", "integer"),
        ("Note Text", "character varying(30)"),
        ("moods", "mood[]"),
        ("qty", "posint"),
    ]

    # The daemon resumes: the rows written after the change carry their new columns.
    sync_once(pair)
    query = 'SELECT id, headline, amount, score, "Note Text", moods::text, qty FROM public.items ORDER BY id'
    site_rows, agent_rows = _rows(pair.site_dsn, query), _rows(pair.agent_dsn, query)
    assert site_rows[0] == agent_rows[0] == (1, "one", 10, 7, "note 1", "{angry}", 1)
    assert site_rows[2] == agent_rows[2] == (3, "three", 30, 9, "note 3", "{calm,angry}", 5)
    # Row 2 was not written since: its renamed column's value is on the Site only, until repaired.
    assert agent_rows[1] == (2, None, 20, 7, None, None, None) and site_rows[1][1] == "two"
    code, out, _ = _cli(pair, "reconcile", "--repair", "--apply", "--table", "public.items")
    assert code == 0, out
    assert _rows(pair.site_dsn, query) == _rows(pair.agent_dsn, query)

    # What is left: the retype (by hand); the old columns are notes now.
    code, out, _ = _cli(pair, "schema", "diff")
    assert code == 1 and out.splitlines()[-1].startswith("-- 1 difference(s)"), out
    with psycopg.connect(pair.agent_dsn, autocommit=True) as agent:
        agent.execute('ALTER TABLE "public"."items" ALTER COLUMN "amount" TYPE bigint USING "amount"::bigint')
    code, out, _ = _cli(pair, "schema", "diff")
    assert code == 0, out
    assert "column title exists only on the Agent DB" in out and out.splitlines()[-1] == (
        "-- no difference in 4 replicated table(s)"
    )


CREATED_SITE = (
    TYPES
    + """
CREATE SCHEMA "Sales";
CREATE TABLE "Sales"."Order Lines" (
    id serial PRIMARY KEY,
    n bigint GENERATED ALWAYS AS IDENTITY,
    qty public.posint NOT NULL DEFAULT 1,
    price numeric(10,2),
    twice numeric GENERATED ALWAYS AS (price * 2) STORED,
    moods public.mood[],
    "Label" varchar(10) COLLATE "C" DEFAULT 'x',
    odd "Odd"."Mood Type"[]
);
"""
)
CREATED_AGENT = TYPES + 'CREATE SCHEMA "Sales";'


def test_a_table_missing_on_the_agent_is_created(pair: DbPair) -> None:
    replicate(pair, CREATED_SITE, '"Sales"."Order Lines"', agent_ddl=CREATED_AGENT)
    site = pair.site()
    site.execute(
        """INSERT INTO "Sales"."Order Lines" (qty, price, moods, odd) VALUES (2, 1.50, '{calm}', '{b,a}'), """
        "(3, NULL, NULL, NULL)"
    )
    code, out, _ = _cli(pair, "schema", "diff")
    assert code == 1, out
    create = (
        'CREATE TABLE "Sales"."Order Lines" (\n'
        '    "id" integer NOT NULL,\n'
        '    "n" bigint NOT NULL,\n'
        '    "qty" public.posint DEFAULT 1 NOT NULL,\n'
        '    "price" numeric(10,2),\n'
        '    "twice" numeric GENERATED ALWAYS AS ((price * (2)::numeric)) STORED,\n'
        '    "moods" public.mood[],\n'
        '    "Label" character varying(10) COLLATE pg_catalog."C" DEFAULT \'x\'::character varying,\n'
        '    "odd" "Odd"."Mood Type"[],\n'
        '    PRIMARY KEY ("id")\n'
        ");"
    )
    assert create in out, out
    code, out, _ = _cli(pair, "schema", "diff", "--apply")
    assert code == 0, out
    assert '-- "Sales"."Order Lines": applied: table is missing on the Agent DB' in out
    assert 'copy the rows the Site DB already holds: `dbsync backfill \'"Sales"."Order Lines"\'`' in out
    code, out, _ = _cli(pair, "schema", "diff")
    assert code == 0, out  # the identity stays on the Site: a note, not a difference
    assert "column n is GENERATED ALWAYS AS IDENTITY on the Site DB and no identity on the Agent DB" in out

    code, out, _ = _cli(pair, "backfill", '"Sales"."Order Lines"')
    assert code == 0, out
    site.execute("""UPDATE "Sales"."Order Lines" SET price = 4 WHERE id = 2""")
    sync_once(pair)
    query = 'SELECT id, n, qty, price, twice, moods::text, "Label", odd::text FROM "Sales"."Order Lines" ORDER BY id'
    assert _rows(pair.agent_dsn, query) == _rows(pair.site_dsn, query)
    assert len(_rows(pair.agent_dsn, query)) == 2


def test_an_agent_only_not_null_column_refuses_rows_and_is_reported(pair: DbPair) -> None:
    replicate(
        pair,
        "CREATE TABLE public.items (id bigint PRIMARY KEY, title text)",
        "public.items",
        agent_ddl="CREATE TABLE public.items (id bigint PRIMARY KEY, title text, strict integer NOT NULL)",
    )
    code, out, _ = _cli(pair, "schema", "diff", "--apply")
    assert code == 1, out
    assert "every new replicated row is refused" in out
    assert '-- ALTER TABLE "public"."items" ALTER COLUMN "strict" DROP NOT NULL;' in out.splitlines()
    assert "applied 0 statement(s) in one transaction, left 1" in out


def test_apply_is_all_or_nothing(pair: DbPair) -> None:
    """A statement the Agent DB refuses (a type it lacks) rolls back the others: one line, exit 2."""
    replicate(
        pair,
        TYPES + "CREATE TABLE public.items (id bigint PRIMARY KEY, a text, b public.mood)",
        "public.items",
        agent_ddl="CREATE TABLE public.items (id bigint PRIMARY KEY)",
    )
    code, out, err = _cli(pair, "schema", "diff", "--apply")
    assert code == 2, out + err
    assert err.strip().count("\n") == 0 and "nothing was applied" in err and "public.mood" in err, err
    assert _rows(
        pair.agent_dsn, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.items'::regclass AND attnum > 0"
    )[0] == (1,)


def test_connection_errors_are_one_line_without_the_password(pair: DbPair) -> None:
    env = pair.env()
    env["DBSYNC_AGENT_DSN"] = "host=127.0.0.1 port=1 dbname=x user=u password=hunter2-secret connect_timeout=2"
    result = dbsync_cmd("schema", "diff", env=env)
    assert result.returncode == 2
    assert "hunter2" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "cannot connect to the Agent DB" in result.stderr
    env.pop("DBSYNC_AGENT_DSN")
    result = dbsync_cmd("schema", "diff", env=env)
    assert result.returncode == 2 and "agent" in result.stderr.lower() and "Traceback" not in result.stderr


def test_a_default_that_calls_a_function_of_the_site_is_left_out(pair: DbPair) -> None:
    """The Agent DB has no such function (or, worse, someone else's overload of it)."""
    replicate(pair, "CREATE TABLE public.items (id bigint PRIMARY KEY)", "public.items")
    site = pair.site()
    site.execute("INSERT INTO public.items VALUES (1)")
    sync_once(pair)
    site.execute("CREATE FUNCTION public.new_ref() RETURNS text LANGUAGE sql AS $$ SELECT 'r' $$")
    site.execute("ALTER TABLE public.items ADD COLUMN ref text NOT NULL DEFAULT public.new_ref()")
    code, out, _ = _cli(pair, "schema", "diff", "--apply")
    assert code == 0, out
    assert 'ALTER TABLE "public"."items" ADD COLUMN "ref" text;' in out.splitlines()
    assert "SET DEFAULT public.new_ref();" in out and 'ALTER COLUMN "ref" SET NOT NULL' in out
    code, out, _ = _cli(pair, "reconcile", "--repair", "--apply", "--table", "public.items")
    assert code == 0, out
    assert _rows(pair.agent_dsn, "SELECT id, ref FROM public.items") == [(1, "r")]


def test_a_running_daemon_stopped_by_a_new_column_resumes_after_apply(pair: DbPair, tmp_path: Path) -> None:
    replicate(pair, "CREATE TABLE public.items (id bigint PRIMARY KEY, title text)", "public.items")
    site = pair.site()
    query = "SELECT id, title, score FROM public.items ORDER BY id"
    with Daemon(pair, log_path=tmp_path / "daemon.log"):
        site.execute("INSERT INTO public.items VALUES (1, 'one')")
        wait_until(lambda: _rows(pair.agent_dsn, "SELECT id FROM public.items") == [(1,)], what="row 1 applied")
        site.execute("ALTER TABLE public.items ADD COLUMN score numeric(6,2) NOT NULL DEFAULT 0")
        site.execute("INSERT INTO public.items VALUES (2, 'two', 2.5)")
        wait_until(
            lambda: _rows(pair.agent_dsn, "SELECT last_error FROM dbsync.apply_progress WHERE last_error IS NOT NULL"),
            what="the daemon to stop on the new column",
        )
        code, out, _ = _cli(pair, "schema", "diff", "--apply")
        assert code == 0, out
        wait_until(
            lambda: _rows(pair.agent_dsn, query) == _rows(pair.site_dsn, query),
            what="the daemon to resume with the new column",
        )
    assert _rows(pair.agent_dsn, query) == [(1, "one", 0), (2, "two", Decimal("2.50"))]


def test_a_changed_primary_key_is_reported_on_both_counts(pair: DbPair) -> None:
    replicate(pair, "CREATE TABLE public.items (id bigint PRIMARY KEY, part integer NOT NULL)", "public.items")
    pair.site().execute("ALTER TABLE public.items DROP CONSTRAINT items_pkey, ADD PRIMARY KEY (id, part)")
    code, out, _ = _cli(pair, "schema", "diff", "--json", "--apply")
    assert code == 1, out
    changes = {c["kind"]: c for c in json.loads(out)["tables"]["public.items"]}
    assert set(changes) == {"key", "registered_key"}
    assert changes["key"]["statement"] == (
        'ALTER TABLE "public"."items" DROP CONSTRAINT "items_pkey", ADD PRIMARY KEY ("id", "part");'
    )
    assert not changes["key"]["safe"] and not changes["key"]["applied"]
    assert "`dbsync tables remove` the table and `dbsync tables add` it again" in changes["registered_key"]["note"]
