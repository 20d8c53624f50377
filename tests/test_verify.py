"""Full verification (issue 16, items 2 and 3): the daemon compares every replicated table with the
Site DB in key ranges, reports rows that differ (log, /metrics, webhook, `dbsync status`) and,
with --verify-repair, repairs them through the sync log; writers on the Site never make it report
a false mismatch."""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dbsync.catchup import CatchUp
from dbsync.db import connect
from dbsync.embedded.cluster import free_port
from dbsync.reconcile import Comparer, check_range, targets
from tests.helpers import Daemon, DbPair, dbsync_cmd, replicate, same, sync_once, wait_until
from tests.test_service import Webhook, log_text, metrics, ready, scrape_when, serving, status

PAIRS = "CREATE TABLE public.pairs (a int, b text, v text, PRIMARY KEY (a, b))"


def fill(pair: DbPair, rows: int) -> None:
    site = pair.site()
    site.execute("INSERT INTO pairs SELECT g / 3, 'k' || (g %% 3), 'v' || g FROM generate_series(1, %s) g", (rows,))
    site.execute(
        "INSERT INTO conversations (phone_number, contact_name) "
        "SELECT '+' || g, 'c' || g FROM generate_series(1, %s) g",
        (rows,),
    )


def tamper(pair: DbPair) -> None:
    """Behind dbsync's back on the Agent DB: a changed value, a deleted row, an extra row."""
    agent = pair.agent()
    agent.execute("UPDATE pairs SET v = 'tampered' WHERE a = 20 AND b = 'k1'")
    agent.execute("DELETE FROM pairs WHERE a = 40 AND b = 'k2'")
    agent.execute(
        "INSERT INTO conversations (id, phone_number, created_at, updated_at) VALUES (100000, '+0', now(), now())"
    )


TAMPERED = {
    ("public.pairs", "changed", '{"a" : "20", "b" : "k1"}'),
    ("public.pairs", "missing", '{"a" : "40", "b" : "k2"}'),
    ("public.conversations", "extra", '{"id" : "100000"}'),
}


def test_ranges_cover_every_row_and_prove_each_kind_of_difference(pair: DbPair) -> None:
    """Walked in ranges of 37 rows, two tables (one with a two-column key) are compared whole:
    an extra row past the Site's last key too, and only the tampered rows differ."""
    replicate(pair, PAIRS, "public.pairs")
    fill(pair, 300)
    sync_once(pair)
    tamper(pair)
    pair.agent().execute("INSERT INTO pairs VALUES (-1, 'a', 'before the first'), (9999, 'z', 'after the last')")
    settings = pair.settings()
    found: set[tuple[str, str, str]] = set()
    with connect(pair.site_dsn, "Site") as site, connect(pair.agent_dsn, "Agent") as agent:
        comparer = Comparer(site, agent)
        try:
            catchup = CatchUp(site, agent, settings, timeout=10)
            for target in targets(site, agent, []):
                after, total = None, 0
                while True:
                    checked = check_range(comparer, catchup, target, after, 37)
                    total += checked.diff.site_rows
                    for kind in ("missing", "extra", "changed", "unsettled"):
                        found |= {(target.label, kind, key) for key in getattr(checked.diff, kind)}
                    if checked.upto is None:
                        break
                    after = checked.upto
                assert total == site.execute(f"SELECT count(*) FROM {target.label}").fetchone()[0]  # type: ignore[index]
        finally:
            comparer.close()
    assert found == TAMPERED | {
        ("public.pairs", "extra", '{"a" : "-1", "b" : "a"}'),
        ("public.pairs", "extra", '{"a" : "9999", "b" : "z"}'),
    }


def verify_daemon(pair: DbPair, port: int, log: Path, *extra: str) -> Daemon:
    return Daemon(
        pair,
        "--http",
        f"127.0.0.1:{port}",
        "--full-verify-interval",
        "1",
        "--verify-rows-per-second",
        "20000",
        *extra,
        log_path=log,
    )


