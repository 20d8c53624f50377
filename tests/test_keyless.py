"""Tables without a primary key (issue 13): an identity index stands in for the key
(`tables add --identity INDEX`), or an append-only table is replicated insert-only
(`tables add --insert-only`), its rows carried as images and applied exactly once."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from dbsync.daemon.apply import Replay
from dbsync.daemon.consume import ApplyProgress, Event
from dbsync.protocol import visible_in
from dbsync.schema import Column, TableDef, create_table_sql
from tests.helpers import Daemon, DbPair, assert_same, count, dbsync_cmd, sync_once, wait_until
from tests.proxy import Proxy
from tests.test_tables import error_line

IDENTITY_DDL = """
CREATE TABLE public.contacts (tenant integer NOT NULL, email text NOT NULL, name text, n integer);
CREATE UNIQUE INDEX contacts_identity ON public.contacts (email, tenant);
"""
EVENTS_DDL = "CREATE TABLE public.events (at timestamptz NOT NULL DEFAULT now(), kind text, amount numeric)"


def both(pair: DbPair, ddl: str) -> None:
    pair.site().execute(ddl)
    pair.agent().execute(ddl)


def add(pair: DbPair, *args: str) -> subprocess.CompletedProcess[str]:
    return dbsync_cmd("tables", "add", *args, env=pair.env())


def test_a_table_without_a_key_is_refused_naming_both_options(pair: DbPair) -> None:
    both(pair, EVENTS_DDL)
    line = error_line(add(pair, "events"))
    assert "public.events has no primary key" in line, line
    assert "--identity INDEX" in line and "--insert-only" in line, line


@pytest.mark.parametrize(
    ("setup", "index", "reason"),
    [
        pytest.param("CREATE INDEX i ON public.t (a)", "i", "index public.i is not unique", id="not-unique"),
        pytest.param(
            "CREATE UNIQUE INDEX i ON public.t (a) WHERE a > 0", "i", "index public.i is partial", id="partial"
        ),
        pytest.param(
            "CREATE UNIQUE INDEX i ON public.t (lower(b))", "i", "index public.i has expressions", id="expression"
        ),
        pytest.param(
            "CREATE UNIQUE INDEX i ON public.t (a, c)", "i", "column c of index public.i is nullable", id="nullable"
        ),
        pytest.param(
            "CREATE TABLE public.other (a integer NOT NULL); CREATE UNIQUE INDEX i ON public.other (a)",
            "i",
            "index public.i is on table public.other, not on public.t",
            id="other-table",
        ),
        pytest.param(
            "INSERT INTO public.t VALUES (1, 'x', 1), (1, 'y', 2)",
            "i",
            "index public.i is not valid",
            id="invalid",
        ),
        pytest.param("", "nothere", "index 'nothere' does not exist on the Site DB", id="missing"),
    ],
)
def test_identity_refuses_an_index_that_cannot_be_a_key(pair: DbPair, setup: str, index: str, reason: str) -> None:
    both(pair, "CREATE TABLE public.t (a integer NOT NULL, b text NOT NULL, c integer)")
    site = pair.site()
    if reason.endswith("is not valid"):
        site.execute(setup)
        with pytest.raises(psycopg.errors.UniqueViolation):  # leaves the index behind, invalid
            site.execute("CREATE UNIQUE INDEX CONCURRENTLY i ON public.t (a)")
    elif setup:
        site.execute(setup)
    line = error_line(add(pair, "--identity", index, "t"))
    assert reason in line, line
    assert site.execute("SELECT count(*) FROM dbsync.replicated_tables WHERE table_name = 't'").fetchone() == (0,)


def test_identity_needs_a_matching_unique_index_on_the_agent(pair: DbPair) -> None:
    pair.site().execute(IDENTITY_DDL)
    pair.agent().execute(IDENTITY_DDL.split(";")[0])
    line = error_line(add(pair, "--identity", "contacts_identity", "contacts"))
    assert "the Agent DB has no primary key or unique index on (email, tenant)" in line, line
    pair.agent().execute("CREATE UNIQUE INDEX ON public.contacts (tenant, email)")  # any order serves ON CONFLICT
    proc = add(pair, "--identity", "contacts_identity", "contacts")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "replicating public.contacts (identity: public.contacts_identity, key: email, tenant)"


def test_identity_table_through_insert_update_delete_and_key_change(pair: DbPair) -> None:
    both(pair, IDENTITY_DDL)
    site = pair.site()
    site.execute(
        "INSERT INTO public.contacts SELECT g % 3, 'u' || g || '@x', 'n' || g, g FROM generate_series(1, 50) g"
    )
    proc = add(pair, "--backfill", "--identity", "contacts_identity", "contacts")
    assert proc.returncode == 0, proc.stderr
    sync_once(pair)
    assert_same(pair, ["public.contacts"])

    site.execute("INSERT INTO public.contacts VALUES (7, 'new@x', 'new', 0)")
    site.execute("UPDATE public.contacts SET name = 'renamed' WHERE n < 10")
    site.execute("UPDATE public.contacts SET email = 'moved' || n || '@x' WHERE n BETWEEN 10 AND 20")  # key change
    site.execute("UPDATE public.contacts SET tenant = tenant + 10 WHERE n = 30")  # the other key column
    site.execute("DELETE FROM public.contacts WHERE n > 40")
    # Two rows swap their keys in one statement.
    site.execute(
        "UPDATE public.contacts SET email = CASE email WHEN 'u21@x' THEN 'u22@x' ELSE 'u21@x' END "
        "WHERE email IN ('u21@x', 'u22@x') AND tenant = 0"
    )
    sync_once(pair)
    assert_same(pair, ["public.contacts"])
    assert count(pair.agent_dsn, "public.contacts") == 41

    listing = json.loads(dbsync_cmd("tables", "list", "--json", env=pair.env()).stdout)
    entry = next(t for t in listing if t["table"] == "public.contacts")
    assert entry["mode"] == "identity" and entry["identity"] == "public.contacts_identity", entry
    assert entry["key"] == ["email", "tenant"], entry
    human = dbsync_cmd("tables", "list", env=pair.env()).stdout.splitlines()
    assert "public.contacts\tidentity: public.contacts_identity, key: email, tenant" in human, human

    site.execute("TRUNCATE public.contacts")
    sync_once(pair)
    assert count(pair.agent_dsn, "public.contacts") == 0


def test_insert_only_table_captures_and_applies_every_row(pair: DbPair) -> None:
    both(pair, EVENTS_DDL)
    site = pair.site()
    site.execute("INSERT INTO public.events VALUES ('2026-01-01', 'before', 1.50), ('2026-01-01', 'before', 1.50)")
    proc = add(pair, "--insert-only", "--backfill", "events")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == [
        "replicating public.events (insert-only)",
        "public.events: backfill complete: 2 rows",
    ]
    # Identical rows are rows: each arrives, as often as it was inserted.
    site.execute("INSERT INTO public.events (kind, amount) SELECT 'bulk', g % 3 FROM generate_series(1, 2500) g")
    site.execute("INSERT INTO public.events VALUES ('2026-01-01', 'before', 1.50)")
    site.execute("INSERT INTO public.events VALUES ('2026-02-01', NULL, 'NaN')")
    sync_once(pair, batch_size=400)
    assert_same(pair, ["public.events"])
    assert count(pair.agent_dsn, "public.events") == 2504

    listing = json.loads(dbsync_cmd("tables", "list", "--json", env=pair.env()).stdout)
    entry = next(t for t in listing if t["table"] == "public.events")
    assert entry["mode"] == "insert-only" and entry["key"] == [] and entry["identity"] is None, entry
    assert "public.events\tinsert-only" in dbsync_cmd("tables", "list", env=pair.env()).stdout.splitlines()

    # A later backfill would duplicate rows: refused.
    again = dbsync_cmd("backfill", "events", env=pair.env())
    assert again.returncode != 0 and "Traceback" not in again.stderr, again.stderr
    assert "is replicated insert-only" in again.stderr, again.stderr


@pytest.mark.parametrize(
    ("statement", "op"),
    [
        ("UPDATE public.events SET kind = 'changed'", "UPDATE"),
        ("UPDATE public.events SET kind = 'changed' WHERE false", "UPDATE"),
        ("DELETE FROM public.events WHERE kind = 'a'", "DELETE"),
        ("TRUNCATE public.events", "TRUNCATE"),
    ],
)
def test_insert_only_table_refuses_update_delete_truncate_at_the_site(pair: DbPair, statement: str, op: str) -> None:
    both(pair, EVENTS_DDL)
    assert add(pair, "--insert-only", "events").returncode == 0
    site = pair.site()
    site.execute("INSERT INTO public.events (kind) VALUES ('a'), ('b')")
    with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
        site.execute(statement)
    first = str(refused.value).splitlines()[0]
    assert first == f"dbsync: table public.events is replicated insert-only: {op} is refused", first
    sync_once(pair)
    assert_same(pair, ["public.events"])
    # Once it is no longer replicated, the table is the user's again.
    assert dbsync_cmd("tables", "remove", "events", env=pair.env()).returncode == 0
    site.execute(statement)


def test_insert_only_refuses_a_partitioned_table(pair: DbPair) -> None:
    both(
        pair,
        "CREATE TABLE public.p (a integer) PARTITION BY RANGE (a); "
        "CREATE TABLE public.p1 PARTITION OF public.p FOR VALUES FROM (0) TO (10)",
    )
    line = error_line(add(pair, "--insert-only", "p"))
    assert "insert-only replication takes plain tables only" in line, line


def test_insert_only_and_identity_exclude_each_other(pair: DbPair) -> None:
    both(pair, IDENTITY_DDL)
    line = error_line(add(pair, "--insert-only", "--identity", "contacts_identity", "contacts"))
    assert "--identity and --insert-only exclude each other" in line, line


def daemon(pair: DbPair, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "dbsync", "run"],
            env={**pair.env(), "DBSYNC_BATCH_SIZE": "100"},
            stdout=subprocess.DEVNULL,
            stderr=out,
        )


def progressed(pair: DbPair, rows: int) -> Callable[[], bool]:
    return lambda: count(pair.agent_dsn, "public.events") >= rows


def test_insert_only_rows_are_applied_exactly_once_across_daemon_kills(pair: DbPair, tmp_path: Path) -> None:
    """One Site transaction of 30,000 rows is a batch of 300 pages. The daemon is SIGKILLed three
    times while it applies it; each new daemon opens the batch again from `prev` and must not
    insert again a row a page already committed (the progress guard), nor lose one."""
    both(pair, EVENTS_DDL)
    assert add(pair, "--insert-only", "events").returncode == 0
    site = pair.site()
    total = 30_000
    site.execute(
        "INSERT INTO public.events (kind, amount) SELECT 'k' || (g %% 7), g %% 5 FROM generate_series(1, %s) g",
        (total,),
    )
    agent = pair.agent()
    mid_batch = 0
    for _ in range(3):
        proc = daemon(pair, tmp_path / "daemon.log")
        try:
            wait_until(
                progressed(pair, count(pair.agent_dsn, "public.events") + 500),
                60,
                interval=0.005,
                what="the daemon to apply some pages",
            )
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        stored = agent.execute("SELECT batch_snapshot IS NOT NULL FROM dbsync.apply_progress").fetchone()
        mid_batch += bool(stored and stored[0])
        assert count(pair.agent_dsn, "public.events") <= total
    assert mid_batch >= 1, "no kill landed inside the batch: the test proved nothing"
    proc = daemon(pair, tmp_path / "daemon.log")
    try:
        wait_until(lambda: count(pair.agent_dsn, "public.events") >= total, 120, what="the daemon to catch up")
        wait_until(
            lambda: agent.execute("SELECT batch_snapshot IS NULL FROM dbsync.apply_progress").fetchone()[0],  # type: ignore[index]
            30,
            what="the batch to close",
        )
    finally:
        proc.terminate()
        proc.wait(30)
    assert count(pair.agent_dsn, "public.events") == total
    assert_same(pair, ["public.events"])


def reconcile(pair: DbPair, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = dbsync_cmd("reconcile", "--deep", "--json", "--apply", *args, env=pair.env())
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


def drift(pair: DbPair, *statements: str) -> None:
    """Change the Agent DB behind dbsync's back."""
    agent = pair.agent()
    for statement in statements:
        agent.execute(statement)


