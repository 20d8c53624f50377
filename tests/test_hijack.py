"""A hostile role that may CREATE in public plants overloads, operators and casts for every name
dbsync's code calls; nothing of theirs may ever run with dbsync's rights (DESIGN-NOTES §7).

The planted objects bump a sequence the attacker owns (a sequence, because it is not rolled
back when the hijacked statement fails) and note what ran in a table. Every path dbsync has is
then exercised: capture of INSERT, UPDATE, key change, DELETE and TRUNCATE by the writer; the
daemon applying all of it; `tables add`, `backfill`, `reconcile --deep`, `reconcile --repair`,
`status`, `tables list`, `tables remove`. PostgreSQL 15 does not let every role create in
public by default (13 and 14 do), so the test grants it, as those versions would.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest

from dbsync.consumers import agent_consumer_name
from dbsync.daemon import pg
from dbsync.daemon.retention import Retention
from tests.helpers import DbPair, assert_same, dbsync_cmd, sync_once, wait_until

_n = itertools.count()

# Every function name the SECURITY DEFINER bodies, the daemon's and the CLI's SQL call, and a few
# more that such code commonly calls.
NAMES = [
    "hstore",
    "slice",
    "hstore_to_json",
    "hstore_to_jsonb",
    "populate_record",
    "jsonb_populate_record",
    "json_populate_record",
    "json_populate_recordset",
    "jsonb_populate_recordset",
    "to_json",
    "to_jsonb",
    "row_to_json",
    "json_to_record",
    "json_to_recordset",
    "jsonb_to_recordset",
    "json_build_object",
    "jsonb_build_object",
    "json_typeof",
    "json_agg",
    # 0013_site_write_back.
    "skip_applied",
    "set_conflict_policy",
    "register_applier",
    # 0010_site_consumers and what it calls.
    "register_consumer",
    "consumer_applied",
    "prune_log",
    "pg_has_role",
    "aclexplode",
    "pg_control_system",
    "jsonb_agg",
    "json_array_elements",
    "jsonb_array_elements",
    "format",
    "quote_ident",
    "quote_literal",
    "string_agg",
    "array_agg",
    "unnest",
    "count",
    "current_setting",
    "set_config",
    "pg_notify",
    "setval",
    "nextval",
    "pg_sequence_last_value",
    "format_type",
    "cardinality",
    "array_to_string",
    "pg_current_xact_id",
    "clock_timestamp",
    "now",
    "textin",
    "record_out",
    "akeys",
    "avals",
    "each",
    "exist",
    "defined",
    "key_image",
    "row_image",
    "read_rows",
    "install_capture",
    "drop_capture",
    "capture_function",
    "output_is_fixed",
    "record_image_ne",
    "record_image_eq",
    "with_key",
    "image_json",
    "key_json",
    "log_keys",
    "row_number",
    "reader_function",
    "install_reader",
    "install_key_capture",
    "install_insert_capture",
    "identity_problem",
    "copy_insert_only",
    "insert_only_table",
    "add_table",
    "drop_key_capture",
    "to_regprocedure",
    "json_agg",
    "doorbell_armed",
    "key_operator",
    "key_compare",
    "to_regclass",
    "pg_backend_pid",
    "pg_advisory_lock",
    "pg_try_advisory_lock",
    "pg_advisory_xact_lock",
    "pg_advisory_unlock",
    "pg_snapshot_xmin",
    "pg_snapshot_xmax",
    "pg_current_snapshot",
    "pg_visible_in_snapshot",
    "pg_snapshot_xip",
    "hashtextextended",
    "md5",
    "left",
    "lower",
    "length",
    "octet_length",
    "pg_column_size",
    "greatest",
    "least",
    "generate_series",
    "int8",
    "text",
    "array_length",
    "array_position",
    "pg_get_indexdef",
    "pg_relation_size",
    "lag",
    "sum",
    "min",
    "max",
    "has_table_privilege",
    "set_table_filter",
    "check_row_filter",
    "reader_statement",
    "pg_get_expr",
    "pg_describe_object",
    "strpos",
    "btrim",
    "resync_image_columns",
]

# Argument lists an overload can take to be more specific than the one dbsync means.
SIGNATURES = [
    "public.attacked",
    "anyelement",
    "anycompatible",
    "anyarray",
    "text",
    "name",
    "oid",
    "regclass",
    "int2vector",
    "integer",
    "bigint",
    "json",
    "jsonb",
    "xid8",
    "pg_snapshot",
    "text[]",
    "public.hstore",
    "public.hstore, text[]",
    "anyelement, public.hstore",
    "public.attacked, public.hstore",
    "public.attacked, jsonb",
    "anyelement, jsonb",
    "public.attacked, json",
    "text, text",
    "text, anyelement",
    "regclass, text",
    "text, text, boolean",
    "xid8, pg_snapshot",
    "public.wkey",
    "public.wmood",
    "public.wtext",
]

OPERATORS = ["=", "<>", "<", ">", "<=", ">=", "*=", "*<>", "->", "->>", "#=", "||", "@>", "?", "~"]
OPERAND_PAIRS = [
    ("public.attacked", "public.attacked"),
    ("public.hstore", "public.hstore"),
    ("public.hstore", "text[]"),
    ("public.hstore", "text"),
    ("text", "text"),
    ("name", "text"),
    ("text", "name"),
    ("name", "name"),
    ("oid", "regclass"),
    ("regclass", "oid"),
    ("oid", "oid"),
    ("integer", "integer"),
    ("bigint", "bigint"),
    ("smallint", "smallint"),
    ("json", "text"),
    ("json", "integer"),
    ("jsonb", "text"),
    ("xid8", "xid8"),
    ('"char"', '"char"'),
    ("int2vector", "int2vector"),
    ("anyelement", "anyelement"),
    ("public.wkey", "public.wkey"),
    ("public.wmood", "public.wmood"),
    ("public.wtext", "public.wtext"),
    ("public.wkey", "integer"),
    ("integer", "public.wkey"),
]

# The attacker owns these types; the table owner used them in a replicated table. An owner of a
# type may add casts from and to it, and operators on it.
ATTACKER_TYPES = """
CREATE DOMAIN public.wkey AS integer;
CREATE TYPE public.wmood AS ENUM ('calm', 'angry');
CREATE DOMAIN public.wtext AS text;
CREATE SEQUENCE public.hijack_seq;
GRANT USAGE, SELECT, UPDATE ON SEQUENCE public.hijack_seq TO PUBLIC;
CREATE TABLE public.hijack_log (who text, what text);
GRANT INSERT ON public.hijack_log TO PUBLIC;
"""

TABLE = """
CREATE TABLE public.attacked (
    id public.wkey PRIMARY KEY,
    mood public.wmood NOT NULL DEFAULT 'calm',
    note public.wtext,
    body text,
    tags text[]
);
CREATE TABLE public.attacked_parts (id integer, mood public.wmood, PRIMARY KEY (id, mood)) PARTITION BY LIST (mood);
CREATE TABLE public.attacked_calm PARTITION OF public.attacked_parts FOR VALUES IN ('calm');
CREATE TABLE public.attacked_angry PARTITION OF public.attacked_parts FOR VALUES IN ('angry');
"""
# On the Agent the partitioned table is a plain one.
AGENT_TABLE = TABLE.split("CREATE TABLE public.attacked_parts")[0] + (
    "CREATE TABLE public.attacked_parts (id integer, mood public.wmood, PRIMARY KEY (id, mood));"
)

CASTS = [
    ("public.wmood", "text"),
    ("public.wmood", "json"),
    ("public.wmood", "jsonb"),
    ("public.wmood", "public.hstore"),
    ("text", "public.wmood"),
    ("json", "public.wmood"),
    ("jsonb", "public.wmood"),
    ("character varying", "public.wmood"),
]


def _evidence(attacker: str, what: str, ret: str = "text") -> str:
    """The body of a planted function: it leaves a trace when it runs as anybody but the
    attacker (the attacker's own queries in the attacker's own session gain nothing)."""
    other = f"CURRENT_USER OPERATOR(pg_catalog.<>) {psycopg.sql.quote(attacker)}::pg_catalog.name"
    return (
        f"SELECT pg_catalog.nextval('public.hijack_seq'::pg_catalog.regclass) WHERE {other}; "
        f"INSERT INTO public.hijack_log SELECT CURRENT_USER, {psycopg.sql.quote(what)} WHERE {other}; "
        f"SELECT NULL::{ret}"
    )


def _try(conn: psycopg.Connection, statement: str) -> bool:
    """Run one statement; planting fails where the name or signature is taken: that is fine."""
    try:
        with conn.transaction():
            conn.execute(statement)
        return True
    except psycopg.Error:
        return False


def plant(conn: psycopg.Connection, attacker: str) -> int:
    """As the attacker: every overload, operator and cast above. Returns how many took."""
    planted = 0
    for i, (name, sig) in enumerate(itertools.product(NAMES, SIGNATURES)):
        what = f"{name}({sig})"
        # LANGUAGE sql with a body that runs at call time; the return type plays no part in
        # overload resolution.
        planted += _try(
            conn,
            f"CREATE FUNCTION public.{name}({sig}) RETURNS text LANGUAGE sql AS $b${_evidence(attacker, what)}$b$",
        ) or _try(
            # A polymorphic result needs a polymorphic argument; some names only take that form.
            conn,
            f"CREATE FUNCTION public.hj_{i}({sig}) RETURNS text LANGUAGE sql AS $b${_evidence(attacker, what)}$b$",
        )
    for j, (op, (left, right)) in enumerate(itertools.product(OPERATORS, OPERAND_PAIRS)):
        what = f"{left} {op} {right}"
        fn = f"public.hj_op_{j}"
        if _try(
            conn,
            f"CREATE FUNCTION {fn}({left}, {right}) RETURNS boolean LANGUAGE sql "
            f"AS $b${_evidence(attacker, what, 'boolean')}$b$",
        ):
            planted += _try(
                conn, f"CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {fn})"
            )
    for k, (source, target) in enumerate(CASTS):
        fn = f"public.hj_cast_{k}"
        if _try(
            conn,
            f"CREATE FUNCTION {fn}({source}) RETURNS {target} LANGUAGE sql "
            f"AS $b${_evidence(attacker, f'cast {source} as {target}', target)}$b$",
        ):
            planted += _try(conn, f"CREATE CAST ({source} AS {target}) WITH FUNCTION {fn}({source})")
    return planted


def ran(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """What the attacker's objects recorded (the sequence is the proof; the log says what)."""
    conn.execute("SET search_path = pg_catalog, pg_temp")
    bumped = conn.execute("SELECT last_value, is_called FROM public.hijack_seq").fetchone()
    rows = conn.execute("SELECT who, what FROM public.hijack_log").fetchall()
    assert bumped is not None
    return rows if rows or not bumped[1] else [("?", f"{bumped[0]} call(s), rolled back")]


