"""Adding and removing tables from replication, with the checks both databases need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from dbsync.db import display_name, first_line, resolve_table_oid
from dbsync.errors import SchemaError
from dbsync.keyops import key_equality
from dbsync.protocol import ReplicatedTable
from dbsync.resync import resync_keys


@dataclass(frozen=True)
class Selection:
    """What of a table is replicated: its listed columns (None: all) and the rows matching its
    row filter (None: all), as the Site DB stores them (sql/site/0009_site_filters.sql)."""

    columns: tuple[str, ...] | None = None
    where: str | None = None

    @property
    def everything(self) -> bool:
        return self.columns is None and self.where is None


EVERYTHING = Selection()


def resolve(conn: psycopg.Connection, name: str, where: str) -> tuple[str, str]:
    """(schema, table) of a table name as a user typed it ("t", "s.t", '"Odd Name"')."""
    try:
        oid = resolve_table_oid(conn, name)
    except psycopg.Error as exc:
        raise SchemaError(f"{name!r} is not a valid table name: {first_line(exc)}") from None
    row = None
    if oid is not None:
        row = conn.execute(
            "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s::oid",
            (oid,),
        ).fetchone()
    if row is None:
        raise SchemaError(f"table {name!r} does not exist on the {where} DB")
    if row[2] not in ("r", "p"):
        raise SchemaError(f"{name!r} on the {where} DB is not a table")
    return row[0], row[1]


def columns(conn: psycopg.Connection, schema: str, name: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = %s::regclass "
        "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (sql.Identifier(schema, name).as_string(conn),),
    ).fetchall()
    return [r[0] for r in rows]


def primary_key(conn: psycopg.Connection, schema: str, name: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY k.ord",
        (sql.Identifier(schema, name).as_string(conn),),
    ).fetchall()
    return [r[0] for r in rows]


def add(
    site: psycopg.Connection,
    agent: psycopg.Connection,
    names: Sequence[str],
    selection: Selection = EVERYTHING,
    *,
    identity: str | None = None,
    insert_only: bool = False,
    copy_appends: bool = False,
    policy: Policy | None = None,
) -> list[AddedTable]:
    """Check every table on both sides, then install capture on all of them in one Site transaction.

    All or nothing: a set added half-way is worse than one refused, since the same command run
    again says "already replicated" for the tables it did install. Every problem found is named in
    the one error; a table named twice (however spelled) is added once. A column list or row
    filter (`selection`) names one table's columns, so it comes with one table only.

    `identity` names the unique index that stands in for a missing primary key (one table only);
    `insert_only` registers keyless append-only tables, whose existing rows `copy_appends` logs
    in the same transaction (`copied` of each result): a copy any later would duplicate rows
    inserted in between.

    `policy`: write-back (`site` is then the Agent DB, whose changes are captured): the conflict
    policy stored with each registration (sql/site/0013_site_write_back.sql; not enforced yet)."""
    if identity is not None and insert_only:
        raise SchemaError("--identity and --insert-only exclude each other: a table has a key or has none")
    if identity is not None and len(set(names)) > 1:
        raise SchemaError("--identity names the index of one table: add the tables one at a time")
    if not selection.everything and len(set(names)) > 1:
        raise SchemaError("--columns and --where apply to one table: add the tables one at a time")
    if policy is not None and policy.agent_owns and len(set(names)) > 1:
        raise SchemaError("--agent-owns names one table's columns: add the tables one at a time")
    if not selection.everything and insert_only:
        raise SchemaError(
            "--columns and --where do not apply to --insert-only tables: their rows are logged whole, as inserted"
        )
    filters = has_filters(site)
    if not selection.everything and not filters:
        raise SchemaError(NO_FILTERS)
    found: dict[tuple[str, str], tuple[list[str], list[str], str | None]] = {}
    problems = []
    for name in names:
        try:
            schema, table, keys, site_cols, index = _check_add(
                site,
                agent,
                name,
                identity,
                insert_only,
                selection.columns,
                ("Agent", "Site") if policy else ("Site", "Agent"),
            )
        except SchemaError as exc:
            problems.append(str(exc))
        else:
            found.setdefault((schema, table), (keys, site_cols, index))
    if problems:
        raise SchemaError(_none_done(problems, len(names), "added"))
    infos: list[AddedTable] = []
    label = ""
    try:
        with site.transaction():
            for (schema, table), (keys, site_cols, index) in found.items():
                label = display_name(schema, table)
                table_id = site.execute(
                    "SELECT dbsync.add_table(%s::regclass, %s::regclass, %s)",
                    (sql.Identifier(schema, table).as_string(site), index, insert_only),
                ).fetchone()[0]  # type: ignore[index]
                if filters:  # also clears what a table removed and added again had
                    _set_selection(site, schema, table, selection)
                if policy is not None:
                    site.execute(
                        "SELECT dbsync.set_conflict_policy(%s::regclass, %s, %s)",
                        (sql.Identifier(schema, table).as_string(site), policy.conflict, list(policy.agent_owns)),
                    )
                copied = None
                if insert_only and copy_appends:
                    copied = site.execute("SELECT dbsync.copy_insert_only(%s)", (table_id,)).fetchone()[0]  # type: ignore[index]
                infos.append(
                    AddedTable(table_id, schema, table, tuple(keys), tuple(site_cols), index, insert_only, copied)
                )
    except psycopg.Error as exc:
        reason = f"cannot add {label}: {first_line(exc).removeprefix('dbsync: ')}"
        raise SchemaError(_none_done([reason], len(names), "added")) from None
    return infos


@dataclass(frozen=True)
class Policy:
    """A write-back table's conflict policy (issue 12 item 3), as the Agent DB's registry stores it."""

    conflict: str = "site-wins"
    agent_owns: tuple[str, ...] = ()


CONFLICT_POLICIES = ("site-wins", "agent-wins", "latest")


def policies(capture: psycopg.Connection) -> dict[int, Policy]:
    """The stored policy of each table registered on a write-back registry (the Agent DB's)."""
    rows = capture.execute(
        "SELECT table_id, conflict, agent_owns FROM dbsync.replicated_tables WHERE removed_at IS NULL"
    ).fetchall()
    return {r[0]: Policy(r[1], tuple(r[2])) for r in rows}


@dataclass(frozen=True)
class AddedTable(ReplicatedTable):
    """A table `add` registered; `copied`: the existing rows of an insert-only table it logged."""

    copied: int | None = None


def remove(site: psycopg.Connection, names: Sequence[str]) -> list[str]:
    """Stop capturing every table named, in one Site transaction; if any is missing or not
    replicated, none is removed (the same rule as add)."""
    found: dict[tuple[str, str], None] = {}
    problems = []
    for name in names:
        try:
            schema, table = resolve(site, name, "Site")
        except SchemaError as exc:
            problems.append(str(exc))
            continue
        if not _replicated(site, schema, table):
            problems.append(f"table {display_name(schema, table)} is not replicated")
        found[(schema, table)] = None
    if problems:
        raise SchemaError(_none_done(problems, len(names), "removed"))
    with site.transaction():
        for schema, table in found:
            removed = site.execute(
                "SELECT dbsync.remove_table(%s::regclass)", (sql.Identifier(schema, table).as_string(site),)
            ).fetchone()[0]  # type: ignore[index]
            if not removed:  # removed by someone else since the check: undo this command's removals
                gone = f"table {display_name(schema, table)} is not replicated"
                raise SchemaError(_none_done([gone], len(names), "removed"))
    return [display_name(schema, table) for schema, table in found]


def _check_add(
    site: psycopg.Connection,
    agent: psycopg.Connection,
    name: str,
    identity: str | None,
    insert_only: bool,
    listed: tuple[str, ...] | None = None,
    sides: tuple[str, str] = ("Site", "Agent"),
) -> tuple[str, str, list[str], list[str], str | None]:
    """(schema, table, key columns, Site columns, identity index) of a table that can be added;
    SchemaError if not. `sides`: the capturing and the applying database's names in messages
    (write-back captures on the Agent DB)."""
    src, dst = sides
    schema, table = resolve(site, name, src)
    label = display_name(schema, table)
    index = None
    if insert_only:
        keys: list[str] = []
    elif identity is not None:
        index = identity_index(site, schema, table, identity)
        keys = index_columns(site, index)
    else:
        keys = primary_key(site, schema, table)
        if not keys:
            raise SchemaError(
                f"table {label} has no primary key; dbsync needs a key to apply changes idempotently: "
                "add it with `--identity INDEX` (a unique index on NOT NULL columns) or, if rows are only "
                "ever inserted, `--insert-only`"
            )
    if _replicated(site, schema, table):
        raise SchemaError(f"table {label} is already replicated (`dbsync backfill {label}` copies its existing rows)")
    site_cols = columns(site, schema, table)
    check_column_list(label, listed, site_cols, keys)
    agent_cols = columns(agent, schema, table) if _exists(agent, schema, table) else None
    if agent_cols is None:
        raise SchemaError(f"table {label} does not exist on the {dst} DB; create it there first")
    replicated = [c for c in site_cols if listed is None or c in listed]
    missing = [c for c in replicated if c not in agent_cols]
    if missing:
        raise SchemaError(f"table {label} on the {dst} DB lacks column(s) {', '.join(missing)}")
    if insert_only:
        return schema, table, keys, site_cols, index
    if index is None:
        agent_keys = primary_key(agent, schema, table)
        if sorted(agent_keys) != sorted(keys):
            raise SchemaError(
                f"table {label}: the {dst} DB's primary key ({', '.join(agent_keys) or 'none'}) "
                f"differs from the {src} DB's ({', '.join(keys)})"
            )
    elif not has_unique_index(agent, schema, table, keys):
        raise SchemaError(
            f"table {label}: the {dst} DB has no primary key or unique index on ({', '.join(keys)}), "
            "which the apply's ON CONFLICT needs; create one there first"
        )
    # Rows are matched by key on both sides: each key type needs an equality operator there.
    key_equality(site, schema, table, keys)
    key_equality(agent, schema, table, keys)
    return schema, table, keys, site_cols, index


def identity_index(site: psycopg.Connection, schema: str, table: str, name: str) -> str:
    """The index `name` (as typed; unqualified, it is looked for in the table's schema too) as
    regclass text, once the Site says it can be the table's identity; SchemaError if not."""
    label = display_name(schema, table)
    try:
        oid = resolve_table_oid(site, name)
        if oid is None and "." not in name:
            oid = resolve_table_oid(site, f"{sql.Identifier(schema).as_string(site)}.{name}")
    except psycopg.Error as exc:
        raise SchemaError(f"{name!r} is not a valid index name: {first_line(exc)}") from None
    if oid is None:
        raise SchemaError(f"index {name!r} does not exist on the Site DB (the identity of {label})")
    row = site.execute(
        "SELECT c.oid::regclass::text, dbsync.identity_problem(%s::regclass, c.oid::regclass) "
        "FROM pg_class c WHERE c.oid = %s::oid",
        (sql.Identifier(schema, table).as_string(site), oid),
    ).fetchone()
    assert row is not None
    if row[1] is not None:
        raise SchemaError(f"cannot use {row[0]} as the identity of {label}: {row[1]}")
    return str(row[0])


def index_columns(conn: psycopg.Connection, index: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indexrelid = %s::regclass ORDER BY k.ord",
        (index,),
    ).fetchall()
    return [r[0] for r in rows]


# A unique index on exactly the key columns (any order), as ON CONFLICT (keys) can use.
UNIQUE_ON = """
SELECT 1 FROM pg_index i
WHERE i.indrelid = %(rel)s::regclass AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
  AND i.indisvalid AND i.indimmediate
  AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text) FROM pg_attribute a
       WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey))
      = (SELECT array_agg(k ORDER BY k) FROM unnest(%(keys)s::text[]) AS k)
"""


def has_unique_index(conn: psycopg.Connection, schema: str, table: str, keys: Sequence[str]) -> bool:
    rel = sql.Identifier(schema, table).as_string(conn)
    return conn.execute(UNIQUE_ON, {"rel": rel, "keys": list(keys)}).fetchone() is not None


def check_column_list(label: str, listed: tuple[str, ...] | None, site_cols: list[str], keys: list[str]) -> None:
    """A column list must name columns the table has, and every key column."""
    if listed is None:
        return
    if not listed:
        raise SchemaError(f"the column list of {label} is empty")
    unknown = [c for c in listed if c not in site_cols]
    if unknown:
        raise SchemaError(f"table {label} has no column(s) {', '.join(unknown)}")
    lacking = [k for k in keys if k not in listed]
    if lacking:
        raise SchemaError(f"the column list of {label} must include its key column(s) {', '.join(lacking)}")


NO_FILTERS = "the Site DB lacks column lists and row filters (migration 0009_site_filters): run `dbsync migrate`"

# Whether the Site DB has sql/site/0009_site_filters.sql.
HAS_FILTERS = """
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
               WHERE attrelid = 'dbsync.replicated_tables'::pg_catalog.regclass AND attname = 'row_filter'
                 AND NOT attisdropped)
"""

SET_SELECTION = "SELECT dbsync.set_table_filter(%s::regclass, %s::text[], %s::text)"


def captures(conn: psycopg.Connection) -> bool:
    """Whether a database has dbsync's capture chain: always the Site DB; the Agent DB after
    `dbsync migrate --two-way`."""
    row = conn.execute("SELECT pg_catalog.to_regclass('dbsync.sync_log') IS NOT NULL").fetchone()
    return bool(row and row[0])


def has_filters(site: psycopg.Connection) -> bool:
    row = site.execute(HAS_FILTERS).fetchone()
    return bool(row and row[0])


def _set_selection(site: psycopg.Connection, schema: str, table: str, selection: Selection) -> None:
    columns = None if selection.columns is None else list(selection.columns)
    site.execute(SET_SELECTION, (sql.Identifier(schema, table).as_string(site), columns, selection.where))


def selections(site: psycopg.Connection) -> dict[int, Selection]:
    """Each replicated table's selection by table id (only the ones that leave something out)."""
    if not has_filters(site):
        return {}
    rows = site.execute(
        "SELECT table_id, column_list, row_filter FROM dbsync.replicated_tables "
        "WHERE column_list IS NOT NULL OR row_filter IS NOT NULL"
    ).fetchall()
    return {r[0]: Selection(None if r[1] is None else tuple(r[1]), r[2]) for r in rows}


@dataclass(frozen=True)
class Altered:
    table: str
    before: Selection
    after: Selection


def alter(
    site: psycopg.Connection,
    agent: psycopg.Connection,
    name: str,
    *,
    listed: tuple[str, ...] | None = None,
    all_columns: bool = False,
    where: str | None = None,
    no_where: bool = False,
) -> Altered:
    """Change a replicated table's column list and/or row filter (what is not named stays).

    Only the selection changes here; the rows already on the Agent DB are the caller's next step
    (`dbsync tables alter` resyncs the whole table through the sync log)."""
    if not has_filters(site):
        raise SchemaError(NO_FILTERS)
    if listed is not None and all_columns:
        raise SchemaError("--columns and --all-columns contradict each other")
    if where is not None and no_where:
        raise SchemaError("--where and --no-where contradict each other")
    if listed is None and not all_columns and where is None and not no_where:
        raise SchemaError("nothing to change: give --columns, --all-columns, --where or --no-where")
    schema, table = resolve(site, name, "Site")
    label = display_name(schema, table)
    if not _replicated(site, schema, table):
        raise SchemaError(f"table {label} is not replicated")
    row = site.execute(
        "SELECT table_id FROM dbsync.replicated_tables WHERE relid = %s::regclass AND removed_at IS NULL",
        (sql.Identifier(schema, table).as_string(site),),
    ).fetchone()
    assert row is not None
    before = selections(site).get(row[0], EVERYTHING)
    after = Selection(
        None if all_columns else (listed if listed is not None else before.columns),
        None if no_where else (where if where is not None else before.where),
    )
    keys = primary_key(site, schema, table)
    site_cols = columns(site, schema, table)
    check_column_list(label, after.columns, site_cols, keys)
    if not _exists(agent, schema, table):
        raise SchemaError(f"table {label} does not exist on the Agent DB")
    agent_cols = columns(agent, schema, table)
    missing = [c for c in site_cols if (after.columns is None or c in after.columns) and c not in agent_cols]
    if missing:
        raise SchemaError(f"table {label} on the Agent DB lacks column(s) {', '.join(missing)}")
    try:
        with site.transaction():
            _set_selection(site, schema, table, after)
    except psycopg.Error as exc:
        raise SchemaError(first_line(exc).removeprefix("dbsync: ")) from None
    return Altered(label, before, selections(site).get(row[0], EVERYTHING))


def _none_done(problems: list[str], named: int, verb: str) -> str:
    """One line for a refused command; with several tables named, it says none was touched."""
    text = "; ".join(dict.fromkeys(problems))  # a table named twice has its problem said once
    return f"{text}; no table was {verb}" if named > 1 else text


def _replicated(site: psycopg.Connection, schema: str, name: str) -> bool:
    row = site.execute(
        "SELECT 1 FROM dbsync.replicated_tables WHERE relid = %s::regclass AND removed_at IS NULL",
        (sql.Identifier(schema, name).as_string(site),),
    ).fetchone()
    return row is not None


def listing(site: psycopg.Connection) -> list[ReplicatedTable]:
    rows = site.execute(
        "SELECT table_id, schema_name, table_name, key_columns, identity_index::regclass::text, insert_only "
        "FROM dbsync.replicated_tables WHERE removed_at IS NULL ORDER BY schema_name, table_name"
    ).fetchall()
    return [ReplicatedTable(r[0], r[1], r[2], tuple(r[3]), identity=r[4], insert_only=r[5]) for r in rows]


def _exists(conn: psycopg.Connection, schema: str, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (schema, name),
    ).fetchone()
    return row is not None


@dataclass(frozen=True)
class PartitionChange:
    member: str
    change: str  # attached, detached or dropped
    resynced: int  # rows written to the sync log for it (updated + deleted)


def refresh(site: psycopg.Connection, name: str) -> list[PartitionChange]:
    """Bring capture of a partitioned table in line with its tree after ATTACH / DETACH
    PARTITION (which fire no trigger): the Site DB installs or drops the TRUNCATE triggers, then
    the rows of every attached or detached member are resynced by key, so the Agent DB gains
    the rows that came with a partition and loses those that left with one. A member dropped
    after its detach cannot be read any more: the caller reports it (reconcile finds its rows)."""
    schema, table = resolve(site, name, "Site")
    rel = sql.Identifier(schema, table).as_string(site)
    try:
        with site.transaction():
            changes = site.execute(
                "SELECT member, relid, change FROM dbsync.refresh_partitions(%s::regclass)", (rel,)
            ).fetchall()
            keys = site.execute(
                "SELECT key_columns FROM dbsync.replicated_tables WHERE relid = %s::regclass AND removed_at IS NULL",
                (rel,),
            ).fetchone()
    except psycopg.errors.UndefinedFunction:
        raise SchemaError("the Site DB lacks dbsync.refresh_partitions: run `dbsync migrate`") from None
    except psycopg.Error as exc:
        raise SchemaError(first_line(exc).removeprefix("dbsync: ")) from None
    assert keys is not None
    out = []
    for member, relid, change in changes:
        resynced = 0
        if change != "dropped":
            member_keys = [
                str(r[0])
                for r in site.execute(
                    "SELECT dbsync.member_keys(%s::oid::regclass, %s::text[])::text", (relid, list(keys[0]))
                ).fetchall()
            ]
            updated, deleted = resync_keys(site, schema, table, member_keys)
            resynced = updated + deleted
        out.append(PartitionChange(member, change, resynced))
    return out


PARTITION_CHANGES = """
SELECT r.schema_name, r.table_name, c.member, c.change
FROM dbsync.replicated_tables r
CROSS JOIN LATERAL dbsync.partition_changes(r.table_id) AS c
WHERE r.removed_at IS NULL
ORDER BY 1, 2, 3
"""


def partition_drift(site: psycopg.Connection) -> list[str]:
    """One line per replicated table whose partition tree changed since capture was installed
    on it (empty where the Site DB predates partition support or the role may not look)."""
    usable = site.execute(
        "SELECT to_regprocedure('dbsync.partition_changes(integer)') IS NOT NULL "
        "AND has_function_privilege('dbsync.partition_changes(integer)', 'EXECUTE')"
    ).fetchone()
    if not usable or not usable[0]:
        return []
    by_table: dict[str, list[str]] = {}
    for schema, table, member, change in site.execute(PARTITION_CHANGES).fetchall():
        by_table.setdefault(display_name(schema, table), []).append(f"{change} {member}")
    return [
        f"{label}: partitions changed since capture was installed ({'; '.join(changes)}): "
        f"run `dbsync tables refresh {label}`"
        for label, changes in by_table.items()
    ]
