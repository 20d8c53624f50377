"""Keys and values of extension types (ltree, citext, hstore) replicate, compare and delete.

Every dbsync session pins search_path to pg_catalog, where an extension's `=` is not found: key
comparisons must name the type's own equality operator, schema-qualified, found in the catalog,
and compare a domain as its base type, so that an operator a writer defines on the domain never
runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from tests.helpers import DbPair, assert_same, dbsync_cmd, sync_once

T = "public.ext_t"


@dataclass(frozen=True)
class Case:
    extension: str
    key_type: str
    value_type: str
    keys: tuple[str, ...]  # 4 distinct key literals
    values: tuple[str, ...]  # 2 value literals
    setup: str = ""


CASES = {
    "ltree": Case(
        "ltree", "public.ltree", "public.ltree", ("'a.b'", "'a.b.c'", "'Top.Science'", "'x'"), ("'v.w'", "'v.w.z'")
    ),
    "citext": Case(
        "citext",
        "public.citext",
        "public.citext",
        ("'Abc'", "'xyz, \"q\"'", "'ÜMLAUT'", "'k4'"),
        ("'Hello'", "'hello again'"),
    ),
    "hstore": Case(
        "hstore",
        "public.hstore",
        "public.hstore",
        ("'a=>1'", "'a=>1, b=>\"2, x\"'", "'\"\"=>NULL'", "'k=>v'"),
        ("'x=>1'", "'y=>\"z z\"'"),
    ),
    "citext-domain": Case(
        "citext",
        "public.ckey",
        "public.citext",
        ("'Abc'", "'def'", "'GHI'", "'k4'"),
        ("'Hello'", "'hello again'"),
        "CREATE DOMAIN public.ckey AS public.citext CHECK (VALUE <> '')",
    ),
}


def extension(pair: DbPair, name: str) -> None:
    for conn in (pair.site(), pair.agent()):
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = %s", (name,)).fetchone() is None:
            pytest.skip(f"extension {name} is not available on this PostgreSQL")
        conn.execute(f"CREATE EXTENSION IF NOT EXISTS {name} SCHEMA public")


def make_table(pair: DbPair, case: Case) -> None:
    extension(pair, case.extension)
    ddl = (case.setup + ";" if case.setup else "") + (
        f"CREATE TABLE {T} (k {case.key_type} PRIMARY KEY, v {case.value_type}, n integer)"
    )
    for conn in (pair.site(), pair.agent()):
        conn.execute(ddl)
    pair.site().execute("SELECT dbsync.add_table(%s::regclass)", (T,))


def reconcile(pair: DbPair, *args: str) -> tuple[int, Any, str]:
    proc = dbsync_cmd("reconcile", "--deep", "--json", "--table", T, *args, env=pair.env())
    out: Any = json.loads(proc.stdout) if proc.stdout.strip() else proc.stdout
    return proc.returncode, out, proc.stderr


def key_text(pair: DbPair, case: Case, literal: str) -> str:
    row = pair.site().execute(f"SELECT ({literal}::{case.key_type})::text").fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("case", [pytest.param(c, id=name) for name, c in CASES.items()])
def test_extension_type_keys_and_values_replicate(pair: DbPair, case: Case) -> None:
    make_table(pair, case)
    site = pair.site()
    k1, k2, k3, k4 = case.keys
    v1, v2 = case.values
    site.execute(f"INSERT INTO {T} VALUES ({k1}, {v1}, 1), ({k2}, {v2}, 2), ({k3}, NULL, 3)")
    sync_once(pair)
    assert_same(pair, [T])

    site.execute(f"UPDATE {T} SET v = {v2}, n = 10 WHERE k = {k1}")
    site.execute(f"UPDATE {T} SET k = {k4} WHERE k = {k2}")  # a key change: the old key goes
    site.execute(f"DELETE FROM {T} WHERE k = {k3}")
    sync_once(pair)
    assert_same(pair, [T])
    assert pair.agent().execute(f"SELECT count(*) FROM {T}").fetchone() == (2,)

    site.execute(f"TRUNCATE {T}")
    site.execute(f"INSERT INTO {T} VALUES ({k1}, {v1}, 1), ({k2}, {v2}, 2), ({k3}, {v1}, 3), ({k4}, NULL, 4)")
    sync_once(pair)
    assert_same(pair, [T])

    code, report, err = reconcile(pair)
    assert code == 0, err
    assert report["in_sync"] is True

    # Tamper with the Agent: one row gone, one changed, one that the Site does not have.
    agent = pair.agent()
    agent.execute(f"DELETE FROM {T} WHERE k = {k1}")
    agent.execute(f"UPDATE {T} SET n = 99 WHERE k = {k2}")
    agent.execute(f"INSERT INTO {T} VALUES ({case.values[0]}::{case.key_type}, NULL, 5)")
    code, report, err = reconcile(pair)
    assert code == 1, err
    table = report["tables"][T]
    assert (table["missing"], table["changed"], table["extra"], table["unsettled"]) == (1, 1, 1, 0), table
    assert [k["k"] for k in table["missing_keys"]] == [key_text(pair, case, k1)]
    assert [k["k"] for k in table["changed_keys"]] == [key_text(pair, case, k2)]
    assert [k["k"] for k in table["extra_keys"]] == [key_text(pair, case, case.values[0])]

    code, report, err = reconcile(pair, "--repair", "--apply")
    assert code == 0, err
    assert report["in_sync"] is True
    assert_same(pair, [T])


@pytest.mark.parametrize("case", [pytest.param(c, id=name) for name, c in CASES.items()])
def test_extension_type_keys_backfill_in_key_order(pair: DbPair, case: Case) -> None:
    """The initial copy walks the table in key order with the key type's own operators."""
    make_table(pair, case)
    values = ", ".join(f"({k}, {case.values[i % 2]}, {i})" for i, k in enumerate(case.keys))
    pair.site().execute(f"INSERT INTO {T} VALUES {values}")
    sync_once(pair)
    pair.agent().execute(f"DELETE FROM {T}")
    proc = dbsync_cmd("backfill", "--chunk-size", "1", T, env=pair.env())
    assert proc.returncode == 0, proc.stderr
    sync_once(pair)
    assert_same(pair, [T])


