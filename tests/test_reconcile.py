"""`dbsync reconcile`: exact drift reports, repair through the sync log, no false alarms in flight."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from dbsync.catchup import CatchUp
from dbsync.reconcile import Comparer, TableDiff, check_keys, deep_check, moving_keys, recheck, targets
from tests.helpers import (
    LOGGED_KEYS,
    Daemon,
    DbPair,
    assert_same,
    dbsync_cmd,
    same,
    sync_once,
    wait_until,
)


def reconcile(pair: DbPair, *args: str) -> tuple[int, Any, str]:
    proc = dbsync_cmd("reconcile", *args, env=pair.env())
    out: Any = proc.stdout
    if "--json" in args and proc.stdout.strip():
        out = json.loads(proc.stdout)
    return proc.returncode, out, proc.stderr


def seed_whatsapp(pair: DbPair, conversations: int = 50) -> None:
    site = pair.site()
    site.execute(
        "INSERT INTO conversations (phone_number, contact_name) "
        "SELECT '+49151' || g, 'Contact ' || g FROM generate_series(1, %s) g",
        (conversations,),
    )
    site.execute(
        "INSERT INTO leads (phone_number, name, conversation_id, attributes) "
        "SELECT '+49151' || g, 'Lead ' || g, g, jsonb_build_object('n', g) FROM generate_series(1, %s) g",
        (conversations // 2,),
    )
    site.execute(
        "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction, content) "
        "SELECT 'wamid.' || g, 1 + g %% %s, '+49151' || (1 + g %% %s), 'inbound', 'hello ' || g "
        "FROM generate_series(1, %s) g",
        (conversations, conversations, conversations * 2),
    )


def ids(keys: list[dict[str, Any]]) -> list[int]:
    """Key values are reported as their text output, as the sync log holds them."""
    return sorted(int(k["id"]) for k in keys)


def test_deep_check_finds_exact_drift_and_repair_fixes_it(pair: DbPair) -> None:
    seed_whatsapp(pair)
    sync_once(pair)
    agent = pair.agent()
    agent.execute("DELETE FROM conversations WHERE id IN (3, 7)")
    agent.execute(
        "INSERT INTO conversations (id, phone_number, created_at, updated_at) "
        "VALUES (1000, '+1', now(), now()), (1001, '+2', now(), now())"
    )
    agent.execute("UPDATE conversations SET contact_name = NULL WHERE id = 10")
    agent.execute('UPDATE leads SET attributes = \'{"n": 5, "x": 1}\' WHERE id = 5')
    agent.execute("UPDATE whatsapp_messages SET status = 'read' WHERE id = 20")

    code, report, err = reconcile(pair, "--deep", "--json")
    assert code == 1, err
    assert isinstance(report, dict), (report, err)
    conv = report["tables"]["public.conversations"]
    assert (conv["missing"], conv["extra"], conv["changed"], conv["unsettled"]) == (2, 2, 1, 0)
    assert ids(conv["missing_keys"]) == [3, 7]
    assert ids(conv["extra_keys"]) == [1000, 1001]
    assert ids(conv["changed_keys"]) == [10]
    leads = report["tables"]["public.leads"]
    assert (leads["missing"], leads["extra"], leads["changed"]) == (0, 0, 1)
    assert leads["changed_keys"] == [{"id": "5"}]
    msgs = report["tables"]["public.whatsapp_messages"]
    assert (msgs["missing"], msgs["extra"], msgs["changed"]) == (0, 0, 1)
    assert report["in_sync"] is False

    code, report, err = reconcile(pair, "--deep", "--repair", "--apply", "--json")
    assert code == 0, err
    repaired = report["tables"]["public.conversations"]["repair"]
    assert (repaired["upserts_logged"], repaired["deletes_logged"]) == (3, 2)
    assert report["in_sync"] is True
    assert_same(pair)
    code, out, err = reconcile(pair, "--deep")
    assert code == 0, err
    assert out.strip().endswith("in sync")


TYPES_DDL = """
CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN public.posint AS integer CHECK (VALUE > 0);
CREATE TYPE public.pair_t AS (a integer, b text);
CREATE TABLE public.every_type (
    id integer PRIMARY KEY,
    i2 smallint, i8 bigint, num numeric(12, 3), num_free numeric, f4 real, f8 double precision,
    t text, vc varchar(20), ch char(5), b boolean, d date, ts timestamp, tstz timestamptz,
    tm time, tmtz timetz, iv interval, u uuid, by bytea, js json, jb jsonb,
    ia integer[], ta text[], mood public.mood, moods public.mood[], dom public.posint, comp public.pair_t,
    ir int4range, tr tstzrange, ip inet, mac macaddr, bits bit varying(16), pt point, tsv tsvector,
    cash money,
    gen integer GENERATED ALWAYS AS (i2 * 2) STORED
);
"""

# Every row starts identical on both sides; PLANTED[id] then changes one value on the Agent DB
# to another value whose text differs, often while comparing equal (1.10 = 1.1, '1 day' = '24 hours').
PLANTED = {
    1: "f8 = 0.10000000000000002",
    2: "f8 = '-0'",
    3: "f8 = 'Infinity'",
    4: "f4 = 1.5000001",
    5: "num_free = 1.1",
    6: "t = ''",
    7: "t = 'NULL'",
    8: "t = NULL",
    9: "ta = '{a,\"NULL\"}'",
    10: "jb = '{\"a\": 1.0}'",
    11: "js = '{\"a\":1}'",
    12: "by = '\\x00fe'",
    13: "tstz = tstz + interval '1 microsecond'",
    14: "iv = '24 hours'",
    15: "ia = '{2,1}'",
    16: "moods = '{ok,sad}'",
    17: "comp = ROW(1, '')::public.pair_t",
    18: "tr = tstzrange('2024-01-01', '2024-02-01', '[]')",
    19: "ch = 'abc'",
    20: "cash = 1.01",
    21: "ts = ts + interval '1 microsecond'",
    22: "u = '00000000-0000-0000-0000-000000000001'",
    23: "ip = '10.0.0.2'",
    24: "dom = 6",
    27: "tmtz = '11:00:00+00'",
    28: "bits = B'1010'",
    29: "d = d + 1",
    30: "ta = '{}'",
    31: "i2 = 8",  # the generated column follows on the Agent DB: two values change
    32: "num = 1.101",
}

ROW_VALUES = """
INSERT INTO public.every_type (id, i2, i8, num, num_free, f4, f8, t, vc, ch, b, d, ts, tstz, tm, tmtz, iv, u, by,
    js, jb, ia, ta, mood, moods, dom, comp, ir, tr, ip, mac, bits, pt, tsv, cash)