def test_reconcile_and_repair_an_identity_table(pair: DbPair) -> None:
    both(pair, IDENTITY_DDL)
    pair.site().execute("INSERT INTO public.contacts SELECT 1, 'u' || g || '@x', 'n', g FROM generate_series(1, 300) g")
    assert add(pair, "--backfill", "--identity", "contacts_identity", "contacts").returncode == 0
    sync_once(pair)
    drift(
        pair,
        "DELETE FROM public.contacts WHERE n = 5",
        "UPDATE public.contacts SET name = 'drift' WHERE n = 9",
        "INSERT INTO public.contacts VALUES (2, 'stray@x', 'x', 0)",
    )
    code, report, err = reconcile(pair, "--table", "contacts")
    assert code == 1, err
    entry = report["tables"]["public.contacts"]
    assert entry["missing_keys"] == [{"email": "u5@x", "tenant": "1"}], entry
    assert entry["changed_keys"] == [{"email": "u9@x", "tenant": "1"}], entry
    assert entry["extra_keys"] == [{"email": "stray@x", "tenant": "2"}], entry
    code, report, err = reconcile(pair, "--repair", "--table", "contacts")
    assert code == 0, err
    assert_same(pair, ["public.contacts"])


def test_reconcile_compares_an_insert_only_table_as_a_multiset(pair: DbPair) -> None:
    both(pair, EVENTS_DDL)
    site = pair.site()
    site.execute("INSERT INTO public.events SELECT '2026-01-01', 'k' || (g % 4), g % 3 FROM generate_series(1, 3000) g")
    assert add(pair, "--insert-only", "--backfill", "events").returncode == 0
    sync_once(pair)
    code, report, err = reconcile(pair, "--table", "events")
    assert code == 0 and report["tables"]["public.events"]["in_sync"], (report, err)
    assert report["tables"]["public.events"]["site_rows"] == 3000

    # One of the 250 copies of a row lost, one copy too many of another, and a row the Site never had.
    drift(
        pair,
        "DELETE FROM public.events WHERE ctid = (SELECT min(ctid) FROM public.events WHERE kind = 'k1' AND amount = 1)",
        "INSERT INTO public.events VALUES ('2026-01-01', 'k2', 2)",
        "INSERT INTO public.events VALUES ('2030-01-01', 'never', 0)",
    )
    # Rows logged and not yet applied when it starts are not differences.
    site.execute("INSERT INTO public.events (kind) SELECT 'late' FROM generate_series(1, 500)")
    code, report, err = reconcile(pair, "--table", "events")
    assert code == 1, err
    entry = report["tables"]["public.events"]
    assert (entry["missing"], entry["extra"], entry["changed"], entry["unsettled"]) == (1, 2, 0, 0), entry
    assert [k["copies"] for k in entry["missing_keys"]] == [1], entry
    assert sorted(k["copies"] for k in entry["extra_keys"]) == [1, 1], entry

    code, report, err = reconcile(pair, "--repair", "--table", "events")
    assert code == 1, err
    assert "--repair cannot fix it" in err and "tables add --insert-only --backfill" in err, err
    assert report["tables"]["public.events"]["repair"]["upserts_logged"] == 0


