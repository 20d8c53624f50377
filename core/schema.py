"""`dbsync schema diff`: what the Agent DB's replicated tables need to take the Site DB's rows.

Both sides' catalogs are read (types through format_type, so typmods, arrays, domains and
schema-qualified, quoted names come out as PostgreSQL writes them), compared column by column,
and every difference becomes a Change: the statement the Agent needs and whether `--apply` may
run it. Only additions are safe (a missing table, a missing column): they never drop, retype or
rewrite a value the Agent holds. Everything else is printed for a person to review and run.

The daemon names the columns it writes (dbsync.daemon.apply), so a column only the Agent has is
harmless as long as the Agent can fill it itself (nullable, a default, generated or identity):
such a column is a note, not a difference. One that cannot be filled refuses every new row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import psycopg

from dbsync import tables as registry
from dbsync.db import display_name, first_line, quote_ident
from dbsync.errors import SchemaError
from dbsync.status import require_schema

# Every name schema-qualified; the session's search_path is pg_catalog, pg_temp (dbsync.db), so
# operators resolve in pg_catalog too and format_type / pg_get_expr qualify every other schema.
TABLE_OID = """
SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(name)s AND c.relkind IN ('r', 'p')
"""

# attidentity: '' none, 'a' ALWAYS, 'd' BY DEFAULT; attgenerated: '' or 's' (stored). `serial`: the
# default comes from a sequence the column owns (serial, bigserial), which the Agent needs not have.
# `calls_out`: the default (or generation expression) calls a function, operator or cast that is
# not built in (built-in ones are pinned and have no pg_depend row): one `--apply` does not
# evaluate on the Agent DB, where another role may have planted a more specific overload.
COLUMNS = """
SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text,
       EXISTS (SELECT FROM pg_catalog.pg_depend s
               WHERE s.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND s.refobjid = a.attrelid
                 AND s.refobjsubid = a.attnum AND s.deptype = 'a'
                 AND s.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass),
       EXISTS (SELECT FROM pg_catalog.pg_depend x
               WHERE x.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND x.objid = d.oid
                 AND x.refclassid IN ('pg_catalog.pg_proc'::pg_catalog.regclass,
                                      'pg_catalog.pg_operator'::pg_catalog.regclass,
                                      'pg_catalog.pg_cast'::pg_catalog.regclass)),
       CASE WHEN a.attcollation <> t.typcollation
            THEN pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) END,
       a.atthasmissing
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

PRIMARY_KEY = """
SELECT con.conname, a.attname
FROM pg_catalog.pg_constraint con
CROSS JOIN LATERAL pg_catalog.unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
WHERE con.conrelid = %(oid)s AND con.contype = 'p'
ORDER BY k.ord
"""

# The column sets (sorted) of the unique indexes ON CONFLICT can use as the key of an identity
# table: not partial, no expressions, valid, not deferrable.
UNIQUE_KEYS = """
SELECT DISTINCT (SELECT pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY a.attname::pg_catalog.text)
                 FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid = i.indrelid AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey))
FROM pg_catalog.pg_index i
WHERE i.indrelid = %(oid)s AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
  AND i.indisvalid AND i.indimmediate
"""


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type: "character varying(20)", "public.mood[]", '"Odd"."Type"'
    not_null: bool = False
    default: str | None = None  # pg_get_expr of the default (or of the generation expression)
    identity: str = ""  # "", "a" (ALWAYS) or "d" (BY DEFAULT)
    generated: str = ""  # "" or "s" (stored)
    serial: bool = False  # the default is nextval() of a sequence the column owns
    calls_out: bool = False  # the expression calls a function, operator or cast that is not built in
    collation: str | None = None  # qualified, when not the type's own: pg_catalog."C"
    # The rows that existed when the column was added hold one stored value (PostgreSQL's fast
    # default: a default that is not volatile, and no table rewrite since).
    has_missing: bool = False

    @property
    def full_type(self) -> str:
        return f"{self.type} COLLATE {self.collation}" if self.collation else self.type

    @property
    def own_default(self) -> str | None:
        """The default the Agent can use: a serial's sequence and an identity stay on the Site
        (replicated rows carry their values), a generation expression is not a default."""
        return None if self.serial or self.identity or self.generated else self.default

    @property
    def fills_itself(self) -> bool:
        """Whether the Agent can fill the column in a row that does not name it."""
        return not self.not_null or self.default is not None or bool(self.identity) or bool(self.generated)


