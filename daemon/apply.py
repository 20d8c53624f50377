"""The apply path: one Agent DB transaction per page, rows and progress together.

The log says which keys changed; each event arrives with its row as it stands at the batch's
snapshot, or with none when the key is absent there (dbsync.daemon.consume). A page is
coalesced to one write per key (the Agent DB holds state, not history), then written with one
statement per table and kind: a set-based DELETE of the keys absent at the snapshot and a
set-based upsert of the rows present, both fed as one JSON array that PostgreSQL expands with
json_to_recordset. Row images pass through Python as text and are never decoded, except the
last one per table, whose column names are checked against the Agent table (schema drift).

A page without a TRUNCATE goes to the Agent as one statement, its progress included (one round
trip; Applier._write_page); when that statement cannot write it, the page takes a transaction.
Every row of a page is as it stood at one snapshot, which satisfies the Site's unique
constraints; the Agent may still hold an older value that a page's row now takes (two rows
swapping a unique value). If the set-based statements fail, the page is written again as
"delete every key of the page, then insert its rows"; if that fails too, key by key, which pins
the failure on one key (table, key, seq) for the report, or parks it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import asyncpg

from dbsync.daemon.consume import ApplyProgress, Event
from dbsync.daemon.pg import is_transient
from dbsync.db import display_name, quote_ident
from dbsync.errors import ApplyError, DriftError, SchemaError
from dbsync.keyops import KEY_EQUALITY_ASYNCPG, KeyEquality, key_equalities
from dbsync.protocol import (
    COUNT_PARKED,
    DROP_SUPERSEDED,
    PARK,
    PARKED_KEYS,
    RETRY_CANDIDATES,
    RETRY_FAILED,
    SAVE_PROGRESS,
    TOUCH_PROGRESS,
    UNPARK,
    ReplicatedTable,
    save_progress_returning,
    visible_in,
)
from dbsync.rls import ACTIVE_ASYNCPG, is_rls_error, refusal


@dataclass(frozen=True)
class ApplyTable:
    """A replicated table as the apply path needs it."""

    table_id: int
    schema: str
    name: str
    keys: tuple[str, ...]
    columns: frozenset[str]
    insertable: tuple[str, ...]
    # Column -> type name (without typmod: the INSERT's own assignment applies it, and raises
    # where an explicit cast would silently truncate).
    types: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    # GENERATED ALWAYS identity columns: inserted with OVERRIDING SYSTEM VALUE, never updated.
    always_identity: frozenset[str] = frozenset()
    # Variable-length columns whose values PostgreSQL may move out of line (TOAST).
    toastable: frozenset[str] = frozenset()
    # How each key column compares (its type's own equality operator), in key order.
    key_equality: tuple[KeyEquality, ...] = field(default=(), hash=False, compare=False)
    # Columns of type json or jsonb, or a domain over one (see _source).
    json_typed: frozenset[str] = frozenset()
    # Replicated insert-only: no key; every row a page carries is inserted as it is.
    insert_only: bool = False

    @property
    def label(self) -> str:
        return display_name(self.schema, self.name)

    @property
    def qualified(self) -> str:
        return quote_ident(self.schema, self.name)

    # Row images arrive as JSON objects of text values (each column's text output on the Site);
    # json_to_recordset hands each value to the Agent column type's input function: PostgreSQL's
    # own exact round trip. Never a cast from text: the owner of a type (an enum, a composite)
    # may create a cast from text to it, and its function would run with the daemon's rights.
    # json and jsonb columns are read as text and cast (json_to_recordset would keep a JSON
    # string as a string); casts between those built-in types only a superuser can create.
    # `param` is the statement's parameter number that carries the JSON array.
    def _source(self, columns: Sequence[str], alias: str, param: int = 1) -> str:
        defs = ", ".join(f"{quote_ident(c)} {'text' if c in self.json_typed else self.types[c]}" for c in columns)
        return f"pg_catalog.json_to_recordset(${param}::text::json) AS {alias}({defs})"

    def _cast(self, alias: str, column: str) -> str:
        value = f"{alias}.{quote_ident(column)}"
        return f"{value}::{self.types[column]}" if column in self.json_typed else value

    def _assign(self, column: str) -> str:
        """The SET clause of an upsert for one column.

        A row image carries every column, so an update that changed only a status also carries
        the message's 100 kB body. Assigning that value anew makes PostgreSQL compress and
        write it out of line again; assigning the stored value (the same TOAST pointer) keeps
        it. So a large stored value that is byte for byte the incoming one is kept. The size
        test reads only the stored length, so small values cost nothing extra.
        """
        c = quote_ident(column)
        if column not in self.toastable:
            return f"{c} = EXCLUDED.{c}"
        return (
            f"{c} = CASE WHEN pg_catalog.pg_column_size(t.{c}) > {KEEP_STORED_BYTES} "
            f"AND pg_catalog.record_image_eq(ROW(t.{c}), ROW(EXCLUDED.{c})) THEN t.{c} ELSE EXCLUDED.{c} END"
        )

    # `guard`: an SQL condition every written row also needs (Applier._write_page).
    def upsert_sql(self, columns: Sequence[str], param: int = 1, guard: str = "true") -> str:
        cols = ", ".join(quote_ident(c) for c in columns)
        values = ", ".join(self._cast("r", c) for c in columns)
        if self.insert_only:  # no key to meet: exactly once comes from the guarded progress
            return (
                f"INSERT INTO {self.qualified} ({cols}) OVERRIDING SYSTEM VALUE "
                f"SELECT {values} FROM {self._source(columns, 'r', param)} WHERE {guard}"
            )
        keys = ", ".join(quote_ident(k) for k in self.keys)
        sets = ", ".join(self._assign(c) for c in columns if c not in self.keys and c not in self.always_identity)
        action = f"DO UPDATE SET {sets}" if sets else "DO NOTHING"
        return (
            f"INSERT INTO {self.qualified} AS t ({cols}) OVERRIDING SYSTEM VALUE "
            f"SELECT {values} FROM {self._source(columns, 'r', param)} WHERE {guard} "
            f"ON CONFLICT ({keys}) {action}"
        )

    def _match(self, left: str, right: str) -> str:
        """SQL: the key of alias `left` equals that of `right` (the table or a recordset; the
        cast of a json key column is a no-op on the table's own column)."""
        return " AND ".join(
            eq.match(self._cast(left, eq.column), self._cast(right, eq.column)) for eq in self.key_equality
        )

    def delete_sql(self, param: int = 1, guard: str = "true") -> str:
        return (
            f"DELETE FROM {self.qualified} AS d USING {self._source(self.keys, 'k', param)} "
            f"WHERE {self._match('d', 'k')} AND {guard}"
        )

    def overlap_sql(self, deletes: int, upserts: int) -> str:
        """SQL: a key of the JSON array in parameter `deletes` equals (by the key type's equality)
        a key of the rows in parameter `upserts`, as text keys 1.0 and 1.00 of a numeric do.

        A count, not EXISTS: planned for the 100 rows a recordset is estimated at, EXISTS expects
        a match soon and compares every pair in a nested loop (9,000,000 comparisons for a page
        of 1,000 deletes and 9,000 upserts); a count joins by hash, or by sort for a key type
        without a hash opclass."""
        return (
            f"(SELECT pg_catalog.count(*) FROM {self._source(self.keys, 'k', deletes)} "
            f"JOIN {self._source(self.keys, 'u', upserts)} ON {self._match('k', 'u')}) OPERATOR(pg_catalog.>) 0"
        )

    def truncate_sql(self) -> str:
        return f"DELETE FROM {self.qualified}"


# Stored values larger than this (bytes, after compression) are compared before an upsert
# overwrites them; below it a value lives in the row itself and rewriting it is cheap.
KEEP_STORED_BYTES = 1000

# A table without key columns is replicated insert-only (0008_site_identity).
SITE_REGISTRY = """
SELECT table_id, schema_name, table_name, key_columns, pg_catalog.cardinality(key_columns) = 0 AS insert_only
FROM dbsync.replicated_tables
"""

AGENT_COLUMNS = """
SELECT a.attname::text AS name, a.attgenerated <> '' AS generated, a.attidentity = 'a' AS always_identity,
       a.attlen = -1 AND a.attstorage <> 'p' AS toastable,
       CASE a.atttypid  -- without a length, these names mean length 1
           WHEN 'pg_catalog.bpchar'::pg_catalog.regtype THEN 'pg_catalog.bpchar'
           WHEN 'pg_catalog._bpchar'::pg_catalog.regtype THEN 'pg_catalog.bpchar[]'
           WHEN 'pg_catalog.bit'::pg_catalog.regtype THEN 'pg_catalog.varbit'
           WHEN 'pg_catalog._bit'::pg_catalog.regtype THEN 'pg_catalog.varbit[]'
           ELSE pg_catalog.format_type(a.atttypid, NULL)
       END AS type,
       (SELECT coalesce(nullif(ty.typbasetype, 0), ty.oid) FROM pg_catalog.pg_type ty WHERE ty.oid = a.atttypid)
           IN ('pg_catalog.json'::pg_catalog.regtype, 'pg_catalog.jsonb'::pg_catalog.regtype) AS json_typed
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

AGENT_TABLE = """
SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
"""

# A unique index on exactly the key columns is what ON CONFLICT needs.
AGENT_KEY_INDEX = """
SELECT 1
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indpred IS NULL
  AND i.indexprs IS NULL
  AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
       FROM pg_catalog.pg_attribute a
       WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)) = $3::text[]