def schema_diff(pair: DbPair, *args: str) -> tuple[int, dict[str, Any]]:
    proc = dbsync_cmd("schema", "diff", "--json", *args, env=pair.env())
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_schema_diff_understands_identity_and_insert_only_tables(pair: DbPair) -> None:
    both(pair, IDENTITY_DDL)
    both(pair, EVENTS_DDL)
    assert add(pair, "--identity", "contacts_identity", "contacts").returncode == 0
    assert add(pair, "--insert-only", "events").returncode == 0
    code, report = schema_diff(pair)
    assert code == 0 and report["in_sync"], report  # neither has a primary key: nothing to say about one

    agent = pair.agent()
    agent.execute("DROP INDEX public.contacts_identity")
    pair.site().execute("ALTER TABLE public.events ADD COLUMN note text")
    code, report = schema_diff(pair)
    assert code == 1, report
    [key] = report["tables"]["public.contacts"]
    assert key["kind"] == "key" and "identity (email, tenant)" in key["note"], key
    assert key["statement"] == 'CREATE UNIQUE INDEX ON "public"."contacts" ("email", "tenant");', key
    [column] = report["tables"]["public.events"]
    assert (column["kind"], column["column"]) == ("missing_column", "note"), column

    code, report = schema_diff(pair, "--apply")  # adds the column; the index is the DBA's to build
    assert code == 1 and [c["kind"] for c in report["tables"]["public.contacts"]] == ["key"], report
    agent.execute(key["statement"])
    assert schema_diff(pair)[0] == 0

    pair.site().execute("DROP INDEX public.contacts_identity")
    code, report = schema_diff(pair)
    assert code == 1 and report["tables"]["public.contacts"][0]["kind"] == "registered_key", report

    # A table missing on the Agent DB is created with its identity as a unique constraint.
    table = TableDef("public", "t", (Column("a", "integer", not_null=True),))
    assert 'UNIQUE ("a")' in create_table_sql(table, ["a"])