@dataclass(frozen=True)
class TableDef:
    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()
    pk_name: str | None = None
    # Column sets (sorted) of its unique indexes usable as a key (UNIQUE_KEYS), the primary key's included.
    unique_keys: frozenset[tuple[str, ...]] = frozenset()

    @property
    def qualified(self) -> str:
        return quote_ident(self.schema, self.name)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass(frozen=True)
class Change:
    """One difference of one table. `statement` is what the Agent needs (None when no statement
    closes it); `safe` statements are the ones `--apply` runs; `differs` False is a note that
    does not count as a difference (an Agent-only column replication does not mind)."""

    table: str
    kind: str  # missing_table, missing_column, renamed, retyped, not_null, default, identity, key,
    # dropped, agent_only, missing_on_site
    column: str | None
    note: str
    statement: str | None = None
    safe: bool = False
    differs: bool = True

    def as_dict(self) -> dict[str, object]:
        return {
            "table": self.table,
            "kind": self.kind,
            "column": self.column,
            "statement": self.statement,
            "safe": self.safe,
            "differs": self.differs,
            "note": self.note,
        }


@dataclass
class TableReport:
    table: str
    changes: list[Change] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        return any(c.differs for c in self.changes)


# ---- statements (pure: unit-tested without a server) ----


def column_sql(col: Column, *, not_null: bool | None = None) -> str:
    """A column definition for CREATE TABLE or ADD COLUMN, as the Agent should have it."""
    parts = [quote_ident(col.name), col.full_type]
    if col.calls_out:
        pass  # see calls_out_note: the daemon writes the Site's values either way
    elif col.generated and col.default is not None:
        parts.append(f"GENERATED ALWAYS AS ({col.default}) STORED")
    elif col.own_default is not None:
        parts.append(f"DEFAULT {col.own_default}")
    if col.not_null if not_null is None else not_null:
        parts.append("NOT NULL")
    return " ".join(parts)


def create_table_sql(table: TableDef, identity: Sequence[str] = ()) -> str:
    lines = [column_sql(c) for c in table.columns]
    if table.primary_key:
        lines.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in table.primary_key)})")
    if identity and tuple(sorted(identity)) != tuple(sorted(table.primary_key)):
        lines.append(f"UNIQUE ({', '.join(quote_ident(k) for k in identity)})")
    body = ",\n    ".join(lines)
    return f"CREATE TABLE {table.qualified} (\n    {body}\n);"


def add_column_sql(table: TableDef, col: Column) -> tuple[str, bool]:
    """ADD COLUMN, and whether NOT NULL had to be left out: without a default the Agent could
    fill existing rows with, NOT NULL would refuse a table that already holds rows."""
    filled = not col.calls_out and (col.own_default is not None or bool(col.generated))
    deferred = col.not_null and not filled
    sql = f"ALTER TABLE {table.qualified} ADD COLUMN {column_sql(col, not_null=col.not_null and not deferred)};"
    return sql, deferred


def calls_out_note(table: TableDef, col: Column) -> str:
    """Why a column's expression was left out, and the statement that puts it back."""
    if col.generated:
        return (
            f"column {col.name}'s generation expression ({col.default}) calls a function, operator or cast that is "
            f"not built in, so --apply never runs it on the Agent DB: it is a plain column there (the daemon writes "
            f"the Site's values)"
        )
    return (
        f"column {col.name}'s default ({col.default}) calls a function, operator or cast that is not built in, so "
        f"--apply never runs it on the Agent DB; after checking it there: "
        f"{alter_column_sql(table, col.name, f'SET DEFAULT {col.default}')}"
    )


