"""Comparing key columns with the type's own equality operator, found in the catalog.

Every dbsync session resolves names in pg_catalog only, where the `=` of an extension type
(ltree, citext, hstore) is not found, and a bare `=` that is found may be the wrong one (citext
falls back to text's case-sensitive `=`). So a key comparison names its operator: the equality
member of the default btree (else hash) operator class of the column's type, schema-qualified,
with both sides cast to the type the operator takes. A domain compares as its base type, so an
operator someone defined on the domain itself can never be chosen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from dbsync.db import display_name
from dbsync.errors import SchemaError

# For the key columns $2 of table $1, in key order: the column's type, and the schema and name
# of its equality operator and the type both operands are cast to (null when there is none), and
# whether to_json() would turn a value into a JSON object by a cast (hstore) instead of its text.
# Run with any driver: positional parameters as %s (psycopg) or $n (asyncpg) via KEY_EQUALITY_*.
_KEY_EQUALITY = """
WITH RECURSIVE k AS (
    SELECT k.name, k.ord, a.atttypid AS typ, 0 AS depth
    FROM pg_catalog.unnest({keys}::pg_catalog.text[]) WITH ORDINALITY AS k(name, ord)
    JOIN pg_catalog.pg_attribute a
      ON a.attrelid = {rel}::pg_catalog.oid AND a.attname OPERATOR(pg_catalog.=) k.name AND NOT a.attisdropped
    UNION ALL
    SELECT k.name, k.ord, t.typbasetype, k.depth + 1
    FROM k JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) k.typ
    WHERE t.typtype OPERATOR(pg_catalog.=) 'd'
), base AS (
    SELECT DISTINCT ON (k.ord) k.name, k.ord, k.typ FROM k ORDER BY k.ord, k.depth DESC
)
SELECT b.name::pg_catalog.text, pg_catalog.format_type(b.typ, NULL) AS type, eq.nsp, eq.opr, eq.cast_to,
       EXISTS (SELECT 1 FROM pg_catalog.pg_cast x
               WHERE x.castsource OPERATOR(pg_catalog.=) b.typ
                 AND x.casttarget OPERATOR(pg_catalog.=)
                     ANY ('{{pg_catalog.json,pg_catalog.jsonb}}'::pg_catalog.regtype[]))
           AS json_cast
