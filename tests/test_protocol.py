"""The protocol module: one statement text for psycopg and asyncpg, and the layers (no server)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dbsync import protocol
from dbsync.protocol import Statement, to_asyncpg

pytestmark = pytest.mark.unit


def test_named_placeholders_become_numbered_in_the_declared_order() -> None:
    text = "SELECT %(b)s, %(a)s WHERE x = %(b)s AND y LIKE 'a%%'"
    assert to_asyncpg(text, ("a", "b")) == "SELECT $2, $1 WHERE x = $2 AND y LIKE 'a%'"
    stmt = Statement(text, "b", "a")
    assert stmt.psycopg == text and stmt.names == ("b", "a")
    assert stmt.asyncpg == "SELECT $1, $2 WHERE x = $1 AND y LIKE 'a%'"


def test_a_casted_placeholder_keeps_its_cast() -> None:
    assert to_asyncpg("%(s)s::text::pg_snapshot", ("s",)) == "$1::text::pg_snapshot"


@pytest.mark.parametrize(
    ("text", "names", "says"),
    [
        ("SELECT %(a)s, %(c)s", ("a",), "'c' is not declared"),
        ("SELECT %(a)s", ("a", "b"), "b not used"),
        ("SELECT %(a)s", ("a", "a"), "declared twice"),
        ("SELECT %s", (), "lone %"),
        ("SELECT 5 % 3", (), "lone %"),
    ],
)
def test_a_statement_and_its_parameters_must_agree(text: str, names: tuple[str, ...], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Statement(text, *names)


def test_every_protocol_statement_has_both_forms() -> None:
    statements = [v for v in vars(protocol).values() if isinstance(v, Statement)]
    assert len(statements) > 15
    for stmt in statements:
        assert "%(" not in stmt.asyncpg, stmt
        numbers = {f"${i}" for i in range(1, len(stmt.names) + 1)}
        assert all(n in stmt.asyncpg for n in numbers), stmt


def test_the_visibility_rule_is_one_fragment() -> None:
    rule = protocol.committed_between("l.txid", "p", "s")
    assert rule == "pg_catalog.pg_visible_in_snapshot(l.txid, s) AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, p)"


LOADED = "import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('dbsync.daemon')))"


@pytest.mark.parametrize("module", ["dbsync.status", "dbsync.reconcile", "dbsync.logcheck", "dbsync.repair"])
def test_the_library_loads_no_daemon_code(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", LOADED.format(module=module)], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