SELECT g, 7, 9007199254740993, 1.1, 1.10, 1.5, CASE g WHEN 3 THEN 'NaN'::float8 WHEN 2 THEN 0 ELSE 0.1 END,
    CASE g WHEN 6 THEN NULL WHEN 7 THEN '' WHEN 8 THEN 'NULL' ELSE 'text, "quoted" (' || g || ')' END,
    'vc', 'ab', g % 2 = 0, date '2024-02-29', timestamp '2024-01-01 00:00',
    timestamptz '2024-01-01 12:34:56.789012+02', time '23:59:59.999999', timetz '12:00:00+01',
    interval '1 day', gen_random_uuid(), '\\x00ff'::bytea, '{"a": 1}', '{"a": 1}',
    '{1,2}', CASE g WHEN 30 THEN NULL ELSE '{a,NULL}'::text[] END, 'ok', '{sad,ok}', 5, ROW(1, 'x')::public.pair_t,
    int4range(1, 10), tstzrange('2024-01-01', '2024-02-01'), '10.0.0.1', '08:00:2b:01:02:03', B'101',
    point(1.5, -2.25), to_tsvector('simple', 'a quick test'), 1.00
FROM generate_series(1, 40) g
"""


def add_table(pair: DbPair, ddl: str, table: str) -> None:
    pair.site().execute(ddl)
    pair.agent().execute(ddl)
    pair.site().execute("SELECT dbsync.add_table(%s::regclass)", (table,))


def test_every_column_type_is_compared_exactly(pair: DbPair) -> None:
    add_table(pair, TYPES_DDL, "public.every_type")
    pair.site().execute(ROW_VALUES)
    sync_once(pair)
    code, out, err = reconcile(pair, "--deep", "--table", "every_type")
    assert code == 0, out + err  # replication and comparison agree on every type

    agent = pair.agent()
    for key, change in PLANTED.items():
        agent.execute(f"UPDATE public.every_type SET {change} WHERE id = %s", (key,))
    agent.execute("DELETE FROM public.every_type WHERE id = 25")
    agent.execute("INSERT INTO public.every_type (id) VALUES (1026)")
    code, report, err = reconcile(pair, "--deep", "--table", "public.every_type", "--json", "--max-keys", "100")
    assert code == 1, err
    table = report["tables"]["public.every_type"]
    assert ids(table["changed_keys"]) == sorted(PLANTED)
    assert ids(table["missing_keys"]) == [25]
    assert ids(table["extra_keys"]) == [1026]
    assert (table["changed"], table["missing"], table["extra"], table["unsettled"]) == (len(PLANTED), 1, 1, 0)
    assert list(report["tables"]) == ["public.every_type"]

    code, report, err = reconcile(pair, "--deep", "--table", "every_type", "--repair", "--apply", "--json")
    assert code == 0, err
    assert_same(pair, ["public.every_type"])


KEYS_DDL = """
CREATE TABLE public."Odd Keys" (
    tenant text, n integer, day date, val text,
    PRIMARY KEY (tenant, n, day)
);
"""

TENANTS = ["", "NULL", "a,b", 'q"uote', "(paren)", " space", "ü", "back\\slash"]


def test_text_and_composite_keys_and_null_vs_empty(pair: DbPair) -> None:
    add_table(pair, KEYS_DDL, 'public."Odd Keys"')
    site = pair.site()
    for i, tenant in enumerate(TENANTS):
        for n in (1, 2):
            val = [None, "", "NULL", "x"][(i + n) % 4]
            site.execute('INSERT INTO public."Odd Keys" VALUES (%s, %s, %s, %s)', (tenant, n, "2024-05-01", val))
    sync_once(pair)
    table = 'public."Odd Keys"'
    assert reconcile(pair, "--deep", "--table", table)[0] == 0

    agent = pair.agent()
    # NULL -> '', '' -> 'NULL', 'NULL' -> NULL: same row count, same "visible" text.
    agent.execute(
        "UPDATE public.\"Odd Keys\" SET val = CASE WHEN val IS NULL THEN '' "
        "WHEN val = '' THEN 'NULL' WHEN val = 'NULL' THEN NULL ELSE val END WHERE n = 1"
    )
    agent.execute("DELETE FROM public.\"Odd Keys\" WHERE tenant = 'NULL' AND n = 2")
    agent.execute("INSERT INTO public.\"Odd Keys\" VALUES ('', 3, '2024-05-01', NULL)")
    changed = sorted(t for i, t in enumerate(TENANTS) if (i + 1) % 4 != 3)  # every n = 1 row but val 'x'
    code, report, err = reconcile(pair, "--deep", "--table", table, "--json", "--max-keys", "100")
    assert code == 1, err
    result = report["tables"]['public."Odd Keys"']
    assert sorted(k["tenant"] for k in result["changed_keys"]) == changed
    assert all(k["n"] == "1" and k["day"] == "2024-05-01" for k in result["changed_keys"])
    assert result["missing_keys"] == [{"tenant": "NULL", "n": "2", "day": "2024-05-01"}]
    assert result["extra_keys"] == [{"tenant": "", "n": "3", "day": "2024-05-01"}]

    code, report, err = reconcile(pair, "--deep", "--table", table, "--repair", "--apply", "--json")
    assert code == 0, err
    assert_same(pair, [table])


def test_bad_table_names_fail_with_one_line(pair: DbPair) -> None:
    for name, message in (("nope", "does not exist"), ("notifications", "is not replicated")):
        code, _, err = reconcile(pair, "--deep", "--table", name)
        assert code == 2
        assert message in err
        assert len(err.strip().splitlines()) == 1, err


def test_log_check_reports_lag_parked_and_open_writers(pair: DbPair) -> None:
    seed_whatsapp(pair, 4)
    code, report, err = reconcile(pair, "--json")
    assert code == 1, err
    assert report["problems"] == ["14 event(s) wait and no daemon is running"]
    by_table = {t["table"]: t for t in report["tables"]}
    assert by_table["public.conversations"]["pending_events"] == 4
    assert by_table["public.whatsapp_messages"]["pending_events"] == 8
    assert report["status"]["events_behind"] == 14
    sync_once(pair)
    assert reconcile(pair)[0] == 0

    with pair.site().transaction() as tx:
        tx.connection.execute("INSERT INTO conversations (phone_number) VALUES ('+7')")
        _, report, _ = reconcile(pair, "--json")
        assert report["open_writers"] == 1
        assert report["oldest_open_writer_seconds"] is not None
        assert report["status"]["events_behind"] == 0  # not committed: invisible, held back

    pair.agent().execute(
        "INSERT INTO dbsync.parked_events (source, seq, table_id, table_name, op, pk, error) "
        "VALUES ('site', 999, 1, 'public.conversations', 'U', '{\"id\": 1}', 'planted')"
    )
    code, out, err = reconcile(pair)
    assert code == 1
    assert "parked" in out
    assert "public.conversations" in out


class Writer(threading.Thread):
    """Keeps writing to the Site DB (new messages, updates of rows 1..pool) until stopped."""

    def __init__(self, pair: DbPair, pool: int, avoid: set[int], tag: str) -> None:
        super().__init__(daemon=True)
        self.dsn = pair.site_dsn
        self.pool = pool
        self.avoid = avoid
        self.tag = tag
        self.stop = threading.Event()
        self.writes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(7)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set() and self.writes < 20000:
                    target = rng.randint(1, self.pool)
                    if target in self.avoid:
                        continue
                    with conn.transaction():
                        conn.execute(
                            "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction) "
                            "VALUES (%s, %s, '+1', 'outbound')",
                            (f"{self.tag}.{self.writes}", target),
                        )
                        conn.execute(
                            "UPDATE conversations SET unread_count = unread_count + 1 WHERE id = %s", (target,)
                        )
                    self.writes += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def finish(self) -> int:
        self.stop.set()
        self.join(timeout=30)
        assert self.error is None, self.error
        return self.writes


def plant(pair: DbPair) -> None:
    agent = pair.agent()
    agent.execute("DELETE FROM conversations WHERE id IN (5, 6)")
    agent.execute(
        "INSERT INTO conversations (id, phone_number, created_at, updated_at) VALUES (5000, '+5', now(), now())"
    )
    agent.execute("UPDATE conversations SET status = 'closed' WHERE id = 9")


def assert_planted(report: dict[str, Any]) -> None:
    conv = report["tables"]["public.conversations"]
    assert ids(conv["missing_keys"]) == [5, 6]
    assert ids(conv["extra_keys"]) == [5000]
    assert ids(conv["changed_keys"]) == [9]
    assert (conv["missing"], conv["extra"], conv["changed"], conv["unsettled"]) == (2, 1, 1, 0)
    for table in ("public.leads", "public.whatsapp_messages"):
        assert report["tables"][table]["in_sync"], report["tables"][table]


def test_changes_in_flight_are_not_reported(pair: DbPair, tmp_path: Path) -> None:
    """The daemon is frozen while rows change, and thawed only once the first pass has seen them
    differ; writes go on throughout. Only the planted drift may be reported."""
    seed_whatsapp(pair, 200)
    with Daemon(pair, log_path=tmp_path / "daemon.log") as daemon:
        wait_until(lambda: same(pair), 30, what="initial sync")
        plant(pair)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            site = pair.site()
            site.execute("UPDATE whatsapp_messages SET status = 'read' WHERE id BETWEEN 100 AND 160")
            site.execute("UPDATE conversations SET contact_name = 'renamed' WHERE id BETWEEN 20 AND 40")
            writer = Writer(pair, 200, {5, 6, 9}, "inflight")
            writer.start()
            check = subprocess.Popen(
                [sys.executable, "-m", "dbsync", "reconcile", "--deep", "--json", "--max-keys", "100"],
                env=pair.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert check.stderr is not None
            seen = []
            for line in check.stderr:
                seen.append(line)
                if "waiting for the daemon" in line:
                    break
            else:
                raise AssertionError("reconcile never waited for the daemon: " + "".join(seen))
            # The first pass did see rows in flight, besides the 4 planted differences.
            found = [re.search(r"conversations: (\d+) candidate", line) for line in seen]
            candidates = [int(m.group(1)) for m in found if m]
            assert candidates and candidates[0] > 4, seen
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        out, err = check.communicate(timeout=120)
        writes = writer.finish()
        assert check.returncode == 1, "".join(seen) + err
        assert writes > 0
        assert_planted(json.loads(out))


def test_repair_under_live_writes_with_daemon(pair: DbPair, tmp_path: Path) -> None:
    seed_whatsapp(pair, 200)
    with Daemon(pair, log_path=tmp_path / "daemon.log"):
        wait_until(lambda: same(pair), 30, what="initial sync")
        plant(pair)
        writer = Writer(pair, 200, {5, 6, 9}, "live")
        writer.start()
        try:
            code, report, err = reconcile(pair, "--deep", "--json")
            assert code == 1, err
            assert_planted(report)
            code, report, err = reconcile(pair, "--deep", "--repair", "--json")
            assert code == 0, err
            conv = report["tables"]["public.conversations"]
            assert (conv["repair"]["upserts_logged"], conv["repair"]["deletes_logged"]) == (3, 1)
        finally:
            writer.finish()
        wait_until(lambda: same(pair), 30, what="Agent DB caught up")
        assert reconcile(pair, "--deep")[0] == 0


def test_repair_without_daemon_says_what_to_do(pair: DbPair) -> None:
    seed_whatsapp(pair, 20)
    sync_once(pair)
    plant(pair)
    code, _, err = reconcile(pair, "--deep", "--repair")
    assert code == 1
    assert "no daemon is running" in err and "dbsync run --once" in err
    sync_once(pair)  # what the message says to do
    assert_same(pair)
    assert reconcile(pair, "--deep")[0] == 0


def test_deep_check_without_daemon_refuses_to_guess(pair: DbPair) -> None:
    seed_whatsapp(pair, 20)
    sync_once(pair)
    plant(pair)
    pair.site().execute("UPDATE conversations SET contact_name = 'pending' WHERE id = 1")
    code, _, err = reconcile(pair, "--deep")
    assert code == 2
    assert "no daemon is running" in err
    code, report, err = reconcile(pair, "--deep", "--apply", "--json")
    assert code == 1, err
    assert_planted(report)


def _blocked(conn: psycopg.Connection, pid: int) -> bool:
    row = conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return bool(row and row[0])


def _resync_in_thread(pair: DbPair, keys: str) -> tuple[threading.Thread, dict[str, Any], int]:
    conn = pair.site()
    result: dict[str, Any] = {}
    pid = conn.info.backend_pid

    def run() -> None:
        result["value"] = conn.execute("SELECT dbsync.resync_keys('public.conversations', %s)", (keys,)).fetchone()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result, pid


def test_resync_delete_cannot_overtake_a_concurrent_insert(pair: DbPair) -> None:
    """The key is absent when resync looks, but an open transaction is inserting it: the resync
    waits for that writer, then logs the row (not a delete) after the writer's own event."""
    sync_once(pair)
    writer = pair.site()
    watcher = pair.site()
    writer.execute("BEGIN")
    writer.execute("INSERT INTO conversations (id, phone_number) VALUES (77, '+77')")
    thread, result, pid = _resync_in_thread(pair, '[{"id": 77}]')
    wait_until(lambda: _blocked(watcher, pid), 10, what="resync waiting for the writer")
    writer.execute("COMMIT")
    thread.join(10)
    assert result["value"] == ({"updated": 1, "deleted": 0},)
    events = [(op,) for _, _, _, op, key, _ in watcher.execute(LOGGED_KEYS, (0,)) if json.loads(key)["id"] == "77"]
    assert events == [("I",), ("U",)]
    sync_once(pair)
    assert_same(pair)