@pytest.fixture
def attacked(pair: DbPair) -> Iterator[tuple[DbPair, str]]:
    """Both databases with an attacker role that may create in public, its types, the table
    that uses them (owned by the DBA, writable by the attacker) and every planted object."""
    attacker = f"dbsync_attacker_{os.getpid()}_{next(_n)}"
    conns = {"site": pair.site(), "agent": pair.agent()}
    for conn in conns.values():
        conn.execute(f"CREATE ROLE {attacker} LOGIN")
    try:
        for side, conn in conns.items():
            conn.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {attacker}")
            conn.execute(f"SET ROLE {attacker}")
            conn.execute(ATTACKER_TYPES)
            conn.execute("RESET ROLE")
            conn.execute(TABLE if side == "site" else AGENT_TABLE)
            conn.execute(
                "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON public.attacked, public.attacked_parts "
                f"TO {attacker}"
            )
            if side == "site":
                conn.execute(f"GRANT TRUNCATE ON public.attacked_calm TO {attacker}")
            conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON public.conversations TO {attacker}")
            conn.execute(f"SET ROLE {attacker}")
            assert plant(conn, attacker) > 500, f"planting failed on the {side} DB"
            conn.execute("RESET ROLE")
        yield pair, attacker
    finally:
        for conn in conns.values():
            conn.execute("RESET ROLE")
            conn.execute(f"DROP OWNED BY {attacker} CASCADE")
            conn.execute(f"DROP ROLE {attacker}")