def alter_column_sql(table: TableDef, column: str, action: str) -> str:
    return f"ALTER TABLE {table.qualified} ALTER COLUMN {quote_ident(column)} {action};"


def retype_sql(table: TableDef, col: Column) -> str:
    c = quote_ident(col.name)
    return alter_column_sql(table, col.name, f"TYPE {col.full_type} USING {c}::{col.type}")


def primary_key_sql(table: TableDef, keys: Sequence[str], existing: str | None) -> str:
    drop = f"DROP CONSTRAINT {quote_ident(existing)}, " if existing else ""
    return f"ALTER TABLE {table.qualified} {drop}ADD PRIMARY KEY ({', '.join(quote_ident(k) for k in keys)});"


# ---- comparison (pure) ----

BY_HAND = "not applied by --apply"


def compare(
    site: TableDef, agent: TableDef | None, *, identity: Sequence[str] = (), insert_only: bool = False
) -> list[Change]:
    """Every difference between a table's Site and Agent definitions, Site order. `identity`: the
    key columns of a table replicated by an identity index; `insert_only`: one with no key."""
    label = display_name(site.schema, site.name)
    if agent is None:
        note = "table is missing on the Agent DB; `--apply` creates it (types it uses must exist there)"
        for col in site.columns:
            if col.calls_out and col.default is not None and not col.serial:
                note += "; " + calls_out_note(site, col)
        return [Change(label, "missing_table", None, note, create_table_sql(site, identity), safe=True)]
    changes: list[Change] = []
    missing = [c for c in site.columns if agent.column(c.name) is None]
    only_agent = [c for c in agent.columns if site.column(c.name) is None]
    renames = _renames(site, agent, missing, only_agent)
    for col in missing:
        statement, deferred = add_column_sql(agent, col)
        note = f"column {col.name} is missing on the Agent DB"
        if col.name in renames:
            old = renames[col.name]
            note = (
                f"column {col.name} is missing on the Agent DB and {old} exists only there: it looks like a "
                f"rename on the Site DB. A rename must be done by hand on the Agent DB, before any --apply, to keep "
                f"its values: ALTER TABLE {agent.qualified} RENAME COLUMN {quote_ident(old)} "
                f"TO {quote_ident(col.name)}; "
                f"`--apply` adds {col.name} empty and leaves {old} as it is"
            )
        if col.serial or col.identity:
            note += "; the Site's sequence stays on the Site (replicated rows carry the values)"
        elif col.calls_out and col.default is not None:
            note += "; " + calls_out_note(agent, col)
        if deferred:
            note += (
                f"; added without NOT NULL (rows already on the Agent DB have no value): once "
                f"`dbsync reconcile --repair --table {label}` has filled them, run "
                f"{alter_column_sql(agent, col.name, 'SET NOT NULL')}"
            )
        changes.append(
            Change(label, "renamed" if col.name in renames else "missing_column", col.name, note, statement, safe=True)
        )
    for col in site.columns:
        other = agent.column(col.name)
        if other is not None:
            changes.extend(_column_changes(agent, col, other))
    for col in only_agent:
        changes.append(_agent_only(agent, col, renamed=col.name in renames.values()))
    if identity:
        changes.extend(_identity_changes(site, agent, identity))
    elif not insert_only:
        changes.extend(_key_changes(site, agent))
    return changes


def _renames(site: TableDef, agent: TableDef, missing: list[Column], only_agent: list[Column]) -> dict[str, str]:
    """Site column -> Agent-only column of the same type that it looks renamed from (same
    position preferred): a rename shows as a column gone and one new."""
    out: dict[str, str] = {}
    free = list(only_agent)
    for col in missing:
        same_type = [c for c in free if c.full_type == col.full_type]
        if not same_type:
            continue
        position = site.columns.index(col)
        at = [c for c in same_type if agent.columns.index(c) == position]
        chosen = (at or same_type)[0]
        out[col.name] = chosen.name
        free.remove(chosen)
    return out