FROM base b
JOIN pg_catalog.pg_type bt ON bt.oid OPERATOR(pg_catalog.=) b.typ
LEFT JOIN LATERAL (
    SELECT n.nspname::pg_catalog.text AS nsp, o.oprname::pg_catalog.text AS opr,
           pg_catalog.format_type(CASE WHEN ct.typtype OPERATOR(pg_catalog.=) 'p' THEN b.typ ELSE c.opcintype END,
                                  NULL) AS cast_to
    FROM pg_catalog.pg_opclass c
    JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) c.opcmethod
    JOIN pg_catalog.pg_amop ao
      ON ao.amopfamily OPERATOR(pg_catalog.=) c.opcfamily
     AND ao.amoplefttype OPERATOR(pg_catalog.=) c.opcintype
     AND ao.amoprighttype OPERATOR(pg_catalog.=) c.opcintype
     AND ao.amopstrategy OPERATOR(pg_catalog.=) CASE am.amname WHEN 'btree' THEN 3 ELSE 1 END
    JOIN pg_catalog.pg_operator o ON o.oid OPERATOR(pg_catalog.=) ao.amopopr
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) o.oprnamespace
    JOIN pg_catalog.pg_type ct ON ct.oid OPERATOR(pg_catalog.=) c.opcintype
    WHERE c.opcdefault AND am.amname::pg_catalog.text OPERATOR(pg_catalog.=) ANY ('{{btree,hash}}')
      AND (c.opcintype OPERATOR(pg_catalog.=) b.typ
           OR EXISTS (SELECT 1 FROM pg_catalog.pg_cast x
                      WHERE x.castsource OPERATOR(pg_catalog.=) b.typ
                        AND x.casttarget OPERATOR(pg_catalog.=) c.opcintype
                        AND x.castmethod OPERATOR(pg_catalog.=) 'b')
           OR (c.opcintype OPERATOR(pg_catalog.=) 'pg_catalog.anyarray'::pg_catalog.regtype
               AND EXISTS (SELECT 1 FROM pg_catalog.pg_type e
                           WHERE e.oid OPERATOR(pg_catalog.=) bt.typelem AND e.typarray OPERATOR(pg_catalog.=) bt.oid))
           OR (c.opcintype OPERATOR(pg_catalog.=) 'pg_catalog.anyenum'::pg_catalog.regtype
               AND bt.typtype OPERATOR(pg_catalog.=) 'e')
           OR (c.opcintype OPERATOR(pg_catalog.=) 'pg_catalog.anyrange'::pg_catalog.regtype
               AND bt.typtype OPERATOR(pg_catalog.=) 'r')
           OR (c.opcintype OPERATOR(pg_catalog.=) pg_catalog.to_regtype('pg_catalog.anymultirange')
               AND bt.typtype OPERATOR(pg_catalog.=) 'm')
           OR (c.opcintype OPERATOR(pg_catalog.=) 'pg_catalog.record'::pg_catalog.regtype
               AND bt.typtype OPERATOR(pg_catalog.=) 'c'))
    -- btree before hash; the type's own class before one of a binary-coercible or polymorphic type
    ORDER BY am.amname::pg_catalog.text OPERATOR(pg_catalog.=) 'btree' DESC,
             c.opcintype OPERATOR(pg_catalog.=) b.typ DESC,
             ct.typtype OPERATOR(pg_catalog.=) 'p'
    LIMIT 1
) eq ON true
ORDER BY b.ord
"""

KEY_EQUALITY_PSYCOPG = _KEY_EQUALITY.format(rel="%(rel)s", keys="%(keys)s")
KEY_EQUALITY_ASYNCPG = _KEY_EQUALITY.format(rel="$1", keys="$2")

_OPERATOR_NAME = re.compile(r"[-+*/<>=~!@#%^&|`?]+")


@dataclass(frozen=True)
class KeyEquality:
    """How to compare one key column."""

    column: str
    cast_to: str  # the type both operands are cast to (server text, schema-qualified as needed)
    operator: str  # OPERATOR(schema.name)
    # to_json() would cast the value to JSON (hstore -> object): a key image needs its text instead,
    # as capture writes it, so that json_to_record reads it back.
    json_as_text: bool = False

    def match(self, left: str, right: str) -> str:
        """SQL text comparing two expressions of the column's type."""
        return f"({left})::{self.cast_to} {self.operator} ({right})::{self.cast_to}"


def key_equalities(rows: Sequence[Sequence[Any]], table: str) -> list[KeyEquality]:
    """KeyEquality per key column from KEY_EQUALITY rows; refuses a key type without equality."""
    out = []
    for column, type_name, nsp, opr, cast_to, json_cast in rows:
        if nsp is None or opr is None or cast_to is None or not _OPERATOR_NAME.fullmatch(opr):
            raise SchemaError(
                f"key column {display_name(column)} of {table} has type {type_name}, which has no equality "
                "operator (no default btree or hash operator class): dbsync cannot match rows by it"
            )
        operator = f"OPERATOR({sql.Identifier(nsp).as_string(None)}.{opr})"
        out.append(KeyEquality(str(column), str(cast_to), operator, bool(json_cast)))
    return out


def key_equality(conn: psycopg.Connection, schema: str, name: str, keys: Sequence[str]) -> tuple[KeyEquality, ...]:
    """The equality operator of each key column of a table; refuses a key type without one."""
    rel = sql.Identifier(schema, name).as_string(conn)
    row = conn.execute("SELECT %s::pg_catalog.regclass::pg_catalog.oid", (rel,)).fetchone()
    assert row is not None
    rows = conn.execute(KEY_EQUALITY_PSYCOPG, {"rel": row[0], "keys": list(keys)}).fetchall()
    return tuple(key_equalities(rows, display_name(schema, name)))
