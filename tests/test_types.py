"""Every common column type survives the trip Site -> JSON row image -> Agent exactly.

Each case inserts its values (and a NULL), then rotates the values between rows (the update
path), then deletes every other row (the delete path), syncing and comparing after each step.
assert_same compares PostgreSQL's own text output of every row, with floats at full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.helpers import DbPair, assert_same, count, replicate, sync_once

T = "public.t"


@dataclass(frozen=True)
class Case:
    type: str
    values: tuple[str, ...]  # SQL expressions
    setup: str = ""  # types the column needs, created on both sides
    nullable: bool = True
    min_version: int = 0  # server_version_num that knows these values


ENUM = "CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy', 'a b', 'quo\"te', 'comma,', 'ünï', 'NULL', '')"
COMPOSITE = (
    "CREATE TYPE public.addr AS (street text, no integer, tags text[], at timestamptz, price numeric);"
    "CREATE TYPE public.shipment AS (src public.addr, dst public.addr, weight float8)"
)

CASES: dict[str, Case] = {
    "numeric": Case(
        "numeric",
        ("1.10", "1.1", "1.100000", "1e-20", "-1e-20", "0", "0.000", "-0.0", "'NaN'", "'Infinity'", "'-Infinity'",
         "123456789012345678901234567890.123456789012345678901234567890", "1e100", "-42"),
    ),
    "numeric-typmod": Case("numeric(12, 4)", ("1.1", "-99999999.9999", "0", "3.14159")),
    "float8": Case(
        "float8",
        ("0.1", "0.1::float8 + 0.2", "1::float8 / 3", "'NaN'", "'Infinity'", "'-Infinity'", "0",
         "1e-320", "2.2250738585072014e-308", "1.7976931348623157e308", "-1.5e-300", "123456789.123456789"),
    ),
    "float8-negative-zero": Case("float8", ("'-0'", "-0.0::float8", "0")),
    "float4": Case(
        "float4",
        ("0.1", "1::float4 / 3", "'NaN'", "'Infinity'", "'-Infinity'", "0", "3.4028235e38", "1.4e-45",
         "1.17549435e-38", "16777217"),
    ),
    "float4-negative-zero": Case("float4", ("'-0'", "0")),
    "integers": Case(
        "integer", ("0", "-2147483648", "2147483647", "42"),
    ),
    "bigint": Case("bigint", ("-9223372036854775808", "9223372036854775807", "9007199254740993")),
    "smallint": Case("smallint", ("-32768", "32767")),
    "timestamptz": Case(
        "timestamptz",
        ("'2024-03-31 01:30:00+00'", "'1999-12-31 23:59:59.999999+14'", "'1970-01-01 00:00:00.000001-12'",
         "'infinity'", "'-infinity'", "'0044-03-15 12:00:00+00 BC'", "'4713-01-01 00:00:00+00 BC'",
         "'294276-12-31 23:59:59.999999+00'", "'2024-10-27 02:30:00 Europe/Berlin'"),
    ),
    "timestamp": Case(
        "timestamp",
        ("'2024-02-29 23:59:59.999999'", "'2000-01-01 00:00:00'", "'infinity'", "'-infinity'",
         "'0001-01-01 00:00:00 BC'", "'294276-12-31 23:59:59.999999'"),
    ),
    "timestamp-precision": Case("timestamp(3) with time zone", ("'2024-01-01 12:00:00.123+01'", "now()")),
    "date": Case(
        "date",
        ("'2024-02-29'", "'infinity'", "'-infinity'", "'0001-01-01 BC'", "'4713-01-01 BC'", "'5874897-12-31'"),
    ),
    "time": Case("time", ("'00:00:00'", "'23:59:59.999999'", "'24:00:00'", "'12:34:56.5'")),
    "timetz": Case("timetz", ("'12:34:56.789+05:45'", "'00:00:00-15:59'", "'24:00:00+00'", "'23:59:59.999999+15:59'")),
    "interval": Case(
        "interval",
        ("'1 year 2 mons 3 days 04:05:06.789'", "'-1 year +2 mons -3 days +04:05:06.789'", "'-3 days -04:05:06'",
         "'1 day -1 microsecond'", "'0'", "'178000000 years'", "'-178000000 years'", "'1 mon -30 days'",
         "'-0.000001 seconds'", "'P1Y2M3DT4H5M6S'"),
    ),
    "interval-infinity": Case("interval", ("'infinity'", "'-infinity'"), min_version=170000),
    "jsonb": Case(
        "jsonb",
        ("""'{"a": {"b": [1, 2.50, null, true, "ü ✓ \\"q\\"", {"": ""}]}, "z": -0.0}'""",
         "'[]'", "'{}'", """'"just a string"'""", "'123.4500'", "'1e-5'", """'{"k": "\\\\ back / slash \\n"}'""",
         "jsonb_build_object('big', repeat('x', 10000))"),
    ),
    "jsonb-null": Case("jsonb", ("'null'", "'{\"a\": null}'")),
    "json": Case(
        "json",
        ("""'{ "a" :1,   "a":2 }'""", "'[1,2 , 3]'", """'{"u": "\\u00fc \\u2713"}'""", "'1.10'",
         """'{"nested": {"x": [ ]}}'"""),
    ),
    "json-null": Case("json", ("'null'",)),
    "json-outer-whitespace": Case("json", ("'  {\"a\": 1}  '",)),
    "json-u0000": Case("json", ("""'"\\u0000"'""",)),
    "text-array": Case(
        "text[]",
        ("'{}'", """'{a,"b c","q\\"uote",NULL,"NULL","",ü,"{","}",",","\\\\"}'""", "ARRAY['x']",
         "'{{a,b},{c,NULL}}'"),
    ),
    "int-array": Case(
        "integer[]",
        ("'{1,2,3}'", "'{{1,2},{3,4}}'", "'{{{1}},{{2}}}'", "'{NULL,1}'", "'{}'", "ARRAY[NULL]::int[]"),
    ),
    "array-lower-bounds": Case("integer[]", ("'[0:2]={1,2,3}'", "'[-5:-4][1:2]={{1,2},{3,4}}'")),
    "numeric-array": Case("numeric[]", ("'{1.10,NaN,1e-20}'",)),
    "float-array": Case("float8[]", ("ARRAY[0.1::float8 + 0.2, 'NaN', '-Infinity']",)),
    "timestamptz-array": Case("timestamptz[]", ("ARRAY['2024-01-01 00:00+05'::timestamptz, 'infinity']",)),
    "bytea": Case(
        "bytea",
        ("'\\x'", "'\\x00'", "'\\x000102ff00'", "'\\x5c7822'", "decode(repeat('00ff', 100000), 'hex')"),
    ),
    "uuid": Case("uuid", ("'00000000-0000-0000-0000-000000000000'", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'")),
    "enum": Case("public.mood", ("'sad'", "'a b'", "'quo\"te'", "'comma,'", "'ünï'", "'NULL'", "''"), ENUM),
    "enum-array": Case(
        "public.mood[]",
        ("ARRAY['sad', 'a b', 'quo\"te', 'NULL', '']::public.mood[]", "'{}'", "ARRAY[NULL, 'ok']::public.mood[]"),
        ENUM,
    ),
    "domain": Case(
        "public.posint", ("1", "2147483647"), "CREATE DOMAIN public.posint AS integer CHECK (VALUE > 0)"
    ),
    "domain-not-null": Case(
        "public.code", ("'a'", "'b'", "'c'"), "CREATE DOMAIN public.code AS text NOT NULL CHECK (VALUE <> '')",
        nullable=False,
    ),
    "composite": Case(
        "public.addr",
        ("ROW('Main \"St\", 1', 5, ARRAY['a', 'b c'], '2024-01-01 00:00+03', 1.10)::public.addr",
         "ROW(NULL, NULL, NULL, NULL, NULL)::public.addr", "ROW('', 0, '{}', 'infinity', 'NaN')::public.addr"),
        COMPOSITE,
    ),
    "nested-composite": Case(
        "public.shipment",
        ("ROW(ROW('a', 1, NULL, NULL, 2.50)::public.addr, NULL, 0.1::float8 + 0.2)::public.shipment",),
        COMPOSITE,
    ),
    "composite-array": Case(
        "public.addr[]", ("ARRAY[ROW('x', 1, '{y}', NULL, 1.0)::public.addr, NULL]",), COMPOSITE
    ),
    "inet": Case("inet", ("'192.168.0.1/24'", "'10.0.0.1'", "'::1'", "'2001:db8::1/64'", "'::ffff:1.2.3.4'")),
    "cidr": Case("cidr", ("'10.0.0.0/8'", "'2001:db8::/32'", "'192.168.1.0/24'")),
    "macaddr": Case("macaddr", ("'08:00:2b:01:02:03'",)),
    "boolean": Case("boolean", ("true", "false")),
    "text": Case(
        "text",
        ("''", "' '", "E'a\\tb\\nc\\r'", "'ünïcødé ✓ 😀'", "'quo\"te ''single'' \\back'", "'NULL'",
         "E'\\u0001\\u001f'"),
    ),
    "text-over-1mb": Case("text", ("repeat('ü✓x', 400000)", "repeat('a', 1100000)")),
    "char": Case("char(5)", ("'ab'", "'abcde'", "''", "'ü'")),
    "varchar": Case("varchar(10)", ("'ab '", "''")),
    "internal-char": Case('"char"', ("'a'", "''")),
    "bit": Case("bit varying", ("B'1010'", "B''", "B'1'")),
    "ranges": Case("numrange", ("'[1.10,2.200]'", "'empty'", "'(,)'", "'(1,)'")),
    "tstzrange": Case("tstzrange", ("tstzrange('2024-01-01+00', 'infinity')", "'empty'")),
    "multirange": Case("int4multirange", ("'{[1,3),[5,7)}'", "'{}'")),
    "money": Case("money", ("1234.56", "-0.01")),
    "point": Case("point", ("'(1.5,-2)'", "point(0.1::float8 + 0.2, 1e-300)")),
    "tsvector": Case("tsvector", ("'a:1 b:2B ''quoted word'':3'",)),
    "oid": Case("oid", ("0", "4294967295")),
}

# Expected failures (case id -> diagnosis), marked xfail(strict=True) so a fix forces the mark
# to go. Empty: float -0 was suspected but round-trips exactly (to_json writes -0, float8in
# reads it back).
KNOWN: dict[str, str] = {}


def params() -> list[object]:
    out: list[object] = []
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[name])] if name in KNOWN else []
        out.append(pytest.param(case, id=name, marks=marks))
    return out


def make_table(pair: DbPair, columns: str, setup: str = "") -> None:
    ddl = (setup + ";\n" if setup else "") + f"CREATE TABLE {T} (id integer PRIMARY KEY, {columns})"
    replicate(pair, ddl, T)


@pytest.mark.parametrize("case", params())
def test_type_round_trips(pair: DbPair, case: Case) -> None:
    if pair.site().info.server_version < case.min_version:
        pytest.skip(f"these values need PostgreSQL {case.min_version // 10000}")
    make_table(pair, f"v {case.type}", case.setup)
    site = pair.site()
    values = [*case.values, *(["NULL"] if case.nullable else [])]
    site.execute(f"INSERT INTO {T} VALUES " + ", ".join(f"({i}, {v})" for i, v in enumerate(values, 1)))
    sync_once(pair)
    assert count(pair.agent_dsn, T) == len(values)
    assert_same(pair, [T])

    # Every row takes its neighbour's value: the upsert path.
    site.execute(f"UPDATE {T} AS t SET v = o.v FROM {T} AS o WHERE o.id = t.id % {len(values)} + 1")
    sync_once(pair)
    assert_same(pair, [T])

    # The delete path (the key alone identifies the row).
    site.execute(f"DELETE FROM {T} WHERE id % 2 = 0")
    sync_once(pair)
    assert count(pair.agent_dsn, T) == (len(values) + 1) // 2
    assert_same(pair, [T])


# Cases that fail on their own (see the report); kept out of the all-columns test so that it
# checks NULL handling and nothing else.
OWN_FAILURES = {"jsonb-null", "json-null", "json-outer-whitespace", "json-u0000", "array-lower-bounds"}


def test_nulls_in_every_column(pair: DbPair) -> None:
    version = pair.site().info.server_version
    nullable = {
        n: c for n, c in CASES.items() if c.nullable and n not in OWN_FAILURES and c.min_version <= version
    }
    setup = ";\n".join(dict.fromkeys(c.setup for c in nullable.values() if c.setup))
    columns = ", ".join(f'"{n}" {c.type}' for n, c in nullable.items())
    make_table(pair, columns, setup)
    site = pair.site()
    names = ", ".join(f'"{n}"' for n in nullable)
    firsts = ", ".join(c.values[0] for c in nullable.values())
    site.execute(f"INSERT INTO {T} (id) VALUES (1)")
    site.execute(f"INSERT INTO {T} (id, {names}) VALUES (2, {firsts})")
    sync_once(pair)
    assert_same(pair, [T])
    # From all values to all NULLs and back.
    site.execute(f"UPDATE {T} AS t SET ({names}) = (SELECT {names} FROM {T} o WHERE o.id = 3 - t.id)")
    sync_once(pair)
    assert_same(pair, [T])
    agent = pair.agent()
    assert agent.execute(f"SELECT num_nonnulls({names}) FROM {T} ORDER BY id").fetchall() == [(len(nullable),), (0,)]


@pytest.mark.parametrize("agent_kind", ["STORED", "VIRTUAL"])
def test_generated_column(pair: DbPair, agent_kind: str) -> None:
    """Stored on the Site; on the Agent generated too (it cannot be inserted into)."""
    if agent_kind == "VIRTUAL" and pair.agent().info.server_version < 180000:
        pytest.skip("virtual generated columns need PostgreSQL 18")
    site_ddl = (
        f"CREATE TABLE {T} (id integer PRIMARY KEY, qty integer, price numeric, "
        "total numeric GENERATED ALWAYS AS (qty * price) STORED, label text)"
    )
    agent_ddl = (
        f"CREATE TABLE {T} (id integer PRIMARY KEY, qty integer, price numeric, "
        f"total numeric GENERATED ALWAYS AS (qty * price) {agent_kind}, label text)"
    )
    replicate(pair, site_ddl, T, agent_ddl=agent_ddl)
    site = pair.site()
    site.execute(f"INSERT INTO {T} (id, qty, price, label) VALUES (1, 2, 1.10, 'a'), (2, NULL, 3, 'b'), (3, 1, 1, 'c')")
    sync_once(pair)
    assert_same(pair, [T])
    site.execute(f"UPDATE {T} SET qty = qty + 1, label = 'x'")
    site.execute(f"DELETE FROM {T} WHERE id = 3")
    sync_once(pair)
    assert_same(pair, [T])
    assert pair.agent().execute(f"SELECT total::text FROM {T} WHERE id = 1").fetchone() == ("3.30",)


def test_identity_key_generated_always_on_the_agent(pair: DbPair) -> None:
    replicate(
        pair,
        f"CREATE TABLE {T} (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text)",
        T,
        agent_ddl=f"CREATE TABLE {T} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text)",
    )
    site = pair.site()
    site.execute(f"INSERT INTO {T} (v) SELECT 'r' || g FROM generate_series(1, 5) g")
    site.execute(f"INSERT INTO {T} (id, v) VALUES (100, 'explicit')")
    sync_once(pair)
    assert_same(pair, [T])
    site.execute(f"UPDATE {T} SET v = v || '!' WHERE id % 2 = 0")
    site.execute(f"UPDATE {T} SET id = 200 WHERE id = 100")
    site.execute(f"DELETE FROM {T} WHERE id = 1")
    sync_once(pair)
    assert_same(pair, [T])


def test_identity_non_key_column_generated_always_on_the_agent(pair: DbPair) -> None:
    """A GENERATED ALWAYS identity column that is not the key: the Site's value must win."""
    replicate(
        pair,
        f"CREATE TABLE {T} (id integer PRIMARY KEY, n integer GENERATED ALWAYS AS IDENTITY, v text)",
        T,
        agent_ddl=(
            f"CREATE TABLE {T} (id integer PRIMARY KEY, "
            "n integer GENERATED ALWAYS AS IDENTITY (START WITH 1000), v text)"
        ),
    )
    site = pair.site()
    site.execute(f"INSERT INTO {T} (id, v) SELECT g, 'r' || g FROM generate_series(1, 5) g")
    sync_once(pair)
    assert_same(pair, [T])
    site.execute(f"UPDATE {T} SET v = v || '!' WHERE id % 2 = 0")
    site.execute(f"DELETE FROM {T} WHERE id = 1")
    sync_once(pair)
    assert_same(pair, [T])