def _column_changes(agent: TableDef, site_col: Column, agent_col: Column) -> list[Change]:
    label, name = display_name(agent.schema, agent.name), site_col.name
    out: list[Change] = []
    if site_col.full_type != agent_col.full_type:
        out.append(
            Change(
                label,
                "retyped",
                name,
                f"column {name} is {site_col.full_type} on the Site DB and {agent_col.full_type} on the Agent DB; "
                f"{BY_HAND}: "
                f"a type change rewrites the Agent table and can fail or change values, review it and run it by hand",
                retype_sql(agent, site_col),
            )
        )
    if site_col.not_null and not agent_col.not_null:
        out.append(
            Change(
                label,
                "not_null",
                name,
                f"column {name} is NOT NULL on the Site DB only; {BY_HAND}: the Agent DB already takes every Site "
                f"row, and SET NOT NULL scans the table and fails if it holds a NULL",
                alter_column_sql(agent, name, "SET NOT NULL"),
            )
        )
    elif agent_col.not_null and not site_col.not_null:
        out.append(
            Change(
                label,
                "not_null",
                name,
                f"column {name} is NOT NULL on the Agent DB only: a Site row with a NULL there is refused; "
                f"{BY_HAND} (it relaxes a constraint the Agent's own users may rely on)",
                alter_column_sql(agent, name, "DROP NOT NULL"),
            )
        )
    sequence_or_generated = site_col.serial or site_col.identity or site_col.generated or agent_col.generated
    if not sequence_or_generated and site_col.default != agent_col.default:
        action = f"SET DEFAULT {site_col.default}" if site_col.default is not None else "DROP DEFAULT"
        out.append(
            Change(
                label,
                "default",
                name,
                f"column {name} has default {site_col.default or 'none'} on the Site DB and "
                f"{agent_col.default or 'none'} on the Agent DB, which is fine for replication: replicated rows "
                f"carry the Site's values, a default only fills rows the Agent DB inserts itself; {BY_HAND}",
                alter_column_sql(agent, name, action),
                differs=False,
            )
        )
    if site_col.generated != agent_col.generated or (site_col.generated and site_col.default != agent_col.default):
        out.append(
            Change(
                label,
                "generated",
                name,
                f"column {name} is {'generated' if site_col.generated else 'not generated'} on the Site DB and "
                f"{'generated' if agent_col.generated else 'not'} on the Agent DB (or by another expression); "
                f"{BY_HAND}: drop and re-create it by hand",
            )
        )
    if site_col.identity != agent_col.identity and agent_col.identity != "a":
        out.append(
            Change(
                label,
                "identity",
                name,
                f"column {name} is {_identity(site_col)} on the Site DB and {_identity(agent_col)} on the Agent DB, "
                f"which is fine for replication: replicated rows carry the Site's values",
                differs=False,
            )
        )
    if agent_col.identity == "a" and site_col.identity != "a":
        out.append(
            Change(
                label,
                "identity",
                name,
                f"column {name} is GENERATED ALWAYS AS IDENTITY on the Agent DB only: the daemon never updates such "
                f"a column, so a Site update of it would not replicate; {BY_HAND}",
                alter_column_sql(agent, name, "SET GENERATED BY DEFAULT"),
            )
        )
    return out


def _identity(col: Column) -> str:
    return {"a": "GENERATED ALWAYS AS IDENTITY", "d": "GENERATED BY DEFAULT AS IDENTITY"}.get(
        col.identity, "no identity"
    )