def test_resync_reads_the_row_after_a_concurrent_update(pair: DbPair) -> None:
    pair.site().execute("INSERT INTO conversations (id, phone_number) VALUES (78, '+78')")
    sync_once(pair)
    writer = pair.site()
    watcher = pair.site()
    writer.execute("BEGIN")
    writer.execute("UPDATE conversations SET contact_name = 'new' WHERE id = 78")
    thread, _, pid = _resync_in_thread(pair, '[{"id": 78}]')
    wait_until(lambda: _blocked(watcher, pid), 10, what="resync waiting for the row lock")
    writer.execute("COMMIT")
    thread.join(10)
    rows = [
        (op, json.loads(image)["contact_name"] if image else None)
        for _, _, _, op, key, image in watcher.execute(LOGGED_KEYS, (0,))
        if json.loads(key)["id"] == "78"
    ]
    # The capture logs the key (no image); the resync logs the row it read after the lock.
    assert rows == [("I", None), ("U", None), ("U", "new")]
    sync_once(pair)
    assert_same(pair)


def test_keys_changed_after_the_pinned_snapshot_count_as_moving(pair: DbPair) -> None:
    """A recheck never calls a key drift while the log holds a change to it that the pinned
    Site snapshot does not see; a truncate after the snapshot moves every key."""
    seed_whatsapp(pair, 10)
    sync_once(pair)
    site, agent = pair.site(), pair.agent()
    (target,) = targets(site, agent, ["conversations"])
    snap = site.execute("SELECT pg_current_snapshot()::text").fetchone()[0]  # type: ignore[index]
    site.execute("UPDATE conversations SET contact_name = 'later' WHERE id = 5")
    site.execute("DELETE FROM conversations WHERE id = 6")
    keys = ['{"id" : "4"}', '{"id" : "5"}', '{"id" : "6"}']
    assert moving_keys(site, target, snap, keys) == {'{"id" : "5"}', '{"id" : "6"}'}
    later = site.execute("SELECT pg_current_snapshot()::text").fetchone()[0]  # type: ignore[index]
    assert moving_keys(site, target, later, keys) == set()
    site.execute("TRUNCATE whatsapp_messages, leads, conversations")
    assert moving_keys(site, target, later, keys) == set(keys)