def test_partial_changes_of_every_type(pair: DbPair) -> None:
    """Updates that change part of a row: exactly one column, for every type above; NULL to a
    value and a value to NULL; a TOASTed value changed by one byte; a column set to the value it
    already had; the key changed together with other columns. The log carries keys only, so each
    is the daemon's read of the row at its snapshot."""
    version = pair.site().info.server_version
    cases = {n: c for n, c in CASES.items() if c.nullable and n not in OWN_FAILURES and c.min_version <= version}
    setup = ";\n".join(dict.fromkeys(c.setup for c in cases.values() if c.setup))
    make_table(pair, ", ".join(f'"{n}" {c.type}' for n, c in cases.items()) + ", body text", setup)
    site = pair.site()
    names = ", ".join(f'"{n}"' for n in cases)
    firsts = ", ".join(c.values[0] for c in cases.values())
    # An incompressible 100 kB body, stored out of line.
    body = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 3200) g)"
    site.execute(f"INSERT INTO {T} (id, {names}, body) VALUES (1, {firsts}, {body}), (3, {firsts}, {body})")
    site.execute(f"INSERT INTO {T} (id) VALUES (2)")
    sync_once(pair)
    assert_same(pair, [T])

    for i, (name, case) in enumerate(cases.items(), 1):
        other = case.values[1] if len(case.values) > 1 else "NULL"
        site.execute(f'UPDATE {T} SET "{name}" = {other} WHERE id = 1')  # one column, value to value
        site.execute(f'UPDATE {T} SET "{name}" = {case.values[0]} WHERE id = 2')  # NULL to value
        site.execute(f'UPDATE {T} SET "{name}" = NULL WHERE id = 3')  # value to NULL
        if i % 8 == 0:
            sync_once(pair)
            assert_same(pair, [T])
    sync_once(pair)
    assert_same(pair, [T])
    agent = pair.agent()
    assert agent.execute(f"SELECT num_nonnulls({names}) FROM {T} ORDER BY id").fetchall() == [
        (sum(len(c.values) > 1 for c in cases.values()),),
        (len(cases),),
        (0,),
    ]

    # One byte of the TOASTed body; then a column set to what it holds (nothing to log).
    site.execute(f"UPDATE {T} SET body = overlay(body PLACING 'Z' FROM 50000 FOR 1) WHERE id = 1")
    start = site.execute("SELECT coalesce(max(seq), 0) FROM dbsync.sync_log").fetchone()[0]  # type: ignore[index]
    site.execute(f"UPDATE {T} SET body = body, {names.split(', ')[0]} = {names.split(', ')[0]} WHERE id = 1")
    assert site.execute("SELECT count(*) FROM dbsync.sync_log WHERE seq > %s", (start,)).fetchone() == (0,)
    sync_once(pair)
    assert_same(pair, [T])
    assert agent.execute(f"SELECT substr(body, 49999, 3) FROM {T} WHERE id = 1").fetchone()[0][1] == "Z"  # type: ignore[index]

    # The key together with other columns, and a key change that lands on a freed key.
    site.execute(f'UPDATE {T} SET id = 10, "{next(iter(cases))}" = NULL, body = body || \'!\' WHERE id = 1')
    site.execute(f"UPDATE {T} SET id = 1 WHERE id = 3")
    sync_once(pair)
    assert_same(pair, [T])
    assert [r[0] for r in agent.execute(f"SELECT id FROM {T} ORDER BY id").fetchall()] == [1, 2, 10]