def _cli(pair: DbPair, *args: str) -> str:
    result = dbsync_cmd(*args, env=pair.env())
    assert result.returncode == 0, f"dbsync {' '.join(args)} failed: {result.stdout}{result.stderr}"
    return result.stdout


def _verify_incrementally(pair: DbPair, attacker: str) -> None:
    """The daemon's incremental verification (its log reads, the key comparison, the mark) over
    rows the attacker wrote, in-process."""
    from dbsync.daemon.verify import Verifier

    verifier = Verifier(pair.settings(verify_interval=0.2), lambda: True)
    agent = pair.agent()
    verifier.start()
    try:
        wait_until(lambda: agent.execute("SELECT 1 FROM dbsync.verify_mark").fetchone(), what="the verified mark")
        writer = psycopg.connect(pair.site_dsn, autocommit=True)
        try:
            writer.execute(f"SET ROLE {attacker}")
            writer.execute(
                "INSERT INTO public.attacked (id, mood, note) VALUES (200, 'calm', 'late'), (201, 'angry', 'x')"
            )
            writer.execute("INSERT INTO public.attacked_parts VALUES (20, 'calm')")
        finally:
            writer.close()
        sync_once(pair)
        wait_until(lambda: verifier.keys is not None and verifier.keys.keys >= 3, what="the keys compared")
        assert verifier.found == 0 and verifier.problem is None, verifier.problem
    finally:
        verifier.close()