@pytest.mark.unit
def test_visible_in_follows_pg_visible_in_snapshot() -> None:
    snap = "100:110:102,105"
    assert visible_in("99", snap) and visible_in("101", snap) and visible_in("109", snap)
    assert not visible_in("102", snap) and not visible_in("105", snap)
    assert not visible_in("110", snap) and not visible_in("200", snap)
    assert visible_in("5", "10:10:") and not visible_in("10", "10:10:")


@pytest.mark.unit
def test_replay_leaves_out_only_rows_the_interrupted_batch_applied() -> None:
    """The interrupted batch (snapshot 100:110:105, cursor 50) was reopened at 100:130:."""
    replay = Replay("100:110:105", 90, 50, "100:130:")
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def row(seq: int, txid: int) -> Event:
        return Event(seq, 1, "I", None, at, '{"a":"1"}', 0, str(txid))

    assert replay.applied(row(40, 101))
    assert not replay.applied(row(40, 105))  # running at the old snapshot: not in that batch
    assert not replay.applied(row(51, 101))  # past the old cursor
    assert not replay.applied(row(45, 120))  # committed after the old snapshot
    assert not replay.applied(Event(40, 1, "U", '{"id":"1"}', at, None, 1, "101"))  # a keyed event: applied again
    # The stored progress stays the interrupted batch's until the new cursor passes the old one.
    assert replay.covers(ApplyProgress("1:1:", "100:130:", 200, 49)) is True
    assert replay.covers(ApplyProgress("1:1:", "100:130:", 200, 50)) is False
    assert replay.covers(ApplyProgress("100:130:")) is False