class ChangeWhileWaiting(CatchUp):
    """Once, between the recheck's Site read and its Agent read: the Site changes a row, the
    daemon applies it, and retention deletes the applied event from the log."""

    def __init__(self, pair: DbPair, site: psycopg.Connection, agent: psycopg.Connection) -> None:
        super().__init__(site, agent, pair.settings(), timeout=30)
        self.pair = pair
        self.done = False

    def wait(self, snap: str, tables: Sequence[int]) -> None:
        super().wait(snap, tables)
        if not self.done:
            self.done = True
            writer = self.pair.site()
            writer.execute("UPDATE conversations SET contact_name = 'moved on' WHERE id = 3")
            sync_once(self.pair)
            writer.execute("DELETE FROM dbsync.sync_log")


def test_agent_ahead_of_the_snapshot_is_not_drift_even_when_its_event_is_pruned(pair: DbPair) -> None:
    seed_whatsapp(pair, 10)
    sync_once(pair)
    pair.agent().execute("UPDATE conversations SET contact_name = 'drifted' WHERE id = 7")
    site, agent = pair.site(), pair.agent()
    (target,) = targets(site, agent, ["conversations"])
    comparer = Comparer(site, agent)
    try:
        keys = ['{"id" : "3"}', '{"id" : "7"}']
        diff = TableDiff(target.label, target.table_id)
        recheck(comparer, ChangeWhileWaiting(pair, site, agent), target, dict.fromkeys(keys, (None, None)), diff)
    finally:
        comparer.close()
    assert (diff.missing, diff.extra, diff.changed, diff.unsettled) == ([], [], ['{"id" : "7"}'], [])