def _agent_only(agent: TableDef, col: Column, *, renamed: bool) -> Change:
    label = display_name(agent.schema, agent.name)
    drop = f"ALTER TABLE {agent.qualified} DROP COLUMN {quote_ident(col.name)};"
    gone = "renamed on the Site DB, see above" if renamed else "dropped on the Site DB, or the Agent's own"
    if col.fills_itself:
        how = "nullable" if not col.not_null else "filled by the Agent DB"
        return Change(
            label,
            "agent_only",
            col.name,
            f"column {col.name} exists only on the Agent DB ({gone}); it is {how}, which is fine for replication: "
            f"the daemon names the columns it writes. Never dropped by dbsync; if nothing needs it: {drop}",
            differs=renamed,
        )
    return Change(
        label,
        "dropped",
        col.name,
        f"column {col.name} exists only on the Agent DB ({gone}) and is NOT NULL without a default: every new "
        f"replicated row is refused; {BY_HAND}: DROP NOT NULL it, give it a default, or (losing its values) {drop}",
        alter_column_sql(agent, col.name, "DROP NOT NULL"),
    )


def _key_changes(site: TableDef, agent: TableDef) -> list[Change]:
    if sorted(site.primary_key) == sorted(agent.primary_key):
        return []
    have = ", ".join(agent.primary_key) or "none"
    want = ", ".join(site.primary_key) or "none"
    statement = primary_key_sql(agent, site.primary_key, agent.pk_name) if site.primary_key else None
    return [
        Change(
            display_name(site.schema, site.name),
            "key",
            None,
            f"primary key is ({want}) on the Site DB and ({have}) on the Agent DB; the daemon matches rows by the "
            f"Site's key and needs a unique index on it; {BY_HAND}: building a key locks the table and fails on "
            f"duplicates",
            statement,
        )
    ]


def _identity_changes(site: TableDef, agent: TableDef, identity: Sequence[str]) -> list[Change]:
    """An identity table needs a unique index on its key on the Agent DB (for ON CONFLICT); the
    primary keys of the two sides do not matter."""
    if tuple(sorted(identity)) in agent.unique_keys:
        return []
    cols = ", ".join(quote_ident(k) for k in identity)
    return [
        Change(
            display_name(site.schema, site.name),
            "key",
            None,
            f"the table is replicated by the identity ({', '.join(identity)}), and the Agent DB has no primary key or "
            f"unique index on it, which the daemon's upsert needs; {BY_HAND}: building an index locks the table "
            f"and fails on duplicates",
            f"CREATE UNIQUE INDEX ON {agent.qualified} ({cols});",
        )
    ]


def _registered_key(label: str, registered: Sequence[str], primary_key: Sequence[str]) -> Change:
    return Change(
        label,
        "registered_key",
        None,
        f"the Site's primary key ({', '.join(primary_key) or 'none'}) is not the key dbsync captures and matches "
        f"rows by ({', '.join(registered)}), set when the table was added: once both sides have the new key, "
        f"`dbsync tables remove` the table and `dbsync tables add` it again",
    )


def _lost_identity(label: str, identity: Sequence[str]) -> Change:
    return Change(
        label,
        "registered_key",
        None,
        f"the table is replicated by the identity ({', '.join(identity)}), and the Site DB has no unique index on "
        f"it any more: create one again, or `dbsync tables remove` the table and `dbsync tables add` it with "
        f"another --identity",
    )


# ---- catalogs ----


def table_def(conn: psycopg.Connection, schema: str, name: str) -> TableDef | None:
    """The table as one side defines it; None when it has no such table."""
    row = conn.execute(TABLE_OID, {"schema": schema, "name": name}).fetchone()
    if row is None:
        return None
    oid = row[0]
    columns = tuple(
        Column(r[0], r[1], bool(r[2]), r[3], r[4], r[5], bool(r[6]), bool(r[7]), r[8], bool(r[9]))
        for r in conn.execute(COLUMNS, {"oid": oid}).fetchall()
    )
    key = conn.execute(PRIMARY_KEY, {"oid": oid}).fetchall()
    unique = frozenset(tuple(r[0]) for r in conn.execute(UNIQUE_KEYS, {"oid": oid}).fetchall())
    return TableDef(schema, name, columns, tuple(r[1] for r in key), key[0][0] if key else None, unique)