"""


class Catalog:
    """Site registry plus Agent columns, cached; refreshed when a page mentions something new."""

    def __init__(self) -> None:
        self._registry: dict[int, ReplicatedTable] = {}
        self._tables: dict[int, ApplyTable] = {}

    def forget(self) -> None:
        self._registry.clear()
        self._tables.clear()

    async def table(self, site: asyncpg.Connection, agent: asyncpg.Connection, table_id: int) -> ApplyTable:
        if table_id in self._tables:
            return self._tables[table_id]
        if table_id not in self._registry:
            rows = await site.fetch(SITE_REGISTRY)
            self._registry = {
                r["table_id"]: ReplicatedTable(r[0], r[1], r[2], tuple(r[3]), insert_only=r["insert_only"])
                for r in rows
            }
        if table_id not in self._registry:
            raise SchemaError(f"the sync log names table id {table_id}, which dbsync.replicated_tables does not know")
        table = await load_apply_table(agent, self._registry[table_id])
        self._tables[table_id] = table
        return table


async def load_apply_table(agent: asyncpg.Connection, replicated: ReplicatedTable) -> ApplyTable:
    table_id, schema, name, keys = replicated.table_id, replicated.schema, replicated.name, replicated.keys
    label = f"{schema}.{name}"
    oid = await agent.fetchval(AGENT_TABLE, schema, name)
    if oid is None:
        raise SchemaError(f"table {label} does not exist on the Agent DB")
    # The upsert and the delete must see every row (a hidden row would take a new copy, or stay).
    filtered, role = await agent.fetchrow(ACTIVE_ASYNCPG, oid)
    if filtered:
        raise refusal(display_name(schema, name), role, "Agent")
    cols = await agent.fetch(AGENT_COLUMNS, oid)
    names = {c["name"] for c in cols}
    missing = [k for k in keys if k not in names]
    if missing:
        raise SchemaError(f"table {label} on the Agent DB lacks key column(s) {', '.join(missing)}")
    equality: list[KeyEquality] = []
    if not replicated.insert_only:
        if not await agent.fetchval(AGENT_KEY_INDEX, schema, name, sorted(keys)):
            raise SchemaError(
                f"table {label} on the Agent DB has no primary key or unique index on ({', '.join(keys)})"
            )
        equality = key_equalities(
            [tuple(r) for r in await agent.fetch(KEY_EQUALITY_ASYNCPG, oid, list(keys))], f"{label} on the Agent DB"
        )
    return ApplyTable(
        table_id=table_id,
        schema=schema,
        name=name,
        keys=keys,
        columns=frozenset(names),
        insertable=tuple(c["name"] for c in cols if not c["generated"]),
        types={c["name"]: c["type"] for c in cols},
        always_identity=frozenset(c["name"] for c in cols if c["always_identity"]),
        toastable=frozenset(c["name"] for c in cols if c["toastable"]),
        key_equality=tuple(equality),
        json_typed=frozenset(c["name"] for c in cols if c["json_typed"]),
        insert_only=replicated.insert_only,
    )


@dataclass
class TablePlan:
    """What one page does to one table, after coalescing."""

    table: ApplyTable
    truncate: bool = False
    last: dict[str, str | None] = field(default_factory=dict)  # pk text -> row image, None when absent
    columns: list[str] = field(default_factory=list)  # what the upsert writes, from the last image
    appended: list[str] = field(default_factory=list)  # an insert-only table's rows, every one

    def add(self, ev: Event) -> None:
        if ev.op == "T":
            # A row present at the snapshot was inserted after the TRUNCATE, so logged after it.
            self.truncate = True
            self.last.clear()
            self.appended.clear()
        elif ev.appended:
            assert ev.image is not None
            self.appended.append(ev.image)
        else:
            assert ev.pk is not None
            self.last.pop(ev.pk, None)  # keep dict order = order of last write
            self.last[ev.pk] = ev.image

    def keys(self) -> list[str]:
        return list(self.last)

    def deletes(self) -> list[str]:
        return [pk for pk, image in self.last.items() if image is None]

    def upserts(self) -> list[str]:
        return [image for image in self.last.values() if image is not None] + self.appended


def json_array(items: Iterable[str]) -> str:
    return "[" + ",".join(items) + "]"


def image_columns(table: ApplyTable, image: str) -> list[str]:
    """The Agent columns an upsert of `image` writes; every column in a Site row image must
    exist on the Agent table (schema drift otherwise)."""
    present = json.loads(image).keys()
    extra = sorted(set(present) - table.columns)
    if extra:
        cols = ", ".join(extra)
        raise DriftError(
            f"column(s) {cols} of {table.label} exist on the Site DB but not on the Agent DB; "
            f"add them to the Agent table and replication resumes",
            table.schema,
            table.name,
            tuple(extra),
        )
    return [c for c in table.insertable if c in present]


# Page shapes whose one statement is kept (a few per set of tables a page can touch).
PAGE_SQL_CACHE = 256


def _page_sql(parts: Sequence[tuple[TablePlan, list[str], list[str]]]) -> str:
    """The one statement of Applier._write_page; its JSON arrays are parameters $11 on, in the
    order of `parts` (each table's deletes, then its upserts, when it has them)."""
    writes, overlaps = [], []
    guard = "EXISTS (SELECT FROM p)"
    param = len(SAVE_PROGRESS.names)
    for plan, deletes, upserts in parts:
        if deletes:
            param += 1
            writes.append(plan.table.delete_sql(param, guard))
        if upserts:
            param += 1
            writes.append(plan.table.upsert_sql(plan.columns, param, guard))
        if deletes and upserts:
            overlaps.append(f"NOT {plan.table.overlap_sql(param - 1, param)}")
    ctes = ", ".join(f"w{i} AS ({w})" for i, w in enumerate(writes, start=1))
    head = save_progress_returning(" AND ".join(overlaps) or "true")
    return f"WITH p AS ({head}), {ctes} SELECT count(*) FROM p"


class Applier:
    """Writes pages to the Agent DB.

    With `park` set, an event the Agent DB rejects is moved to dbsync.parked_events together
    with every later event for the same key, and the rest of the page is applied; without it,
    the page fails and nothing is skipped.
    """

    def __init__(self, source: str, catalog: Catalog, *, park: bool = False) -> None:
        self.source = source
        self.catalog = catalog
        self.park = park
        # Parked events of this source, as last counted; 0 lets the hot path skip the lookup.
        self.parked = 0
        # Pages written as one statement (the others took a transaction).
        self.one_statement_pages = 0
        # Page shape -> (its tables, the one statement's text); see _write_page.
        self._page_sql: dict[tuple[object, ...], tuple[tuple[ApplyTable, ...], str]] = {}
        # A batch opened again after an interruption, while its stored progress is the old one.
        self._replay: Replay | None = None

    async def relax_commit(self, agent: asyncpg.Connection) -> None:
        """Commit on `agent` without waiting for the WAL flush (the runner calls it once a
        connection is set up).

        Rows and progress commit together, so an Agent crash that loses the last commits loses
        their progress with them, and the daemon applies those pages again from the Site's log.
        The log still holds them only if it is never pruned past what the Agent has flushed:
        whoever calls this prunes only after make_durable.
        """
        await agent.execute("SET synchronous_commit = off")

    async def make_durable(self, agent: asyncpg.Connection) -> None:
        """Return once every earlier commit on the Agent DB is flushed (and on its synchronous
        standbys): a synchronous commit flushes the WAL up to its own commit record, which
        follows theirs. It must write a row: a transaction with an xid but no WAL of its own
        commits asynchronously whatever synchronous_commit says (RecordTransactionCommit)."""
        async with agent.transaction():
            await agent.execute("SET LOCAL synchronous_commit = on")
            await agent.execute(TOUCH_PROGRESS.asyncpg, self.source)

    async def count_parked(self, agent: asyncpg.Connection) -> int:
        self.parked = int(await agent.fetchval(COUNT_PARKED.asyncpg, self.source))
        return self.parked

    async def _plans(
        self, site: asyncpg.Connection, agent: asyncpg.Connection, events: Sequence[Event]
    ) -> list[TablePlan]:
        plans: dict[int, TablePlan] = {}
        for ev in events:
            plan = plans.get(ev.table_id)
            if plan is None:
                plan = plans[ev.table_id] = TablePlan(await self.catalog.table(site, agent, ev.table_id))
            plan.add(ev)
        for plan in plans.values():
            upserts = plan.upserts()
            if upserts:
                try:
                    plan.columns = image_columns(plan.table, upserts[-1])
                except DriftError:
                    # The Agent table may have been altered since we looked: look again first.
                    self.catalog.forget()
                    plan.table = await self.catalog.table(site, agent, plan.table.table_id)
                    plan.columns = image_columns(plan.table, upserts[-1])
        return list(plans.values())

    async def _write_coalesced(
        self, agent: asyncpg.Connection, plans: Sequence[TablePlan], *, delete_all: bool = False
    ) -> None:
        """Truncates, then deletes, then upserts, each set-based per table. With `delete_all`
        every key of the page is deleted first, so the upserts insert into room the page made."""
        for plan in plans:
            if plan.truncate:
                await agent.execute(plan.table.truncate_sql())
        for plan in plans:
            deletes = plan.keys() if delete_all else plan.deletes()
            if deletes:
                await agent.execute(plan.table.delete_sql(), json_array(deletes))
        for plan in plans:
            upserts = plan.upserts()
            if upserts:
                await agent.execute(plan.table.upsert_sql(plan.columns), json_array(upserts))

    async def _write_page(
        self,
        agent: asyncpg.Connection,
        plans: Sequence[TablePlan],
        before: ApplyProgress,
        after: ApplyProgress,
        events: Sequence[Event],
    ) -> bool:
        """Write the page and its progress in one statement; False when it wrote nothing.

        The progress UPDATE leads; every delete and upsert requires its row, so when another
        consumer moved the progress, nothing is written. All parts of one statement run against
        one snapshot and none sees another's rows: a key the page deletes must not equal one it
        upserts, which text keys may under the key type's equality (numeric 1.0 and 1.00). Such
        a page moves nothing here either, and goes the transaction's way (as does any error).
        """
        args: list[object] = list(self._progress_args(before, after, events))
        parts = [(plan, plan.deletes(), plan.upserts()) for plan in plans]
        for _, deletes, upserts in parts:
            args += [json_array(a) for a in (deletes, upserts) if a]
        # The statement's text depends only on the page's shape: built once per shape.
        shape = tuple((id(plan.table), bool(d), bool(u), tuple(plan.columns)) for plan, d, u in parts)
        cached = self._page_sql.get(shape)
        if cached is None or any(t is not plan.table for t, plan in zip(cached[0], plans, strict=True)):
            if len(self._page_sql) >= PAGE_SQL_CACHE:
                self._page_sql.clear()
            cached = self._page_sql[shape] = (tuple(plan.table for plan in plans), _page_sql(parts))
        try:
            moved = await agent.fetchval(cached[1], *args)
        except asyncpg.PostgresError as exc:
            if is_transient(exc) or is_rls_error(exc):
                raise
            return False
        return bool(moved)

    async def _write_event(self, site: asyncpg.Connection, agent: asyncpg.Connection, ev: Event) -> None:
        table = await self.catalog.table(site, agent, ev.table_id)
        if ev.op == "T":
            await agent.execute(table.truncate_sql())
            # A TRUNCATE supersedes whatever was parked for the table before it.
            await agent.execute(DROP_SUPERSEDED.asyncpg, self.source, ev.table_id, ev.seq)
        elif ev.image is None:
            assert ev.pk is not None
            await agent.execute(table.delete_sql(), json_array([ev.pk]))
        else:
            cols = image_columns(table, ev.image)
            await agent.execute(table.upsert_sql(cols), json_array([ev.image]))

    async def _write_key_by_key(
        self,
        site: asyncpg.Connection,
        agent: asyncpg.Connection,
        events: Sequence[Event],
        held: set[tuple[int, str | None]],
    ) -> int:
        """Write each key's state alone, in the order of its last event (TRUNCATEs in place);
        returns how many events were parked."""
        last: dict[tuple[int, str | None], Event] = {}
        for ev in events:
            # A TRUNCATE, and an insert-only table's row, is each one its own write.
            key = (ev.table_id, f"{ev.op}{ev.seq}") if ev.op == "T" or ev.appended else (ev.table_id, ev.pk)
            last.pop(key, None)
            last[key] = ev
        parked = 0
        for ev in last.values():
            if ev.op != "T" and not ev.appended and ev.key in held:
                await self._park(site, agent, ev, "held back: an earlier event for this key is parked")
                parked += 1
                continue
            try:
                if self.park:
                    async with agent.transaction():  # a savepoint
                        await self._write_event(site, agent, ev)
                else:
                    await self._write_event(site, agent, ev)
            except asyncpg.PostgresError as exc:
                # Row-level security is the configuration, not this event: never park for it.
                if is_transient(exc) or is_rls_error(exc):
                    raise
                table = await self.catalog.table(site, agent, ev.table_id)
                reason = f"{exc.__class__.__name__}: {str(exc).strip()}"
                if not self.park:
                    raise ApplyError(
                        f"the Agent DB rejected event seq {ev.seq} ({_opname(ev)} on {table.label}"
                        f"{' key ' + ev.pk if ev.pk else ''}): {reason}"
                    ) from exc
                await self._park(site, agent, ev, reason)
                if not ev.appended:  # an appended row holds nothing back: rows have no order
                    held.add(ev.key)
                parked += 1
        return parked

    async def _park(self, site: asyncpg.Connection, agent: asyncpg.Connection, ev: Event, error: str) -> None:
        table = await self.catalog.table(site, agent, ev.table_id)
        # Parked as what applying it means: the row at the snapshot, or a delete where there is none.
        op = ev.op if ev.op == "T" or ev.image is not None else "D"
        await agent.execute(
            PARK.asyncpg,
            self.source,
            ev.seq,
            ev.key_no,
            ev.table_id,
            table.label,
            op,
            ev.pk,
            ev.image,
            ev.captured_at,
            error,
        )

    async def _held_keys(self, agent: asyncpg.Connection, events: Sequence[Event]) -> set[tuple[int, str | None]]:
        if not self.parked:
            return set()
        keyed = [(e.table_id, e.pk) for e in events if e.pk is not None]
        rows = await agent.fetch(PARKED_KEYS.asyncpg, self.source, [k[0] for k in keyed], [k[1] for k in keyed])
        return {(r["table_id"], r["pk"]) for r in rows}

    async def apply(
        self,
        site: asyncpg.Connection,
        agent: asyncpg.Connection,
        events: Sequence[Event],
        before: ApplyProgress,
        after: ApplyProgress,
        *,
        planned: Callable[[], None] | None = None,
    ) -> int:
        """Apply `events` and move the stored progress from `before` to `after`, atomically.

        Returns the number of events parked. `planned` is called once the write no longer needs
        the Site connection `site` (the caller may then read ahead on its own).
        """
        events = _test_drop_event(events)
        before, events = self._begin(before, after, events)
        after = self._to_store(after)
        if not events:  # every row already applied by the interrupted batch (Replay)
            if planned is not None:
                planned()
            await self._save(agent, before, after, events)
            return 0
        held = await self._held_keys(agent, events)
        if not held:
            plans = await self._plans(site, agent, events)
            if planned is not None:
                planned()
                planned = None
            if not any(plan.truncate for plan in plans) and await self._write_page(agent, plans, before, after, events):
                self.one_statement_pages += 1
                return 0
            for delete_all in (False, True):
                try:
                    async with agent.transaction():
                        await self._write_coalesced(agent, plans, delete_all=delete_all)
                        await self._save(agent, before, after, events)
                    return 0
                except asyncpg.PostgresError as exc:
                    if is_transient(exc) or is_rls_error(exc):
                        raise
        elif planned is not None:
            planned()
        async with agent.transaction():
            parked = await self._write_key_by_key(site, agent, events, held)
            await self._save(agent, before, after, events)
        if parked:
            self.parked += parked
        return parked

    async def retry_parked(self, site: asyncpg.Connection, agent: asyncpg.Connection) -> tuple[int, int]:
        """Re-apply parked events flagged by `dbsync retry`, key by key, in log order.

        Returns (events applied, events still parked after a new failure).
        """
        rows = await agent.fetch(RETRY_CANDIDATES.asyncpg, self.source)
        groups: dict[tuple[int, str | None], list[Event]] = {}
        for row in rows:
            ev = Event(
                row["seq"], row["table_id"], row["op"], row["pk"], row["captured_at"], row["row_image"], row["key_no"]
            )
            groups.setdefault(ev.key, []).append(ev)
        done = failed = 0
        for evs in groups.values():
            seqs, key_nos = [e.seq for e in evs], [e.key_no for e in evs]
            try:
                async with agent.transaction():
                    for ev in evs:
                        await self._write_event(site, agent, ev)
                    await agent.execute(UNPARK.asyncpg, self.source, seqs, key_nos)
                done += len(evs)
            except (asyncpg.PostgresError, DriftError) as exc:
                if isinstance(exc, asyncpg.PostgresError) and (is_transient(exc) or is_rls_error(exc)):
                    raise
                reason = f"{exc.__class__.__name__}: {str(exc).strip()}"
                await agent.execute(RETRY_FAILED.asyncpg, self.source, seqs, key_nos, reason)
                failed += len(evs)
        await self.count_parked(agent)
        return done, failed

    async def save(self, agent: asyncpg.Connection, before: ApplyProgress, after: ApplyProgress) -> None:
        before, _ = self._begin(before, after, [])
        await self._save(agent, before, self._to_store(after), [])  # one statement: its own transaction

    # -- a batch opened again ------------------------------------------------------------------
    # The runner opens a batch left open by a stopped daemon again from `prev`, at a new snapshot,
    # and applies its pages again: harmless for keyed rows (the same keys, rows at least as new),
    # but an insert-only table's rows would be inserted twice. The stored progress says which
    # were applied: those of transactions visible in its batch snapshot with seq <= its cursor.
    # Those are left out, and the stored progress keeps saying so until the new batch's cursor
    # has passed the old one (a crash in between finds the same progress again); from there the
    # new batch's own (snapshot, cursor) covers everything applied. The runner sees its own
    # batch throughout: _stored and _to_store translate between the two.

    def _stored(self, progress: ApplyProgress) -> ApplyProgress:
        """What the Agent DB holds where the runner holds `progress`."""
        r = self._replay
        if r is not None and r.covers(progress):
            return replace(progress, batch_snapshot=r.snapshot, batch_hi=r.hi, batch_cursor=r.cursor)
        return progress

    def _to_store(self, after: ApplyProgress) -> ApplyProgress:
        """What to store for the runner's `after`."""
        r = self._replay
        if r is not None and r.covers(after):
            return replace(after, batch_snapshot=r.snapshot, batch_hi=r.hi, batch_cursor=r.cursor)
        return after  # past the old cursor, or the batch closed: the runner's own progress

    def _begin(
        self, before: ApplyProgress, after: ApplyProgress, events: Sequence[Event]
    ) -> tuple[ApplyProgress, Sequence[Event]]:
        """The stored progress the page starts from, and its events less the insert-only rows an
        interrupted batch already applied."""
        stored = self._stored(before)
        batch = after.batch_snapshot or after.prev_snapshot
        if stored.in_batch and batch != stored.batch_snapshot:
            assert stored.batch_snapshot is not None and stored.batch_cursor is not None
            self._replay = Replay(stored.batch_snapshot, stored.batch_hi, stored.batch_cursor, batch)
        r = self._replay
        if r is None or r.reopened != batch:
            return stored, events
        return stored, [e for e in events if not r.applied(e)]

    def _progress_args(
        self, before: ApplyProgress, after: ApplyProgress, events: Sequence[Event]
    ) -> tuple[object, ...]:
        """SAVE_PROGRESS's parameters, in its order."""
        return (
            self.source,
            after.prev_snapshot,
            after.batch_snapshot,
            after.batch_hi,
            after.batch_cursor,
            after.applied_seq,
            after.events_applied,
            events[-1].captured_at if events else None,
            before.prev_snapshot,
            before.batch_cursor if before.batch_snapshot is not None else None,
        )

    async def _save(
        self, agent: asyncpg.Connection, before: ApplyProgress, after: ApplyProgress, events: Sequence[Event]
    ) -> None:
        status = await agent.execute(SAVE_PROGRESS.asyncpg, *self._progress_args(before, after, events))
        if status != "UPDATE 1":
            raise ConcurrentConsumerError(
                f"the progress of source {self.source!r} on the Agent DB changed underneath this daemon; "
                "is another dbsync daemon applying the same source?"
            )


@dataclass(frozen=True)
class Replay:
    """An interrupted batch (`snapshot`, `hi`, `cursor`, as stored) opened again at `reopened`."""

    snapshot: str
    hi: int | None
    cursor: int
    reopened: str

    def covers(self, progress: ApplyProgress) -> bool:
        """`progress` is in the reopened batch, short of the interrupted one's cursor."""
        return (
            progress.batch_snapshot == self.reopened
            and progress.batch_cursor is not None
            and progress.batch_cursor < self.cursor
        )

    def applied(self, ev: Event) -> bool:
        """An insert-only row the interrupted batch applied."""
        return ev.appended and ev.seq <= self.cursor and ev.txid is not None and visible_in(ev.txid, self.snapshot)


class ConcurrentConsumerError(ApplyError):
    """Another consumer moved the progress row: this daemon's batch is void."""


def _opname(ev: Event) -> str:
    if ev.op == "T":
        return "truncate"
    return "delete" if ev.image is None else {"I": "insert", "U": "update"}.get(ev.op, "upsert")


# A test hook, off unless set: a JSON key object (`{"id": "7"}`) whose first event this process
# meets in a page of two or more is left out of it; the page still commits with its progress: a lost apply, for the
# tests of the incremental verification (tests/test_verify_keys.py). Nothing sets it otherwise.
TEST_DROP_EVENT = "DBSYNC_TEST_DROP_EVENT"
_test_dropped = False


def _test_drop_event(events: Sequence[Event]) -> Sequence[Event]:
    global _test_dropped
    wanted = os.environ.get(TEST_DROP_EVENT)
    if not wanted or _test_dropped or len(events) < 2:
        return events
    key = json.loads(wanted)
    for i, ev in enumerate(events):
        if ev.pk is not None and json.loads(ev.pk) == key:
            _test_dropped = True
            return [*events[:i], *events[i + 1 :]]
    return events