def test_check_keys_reads_only_the_given_keys_and_finds_their_drift(pair: DbPair) -> None:
    """The incremental check compares the given keys, by key: drift on them is found, drift on
    other keys is not looked at, and an equal table yields nothing."""
    seed_whatsapp(pair, 10)
    sync_once(pair)
    site, agent = pair.site(), pair.agent()
    (target,) = targets(site, agent, ["conversations"])
    catchup = CatchUp(site, agent, pair.settings(), timeout=30)
    comparer = Comparer(site, agent)  # pins search_path: names below are qualified
    key = '{{"id" : "{}"}}'.format
    try:
        equal = check_keys(comparer, catchup, target, [key(i) for i in range(1, 11)])
        assert not equal.differs and (equal.site_rows, equal.agent_rows) == (10, 10)
        agent.execute("UPDATE public.conversations SET contact_name = 'drifted' WHERE id IN (7, 9)")
        agent.execute("DELETE FROM public.conversations WHERE id = 8")
        agent.execute("UPDATE public.conversations SET id = 999 WHERE id = 10")  # 10 is not asked for
        diff = check_keys(comparer, catchup, target, [key(i) for i in (3, 7, 8, 999)])
        assert not check_keys(comparer, catchup, target, []).differs
    finally:
        comparer.close()
    assert (diff.missing, diff.extra, diff.changed, diff.unsettled) == ([key(8)], [key(999)], [key(7)], [])