def _prune(pair: DbPair) -> int:
    """One retention step of the daemon of `pair`, at what its Agent DB has applied."""
    with psycopg.connect(pair.agent_dsn, autocommit=True) as agent:
        agent.execute("SET search_path = pg_catalog, pg_temp")
        name = agent_consumer_name(agent, "site", None)
        applied = agent.execute("SELECT prev_snapshot::text FROM dbsync.apply_progress").fetchone()[0]  # type: ignore[index]

    async def go() -> int:
        site = await pg.connect(pair.site_dsn, "Site")
        try:
            return await Retention(consumer=name).maybe_prune(site, applied)
        finally:
            await site.close()

    return asyncio.run(go())


def test_nothing_planted_runs_with_dbsyncs_rights(attacked: tuple[DbPair, str]) -> None:
    pair, attacker = attacked
    site, agent = pair.site(), pair.agent()
    for conn in (site, agent):  # the test's own statements must not set the trap off
        conn.execute("SET search_path = pg_catalog, pg_temp")
    # Rows that exist before capture starts: the backfill copies them.
    site.execute(
        "INSERT INTO public.attacked (id, mood, note, body, tags) "
        "SELECT g, 'calm', 'n' || g, repeat('b', g), ARRAY['x', 'y'] FROM pg_catalog.generate_series(1, 30) g"
    )
    _cli(pair, "tables", "add", "public.attacked", "--backfill")
    site.execute("INSERT INTO public.attacked_parts VALUES (10, 'calm'), (11, 'angry')")
    # A key of the attacker's enum: the backfill's chunk positions must not go through its casts.
    _cli(pair, "tables", "add", "public.attacked_parts", "--backfill", "--chunk-size", "1")
    assert "public.attacked" in _cli(pair, "tables", "list")

    writer = psycopg.connect(pair.site_dsn, autocommit=True)
    try:
        writer.execute(f"SET ROLE {attacker}")  # the attacker's own session and search_path
        writer.execute("INSERT INTO public.attacked (id, mood, note) VALUES (100, 'angry', 'inserted')")
        writer.execute("UPDATE public.attacked SET note = 'updated', mood = 'calm' WHERE id = 100")
        writer.execute("UPDATE public.attacked SET id = 101 WHERE id = 100")  # a key change
        writer.execute("UPDATE public.attacked SET id = id WHERE id = 101")  # changes nothing
        writer.execute("DELETE FROM public.attacked WHERE id = 1")
        writer.execute("UPDATE public.attacked SET tags = ARRAY['z'] WHERE id < 5")
        writer.execute("INSERT INTO public.conversations (phone_number) VALUES ('+4915100000099')")
        writer.execute("INSERT INTO public.attacked_parts VALUES (1, 'calm'), (2, 'angry'), (3, 'calm')")
        writer.execute("UPDATE public.attacked_parts SET mood = 'angry' WHERE id = 3")  # moves partition
        writer.execute("TRUNCATE public.attacked_calm")
    finally:
        writer.close()
    sync_once(pair)
    assert_same(pair, ["public.attacked", "public.conversations", "public.attacked_parts"])

    # Drift behind dbsync's back on the Agent, found and repaired through the sync log.
    agent.execute("UPDATE public.attacked SET note = 'tampered' WHERE id = 7")
    agent.execute("DELETE FROM public.attacked WHERE id = 8")
    agent.execute("INSERT INTO public.attacked (id, note) VALUES (999, 'extra')")
    result = dbsync_cmd("reconcile", "--table", "public.attacked", env=pair.env())
    assert result.returncode == 1, result.stdout + result.stderr  # differences found
    _cli(pair, "reconcile", "--repair", "--apply", "--table", "public.attacked")
    assert_same(pair, ["public.attacked"])
    _cli(pair, "reconcile", "--table", "public.attacked")
    # The same for a key of the attacker's enum, whose casts to text and json are planted.
    agent.execute("DELETE FROM public.attacked_parts WHERE id = 10")
    agent.execute("INSERT INTO public.attacked_parts VALUES (77, 'angry')")
    result = dbsync_cmd("reconcile", "--table", "public.attacked_parts", env=pair.env())
    assert result.returncode == 1, result.stdout + result.stderr
    _cli(pair, "reconcile", "--repair", "--apply", "--table", "public.attacked_parts")
    assert_same(pair, ["public.attacked_parts"])

    # TRUNCATE by the attacker, then the rest of the CLI.
    writer = psycopg.connect(pair.site_dsn, autocommit=True)
    try:
        writer.execute(f"SET ROLE {attacker}")
        writer.execute("TRUNCATE public.attacked")
    finally:
        writer.close()
    sync_once(pair)
    assert_same(pair, ["public.attacked"])
    _verify_incrementally(pair, attacker)
    status = dbsync_cmd("status", env=pair.env())  # 1: no daemon is running, as expected here
    assert status.returncode == 1 and "no active daemon" in status.stdout, status.stdout + status.stderr
    _cli(pair, "tables", "remove", "public.attacked")
    # The consumer registry: a second consumer, the daemon's prune and report, the commands.
    _cli(pair, "consumers", "add", "hijack-copy")
    assert "hijack-copy" in _cli(pair, "consumers", "list")
    assert _prune(pair) == 0  # hijack-copy has applied nothing
    _cli(pair, "consumers", "drop", "hijack-copy")
    assert _prune(pair) > 0

    assert ran(site) == [], "the attacker's objects ran on the Site DB"
    assert ran(agent) == [], "the attacker's objects ran on the Agent DB"


