"""What the capture trigger writes into dbsync.sync_log, and who can see or influence it.

These tests read the log directly; the ones that end with a sync also check the Agent DB.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

from tests.helpers import LOGGED_KEYS, DbPair, assert_same, replicate, sync_once

ITEMS = "public.items"
ITEMS_DDL = "CREATE TABLE public.items (id integer PRIMARY KEY, label text, qty numeric)"

_roles = itertools.count()


@dataclass(frozen=True)
class Event:
    seq: int
    txid: str
    table_id: int
    op: str
    pk: Any
    image: Any
    pk_text: str | None
    image_text: str | None


def events(conn: psycopg.Connection, after: int = 0) -> list[Event]:
    rows = conn.execute(LOGGED_KEYS, (after,)).fetchall()
    return [
        Event(
            seq=r[0],
            txid=r[1],
            table_id=r[2],
            op=r[3],
            pk=json.loads(r[4], parse_float=Decimal) if r[4] is not None else None,
            image=json.loads(r[5], parse_float=Decimal) if r[5] is not None else None,
            pk_text=r[4],
            image_text=r[5],
        )
        for r in rows
    ]


def last_seq(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM dbsync.sync_log").fetchone()[0])  # type: ignore[index]


def table_id(conn: psycopg.Connection, table: str) -> int:
    row = conn.execute(
        "SELECT table_id FROM dbsync.replicated_tables WHERE relid = %s::regclass AND removed_at IS NULL", (table,)
    ).fetchone()
    assert row is not None, f"{table} is not replicated"
    return int(row[0])


@pytest.fixture
def items(pair: DbPair) -> int:
    replicate(pair, ITEMS_DDL, ITEMS)
    return table_id(pair.site(), ITEMS)


@pytest.fixture
def writer(pair: DbPair) -> Iterator[psycopg.Connection]:
    """A Site connection with explicit transactions."""
    conn = psycopg.connect(pair.site_dsn)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def plain_role(pair: DbPair) -> Iterator[str]:
    """A LOGIN role with no privileges beyond what PUBLIC has; dropped afterwards."""
    name = f"dbsync_plain_{os.getpid()}_{next(_roles)}"
    admin = pair.site()
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def connect_as(pair: DbPair, role: str, **kwargs: Any) -> psycopg.Connection:
    return psycopg.connect(make_conninfo(pair.site_dsn, user=role), **kwargs)


# -- one event per row change, inside the writing transaction ---------------------------------


def test_insert_update_delete_each_log_one_event_in_the_writing_transaction(
    pair: DbPair, items: int, writer: psycopg.Connection
) -> None:
    observer = pair.site()
    start = last_seq(observer)

    writer.execute("INSERT INTO public.items VALUES (1, 'one', 1.50)")
    mine = events(writer, start)
    # The log holds the key; the daemon reads the row itself (0006_site_key_capture).
    assert [(e.op, e.table_id, e.pk, e.image) for e in mine] == [("I", items, {"id": "1"}, None)]
    # Written by this transaction, under its own xid...
    own_xid = writer.execute("SELECT pg_current_xact_id()::text").fetchone()[0]  # type: ignore[index]
    assert mine[0].txid == own_xid
    # ...and invisible to everyone else until it commits.
    assert events(observer, start) == []

    writer.execute("UPDATE public.items SET label = 'uno' WHERE id = 1")
    writer.execute("DELETE FROM public.items WHERE id = 1")
    assert events(observer, start) == []
    writer.commit()

    logged = events(observer, start)
    assert [(e.op, e.pk, e.image) for e in logged] == [
        ("I", {"id": "1"}, None),
        ("U", {"id": "1"}, None),
        ("D", {"id": "1"}, None),
    ]
    assert {e.txid for e in logged} == {own_xid}
    assert {e.table_id for e in logged} == {items}
    assert [e.seq for e in logged] == sorted(e.seq for e in logged)


def test_multi_row_statement_logs_one_event_per_row(pair: DbPair, items: int) -> None:
    site = pair.site()
    start = last_seq(site)
    site.execute("INSERT INTO public.items SELECT g, 'x' || g, g FROM generate_series(1, 25) g")
    site.execute("UPDATE public.items SET qty = qty + 1 WHERE id <= 10")
    site.execute("DELETE FROM public.items WHERE id > 20")
    logged = events(site, start)
    assert [e.op for e in logged] == ["I"] * 25 + ["U"] * 10 + ["D"] * 5
    assert sorted(int(e.pk["id"]) for e in logged if e.op == "U") == list(range(1, 11))
    assert sorted(int(e.pk["id"]) for e in logged if e.op == "D") == list(range(21, 26))
    assert all(e.image is None for e in logged)
    sync_once(pair)
    assert_same(pair, [ITEMS])
    qty = pair.agent().execute("SELECT qty FROM public.items WHERE id = 3").fetchone()
    assert qty is not None and qty[0] == Decimal(4)


def test_truncate_logs_one_event_without_key_or_image(pair: DbPair, items: int) -> None:
    site = pair.site()
    site.execute("INSERT INTO public.items SELECT g, 'x', g FROM generate_series(1, 5) g")
    start = last_seq(site)
    site.execute("TRUNCATE public.items")
    assert [(e.op, e.table_id, e.pk, e.image) for e in events(site, start)] == [("T", items, None, None)]


def test_truncate_cascade_logs_every_truncated_table(pair: DbPair) -> None:
    site = pair.site()
    site.execute("INSERT INTO conversations (id, phone_number) VALUES (1, '+1')")
    site.execute("INSERT INTO leads (phone_number, conversation_id) VALUES ('+1', 1)")
    site.execute(
        "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction) "
        "VALUES ('m1', 1, '+1', 'inbound')"
    )
    start = last_seq(site)
    site.execute("TRUNCATE conversations CASCADE")
    logged = events(site, start)
    assert sorted(e.table_id for e in logged) == sorted(
        table_id(site, t) for t in ("public.conversations", "public.leads", "public.whatsapp_messages")
    )
    assert {e.op for e in logged} == {"T"}
    sync_once(pair)
    assert_same(pair)


def test_rolled_back_transaction_leaves_no_events(pair: DbPair, items: int, writer: psycopg.Connection) -> None:
    site = pair.site()
    site.execute("INSERT INTO public.items VALUES (1, 'keep', 1)")
    start = last_seq(site)

    writer.execute("INSERT INTO public.items VALUES (2, 'gone', 2)")
    writer.execute("UPDATE public.items SET label = 'changed' WHERE id = 1")
    writer.execute("DELETE FROM public.items WHERE id = 1")
    writer.execute("TRUNCATE public.items")
    assert len(events(writer, start)) == 4
    writer.rollback()

    assert events(site, start) == []
    # The sequence numbers it took are a hole, not reused: the next event comes after them.
    site.execute("INSERT INTO public.items VALUES (3, 'after', 3)")
    (after,) = events(site, start)
    assert after.seq > start + 4


def test_update_that_changes_nothing_writes_nothing(pair: DbPair, items: int) -> None:
    site = pair.site()
    site.execute("INSERT INTO public.items VALUES (1, 'a', 1.0), (2, NULL, NULL)")
    start = last_seq(site)
    site.execute("UPDATE public.items SET label = label, qty = qty")
    site.execute("UPDATE public.items SET label = 'a' WHERE id = 1")
    site.execute("UPDATE public.items SET label = NULL WHERE id = 2")
    assert events(site, start) == []


def test_update_to_an_equal_but_different_value_is_logged(pair: DbPair, items: int) -> None:
    """1.0 = 1.00 for numeric equality, but the Agent DB must end up with the new scale."""
    site = pair.site()
    site.execute("INSERT INTO public.items VALUES (1, 'a', 1.0)")
    start = last_seq(site)
    site.execute("UPDATE public.items SET qty = 1.00 WHERE id = 1")
    (ev,) = events(site, start)
    assert (ev.op, ev.pk) == ("U", {"id": "1"})
    sync_once(pair)
    assert_same(pair, [ITEMS])
    qty = pair.agent().execute("SELECT qty::text FROM public.items WHERE id = 1").fetchone()
    assert qty == ("1.00",)


def test_primary_key_change_logs_delete_of_old_key_then_insert_of_new(pair: DbPair, items: int) -> None:
    site = pair.site()
    site.execute("INSERT INTO public.items VALUES (1, 'a', 1)")
    start = last_seq(site)
    site.execute("UPDATE public.items SET id = 2, label = 'b' WHERE id = 1")
    logged = events(site, start)
    assert [(e.op, e.pk, e.image) for e in logged] == [
        ("D", {"id": "1"}, None),
        ("I", {"id": "2"}, None),
    ]
    assert logged[0].txid == logged[1].txid
    assert logged[1].seq == logged[0].seq + 1


def test_composite_key_change_of_one_column_logs_delete_and_insert(pair: DbPair) -> None:
    replicate(pair, "CREATE TABLE public.ck (a text, b integer, v text, PRIMARY KEY (a, b))", "public.ck")
    site = pair.site()
    site.execute("INSERT INTO public.ck VALUES ('x', 1, 'v')")
    start = last_seq(site)
    site.execute("UPDATE public.ck SET v = 'w' WHERE a = 'x'")
    site.execute("UPDATE public.ck SET b = 2 WHERE a = 'x'")
    assert [(e.op, e.pk) for e in events(site, start)] == [
        ("U", {"a": "x", "b": "1"}),
        ("D", {"a": "x", "b": "1"}),
        ("I", {"a": "x", "b": "2"}),
    ]


def test_non_replicated_table_is_not_logged(pair: DbPair) -> None:
    site = pair.site()
    start = last_seq(site)
    site.execute("INSERT INTO notifications (user_id, kind) VALUES ('u', 'k')")
    site.execute("UPDATE notifications SET is_read = true")
    site.execute("DELETE FROM notifications")
    assert events(site, start) == []


# -- the doorbell --------------------------------------------------------------------------


def notifications_until_marker(listener: psycopg.Connection, timeout: float = 10.0) -> list[psycopg.Notify]:
    """Everything delivered on channel dbsync before the next NOTIFY on channel 'marker'.

    Notifications arrive in commit order, so a marker sent after a transaction commits bounds
    exactly what that transaction caused, without waiting for silence.
    """
    got: list[psycopg.Notify] = []
    for n in listener.notifies(timeout=timeout):
        if n.channel == "marker":
            return got
        got.append(n)
    raise AssertionError(f"no marker notification within {timeout}s; got {got}")


def test_notify_is_one_empty_doorbell_per_transaction(pair: DbPair, items: int) -> None:
    pair.site().execute("UPDATE dbsync.doorbell SET armed = true")  # as an idle daemon does
    listener = pair.site()
    listener.execute("LISTEN dbsync")
    listener.execute("LISTEN marker")
    writer = pair.site()

    with writer.transaction():
        for i in range(50):
            writer.execute("INSERT INTO public.items VALUES (%s, %s, %s)", (i, f"secret name +49 170 {i:07d}", i))
        writer.execute("UPDATE public.items SET label = 'secret again'")
        writer.execute("DELETE FROM public.items WHERE id < 10")
    writer.execute("NOTIFY marker")
    got = notifications_until_marker(listener)
    assert [(n.channel, n.payload) for n in got] == [("dbsync", "")]
    assert got[0].pid == writer.info.backend_pid

    # Every kind of event rings the same bell, with nothing in it.
    for statement in (
        "INSERT INTO public.items VALUES (100, 'x', 1)",
        "UPDATE public.items SET label = 'y' WHERE id = 100",
        "UPDATE public.items SET id = 101 WHERE id = 100",
        "DELETE FROM public.items WHERE id = 101",
        "TRUNCATE public.items",
    ):
        writer.execute(statement)
        writer.execute("NOTIFY marker")
        got = notifications_until_marker(listener)
        assert [(n.channel, n.payload) for n in got] == [("dbsync", "")], statement


def test_no_doorbell_without_an_event(pair: DbPair, items: int) -> None:
    pair.site().execute("UPDATE dbsync.doorbell SET armed = true")  # as an idle daemon does
    listener = pair.site()
    listener.execute("LISTEN dbsync")
    listener.execute("LISTEN marker")
    writer = pair.site()
    writer.execute("INSERT INTO public.items VALUES (1, 'x', 1)")
    writer.execute("NOTIFY marker")
    assert len(notifications_until_marker(listener)) == 1

    # A rolled-back write, a no-op update and a non-replicated table ring nothing.
    with pytest.raises(psycopg.errors.RaiseException), writer.transaction():
        writer.execute("INSERT INTO public.items VALUES (2, 'x', 1)")
        writer.execute("DO $$ BEGIN RAISE EXCEPTION 'roll back'; END $$")
    writer.execute("UPDATE public.items SET label = 'x'")
    writer.execute("INSERT INTO notifications (user_id, kind) VALUES ('u', 'k')")
    writer.execute("NOTIFY marker")
    assert notifications_until_marker(listener) == []


def test_no_doorbell_while_disarmed(pair: DbPair, items: int) -> None:
    """A busy (or absent) daemon leaves the doorbell disarmed: writers skip NOTIFY and its
    commit-time lock, though their changes are still logged."""
    site = pair.site()
    site.execute("UPDATE dbsync.doorbell SET armed = false")
    listener = pair.site()
    listener.execute("LISTEN dbsync")
    listener.execute("LISTEN marker")
    start = last_seq(site)
    site.execute("INSERT INTO public.items VALUES (1, 'x', 1)")
    site.execute("TRUNCATE public.items")
    site.execute("NOTIFY marker")
    assert notifications_until_marker(listener) == []
    assert [e.op for e in events(site, start)] == ["I", "T"]


# -- privileges ----------------------------------------------------------------------------


def test_public_cannot_read_or_write_the_log(pair: DbPair, plain_role: str) -> None:
    site = pair.site()
    site.execute("INSERT INTO conversations (phone_number, contact_name) VALUES ('+4917012345', 'Private Person')")
    with connect_as(pair, plain_role, autocommit=True) as conn:
        for statement in (
            "SELECT * FROM dbsync.sync_log",
            "SELECT * FROM dbsync.replicated_tables",
            "INSERT INTO dbsync.sync_log (table_id, op) VALUES (1, 'T')",
            "DELETE FROM dbsync.sync_log",
            "SELECT dbsync.add_table('public.notifications'::regclass)",
            "SELECT dbsync.remove_table('public.conversations'::regclass)",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)
    assert site.execute("SELECT count(*) FROM dbsync.sync_log").fetchone()[0] == 1  # type: ignore[index]
    assert table_id(site, "public.conversations")


def test_writer_without_rights_on_the_log_is_still_captured(pair: DbPair, plain_role: str) -> None:
    site = pair.site()
    role = sql.Identifier(plain_role)
    site.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON public.conversations TO {}").format(role))
    site.execute(sql.SQL("GRANT USAGE ON SEQUENCE public.conversations_id_seq TO {}").format(role))
    start = last_seq(site)
    with connect_as(pair, plain_role, autocommit=True) as conn:
        conn.execute("INSERT INTO public.conversations (id, phone_number) VALUES (7, '+1')")
        conn.execute("UPDATE public.conversations SET contact_name = 'Ann' WHERE id = 7")
        conn.execute("INSERT INTO public.conversations (id, phone_number) VALUES (8, '+2')")
        conn.execute("DELETE FROM public.conversations WHERE id = 8")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM dbsync.sync_log")
    assert [(e.op, e.pk) for e in events(site, start)] == [
        ("I", {"id": "7"}),
        ("U", {"id": "7"}),
        ("I", {"id": "8"}),
        ("D", {"id": "8"}),
    ]
    sync_once(pair)
    assert_same(pair)


HOSTILE = """
CREATE SCHEMA evil;
CREATE TABLE evil.calls (what text);
-- Look-alikes of everything the capture function uses, should it resolve names via the caller.
CREATE TABLE evil.sync_log (LIKE dbsync.sync_log);
CREATE TABLE evil.replicated_tables (LIKE dbsync.replicated_tables);
CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE sql
    AS $$ INSERT INTO evil.calls VALUES ('pg_notify ' || $1 || ' ' || $2) $$;