def test_deep_check_finds_a_planted_difference_in_its_bucket_and_none_in_an_equal_table(pair: DbPair) -> None:
    pair.site().execute("INSERT INTO conversations (phone_number) SELECT '+49151' || g FROM generate_series(1, 5000) g")
    sync_once(pair)
    site, agent = pair.site(), pair.agent()
    for conn in (site, agent):
        conn.execute("ANALYZE conversations")  # enough rows for many buckets
    (target,) = targets(site, agent, ["conversations"])
    catchup = CatchUp(site, agent, pair.settings(), timeout=30)
    comparer = Comparer(site, agent)
    try:
        assert not deep_check(comparer, catchup, target).differs
        agent.execute("UPDATE public.conversations SET contact_name = '' WHERE id = 4321")
        # Keys outside the Site's range land in the open-ended first and last key-range buckets.
        agent.execute("UPDATE public.conversations SET id = -7 WHERE id = 1")
        agent.execute("UPDATE public.conversations SET id = 1000000000000 WHERE id = 2500")
        diff = deep_check(comparer, catchup, target)
    finally:
        comparer.close()
    assert (diff.site_rows, diff.agent_rows) == (5000, 5000)
    key = '{{"id" : "{}"}}'.format
    assert (diff.missing, diff.extra, diff.changed, diff.unsettled) == (
        [key(1), key(2500)],
        [key(-7), key(1000000000000)],
        [key(4321)],
        [],
    )