@pytest.mark.parametrize("small_batches", [False, True], ids=["transaction-read", "one-statement-read"])
def test_insert_only_and_keyed_rows_in_one_page(
    pair: DbPair, monkeypatch: pytest.MonkeyPatch, small_batches: bool
) -> None:
    """Both ways a batch is read (runner.SMALL_BATCHES): an insert-only table's rows come from the
    log, a keyed table's from read_rows, in the same page, and the one-statement apply writes both."""
    from dbsync.daemon import runner

    monkeypatch.setattr(runner, "SMALL_BATCHES", small_batches)
    both(pair, EVENTS_DDL)
    assert add(pair, "--insert-only", "events").returncode == 0
    site = pair.site()
    for n in range(5):
        with site.transaction():
            site.execute("INSERT INTO public.events (kind, amount) VALUES ('tx', %s), ('tx', %s)", (n, n))
            site.execute("INSERT INTO public.conversations (phone_number) VALUES (%s)", (f"+49{n}",))
            site.execute("UPDATE public.conversations SET contact_name = 'c' WHERE phone_number = %s", (f"+49{n}",))
    replicator = sync_once(pair)
    assert replicator.stats.whole == (1 if small_batches else 0)
    assert_same(pair, ["public.events", "public.conversations"])
    assert count(pair.agent_dsn, "public.events") == 10


def test_an_insert_only_row_the_agent_rejects_is_parked_alone_and_retried(pair: DbPair) -> None:
    both(pair, EVENTS_DDL)
    pair.agent().execute("ALTER TABLE public.events ADD CONSTRAINT small CHECK (amount < 100)")
    assert add(pair, "--insert-only", "events").returncode == 0
    pair.site().execute("INSERT INTO public.events (kind, amount) VALUES ('a', 1), ('big', 500), ('a', 1), ('b', 2)")
    sync_once(pair, poison_policy="park")
    # The rejected row is parked; identical and later rows are not held back behind it (rows have no order).
    assert count(pair.agent_dsn, "public.events") == 3
    parked = pair.agent().execute("SELECT op, pk, row_image->>'kind' FROM dbsync.parked_events").fetchall()
    assert parked == [("I", None, "big")], parked

    pair.agent().execute("ALTER TABLE public.events DROP CONSTRAINT small")
    asked = dbsync_cmd("retry", "--wait", "0", env=pair.env())
    assert asked.returncode == 0, asked.stderr
    sync_once(pair, poison_policy="park")
    assert_same(pair, ["public.events"])
    assert pair.agent().execute("SELECT count(*) FROM dbsync.parked_events").fetchone() == (0,)