def status_json(pair: DbPair) -> tuple[int, dict[str, object]]:
    proc = dbsync_cmd("status", "--json", "--site-dsn", pair.site_dsn, "--agent-dsn", pair.agent_dsn)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture
def hook() -> Iterator[Webhook]:
    receiver = Webhook()
    yield receiver
    receiver.close()


def test_tampering_is_reported_then_repaired(pair: DbPair, hook: Webhook, tmp_path: Path) -> None:
    """Tampering on the Agent DB is found within the interval: logged with table and key (never
    the row), counted in /metrics, alerted, shown by `dbsync status` (exit 1). A daemon restarted
    with --verify-repair resumes from the record on the Agent DB, repairs the rows through the
    sync log, and the incident clears."""
    replicate(pair, PAIRS, "public.pairs")
    fill(pair, 300)
    port = free_port()
    log = tmp_path / "daemon.log"
    with verify_daemon(pair, port, log, "--alert-webhook", hook.url) as daemon:
        wait_until(lambda: ready(port), what="/readyz 200")
        wait_until(lambda: same(pair, ["public.pairs", "public.conversations"]), what="the rows replicated")
        wait_until(
            lambda: scrape_when(port, lambda m: m.get("dbsync_verify_passes_total", 0) >= 1),
            what="a first clean pass",
        )
        assert metrics(port)["dbsync_verify_mismatches_total"] == 0
        tamper(pair)
        m = wait_until(
            lambda: scrape_when(port, lambda m: m.get("dbsync_verify_open_mismatches") == 3), what="3 open mismatches"
        )
        assert m["dbsync_verify_mismatches_total"] == 3 and m["dbsync_verify_repaired_total"] == 0
        assert 0 <= m["dbsync_seconds_since_full_verify"] < 60
        fired = wait_until(lambda: hook.messages("verify", "firing"), what="the verify alert")
        # It fires with the first table found differing (one incident for all of them).
        assert len(fired) == 1 and 1 <= fired[0]["verify_mismatches"] <= 3, fired
        assert set(fired[0]["tables"]) <= {"public.pairs", "public.conversations"}
        assert "tampered" not in json.dumps(fired[0])

        code, st = status_json(pair)
        assert code == 1 and st["verify_mismatches"] == 3, st
        verify = st["verify"]
        assert isinstance(verify, dict)
        listed = {(k["table"], k["kind"], json.dumps(k["key"], sort_keys=True)) for k in verify["mismatched_keys"]}
        assert listed == {(t, kind, json.dumps(json.loads(key), sort_keys=True)) for t, kind, key in TAMPERED}
        code, out = status(pair)
        assert code == 1 and "verify mismatches  3" in out and "3 row(s) differ" in out, out
        assert daemon.terminate() == 0

    text = log_text(log)
    assert 'public.pairs: row {"a" : "20", "b" : "k1"} differs between the Site and Agent DBs' in text
    assert 'public.pairs: row {"a" : "40", "b" : "k2"} is missing on the Agent DB' in text
    assert 'public.conversations: row {"id" : "100000"} is on the Agent DB but not on the Site DB' in text
    assert "tampered" not in text and "v20" not in text  # keys, never row values

    with verify_daemon(pair, port, log, "--alert-webhook", hook.url, "--verify-repair"):
        wait_until(lambda: serving(port), what="the HTTP listener")
        wait_until(lambda: scrape_when(port, lambda m: m.get("dbsync_verify_open_mismatches") == 0), what="repairs")
        wait_until(lambda: hook.messages("verify", "resolved"), what="the verify alert to clear")
        assert metrics(port)["dbsync_verify_repaired_total"] == 3
        assert same(pair, ["public.pairs", "public.conversations"])
        wait_until(lambda: status_json(pair)[0] == 0, what="status healthy again")
        assert status_json(pair)[1]["verify_mismatches"] == 0

        # Tampering found by a daemon that repairs: alerted, repaired, cleared, all by itself.
        pair.agent().execute("UPDATE pairs SET v = 'again' WHERE a = 50 AND b = 'k0'")
        wait_until(lambda: len(hook.messages("verify", "resolved")) == 2, timeout=60, what="a second incident to clear")
        # The first daemon's incident, the same rows found again by the second, and this one.
        assert len(hook.messages("verify", "firing")) == 3
        assert same(pair, ["public.pairs", "public.conversations"])