CREATE FUNCTION evil.to_json(anyelement) RETURNS json LANGUAGE sql
    AS $$ INSERT INTO evil.calls VALUES ('to_json'); SELECT '{"id": 666}'::json $$;
CREATE FUNCTION evil.json_build_object(text, json) RETURNS json LANGUAGE sql
    AS $$ INSERT INTO evil.calls VALUES ('json_build_object'); SELECT '{"id": 666}'::json $$;
CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql
    AS $$ INSERT INTO evil.calls VALUES ('clock_timestamp'); SELECT 'epoch'::timestamptz $$;
CREATE FUNCTION evil.pg_current_xact_id() RETURNS xid8 LANGUAGE sql
    AS $$ INSERT INTO evil.calls VALUES ('pg_current_xact_id'); SELECT '1'::xid8 $$;
CREATE FUNCTION evil.text_eq(text, text) RETURNS boolean LANGUAGE sql
    AS $$ INSERT INTO evil.calls VALUES ('='); SELECT true $$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_eq);
CREATE FUNCTION evil.json_get(json, text) RETURNS json LANGUAGE sql
    AS $$ INSERT INTO evil.calls VALUES ('->'); SELECT '666'::json $$;
CREATE OPERATOR evil.-> (LEFTARG = json, RIGHTARG = text, FUNCTION = evil.json_get);
CREATE FUNCTION evil.record_eq(record, record) RETURNS boolean LANGUAGE plpgsql
    AS $$ BEGIN INSERT INTO evil.calls VALUES ('*='); RETURN true; END $$;