def test_the_ranged_full_verification_leaves_an_insert_only_table_to_reconcile(pair: DbPair) -> None:
    from dbsync.catchup import CatchUp
    from dbsync.db import connect
    from dbsync.reconcile import Comparer, ReconcileError, check_keys, check_range, targets

    both(pair, EVENTS_DDL)
    assert add(pair, "--insert-only", "events").returncode == 0
    pair.site().execute("INSERT INTO public.events (kind) VALUES ('a'), ('a')")
    sync_once(pair)
    with connect(pair.site_dsn, "Site") as site, connect(pair.agent_dsn, "Agent") as agent:
        comparer = Comparer(site, agent)
        try:
            [target] = targets(site, agent, ["events"])
            catchup = CatchUp(site, agent, pair.settings(), timeout=10)
            checked = check_range(comparer, catchup, target, None, 100)
            assert (checked.upto, checked.rows, checked.diff.differs) == (None, 0, False)
            with pytest.raises(ReconcileError, match="insert-only"):
                check_keys(comparer, catchup, target, ['{"a": "1"}'])
        finally:
            comparer.close()


def daemon_busy(agent: psycopg.Connection) -> bool:
    """Whether a statement of the daemon's is running on the Agent DB, or a transaction is open."""
    row = agent.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'dbsync%%' "
        "AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction')"
    ).fetchone()
    return bool(row and row[0])


def test_insert_only_rows_are_applied_exactly_once_when_the_agents_answer_is_lost(
    pair: DbPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Agent link stalls while the daemon writes a page; once the Agent has finished the
    statement (committed, its answer held in the proxy), the link is cut: the daemon does not
    know whether its page landed, reconnects, opens the batch again and must not insert twice."""
    both(pair, EVENTS_DDL)
    assert add(pair, "--insert-only", "events").returncode == 0
    total = 20_000
    pair.site().execute(
        "INSERT INTO public.events (kind, amount) SELECT 'k' || (g %% 7), g %% 5 FROM generate_series(1, %s) g",
        (total,),
    )
    monkeypatch.setenv("DBSYNC_BATCH_SIZE", "100")
    agent = pair.agent()
    target = conninfo_to_dict(pair.agent_dsn)
    with Proxy(str(target["host"]), int(str(target["port"]))) as proxy:
        routed = dataclasses.replace(pair, agent_dsn=proxy.route(pair.agent_dsn), _conns=[])
        with Daemon(routed, log_path=tmp_path / "daemon.log"):
            for _ in range(3):
                wait_until(
                    progressed(pair, count(pair.agent_dsn, "public.events") + 300),
                    60,
                    interval=0.005,
                    what="the daemon to apply some pages",
                )
                proxy.stall()
                wait_until(lambda: not daemon_busy(agent), 10, interval=0.005, what="the Agent to finish the statement")
                proxy.cut()
                proxy.resume()
            wait_until(progressed(pair, total), 120, what="the daemon to catch up")
            wait_until(
                lambda: agent.execute("SELECT batch_snapshot IS NULL FROM dbsync.apply_progress").fetchone()[0],  # type: ignore[index]
                30,
                what="the batch to close",
            )
        assert proxy.accepted > 1  # the daemon reconnected
    assert count(pair.agent_dsn, "public.events") == total
    assert_same(pair, ["public.events"])


def test_identity_of_a_partitioned_table(pair: DbPair) -> None:
    """A unique index of a partitioned table (it holds the partition key) serves as its identity:
    rows moving between partitions, and TRUNCATE of one partition, reach the Agent."""
    ddl = (
        "CREATE TABLE public.readings (region text NOT NULL, sensor integer NOT NULL, v numeric) "
        "PARTITION BY LIST (region); "
        "CREATE TABLE public.readings_n PARTITION OF public.readings FOR VALUES IN ('n'); "
        "CREATE TABLE public.readings_s PARTITION OF public.readings FOR VALUES IN ('s'); "
        "CREATE UNIQUE INDEX readings_identity ON public.readings (sensor, region)"
    )
    both(pair, ddl)
    site = pair.site()
    site.execute(
        "INSERT INTO public.readings SELECT CASE WHEN g % 2 = 0 THEN 'n' ELSE 's' END, g, g "
        "FROM generate_series(1, 40) g"
    )
    proc = add(pair, "--backfill", "--identity", "readings_identity", "readings")
    assert proc.returncode == 0, proc.stderr
    site.execute("UPDATE public.readings SET region = 's' WHERE sensor = 2")  # moves partition
    site.execute("UPDATE public.readings SET v = -1 WHERE sensor < 10")
    site.execute("DELETE FROM public.readings WHERE sensor = 3")
    site.execute("TRUNCATE public.readings_n")
    sync_once(pair)
    assert_same(pair, ["public.readings"])
    assert count(pair.agent_dsn, "public.readings") == 20
