"""Incremental verification (issue 16, item 1): each --verify-interval the daemon compares the
rows of the keys it applied since its verified mark with the Site DB. A lost apply (an event the
test hook in daemon/apply.py drops from its page) is found and repaired; writers and faults never
make it report a false mismatch; the Site's sync log keeps what is not verified yet, so a daemon
killed before it verified what it applied verifies it after the restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbsync.daemon.apply import TEST_DROP_EVENT
from dbsync.embedded.cluster import free_port
from tests.helpers import Daemon, DbPair, dbsync_cmd, same, wait_until
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
    assert 'public.conversations: row {"id" : "7"} is missing on the Agent DB' in log_text(log)


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