def test_the_planted_objects_do_run_where_nothing_protects_the_call(attacked: tuple[DbPair, str]) -> None:
    """The trap is armed: the same calls made without dbsync's precautions run the attacker's
    code (so the test above would see a hijack)."""
    pair, _ = attacked
    site = pair.site()
    site.execute("SET search_path = public, pg_catalog")
    site.execute("INSERT INTO public.attacked (id) VALUES (1)")
    site.execute("SELECT public.hstore(a) FROM public.attacked a")  # the call 0001 made
    site.execute("SELECT unnest(indkey) FROM pg_index LIMIT 1")  # a bare catalog query
    site.execute("SELECT mood::text FROM public.attacked")  # a cast the type's owner defined
    what = {w for _, w in ran(site)}
    assert "hstore(public.attacked)" in what
    assert "unnest(int2vector)" in what
    assert "cast public.wmood as text" in what


def test_schema_diff_runs_nothing_planted(attacked: tuple[DbPair, str]) -> None:
    """`dbsync schema diff` reads both catalogs and `--apply` alters the Agent DB; the columns use
    the attacker's types, arrays of them, and a default that casts to the attacker's enum."""
    pair, _ = attacked
    site, agent = pair.site(), pair.agent()
    for conn in (site, agent):
        conn.execute("SET search_path = pg_catalog, pg_temp")
    _cli(pair, "tables", "add", "public.attacked")
    site.execute(
        "ALTER TABLE public.attacked ADD COLUMN extra public.wtext DEFAULT 'x', "
        "ADD COLUMN moods public.wmood[] NOT NULL DEFAULT '{calm}', ADD COLUMN k public.wkey"
    )
    agent.execute("ALTER TABLE public.attacked ALTER COLUMN body TYPE varchar(10), ADD COLUMN own public.wtext")
    for args in (("schema", "diff"), ("schema", "diff", "--json"), ("schema", "diff", "--apply")):
        result = dbsync_cmd(*args, env=pair.env())
        assert result.returncode == 1, result.stdout + result.stderr  # the retype is left to a person
    out = dbsync_cmd("schema", "diff", env=pair.env()).stdout
    assert '-- ALTER TABLE "public"."attacked" ALTER COLUMN "body" TYPE text USING "body"::text;' in out
    assert "extra" not in out and "moods" not in out  # added
    assert ran(site) == [], "the attacker's objects ran on the Site DB"
    assert ran(agent) == [], "the attacker's objects ran on the Agent DB"