CREATE OPERATOR evil.*= (LEFTARG = record, RIGHTARG = record, FUNCTION = evil.record_eq);
"""


def test_hostile_search_path_cannot_change_what_is_logged(pair: DbPair, plain_role: str) -> None:
    """A writer cannot shadow what the capture function calls: it runs with a fixed search_path
    and schema-qualified names. (The real schema name `dbsync` cannot be taken twice, so the
    look-alike log and registry live in the writer's schema and in pg_temp.)"""
    site = pair.site()
    role = sql.Identifier(plain_role)
    site.execute(HOSTILE)
    site.execute(sql.SQL("GRANT USAGE ON SCHEMA evil TO {}").format(role))
    site.execute(sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA evil TO {}").format(role))
    site.execute(sql.SQL("GRANT ALL ON public.conversations, public.conversations_id_seq TO {}").format(role))
    start = last_seq(site)

    with connect_as(pair, plain_role, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE sync_log (LIKE evil.sync_log)")
        conn.execute("CREATE TEMP TABLE replicated_tables (LIKE evil.replicated_tables)")
        conn.execute("SET search_path = pg_temp, evil, public, pg_catalog")
        # The look-alikes do win for the writer's own unqualified calls...
        conn.execute("SELECT pg_notify('x', 'y')")
        assert conn.execute("SELECT count(*) FROM evil.calls").fetchone()[0] == 1  # type: ignore[index]
        conn.execute("TRUNCATE evil.calls")
        # ...but not inside the trigger.
        conn.execute("INSERT INTO conversations (id, phone_number) VALUES (1, '+1')")
        conn.execute("UPDATE conversations SET contact_name = 'Eve' WHERE id = 1")
        conn.execute("UPDATE conversations SET id = 2 WHERE id = 1")
        conn.execute("UPDATE conversations SET status = status")
        conn.execute("DELETE FROM conversations WHERE id = 2")
        conn.execute("INSERT INTO conversations (id, phone_number) VALUES (3, '+3')")
        assert conn.execute("SELECT count(*) FROM pg_temp.sync_log").fetchone()[0] == 0  # type: ignore[index]
        assert conn.execute("SELECT count(*) FROM pg_temp.replicated_tables").fetchone()[0] == 0  # type: ignore[index]

    assert site.execute("SELECT array_agg(what) FROM evil.calls").fetchone()[0] is None  # type: ignore[index]
    assert site.execute("SELECT count(*) FROM evil.sync_log").fetchone()[0] == 0  # type: ignore[index]
    logged = events(site, start)
    assert [(e.op, e.pk) for e in logged] == [
        ("I", {"id": "1"}),
        ("U", {"id": "1"}),
        ("D", {"id": "1"}),
        ("I", {"id": "2"}),
        ("D", {"id": "2"}),
        ("I", {"id": "3"}),
    ]
    assert all(e.txid != "1" for e in logged)
    sync_once(pair)
    assert_same(pair)


def test_writer_session_settings_do_not_change_images(pair: DbPair) -> None:
    """Output settings of the writer's session (floats rounded, intervals in SQL-standard form,
    another date style, time zone and bytea format) must not leak into the row images."""
    replicate(
        pair,
        "CREATE TABLE public.fmt (id integer PRIMARY KEY, f8 float8, f4 float4, iv interval, "
        "ts timestamp, tstz timestamptz, d date, t timetz, b bytea, n numeric, a float8[])",
        "public.fmt",
    )
    with psycopg.connect(pair.site_dsn, autocommit=True) as writer:
        writer.execute("SET extra_float_digits = 0")
        writer.execute("SET IntervalStyle = sql_standard")
        writer.execute("SET DateStyle = 'SQL, DMY'")
        writer.execute("SET TimeZone = 'Pacific/Chatham'")
        writer.execute("SET bytea_output = 'escape'")
        writer.execute(
            "INSERT INTO public.fmt VALUES "
            "(1, 0.1::float8 + 0.2, 1.1::float4 / 3, interval '-1 year +2 mons -3 days +04:05:06.789', "
            " timestamp '2024-02-29 23:59:59.999999', timestamptz '2024-03-31 01:30:00+00', date '2024-01-02', "
            " timetz '12:34:56.789+05:45', '\\x00ff5c27'::bytea, 1.10, ARRAY[1/3::float8, 2/3::float8]), "
            "(2, 1.7976931348623157e308, 3.4028235e38::float4, interval '-3 days -04:05:06', timestamp '1999-12-31', "
            " timestamptz '1970-01-01 00:00:00.000001+14', date '0001-01-01 BC', timetz '00:00:00-15:59', "
            " '\\x'::bytea, -0.000001, ARRAY[]::float8[]), "
            "(3, 2.2250738585072014e-308, 1.4e-45::float4, interval '1 day -1 microsecond', NULL, NULL, NULL, "
            " NULL, NULL, NULL, NULL)"
        )
        writer.execute("UPDATE public.fmt SET f8 = f8 * 3, iv = iv - interval '1 mon 1 sec' WHERE id IN (1, 3)")
    sync_once(pair)
    assert_same(pair, ["public.fmt"])


def test_key_text_does_not_depend_on_the_writers_settings(pair: DbPair) -> None:
    """A key whose text output depends on session settings (a timestamptz, a float) is logged in
    the pinned form whatever the writer has set, so one row always has one key."""
    replicate(pair, "CREATE TABLE public.tkey (at timestamptz, x float8, v text, PRIMARY KEY (at, x))", "public.tkey")
    site = pair.site()
    start = last_seq(site)
    with psycopg.connect(pair.site_dsn, autocommit=True) as writer:
        writer.execute("SET TimeZone = 'Pacific/Chatham'")
        writer.execute("SET DateStyle = 'SQL, DMY'")
        writer.execute("SET extra_float_digits = 0")
        writer.execute("INSERT INTO public.tkey VALUES ('2024-03-31 01:30:00+00', 0.1::float8 + 0.2, 'a')")
        writer.execute("UPDATE public.tkey SET v = 'b'")
    logged = events(site, start)
    key = {"at": "2024-03-31 01:30:00+00", "x": "0.30000000000000004"}
    assert [(e.op, e.pk) for e in logged] == [("I", key), ("U", key)]
    sync_once(pair)
    assert_same(pair, ["public.tkey"])


def test_plain_tables_capture_per_statement_and_partitioned_trees_per_row(pair: DbPair) -> None:
    """Statement triggers with transition tables where they see every change; a row trigger on a
    partitioned table, which PostgreSQL clones to every partition."""
    replicate(
        pair,
        "CREATE TABLE public.tree (id integer PRIMARY KEY, v text) PARTITION BY RANGE (id); "
        "CREATE TABLE public.tree_1 PARTITION OF public.tree FOR VALUES FROM (0) TO (100)",
        "public.tree",
    )
    site = pair.site()
    triggers = dict(
        site.execute(
            "SELECT tgrelid::regclass::text || ' ' || tgname, (tgtype & 1 = 1) FROM pg_trigger "
            "WHERE tgname LIKE 'dbsync_capture%%' AND NOT tgisinternal AND tgrelid IN "
            "('public.conversations'::regclass, 'public.tree'::regclass)"
        ).fetchall()
    )
    assert triggers == {
        "conversations dbsync_capture_insert": False,
        "conversations dbsync_capture_update": False,
        "conversations dbsync_capture_delete": False,
        "conversations dbsync_capture_truncate": False,
        "tree dbsync_capture": True,
        "tree dbsync_capture_truncate": False,
        "tree dbsync_capture_truncate_before": False,
    }
    start = last_seq(site)
    site.execute("INSERT INTO public.tree_1 VALUES (1, 'a'), (2, 'b')")  # the partition, directly
    site.execute("UPDATE public.tree SET v = 'c' WHERE id = 1")
    assert [(e.op, e.pk) for e in events(site, start)] == [("I", {"id": "1"}), ("I", {"id": "2"}), ("U", {"id": "1"})]
    sync_once(pair)
    assert_same(pair, ["public.tree"])


def _log_rows(conn: psycopg.Connection, after: int) -> list[tuple[str, int, str, str]]:
    """(op, keys in the log row, first key, last key) of each log row after `after`."""
    rows = conn.execute(
        "SELECT op::text, cardinality(keys) / coalesce(array_length(keys, 2), 1), keys[1][1], "
        "keys[array_length(keys, 1)][1] FROM dbsync.sync_log WHERE seq > %s ORDER BY seq",
        (after,),
    ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("INSERT INTO public.items (id, label) VALUES (1000, 'a')", [("I", 1, "1000", "1000")]),
        (
            "INSERT INTO public.items (id, label) SELECT g, 'a' FROM generate_series(1000, 1099) g",
            [("I", 100, "1000", "1099")],
        ),
        (
            "INSERT INTO public.items (id, label) SELECT g, 'a' FROM generate_series(1000, 1100) g",
            [("I", 100, "1000", "1099"), ("I", 1, "1100", "1100")],
        ),
        ("INSERT INTO public.items (id, label) SELECT g, 'a' FROM generate_series(1, 0) g", []),
        ("UPDATE public.items SET label = 'b' WHERE id = 3", [("U", 1, "3", "3")]),
        ("UPDATE public.items SET label = label WHERE id = 3", []),
        ("UPDATE public.items SET label = 'b' WHERE id < 0", []),
        ("UPDATE public.items SET label = 'b' WHERE id BETWEEN 1 AND 100", [("U", 100, "1", "100")]),
        (
            "UPDATE public.items SET label = 'b' WHERE id BETWEEN 1 AND 101",
            [("U", 100, "1", "100"), ("U", 1, "101", "101")],
        ),
        # Rows it left as they were are not logged; the rest are, in one log row.
        (
            "UPDATE public.items SET label = CASE WHEN id % 2 = 0 THEN 'b' ELSE label END WHERE id <= 10",
            [("U", 5, "2", "10")],
        ),
        ("UPDATE public.items SET id = id + 1000 WHERE id = 7", [("D", 1, "7", "7"), ("I", 1, "1007", "1007")]),
        ("UPDATE public.items SET id = id WHERE id = 5", []),  # nothing changed
        ("DELETE FROM public.items WHERE id = 9", [("D", 1, "9", "9")]),
        ("DELETE FROM public.items WHERE id BETWEEN 1 AND 100", [("D", 100, "1", "100")]),
        ("DELETE FROM public.items WHERE id BETWEEN 1 AND 101", [("D", 100, "1", "100"), ("D", 1, "101", "101")]),
    ],
)
def test_statements_of_up_to_100_rows_and_beyond_log_the_same_keys(
    pair: DbPair, items: int, statement: str, expected: list[tuple[str, int, str, str]]
) -> None:
    """Up to 100 rows, a statement takes the one-aggregate path (0012_site_small_statements);
    beyond, or when an UPDATE changes a key, the general one: 100 keys to a log row either way,
    in the statement's row order, unchanged rows left out."""
    site = pair.site()
    site.execute("INSERT INTO public.items (id, label, qty) SELECT g, 'a', g FROM generate_series(1, 200) g")
    after = last_seq(site)
    site.execute(statement)
    got = _log_rows(site, after)
    if len({op for op, *_ in expected}) > 1:
        assert got == expected  # a changed key: its delete before its insert
    else:
        assert sorted(got) == sorted(expected)  # the chunks of one statement come in any order


def test_a_key_changed_to_an_equal_value_is_an_update_on_both_paths(pair: DbPair) -> None:
    """1.0 and 1.00 are one numeric key: the row is updated (its key's text with it), not deleted
    and inserted, whether the statement is small (one aggregate) or large (the general path)."""
    replicate(pair, "CREATE TABLE public.amounts (k numeric PRIMARY KEY, note text)", "public.amounts")
    site = pair.site()
    site.execute("INSERT INTO public.amounts SELECT g::numeric(10, 1), 'n' FROM generate_series(1, 150) g")
    after = last_seq(site)
    site.execute("UPDATE public.amounts SET k = k::numeric(10, 2) WHERE k = 1")
    assert _log_rows(site, after) == [("U", 1, "1.00", "1.00")]
    after = last_seq(site)
    site.execute("UPDATE public.amounts SET k = k::numeric(10, 2) WHERE k BETWEEN 2 AND 150")
    assert sorted(_log_rows(site, after)) == [("U", 49, "102.00", "150.00"), ("U", 100, "2.00", "101.00")]