ROWS_READ = """
SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_catalog.pg_stat_xact_user_tables
WHERE relid = 'public.conversations'::regclass
"""


def test_check_keys_reads_the_rows_of_its_keys_not_the_table(pair: DbPair) -> None:
    """`check_keys` of 5 keys of a 2,000-row table reads 5 rows on each side, whatever join the
    planner would pick for a key list it estimates at 100 rows (a hash join over the key index
    read all 2,000). Counted in each side's own transaction statistics: the check's statements
    run inside an outer transaction here (as savepoints), so their reads are this transaction's."""
    pair.site().execute("INSERT INTO conversations (phone_number) SELECT '+49151' || g FROM generate_series(1, 2000) g")
    sync_once(pair)
    site, agent = pair.site(), pair.agent()
    for conn in (site, agent):
        conn.execute("ANALYZE conversations")
    (target,) = targets(site, agent, ["conversations"])
    catchup = CatchUp(site, agent, pair.settings(), timeout=30)
    comparer = Comparer(site, agent)
    keys = [f'{{"id" : "{i}"}}' for i in (3, 400, 999, 1500, 2000)]
    try:
        with site.transaction(), agent.transaction():
            diff = check_keys(comparer, catchup, target, keys)
            read = [conn.execute(ROWS_READ).fetchone() for conn in (site, agent)]
    finally:
        comparer.close()
    assert not diff.differs and (diff.site_rows, diff.agent_rows) == (5, 5)
    assert read == [(5,), (5,)]