def test_writers_during_verification_make_no_false_mismatch(pair: DbPair, seed: int, tmp_path: Path) -> None:
    """Inserts, updates and deletes on the Site DB while pass after pass compares the tables in
    small ranges, and across a SIGKILL of the daemon: not one row is reported as differing."""
    replicate(pair, PAIRS, "public.pairs")
    fill(pair, 600)
    port = free_port()
    log = tmp_path / "daemon.log"
    stop = threading.Event()
    writes = 0

    def writer() -> None:
        nonlocal writes
        rng = random.Random(seed)
        with psycopg.connect(pair.site_dsn, autocommit=True) as site:
            while not stop.is_set():
                a, b = rng.randrange(0, 220), f"k{rng.randrange(3)}"
                choice = rng.random()
                with site.transaction():
                    if choice < 0.4:
                        site.execute("UPDATE pairs SET v = %s WHERE a = %s AND b = %s", (f"w{writes}", a, b))
                    elif choice < 0.7:
                        site.execute(
                            "INSERT INTO pairs VALUES (%s, %s, 'new') ON CONFLICT (a, b) DO UPDATE SET v = 'up'", (a, b)
                        )
                    elif choice < 0.85:
                        site.execute("DELETE FROM pairs WHERE a = %s AND b = %s", (a, b))
                    else:
                        site.execute("UPDATE conversations SET unread_count = unread_count + 1 WHERE id = %s", (a,))
                writes += 1

    args = ("--http", f"127.0.0.1:{port}", "--full-verify-interval", "0.5")
    budget = ("--verify-rows-per-second", "3000")  # ranges of 300 rows: several per table
    thread = threading.Thread(target=writer)
    try:
        with Daemon(pair, *args, *budget, log_path=log) as first:
            wait_until(lambda: ready(port), what="/readyz 200")
            thread.start()
            wait_until(
                lambda: scrape_when(port, lambda m: m.get("dbsync_verify_passes_total", 0) >= 2),
                timeout=90,
                what="two passes under writes",
            )
            assert metrics(port)["dbsync_verify_mismatches_total"] == 0
            first.kill()  # mid-pass, mid-page: its successor catches up while it verifies
        with Daemon(pair, *args, *budget, log_path=log):
            wait_until(lambda: serving(port), what="the new daemon's HTTP listener")
            wait_until(
                lambda: scrape_when(port, lambda m: m.get("dbsync_verify_passes_total", 0) >= 2),
                timeout=90,
                what="two more passes under writes, after the kill",
            )
            stop.set()
            thread.join()
            m = metrics(port)
            assert writes > 50
            assert m["dbsync_verify_mismatches_total"] == 0 and m["dbsync_verify_open_mismatches"] == 0
            assert m["dbsync_verify_rows_total"] >= 2 * 600
            wait_until(lambda: same(pair, ["public.pairs", "public.conversations"]), what="the writes replicated")
            assert status_json(pair)[1]["verify_mismatches"] == 0
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
    assert "differs between" not in log_text(log) and "full verification: " in log_text(log)
    assert "Traceback" not in log_text(log)


PROGRESS = "SELECT pass_started_at, table_name, last_key, last_pass_started_at FROM dbsync.verify_progress"