def diff(site: psycopg.Connection, agent: psycopg.Connection) -> list[TableReport]:
    """One report per replicated table, in the registry's order."""
    require_schema(site, agent)
    reports = []
    chosen = registry.selections(site)
    for replicated in registry.listing(site):
        label = display_name(replicated.schema, replicated.name)
        site_def = table_def(site, replicated.schema, replicated.name)
        if site_def is None:
            note = "replicated, but the Site DB has no such table any more; `dbsync tables remove` it"
            reports.append(TableReport(label, [Change(label, "missing_on_site", None, note)]))
            continue
        listed = chosen.get(replicated.table_id, registry.EVERYTHING).columns
        if listed is not None:  # a column list (`tables add --columns`): the rest never leaves the Site
            site_def = replace(site_def, columns=tuple(c for c in site_def.columns if c.name in listed))
        identity = replicated.keys if replicated.identity else ()
        changes = compare(
            site_def,
            table_def(agent, replicated.schema, replicated.name),
            identity=identity,
            insert_only=replicated.insert_only,
        )
        if identity and tuple(sorted(identity)) not in site_def.unique_keys:
            changes.append(_lost_identity(label, identity))
        elif not identity and not replicated.insert_only and sorted(replicated.keys) != sorted(site_def.primary_key):
            changes.append(_registered_key(label, replicated.keys, site_def.primary_key))
        reports.append(TableReport(label, changes))
    return reports


def auto_addable(site: TableDef, agent: TableDef, names: Sequence[str]) -> tuple[list[Change], list[str]]:
    """The ADD COLUMNs the daemon may run by itself (`auto_add_columns`) for the Site columns
    `names`, and why any of them is left to a person.

    A column qualifies only when the rows the Agent already holds end up with the values the
    Site's rows have: nullable or NOT NULL without a default (NULL on both sides), a default that
    PostgreSQL stored once for every existing row (not volatile), or a generated column computed
    from built-in functions. A sequence-filled, identity or per-row (volatile) default, one that
    calls out of pg_catalog, and what looks like a rename would leave old rows differing or lose
    their values: those stop the daemon with the reason, as without the setting."""
    label = display_name(site.schema, site.name)
    changes = {c.column: c for c in compare(site, agent) if c.kind in ("missing_column", "renamed")}
    chosen, refused = [], []
    wanted = set(names)
    for col in site.columns:  # in the Site's order, so that the Agent's columns come out in it too
        change = changes.get(col.name)
        if col.name not in wanted or change is None:
            continue  # not asked for, or on the Agent by now (a person added it meanwhile)
        name = col.name
        why = None
        if change.kind == "renamed":
            why = "it looks renamed from an Agent column; rename that column on the Agent DB by hand to keep its values"
        elif col.serial or col.identity:
            why = "the Site filled its existing rows from a sequence"
        elif col.calls_out:
            why = "its default calls a function, operator or cast that is not built in"
        elif col.default is not None and not col.generated and not col.has_missing:
            why = "its default may differ row by row (volatile, or the table was rewritten since)"
        if why is None:
            chosen.append(change)
        else:
            refused.append(f"column {name} of {label} was not added automatically: {why}")
    return chosen, refused


def apply(agent: psycopg.Connection, changes: Sequence[Change]) -> list[Change]:
    """Run the safe statements on the Agent DB in one transaction: all of them, or none."""
    chosen = [c for c in changes if c.safe and c.statement]
    if not chosen:
        return []
    current = chosen[0]
    try:
        with agent.transaction():
            for current in chosen:
                assert current.statement is not None
                agent.execute(current.statement.encode())
    except psycopg.Error as exc:
        raise SchemaError(
            f"--apply failed on {current.table} ({current.kind} {current.column or ''}): {first_line(exc)}; "
            f"nothing was applied"
        ) from None
    return chosen