PLANT = """
CREATE TABLE public.hijack_log (at timestamptz DEFAULT now(), who text DEFAULT current_user);
GRANT INSERT ON public.hijack_log TO PUBLIC;
CREATE FUNCTION public.hijack_eq(public.ckey, public.ckey) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO public.hijack_log DEFAULT VALUES;
    RETURN $1::text OPERATOR(pg_catalog.=) $2::text;
END $$;
CREATE OPERATOR public.= (LEFTARG = public.ckey, RIGHTARG = public.ckey, FUNCTION = public.hijack_eq)
"""


def plant(conn: psycopg.Connection, writer: str) -> None:
    conn.execute(f"DROP ROLE IF EXISTS {writer}")
    conn.execute(f"CREATE ROLE {writer}")
    conn.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {writer}")
    conn.execute(f"SET ROLE {writer}")
    try:
        conn.execute(PLANT)
    finally:
        conn.execute("RESET ROLE")


def test_an_operator_planted_on_a_key_domain_never_runs(pair: DbPair) -> None:
    case = CASES["citext-domain"]
    make_table(pair, case)
    writer = f"dbsync_writer_{abs(hash(pair.site_dsn)) % 100000}"
    site, agent = pair.site(), pair.agent()
    try:
        for conn in (site, agent):
            plant(conn, writer)
        # The test's own statements name rows by n: its search_path would find the planted `=`.
        site.execute(f"INSERT INTO {T} SELECT 'key' || g, 'v' || g, g FROM generate_series(1, 20) g")
        sync_once(pair)
        site.execute(f"UPDATE {T} SET v = v || '!' WHERE n <= 5")
        site.execute(f"UPDATE {T} SET k = 'moved' WHERE n = 6")
        site.execute(f"DELETE FROM {T} WHERE n BETWEEN 7 AND 9")
        sync_once(pair)
        assert_same(pair, [T])
        agent.execute(f"DELETE FROM {T} WHERE n = 10")
        agent.execute(f"UPDATE {T} SET v = 'tampered' WHERE n = 11")
        code, report, err = reconcile(pair)
        assert code == 1, err
        assert report["tables"][T]["missing_keys"] == [{"k": "key10"}]
        assert report["tables"][T]["changed_keys"] == [{"k": "key11"}]
        code, report, err = reconcile(pair, "--repair", "--apply")
        assert code == 0, err
        site.execute(f"DELETE FROM {T} WHERE n = 12")
        site.execute(f"TRUNCATE {T}")
        sync_once(pair)
        assert_same(pair, [T])
        for conn in (site, agent):
            assert conn.execute("SELECT count(*) FROM public.hijack_log").fetchone() == (0,)
    finally:
        for conn in (site, agent):
            conn.execute(f"DROP OWNED BY {writer}")
            conn.execute(f"DROP ROLE {writer}")


def test_values_of_types_without_equality_replicate(pair: DbPair) -> None:
    """json and point have no `=`: as values they still replicate, large ones included. (xml has
    none either, but the embedded build lacks libxml.)"""
    ddl = f"CREATE TABLE {T} (k integer PRIMARY KEY, j json, p point, big json)"
    for conn in (pair.site(), pair.agent()):
        conn.execute(ddl)
    site = pair.site()
    site.execute("SELECT dbsync.add_table(%s::regclass)", (T,))
    site.execute(
        f"INSERT INTO {T} SELECT g, '{{\"a\": 1}}', point(g, -g), "
        "pg_catalog.json_build_object('body', repeat(md5(g::text), 400)) FROM generate_series(1, 5) g"
    )
    sync_once(pair)
    site.execute(f"UPDATE {T} SET j = '[1, 2]' WHERE k <= 2")  # big stays: the unchanged-value path
    site.execute(f"DELETE FROM {T} WHERE k = 5")
    sync_once(pair)
    assert_same(pair, [T])
    code, report, err = reconcile(pair)
    assert code == 0, err
