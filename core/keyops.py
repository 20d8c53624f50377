"""Comparing key columns with the type's own equality operator, found in the catalog.

Every dbsync session resolves names in pg_catalog only, where the `=` of an extension type
(ltree, citext, hstore) is not found, and a bare `=` that is found may be the wrong one (citext
falls back to text's case-sensitive `=`). So a key comparison names its operator: the equality
member of the operator class the table's key index uses for the column (the primary key, else a
unique index on exactly the key columns, as ON CONFLICT uses), schema-qualified, with both sides
cast to the class's input type (for a polymorphic class such as enum_ops, the column's base
type). Only superusers create operator classes, so no other role can supply the operator; a
domain compares as its base type, so an operator someone defined on the domain never runs. The
Site's resync functions choose the same way (dbsync.key_operator, sql/site/0004).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from dbsync.db import display_name, quote_ident
from dbsync.errors import SchemaError

# For the key columns {keys} of table {rel}, in key order: the column's type; the schema and name
# of its equality operator and the type both operands are cast to (null when there is none); and
# the output function of its base type (schema-qualified), which gives a value's text without a
# cast: a type's owner may create casts from it (to text, to json) whose code would run as us.
_KEY_EQUALITY = """
WITH RECURSIVE idx AS (
    SELECT i.indkey, i.indclass
    FROM pg_catalog.pg_index i
    WHERE i.indrelid OPERATOR(pg_catalog.=) {rel}::pg_catalog.oid AND i.indisunique
      AND i.indpred IS NULL AND i.indexprs IS NULL
      AND (SELECT pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY a.attname::pg_catalog.text)
           FROM pg_catalog.pg_attribute a
           WHERE a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey))
          OPERATOR(pg_catalog.=)
          (SELECT pg_catalog.array_agg(k ORDER BY k) FROM pg_catalog.unnest({keys}::pg_catalog.text[]) AS k)
    ORDER BY i.indisprimary DESC, i.indexrelid
    LIMIT 1
), k AS (
    SELECT k.name, k.ord, a.atttypid AS typ, idx.indclass[p.pos - 1] AS opclass, 0 AS depth
    FROM pg_catalog.unnest({keys}::pg_catalog.text[]) WITH ORDINALITY AS k(name, ord)
    JOIN pg_catalog.pg_attribute a
      ON a.attrelid OPERATOR(pg_catalog.=) {rel}::pg_catalog.oid
     AND a.attname OPERATOR(pg_catalog.=) k.name AND NOT a.attisdropped
    LEFT JOIN idx ON true
    LEFT JOIN LATERAL pg_catalog.unnest(idx.indkey) WITH ORDINALITY AS p(attnum, pos)
      ON p.attnum OPERATOR(pg_catalog.=) a.attnum
    UNION ALL
    SELECT k.name, k.ord, t.typbasetype, k.opclass, k.depth + 1
    FROM k JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) k.typ
    WHERE t.typtype OPERATOR(pg_catalog.=) 'd'
), base AS (  -- a domain compares as its base type
    SELECT DISTINCT ON (k.ord) k.name, k.ord, k.typ, k.opclass FROM k ORDER BY k.ord, k.depth DESC
)
SELECT b.name::pg_catalog.text, pg_catalog.format_type(b.typ, NULL) AS type, eq.nsp, eq.opr, eq.cast_to,
       (SELECT pg_catalog.quote_ident(fn.nspname::pg_catalog.text) OPERATOR(pg_catalog.||) '.'
               OPERATOR(pg_catalog.||) pg_catalog.quote_ident(f.proname::pg_catalog.text)
        FROM pg_catalog.pg_type bt
        JOIN pg_catalog.pg_proc f ON f.oid OPERATOR(pg_catalog.=) bt.typoutput
        JOIN pg_catalog.pg_namespace fn ON fn.oid OPERATOR(pg_catalog.=) f.pronamespace
        WHERE bt.oid OPERATOR(pg_catalog.=) b.typ) AS output
FROM base b
LEFT JOIN LATERAL (
    SELECT n.nspname::pg_catalog.text AS nsp, o.oprname::pg_catalog.text AS opr,
           pg_catalog.format_type(CASE WHEN ct.typtype OPERATOR(pg_catalog.=) 'p' THEN b.typ ELSE c.opcintype END,
                                  NULL) AS cast_to
    FROM pg_catalog.pg_opclass c
    JOIN pg_catalog.pg_amop ao
      ON ao.amopfamily OPERATOR(pg_catalog.=) c.opcfamily
     AND ao.amoplefttype OPERATOR(pg_catalog.=) c.opcintype
     AND ao.amoprighttype OPERATOR(pg_catalog.=) c.opcintype
     AND ao.amopstrategy OPERATOR(pg_catalog.=) 3  -- btree equality
    JOIN pg_catalog.pg_operator o ON o.oid OPERATOR(pg_catalog.=) ao.amopopr
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) o.oprnamespace
    JOIN pg_catalog.pg_type ct ON ct.oid OPERATOR(pg_catalog.=) c.opcintype
    WHERE c.oid OPERATOR(pg_catalog.=) b.opclass
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
    # The base type's output function and the base type: text() below.
    output: str = "pg_catalog.textout"
    base_type: str = "pg_catalog.text"

    def text(self, expr: str) -> str:
        """SQL text giving the value's text output, as capture's key images hold it (and as
        json_to_record reads it back through the type's input function). Through the output
        function, never a cast (to_json, json_build_object and ::text all use casts the type's
        owner may have created)."""
        return f"pg_catalog.textin({self.output}(({expr})::{self.base_type}))"

    def match(self, left: str, right: str) -> str:
        """SQL text comparing two expressions of the column's type."""
        return f"({left})::{self.cast_to} {self.operator} ({right})::{self.cast_to}"


def key_equalities(rows: Sequence[Sequence[Any]], table: str) -> list[KeyEquality]:
    """KeyEquality per key column from KEY_EQUALITY rows; refuses a key type without equality."""
    out = []
    for column, type_name, nsp, opr, cast_to, output in rows:
        if nsp is None or opr is None or cast_to is None or not _OPERATOR_NAME.fullmatch(opr):
            raise SchemaError(
                f"key column {display_name(column)} of {table} (type {type_name}) has no equality operator "
                "in a primary key or unique index on the key columns: dbsync cannot match rows by it"
            )
        operator = f"OPERATOR({quote_ident(str(nsp))}.{opr})"
        out.append(KeyEquality(str(column), str(cast_to), operator, str(output), str(type_name)))
    return out


def key_equality(conn: psycopg.Connection, schema: str, name: str, keys: Sequence[str]) -> tuple[KeyEquality, ...]:
    """The equality operator of each key column of a table; refuses a key without one."""
    rel = sql.Identifier(schema, name).as_string(conn)
    row = conn.execute("SELECT %s::pg_catalog.regclass::pg_catalog.oid", (rel,)).fetchone()
    assert row is not None
    rows = conn.execute(KEY_EQUALITY_PSYCOPG, {"rel": row[0], "keys": list(keys)}).fetchall()
    return tuple(key_equalities(rows, display_name(schema, name)))