def test_a_killed_daemon_resumes_its_pass(pair: DbPair, tmp_path: Path) -> None:
    """Ranges of 10 rows at 100 rows a second: the daemon is killed inside a table, and the next
    one goes on from the last range recorded on the Agent DB; the pass that started before the
    kill is the one that finishes."""
    replicate(pair, PAIRS, "public.pairs")
    fill(pair, 300)
    agent = pair.agent()
    slow = ("--full-verify-interval", "3600", "--verify-rows-per-second", "100")
    with Daemon(pair, *slow, log_path=tmp_path / "first.log") as first:
        started, table, last_key, _ = wait_until(
            lambda: agent.execute(PROGRESS + " WHERE table_name = 'pairs' AND last_key LIKE '{%'").fetchone(),
            what="the pass inside public.pairs",
        )
        first.kill()
    assert started is not None
    with Daemon(pair, *slow, log_path=tmp_path / "second.log"):
        wait_until(
            lambda: agent.execute(PROGRESS + " WHERE last_pass_started_at IS NOT NULL").fetchone(),
            timeout=60,
            what="the pass to finish",
        )
    done = agent.execute(PROGRESS).fetchone()
    assert done is not None and done[3] == started and done[0] is None
    assert "pass started" not in log_text(tmp_path / "second.log")


VERIFY_SITE_GRANTS = (
    "GRANT SELECT ON public.conversations, public.leads, public.whatsapp_messages TO {role}",
    "GRANT EXECUTE ON FUNCTION dbsync.resync_keys(regclass, json) TO {role}",
)
VERIFY_AGENT_GRANTS = (
    "GRANT SELECT, INSERT, UPDATE ON dbsync.verify_progress TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON dbsync.verify_mismatches TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON dbsync.verify_mark TO {role}",
)


def test_the_documented_grants_are_enough_to_verify_and_repair(pair: DbPair, tmp_path: Path) -> None:
    """docs/dba.md's roles, with the verification's grants added: a tampered row is found and
    repaired through the sync log, no privilege missing, the incremental verification on too."""
    from tests.test_privileges import AGENT_GRANTS, SITE_GRANTS

    tag = f"{os.getpid()}_{abs(hash(pair.site_dsn)) % 100000}"
    reader, applier = f"dbsync_vreader_{tag}", f"dbsync_vapplier_{tag}"
    site, agent = pair.site(), pair.agent()
    site.execute(f"CREATE ROLE {reader} LOGIN")
    agent.execute(f"CREATE ROLE {applier} LOGIN")
    try:
        for stmt in [*SITE_GRANTS.strip().splitlines(), *VERIFY_SITE_GRANTS]:
            site.execute(stmt.format(role=reader))
        for stmt in [*AGENT_GRANTS.strip().splitlines(), *VERIFY_AGENT_GRANTS]:
            agent.execute(stmt.format(role=applier))
        fill_conversations = "INSERT INTO conversations (phone_number) SELECT '+' || g FROM generate_series(1, 50) g"
        site.execute(fill_conversations)
        limited = DbPair(
            site_dsn=make_conninfo(pair.site_dsn, user=reader),
            agent_dsn=make_conninfo(pair.agent_dsn, user=applier),
            site_server=pair.site_server,
            agent_server=pair.agent_server,
        )
        port = free_port()
        log = tmp_path / "daemon.log"
        with verify_daemon(limited, port, log, "--verify-repair", "--verify-interval", "0.5"):
            wait_until(lambda: serving(port), what="the HTTP listener")
            wait_until(lambda: same(pair, ["public.conversations"]), what="the rows replicated")
            agent.execute("UPDATE conversations SET contact_name = 'tampered' WHERE id = 7")
            wait_until(
                lambda: scrape_when(port, lambda m: m.get("dbsync_verify_repaired_total") == 1), what="the repair"
            )
            wait_until(lambda: same(pair, ["public.conversations"]), what="the row repaired")
            assert metrics(port)["dbsync_verify_open_mismatches"] == 0
        text = log_text(log)
        assert "ERROR" not in text and "permission denied" not in text, text
    finally:
        for conn, role in ((site, reader), (agent, applier)):
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
