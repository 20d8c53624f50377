"""Pure logic of the RLS refusal line and of key comparisons: no server needed."""

from __future__ import annotations

import pytest

from dbsync.errors import SchemaError
from dbsync.keyops import KeyEquality, key_equalities
from dbsync.rls import RowSecurityError, error_table, from_error, is_rls_error


class FakeServerError(Exception):
    """Only what the checks read: the SQLSTATE and the message."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


RLS = FakeServerError("42501", 'query would be affected by row-level security policy for table "Odd ""Name"""')


@pytest.mark.unit
def test_the_rls_refusal_is_told_apart_from_other_permission_errors() -> None:
    assert is_rls_error(RLS)
    assert not is_rls_error(FakeServerError("42501", "permission denied for table secret"))
    assert not is_rls_error(FakeServerError("42P01", "row-level security is unrelated here"))


@pytest.mark.unit
def test_the_rls_line_names_the_table_the_side_and_the_fix() -> None:
    assert error_table(RLS) == 'Odd "Name"'
    exc = from_error(RLS, "Agent", "applier")
    assert isinstance(exc, RowSecurityError) and isinstance(exc, SchemaError)
    line = str(exc)
    assert "\n" not in line
    assert 'table "Odd ""Name""" hides rows from role applier on the Agent DB' in line
    assert "FORCE ROW LEVEL SECURITY" in line and "BYPASSRLS" in line


@pytest.mark.unit
def test_key_comparisons_name_their_operator_and_cast_both_sides() -> None:
    (eq,) = key_equalities([("k", "public.citext", "public", "=", "public.citext", "public.citextout")], "public.t")
    assert eq == KeyEquality("k", "public.citext", 'OPERATOR("public".=)', "public.citextout", "public.citext")
    assert eq.text("t.k") == "pg_catalog.textin(public.citextout((t.k)::public.citext))"
    assert eq.match("d.k", "k.k") == '(d.k)::public.citext OPERATOR("public".=) (k.k)::public.citext'


@pytest.mark.unit
@pytest.mark.parametrize(
    "row", [("k", "point", None, None, None, "point_out"), ("k", "t", "public", "= 1", "t", "t_out")]
)
def test_a_key_without_a_usable_equality_operator_is_refused(row: tuple[object, ...]) -> None:
    with pytest.raises(SchemaError, match="key column k of public.t"):
        key_equalities([row], "public.t")