# What the attacked table replicates under a filter: bare names throughout, each of which the
# attacker has an overload or operator for on these very types (wkey > integer, wtext <> text,
# wmood = wmood, lower/length(text)). Resolved in pg_catalog alone, none of them is theirs.
FILTER = "mood = 'calm' AND id > 3 AND note <> 'x' AND lower(note) <> 'n5' AND length(note) < 100"
FILTER_COLUMNS = "id, mood, note, tags"


def _filtered(conn: psycopg.Connection, where: str) -> list[tuple[object, ...]]:
    return conn.execute(f"SELECT {FILTER_COLUMNS} FROM public.attacked WHERE {where} ORDER BY id").fetchall()


def test_a_row_filter_never_calls_what_the_attacker_planted(attacked: tuple[DbPair, str]) -> None:
    """The filter runs inside read_rows (SECURITY DEFINER), in reconcile and in the resync of
    `tables alter`; an operator named explicitly from public is refused at registration."""
    pair, attacker = attacked
    site, agent = pair.site(), pair.agent()
    for conn in (site, agent):
        conn.execute("SET search_path = pg_catalog, pg_temp")
    site.execute(
        "INSERT INTO public.attacked (id, mood, note, body, tags) SELECT g, "
        "CASE WHEN g % 2 = 0 THEN 'calm'::public.wmood ELSE 'angry'::public.wmood END, 'n' || g, 'secret', ARRAY['x'] "
        "FROM pg_catalog.generate_series(1, 30) g"
    )
    refused = dbsync_cmd(
        "tables", "add", "--where", "note OPERATOR(public.=) 'x'::public.wtext", "public.attacked", env=pair.env()
    )
    assert refused.returncode != 0 and "built-in functions and operators" in refused.stderr, refused.stderr
    _cli(pair, "tables", "add", "public.attacked", "--columns", "id,mood,note,tags", "--where", FILTER, "--backfill")
    assert "lower(" in _cli(pair, "tables", "list")

    writer = psycopg.connect(pair.site_dsn, autocommit=True)
    try:
        writer.execute(f"SET ROLE {attacker}")  # the attacker's own session and search_path
        writer.execute("UPDATE public.attacked SET mood = 'angry' WHERE id IN (4, 6)")  # leave the filter
        writer.execute("UPDATE public.attacked SET mood = 'calm' WHERE id IN (5, 7)")  # enter it (5 stays out)
        writer.execute("INSERT INTO public.attacked (id, mood, note, body) VALUES (100, 'calm', 'new', 'secret')")
        writer.execute("UPDATE public.attacked SET body = 'other secret' WHERE id = 8")
    finally:
        writer.close()
    sync_once(pair)
    assert _filtered(agent, "true") == _filtered(site, FILTER)
    assert agent.execute("SELECT count(*) FROM public.attacked WHERE body IS NOT NULL").fetchone() == (0,)

    agent.execute("INSERT INTO public.attacked (id, mood, note) VALUES (5, 'calm', 'n5')")  # drift
    result = dbsync_cmd("reconcile", "--table", "public.attacked", env=pair.env())
    assert result.returncode == 1, result.stdout + result.stderr
    _cli(pair, "reconcile", "--repair", "--apply", "--table", "public.attacked")
    assert _filtered(agent, "true") == _filtered(site, FILTER)
    _cli(pair, "tables", "alter", "--where", "mood = 'angry' AND id < 20", "public.attacked")
    sync_once(pair)
    assert _filtered(agent, "true") == _filtered(site, "mood = 'angry' AND id < 20")
    _cli(pair, "reconcile", "--table", "public.attacked")

    assert ran(site) == [], "the attacker's objects ran on the Site DB"
    assert ran(agent) == [], "the attacker's objects ran on the Agent DB"


