"""Incremental verification (issue 16, item 1): each --verify-interval the daemon compares the
rows of the keys it applied since its verified mark with the Site DB. A lost apply (an event the
test hook in daemon/apply.py drops from its page) is found and repaired; writers and faults never
make it report a false mismatch; the Site's sync log keeps what is not verified yet, so a daemon
killed before it verified what it applied verifies it after the restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from dbsync.catchup import CatchUp, CatchUpError
from dbsync.daemon import apply as apply_module
from dbsync.daemon.apply import TEST_DROP_EVENT
from dbsync.daemon.runner import Replicator
from dbsync.daemon.verify import KEYED_JOINS, OwnApply
from dbsync.daemon.verify_keys import HandedKeys, KeyVerifier
from dbsync.db import connect
from dbsync.embedded.cluster import free_port
from dbsync.reconcile import KEY_LOOKUPS, ComparedTable, Comparer, TableDiff, targets
from dbsync.resync import resync_keys
from tests.helpers import Daemon, DbPair, dbsync_cmd, same, sync_once, wait_until
from tests.test_faults import Kit, kit, routed, small_pages, wait_applying  # noqa: F401 - fixtures
from tests.test_service import Webhook, log_text, metrics, scrape_when, serving
from tests.test_verify import hook, status_json  # noqa: F401 - a fixture

TABLES = ["public.conversations", "public.leads", "public.whatsapp_messages"]
LOST = {"id": "7"}  # the key whose event the hook drops
MARK = "SELECT verified_seq, keys_verified, target_snapshot IS NULL FROM dbsync.verify_mark"
ADD_50 = (
    "INSERT INTO conversations (phone_number, contact_name) SELECT '+' || g, 'c' || g FROM generate_series(1, 50) g"
)


def incremental(pair: DbPair, port: int, log: Path, *extra: str) -> Daemon:
    return Daemon(pair, "--http", f"127.0.0.1:{port}", "--verify-interval", "0.5", *extra, log_path=log)


def applied_seq(pair: DbPair) -> int:
    row = pair.agent().execute("SELECT applied_seq FROM dbsync.apply_progress").fetchone()
    return 0 if row is None else int(row[0])


def wait_for_mark(pair: DbPair) -> None:
    """The mark exists: what is applied from now on is verified (what came before is the full
    verification's)."""
    wait_until(lambda: pair.agent().execute(MARK).fetchone(), what="the verified mark")


def test_a_lost_apply_is_found_and_repaired(
    pair: DbPair,
    hook: Webhook,  # noqa: F811 - the fixture
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hook drops key 7's insert from its page: within the interval the verification finds
    the row missing (logged by key, counted, alerted), repairs it through the sync log with
    --verify-repair, and the incident clears; the mark then stands past every applied event."""
    monkeypatch.setenv(TEST_DROP_EVENT, json.dumps(LOST))
    port = free_port()
    log = tmp_path / "daemon.log"
    with incremental(pair, port, log, "--verify-repair", "--alert-webhook", hook.url):
        wait_until(lambda: serving(port), what="the HTTP listener")
        wait_for_mark(pair)
        pair.site().execute(ADD_50)
        m = wait_until(
            lambda: scrape_when(port, lambda m: m.get("dbsync_verify_repaired_total") == 1), what="the repair"
        )
        assert m["dbsync_verify_mismatches_total"] == 1
        wait_until(lambda: hook.messages("verify", "resolved"), what="the verify alert to clear")
        fired = hook.messages("verify", "firing")
        assert len(fired) == 1 and fired[0]["tables"] == {"public.conversations": 1}, fired
        wait_until(lambda: same(pair, TABLES), what="the row repaired")
        top = applied_seq(pair)
        wait_until(
            lambda: scrape_when(port, lambda m: m.get("dbsync_verified_seq", 0) >= top), what="the mark past it all"
        )
        assert metrics(port)["dbsync_verify_open_mismatches"] == 0
        code, st = status_json(pair)
        assert code == 0 and st["verify_mismatches"] == 0, st
        verify = st["verify"]
        assert isinstance(verify, dict) and verify["verified_seq"] >= top, verify
        human = dbsync_cmd("status", env=pair.env()).stdout.splitlines()
        assert any(line.startswith("verified up to") and "incremental verification" in line for line in human), human
        assert not any(line.startswith("full verify") for line in human), human  # no full pass configured
    text = log_text(log)
    assert 'public.conversations: row {"id" : "7"} is missing on the Agent DB' in text, text
    assert "+7" not in text and "c7" not in text  # the key, never the row's values
    # The service hands the apply's pages to the verifier: no pass read its keys from the log.
    assert "passes take the keys the apply read" in text and "reads its keys from the Site's log" not in text, text
    assert "Traceback" not in text


def test_a_key_applied_before_a_kill_is_verified_after_the_restart(
    pair: DbPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first daemon applies 50 rows (losing key 7's) and is SIGKILLed before its next pass
    (an hour away). Its retention has kept their events in the Site's log, so the second daemon
    reads the keys after the mark again, finds row 7 missing and repairs it."""
    monkeypatch.setenv(TEST_DROP_EVENT, json.dumps(LOST))
    site, agent = pair.site(), pair.agent()
    with Daemon(pair, "--verify-interval", "3600", log_path=tmp_path / "first.log") as first:
        wait_for_mark(pair)
        site.execute(ADD_50)
        wait_until(lambda: agent.execute("SELECT count(*) FROM conversations").fetchone() == (49,), what="49 rows")
        wait_until(lambda: agent.execute(MARK).fetchone()[2], what="no pass open")  # type: ignore[index]
        first.kill()
    kept = site.execute("SELECT count(*) FROM dbsync.sync_log").fetchone()
    assert kept is not None and kept[0] >= 1  # applied, not verified: kept
    before = agent.execute(MARK).fetchone()
    assert before is not None and before[0] < applied_seq(pair)
    monkeypatch.delenv(TEST_DROP_EVENT)
    port = free_port()
    log = tmp_path / "second.log"
    with incremental(pair, port, log, "--verify-repair"):
        wait_until(lambda: serving(port), what="the HTTP listener")
        m = wait_until(
            lambda: scrape_when(port, lambda m: m.get("dbsync_verify_repaired_total") == 1), what="the repair"
        )
        assert m["dbsync_verify_mismatches_total"] == 1
        wait_until(lambda: same(pair, TABLES), what="the row repaired")
        # Verified, the events go: the log empties.
        wait_until(
            lambda: site.execute("SELECT count(*) FROM dbsync.sync_log").fetchone() == (0,), what="the log pruned"
        )
    text = log_text(log)
    assert 'public.conversations: row {"id" : "7"} is missing on the Agent DB' in text
    assert "this pass reads its keys from the Site's log" in text, text  # nothing was handed over before it


def test_writers_and_cut_links_make_no_false_mismatch(pair: DbPair, kit: Kit, small_pages: None) -> None:  # noqa: F811
    """Writers on every table while the daemon's Site links are cut four times and the daemon is
    SIGKILLed once: passes every half second compare what it applied, not one row is reported,
    and in the end the mark stands past every applied event and the log is pruned."""
    proxy = kit.proxy(pair.site_dsn)
    port = free_port()
    args = ("--http", f"127.0.0.1:{port}", "--verify-interval", "0.5", "--verify-rows-per-second", "20000")
    d = kit.daemon(routed(pair, site=proxy), *args)
    load = kit.load(pair)
    wait_until(lambda: serving(port), what="the HTTP listener")
    for _ in range(4):
        load.wait_ops(150)
        wait_applying(pair)
        assert proxy.cut() >= 1
    load.wait_ops(100)
    d.kill()
    d = kit.daemon(routed(pair, site=proxy), *args)
    wait_until(lambda: serving(port), what="the second daemon's HTTP listener")
    load.wait_ops(200)
    load.stop()
    wait_until(lambda: same(pair, TABLES), timeout=60, what="the writes replicated")
    top = applied_seq(pair)
    m = wait_until(
        lambda: scrape_when(port, lambda m: m.get("dbsync_verified_seq", 0) >= top),
        timeout=60,
        what="the mark past every applied event",
    )
    assert m["dbsync_verify_mismatches_total"] == 0 and m["dbsync_verify_open_mismatches"] == 0
    assert m["dbsync_verify_keys_total"] > 0
    wait_until(
        lambda: pair.site().execute("SELECT count(*) FROM dbsync.sync_log").fetchone() == (0,),
        timeout=30,
        what="the log pruned",
    )
    text = "".join(kit.log(x) for x in kit.daemons)
    assert "differs between" not in text and "is missing" not in text and "is on the Agent DB" not in text
    assert "Traceback" not in text
    assert status_json(pair)[1]["verify_mismatches"] == 0


# -- the keys handed over by the apply path, in memory (in-process: the runner and one verifier) --


class Found:
    """What the verifier's passes proved, by (table, kind, key)."""

    def __init__(self) -> None:
        self.proven: set[tuple[str, str, str]] = set()

    def judge(self, comparer: Comparer, catchup: CatchUp, target: ComparedTable, diff: TableDiff) -> None:
        for kind in ("missing", "extra", "changed"):
            self.proven |= {(target.label, kind, key) for key in getattr(diff, kind)}


def tables_of(comparer: Comparer) -> dict[int, ComparedTable]:
    return {t.table_id: t for t in targets(comparer.site, comparer.agent, [])}


def lose_key_7(pair: DbPair, monkeypatch: pytest.MonkeyPatch, handed: HandedKeys | None) -> None:
    """50 rows applied in-process, key 7's insert dropped from its page; `handed` gets the pages."""
    monkeypatch.setenv(TEST_DROP_EVENT, json.dumps(LOST))
    monkeypatch.setattr(apply_module, "_test_dropped", False)
    pair.site().execute(ADD_50)
    replicator = Replicator(pair.settings(verify_interval=0.5))
    if handed is not None:
        replicator.on_batch_page = handed.page
    asyncio.run(replicator.run(once=True))
    assert pair.agent().execute("SELECT count(*) FROM conversations").fetchone() == (49,)
    monkeypatch.delenv(TEST_DROP_EVENT)


def one_pass(pair: DbPair, verifier: KeyVerifier) -> Found:
    """Steps of `verifier` until a pass has ended (it finds what `judge` collects)."""
    found = Found()
    verifier.judge = found.judge
    with connect(pair.site_dsn, "Site") as site, connect(pair.agent_dsn, "Agent") as agent:
        comparer = Comparer(site, agent)
        try:
            catchup = CatchUp(site, agent, verifier.settings, timeout=10)
            passes = verifier.passes
            wait_until(lambda: verifier.step(comparer, catchup) or verifier.passes > passes, interval=0, what="a pass")
        finally:
            comparer.close()
    return found


def started(pair: DbPair) -> KeyVerifier:
    sync_once(pair)  # the progress row the mark starts from
    verifier = KeyVerifier(pair.settings(verify_interval=0.5, verify_rows_per_second=100_000), Found().judge, tables_of)
    with connect(pair.agent_dsn, "Agent") as agent:
        verifier.start(agent)
    return verifier


def repaired(pair: DbPair) -> bool:
    """Key 7 resynced through the log and applied: the tables are identical again."""
    with connect(pair.site_dsn, "Site") as site:
        resync_keys(site, "public", "conversations", [json.dumps(LOST)])
    sync_once(pair)
    return same(pair, TABLES)


MISSING_7 = ("public.conversations", "missing", '{"id" : "7"}')


def test_handed_keys_find_a_lost_apply_without_reading_the_log(pair: DbPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner hands its pages over as it read them from the Site, before the apply dropped
    key 7: the pass compares those keys and never reads the log. The log is even emptied behind
    its back first, and the loss is still found; the mark moves past every applied event."""
    verifier = started(pair)
    lose_key_7(pair, monkeypatch, verifier.handed)
    pair.site().execute("DELETE FROM dbsync.sync_log")
    found = one_pass(pair, verifier)
    assert found.proven == {MISSING_7}
    assert verifier.log_reads == 0 and verifier.handed.handed == 1
    assert verifier.keys == 50
    assert verifier.verified_seq is not None and verifier.verified_seq >= applied_seq(pair)
    mark = pair.agent().execute(MARK).fetchone()
    assert mark is not None and mark[0] >= applied_seq(pair) and mark[2], mark
    assert repaired(pair)


def test_after_a_restart_the_pass_reads_the_log(pair: DbPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """What one process applied (and handed over to a verifier that never ran) is verified by the
    next process's verifier, whose memory is empty: it reads the keys after the mark from the
    log and finds the loss."""
    lose_key_7(pair, monkeypatch, started(pair).handed)
    verifier = started(pair)  # a new process: nothing handed over
    found = one_pass(pair, verifier)
    assert found.proven == {MISSING_7}
    assert verifier.log_reads >= 2 and verifier.handed.handed == 0
    assert verifier.verified_seq is not None and verifier.verified_seq >= applied_seq(pair)
    assert repaired(pair)


ROWS_READ = """
SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables
WHERE relid = 'public.conversations'::regclass
"""


def test_a_key_check_reads_the_rows_of_its_keys_not_the_table(pair: DbPair) -> None:
    """With the verification's session settings the comparison by key looks each key up in its
    index: 5 keys of a 2,000-row table read 5 rows (planned for 100 keys, it read all 2,000
    through a hash join; counted in the transaction's own statistics)."""
    site = pair.site()
    site.execute(ADD_50.replace("50", "2000"))
    site.execute("ANALYZE conversations")
    keys = [r[0] for r in site.execute("SELECT json_build_object('id', id::text)::text FROM conversations LIMIT 5")]
    with connect(pair.site_dsn, "Site") as conn, connect(pair.agent_dsn, "Agent") as agent:
        comparer = Comparer(conn, agent)
        try:
            (target,) = [t for t in targets(conn, agent, []) if t.label == "public.conversations"]
            query = comparer.queries(target)[0].rows_by_key()
            for statement in KEYED_JOINS:
                conn.execute(statement)
            with conn.transaction():
                for statement in KEY_LOOKUPS:
                    conn.execute(statement)
                assert len(conn.execute(query, {"keys": "[" + ",".join(keys) + "]"}).fetchall()) == 5
                assert conn.execute(ROWS_READ).fetchone() == (5,)
        finally:
            comparer.close()


def test_the_verifications_wait_polls_the_apply_alone(pair: DbPair) -> None:
    """OwnApply returns once the events a snapshot sees are applied, and says in one line when they
    are not within its timeout (it never looks for another daemon: the apply is its own)."""
    sync_once(pair)
    site = pair.site()
    site.execute(ADD_50)
    snap = str(site.execute("SELECT pg_current_snapshot()::text").fetchone()[0])  # type: ignore[index]
    table = site.execute("SELECT table_id FROM dbsync.replicated_tables WHERE table_name = 'conversations'").fetchone()[
        0
    ]  # type: ignore[index]
    with connect(pair.site_dsn, "Site") as s, connect(pair.agent_dsn, "Agent") as agent:
        wait = OwnApply(s, agent, pair.settings(), timeout=0.2)
        with pytest.raises(CatchUpError, match=r"^the apply has not applied 50 event\(s\) within 0.2 s$"):
            wait.wait(snap, [table])
        sync_once(pair)
        wait.wait(snap, [table])
