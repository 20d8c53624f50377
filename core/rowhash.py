"""Row hashes computed inside each database, so that only hashes cross the network.

A row's hash is taken over `ROW(c1, ..., cn)::text` of the Site table's columns, by name. The
record text tells NULL (nothing), the empty string (`""`) and the string 'NULL' (`NULL`) apart,
and quotes separators, so no two different rows share a text. The text of a value depends on
session settings; SESSION fixes them on both connections, so identical rows hash identically.

The hash is `hashtextextended` (64 bits, fast) when both servers compute the same value for a
probe string, and the first 64 bits of md5 otherwise (the former depends on the CPU's byte order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from dbsync.db import display_name, quote_ident
from dbsync.keyops import KeyEquality

# Text output of every type is fixed by these; both sides must agree.
SESSION = (
    "SET extra_float_digits = 3",
    "SET TimeZone = 'UTC'",
    "SET DateStyle = 'ISO, YMD'",
    "SET IntervalStyle = 'postgres'",
    "SET bytea_output = 'hex'",
    "SET lc_monetary = 'C'",
    "SET search_path = pg_catalog, pg_temp",
)

# For the bucket scan only (SET LOCAL): parallel workers hash and sum their share of the rows per
# bucket, the leader adds up a few thousand partial sums. The planner takes the key's distinct
# count for the number of buckets and would sort the rows; a hash table of buckets is what runs.
BUCKET_PLANNING = (
    "SET LOCAL parallel_setup_cost = 0",
    "SET LOCAL parallel_tuple_cost = 0",
    "SET LOCAL enable_sort = off",
)

FAST = "hashtextextended({}, 0)"
PORTABLE = "('x' || left(md5({}), 16))::bit(64)::int8"
PROBE = "SELECT hashtextextended('dbsync row hash probe', 0)"


def prepare(conn: psycopg.Connection) -> None:
    for statement in SESSION:
        conn.execute(statement)


def choose_hash(site: psycopg.Connection, agent: psycopg.Connection) -> str:
    """The hash expression template both servers compute identically."""
    probes = [conn.execute(PROBE).fetchone() for conn in (site, agent)]
    return FAST if probes[0] == probes[1] else PORTABLE


@dataclass(frozen=True)
class TableShape:
    """A replicated table as the comparison sees it on one side."""

    schema: str
    name: str
    keys: tuple[str, ...]
    columns: tuple[str, ...]  # the replicated columns of the Site table, in the Site's order
    key_defs: str  # "k1 type1, k2 type2": a json_to_recordset column list, this side's types
    # How each key column compares on this side (its type's own equality operator), in key order.
    key_equality: tuple[KeyEquality, ...] = field(default=(), compare=False)
    # The table's row filter (the Site's deparse of it, sql/site/0009_site_filters.sql) where
    # this side holds rows it leaves out: the Site's; None on the Agent, which holds only matches.
    where: str | None = None

    @property
    def label(self) -> str:
        return display_name(self.schema, self.name)


def sql_ident(*names: str) -> sql.SQL:
    """A quoted identifier that survives psycopg's placeholder parsing (a name may hold '%').

    Statements built with it must always be executed with a parameter dict (possibly empty).
    """
    return sql.SQL(quote_ident(*names).replace("%", "%%"))


def raw(text: str) -> sql.SQL:
    """SQL text produced by the server (format('%I ...')), made safe for placeholder parsing."""
    return sql.SQL(text.replace("%", "%%"))


class HashQueries:
    """The statements of the comparison for one table on one side (run them with a dict)."""

    def __init__(self, shape: TableShape, hash_template: str) -> None:
        self.shape = shape
        self.table: sql.Composable = sql_ident(shape.schema, shape.name)
        if shape.where is not None:
            # A subquery the planner flattens: the filter's bare column names resolve in it alone,
            # and the key index still serves lookups and ranges.
            self.table = sql.SQL("(SELECT * FROM {} WHERE ({}))").format(self.table, raw(shape.where))
        hashed = sql.SQL(hash_template)
        row_text = sql.SQL("ROW({})::text").format(_cols(shape.columns))
        key_text = sql.SQL("ROW({})::text").format(_cols(shape.keys))
        self.row_hash = hashed.format(row_text)
        self.bucket = sql.SQL("({} & %(mask)s::int8)").format(hashed.format(key_text))
        # Keys as their text output (KeyEquality.text): never through a cast.
        pairs = [
            sql.SQL("{}, {}").format(
                sql.Literal(eq.column.replace("%", "%%")),
                sql.SQL(eq.text("t." + quote_ident(eq.column)).replace("%", "%%")),
            )
            for eq in shape.key_equality
        ]
        self.key_json = sql.SQL("json_build_object({})::text").format(sql.SQL(", ").join(pairs))
        self.key_match = key_match(shape, "t", "k")

    # -- an insert-only table (no key): the rows as a multiset of row hashes, bucketed by the hash

    def appended_buckets(self) -> sql.Composed:
        """(bucket, rows, sum of row hashes) per bucket of row hashes."""
        return sql.SQL(
            "SELECT s.h & %(mask)s::int8 AS b, count(*), sum(s.h) FROM (SELECT {} AS h FROM {} t) s GROUP BY 1"
        ).format(self.row_hash, self.table)

    def appended_hashes(self) -> sql.Composed:
        """(row hash, copies) of the rows in the buckets %(buckets)s."""
        return sql.SQL(
            "SELECT s.h, count(*) FROM (SELECT {} AS h FROM {} t) s "
            "WHERE (s.h & %(mask)s::int8) = ANY (%(buckets)s::int8[]) GROUP BY 1"
        ).format(self.row_hash, self.table)

    def buckets(self) -> sql.Composed:
        """(bucket, rows, sum of row hashes) per bucket of key hashes; run it with BUCKET_PLANNING.

        Grouped directly (no subquery fence), so each parallel worker aggregates its own rows
        and only partial sums reach the leader, not a (bucket, hash) pair per row.
        """
        return sql.SQL("SELECT {} AS b, count(*), sum({}) FROM {} t GROUP BY 1").format(
            self.bucket, self.row_hash, self.table
        )

    # -- buckets by key range (a single integer key): each bucket is a range of key values, so the
    # rows of a differing bucket are read through the key index, not by another full scan.
    # Bucket b holds keys lo + b * width .. lo + (b + 1) * width - 1; the first and last buckets
    # are open-ended, so a key outside [lo, hi] still falls in a bucket.

    def key_bounds(self) -> sql.Composed:
        """(least key, greatest key) as int8; the key index answers both."""
        key = self._int_key()
        return sql.SQL("SELECT min({k})::pg_catalog.int8, max({k})::pg_catalog.int8 FROM {} t").format(
            self.table, k=key
        )

    def range_buckets(self) -> sql.Composed:
        """(bucket, rows, sum of row hashes) per key range (%(lo)s, %(width)s, %(mask)s)."""
        bucket = sql.SQL(
            "least(greatest(({}::pg_catalog.int8 - %(lo)s::pg_catalog.int8) / %(width)s::pg_catalog.int8, 0),"
            " %(mask)s::pg_catalog.int8)"
        ).format(self._int_key())
        return sql.SQL("SELECT {} AS b, count(*), sum({}) FROM {} t GROUP BY 1").format(
            bucket, self.row_hash, self.table
        )

    def rows_in_ranges(self) -> sql.Composed:
        """(key, row hash) of the rows with keys in [%(lows)s[i], %(highs)s[i]] for some i."""
        key = self._int_key()
        return sql.SQL(
            "SELECT {}, {} FROM ROWS FROM (pg_catalog.unnest(%(lows)s::pg_catalog.int8[]),"
            " pg_catalog.unnest(%(highs)s::pg_catalog.int8[])) AS r(lo, hi) JOIN {} t ON {k} >= r.lo AND {k} <= r.hi"
        ).format(self.key_json, self.row_hash, self.table, k=key)

    def _int_key(self) -> sql.Composed:
        (column,) = self.shape.keys
        return sql.SQL("t.{}").format(sql_ident(column))

    def rows_in_buckets(self) -> sql.Composed:
        """(key, row hash) of every row in the buckets %(buckets)s."""
        return sql.SQL("SELECT {}, {} FROM {} t WHERE {} = ANY (%(buckets)s::int8[])").format(
            self.key_json, self.row_hash, self.table, self.bucket
        )

    def rows_by_key(self) -> sql.Composed:
        """(key, row hash) of the rows with the keys %(keys)s (a JSON array of key objects)."""
        return sql.SQL("SELECT {}, {} FROM {} t JOIN json_to_recordset(%(keys)s::json) AS k({}) ON {}").format(
            self.key_json, self.row_hash, self.table, raw(self.shape.key_defs), self.key_match
        )

    # -- key ranges (the daemon's full verification walks a table in key order) ------------------
    # A range is (after, upto]: keys after %(after)s and up to %(upto)s (JSON key objects; either
    # may be absent: the table's start, its end). Bounds are read through json_to_record in a
    # LATERAL join, so the key index serves the range as it serves ORDER BY.

    def range_end(self, after: bool) -> sql.Composed:
        """The key %(skip)s rows after %(after)s in key order (none: the range runs to the end)."""
        return self._in_range(sql.SQL("{} AS key").format(self.key_json), after, False, ordered=True)

    def range_sum(self, after: bool, upto: bool) -> sql.Composed:
        """(rows, sum of row hashes) of the range."""
        inner = self._in_range(sql.SQL("{} AS h").format(self.row_hash), after, upto, ordered=False)
        return sql.SQL("SELECT count(*), coalesce(sum(r.h), 0) FROM ({}) r").format(inner)

    def rows_in_range(self, after: bool, upto: bool) -> sql.Composed:
        """(key, row hash) of every row of the range."""
        return self._in_range(sql.SQL("{}, {}").format(self.key_json, self.row_hash), after, upto, ordered=False)

    def _in_range(self, select: sql.Composable, after: bool, upto: bool, *, ordered: bool) -> sql.Composed:
        keys = _cols(self.shape.keys)
        bounds: list[sql.Composable] = []
        where: list[sql.Composable] = []
        defs = raw(self.shape.key_defs)
        for used, alias, param, op in ((after, "a", "after", ">"), (upto, "u", "upto", "<=")):
            if used:
                bounds.append(
                    sql.SQL("json_to_record(%({})s::json) AS {}({})").format(sql.SQL(param), sql.SQL(alias), defs)
                )
                where.append(sql.SQL("ROW({}) {} ROW({})").format(keys, sql.SQL(op), _cols(self.shape.keys, alias)))
        body = sql.SQL("SELECT {} FROM {} t").format(select, self.table)
        if where:
            body += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        if ordered:
            body += sql.SQL(" ORDER BY {} OFFSET %(skip)s LIMIT 1").format(keys)
        if not bounds:
            return body
        return sql.SQL("SELECT s.* FROM {} CROSS JOIN LATERAL ({}) s").format(sql.SQL(", ").join(bounds), body)


INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})


def integer_key(shape: TableShape) -> bool:
    """Whether the table has a single key column of an integer type (or a domain over one)."""
    return len(shape.key_equality) == 1 and shape.key_equality[0].base_type in INTEGER_TYPES


def key_match(shape: TableShape, left: str, right: str) -> sql.SQL:
    """`left.k1 = right.k1 AND ...`, each with the key type's own equality operator."""
    return raw(
        " AND ".join(
            eq.match(
                f"{left}.{sql.Identifier(eq.column).as_string(None)}",
                f"{right}.{sql.Identifier(eq.column).as_string(None)}",
            )
            for eq in shape.key_equality
        )
    )


def _cols(names: tuple[str, ...], alias: str = "t") -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL(alias + ".{}").format(sql_ident(n)) for n in names)


# A json_to_recordset column list for the key columns of a table, in key order, with this
# server's type names (schema-qualified where the search path would not find them).
KEY_DEFS = """
SELECT string_agg(format('%%I %%s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord)
FROM unnest(%(keys)s::text[]) WITH ORDINALITY AS k(name, ord)
JOIN pg_attribute a ON a.attrelid = %(rel)s::regclass AND a.attname = k.name AND NOT a.attisdropped
"""


def key_defs(conn: psycopg.Connection, schema: str, name: str, keys: tuple[str, ...]) -> str:
    rel = sql.Identifier(schema, name).as_string(conn)
    row = conn.execute(KEY_DEFS, {"keys": list(keys), "rel": rel}).fetchone()
    assert row is not None and row[0] is not None
    return str(row[0])