def test_the_filters_operators_are_planted(attacked: tuple[DbPair, str]) -> None:
    """The trap of the test above is armed: in the attacker's search_path the filter's own text
    calls their objects."""
    pair, _ = attacked
    site = pair.site()
    site.execute("SET search_path = public, pg_catalog")
    site.execute("INSERT INTO public.attacked (id, mood, note) VALUES (5, 'calm', 'n')")
    site.execute(f"SELECT count(*) FROM public.attacked WHERE {FILTER}")
    assert ran(site) != []


def test_insert_only_capture_and_apply_run_nothing_planted(attacked: tuple[DbPair, str]) -> None:
    """An insert-only table logs whole row images: the capture's hstore of a row must be the
    extension's hstore(record), never the attacker's hstore(public.attacked), and the apply,
    the copy and the multiset reconcile must not meet the attacker's enum casts either."""
    pair, attacker = attacked
    site, agent = pair.site(), pair.agent()
    for conn in (site, agent):
        conn.execute("SET search_path = pg_catalog, pg_temp")
    site.execute("INSERT INTO public.attacked (id, mood, note) VALUES (1, 'calm', 'before')")
    _cli(pair, "tables", "add", "--insert-only", "--backfill", "public.attacked")
    writer = psycopg.connect(pair.site_dsn, autocommit=True)
    try:
        writer.execute(f"SET ROLE {attacker}")
        writer.execute("INSERT INTO public.attacked (id, mood, note, tags) VALUES (2, 'angry', 'x', ARRAY['a'])")
        writer.execute("INSERT INTO public.attacked (id, mood) SELECT g, 'calm' FROM generate_series(3, 40) g")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            writer.execute("UPDATE public.attacked SET note = 'changed'")
    finally:
        writer.close()
    sync_once(pair)
    assert_same(pair, ["public.attacked"])
    _cli(pair, "reconcile", "--table", "public.attacked")
    _cli(pair, "tables", "remove", "public.attacked")
    assert ran(site) == [], "the attacker's objects ran on the Site DB"
    assert ran(agent) == [], "the attacker's objects ran on the Agent DB"
