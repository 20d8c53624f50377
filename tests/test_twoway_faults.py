"""Write-back under faults and the changes a row can go through (issue 12): link cuts on either
side while both sides write, a key changed on either side, a TRUNCATE on either side. Each test
ends with both sides equal and shows that nothing came back: every row write is counted on both
sides (tests/test_twoway.py's ENABLE ALWAYS trigger), and each side's own keys were written
exactly as often as its writer wrote them, whatever the daemon replayed after a fault.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers import Daemon, DbPair, assert_same, dbsync_cmd, same, wait_until
from tests.proxy import Proxy
from tests.test_faults import routed
from tests.test_twoway import AGENT_KEYS, ITEMS, TABLE, both_ways, last_seq, logged, ok, two_way, writes


class Writer:
    """Inserts a key and updates it, key after key, on one side until stopped: two writes a key."""

    def __init__(self, dsn: str, first: int) -> None:
        self.dsn, self.first, self.done = dsn, first, 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    key = self.first + self.done
                    conn.execute(f"INSERT INTO {ITEMS} VALUES (%s, 'v', NULL, 0)", (key,))
                    conn.execute(f"UPDATE {ITEMS} SET score = 1 WHERE id = %s", (key,))
                    self.done += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def start(self) -> Writer:
        self.thread.start()
        return self

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(timeout=60)
        assert self.error is None, self.error
        return self.done


def applied(dsn: str, source: str) -> int:
    """Events one direction has applied, from its progress row on its target."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT events_applied FROM dbsync.apply_progress WHERE source = %s", (source,)).fetchone()
    return int(row[0]) if row else 0


def wait_both_apply(pair: DbPair) -> None:
    """Until each direction applies something new: connected and working."""
    before = applied(pair.agent_dsn, "site"), applied(pair.site_dsn, "agent")
    wait_until(
        lambda: applied(pair.agent_dsn, "site") > before[0] and applied(pair.site_dsn, "agent") > before[1],
        45,
        0.05,
        "both directions to apply new events",
    )


@pytest.mark.parametrize("side", ["site", "agent"])
def test_two_way_link_cut_repeatedly_ends_equal_without_echo(
    pair: DbPair, side: str, tmp_path: Path, seed: int
) -> None:
    """Every connection of the daemon to one database, which both directions use (one reads it,
    the other applies to it), dies four times while both sides write."""
    two_way(pair)
    dsn = pair.site_dsn if side == "site" else pair.agent_dsn
    host_port = psycopg.conninfo.conninfo_to_dict(dsn)
    proxy = Proxy(str(host_port.get("host") or "127.0.0.1"), int(host_port.get("port") or 5432)).start()
    log = tmp_path / "daemon.log"
    rng = random.Random(f"{seed}:two-way cuts")
    writers = [Writer(pair.site_dsn, 1).start(), Writer(pair.agent_dsn, AGENT_KEYS).start()]
    try:
        with Daemon(routed(pair, **{side: proxy}), log_path=log) as d:
            for _ in range(4):
                wait_both_apply(pair)
                more = writers[0].done + rng.randint(5, 50)  # a random amount of work between cuts
                wait_until(lambda n=more: writers[0].done >= n, 30, 0.01, "the Site writer to write")  # type: ignore[misc]
                accepted = proxy.accepted
                assert proxy.cut() >= 1
                wait_until(lambda n=accepted: proxy.accepted > n, 20, what="the daemon to reconnect")  # type: ignore[misc]
            wait_both_apply(pair)
            site_keys, agent_keys = (w.finish() for w in writers)
            wait_until(lambda: same(pair, [ITEMS]), 90, 0.1, "both sides equal")
            assert d.proc.poll() is None, log.read_text()[-3000:]
    finally:
        for w in writers:
            w.stop.set()
        proxy.close()
    assert_same(pair, [ITEMS])
    assert " ERROR " in log.read_text(), "the daemon reported none of the cuts"
    assert site_keys > 10 and agent_keys > 10, (site_keys, agent_keys)
    # No echo: each side's own keys were written twice each (insert, update), by its writer only.
    assert writes(pair.site_dsn, 1, AGENT_KEYS - 1) == 2 * site_keys, log.read_text()[-3000:]
    assert writes(pair.agent_dsn, AGENT_KEYS, 1 << 62) == 2 * agent_keys, log.read_text()[-3000:]
    # And each arrived on the other side (at least once: a page replayed after a cut writes again).
    assert writes(pair.agent_dsn, 1, AGENT_KEYS - 1) >= site_keys
    assert writes(pair.site_dsn, AGENT_KEYS, 1 << 62) >= agent_keys


def _settled(pair: DbPair) -> None:
    """Both directions apply what is pending, more rounds than an echo needs to come back."""
    for _ in range(3):
        both_ways(pair)


@pytest.mark.parametrize("side", ["site", "agent"])
def test_a_key_changed_on_either_side_moves_the_row_on_both(pair: DbPair, side: str) -> None:
    two_way(pair)
    site, agent = pair.site(), pair.agent()
    site.execute(f"INSERT INTO {ITEMS} VALUES (1, 'from site', NULL, NULL)")
    agent.execute(f"INSERT INTO {ITEMS} VALUES ({AGENT_KEYS}, 'from agent', 'new', 1)")
    _settled(pair)
    assert_same(pair, [ITEMS])
    marks = last_seq(pair.site_dsn), last_seq(pair.agent_dsn)
    writer = site if side == "site" else agent
    # Both rows get new keys (and a changed column), on one side, in one statement.
    writer.execute(f"UPDATE {ITEMS} SET id = id + 500000, v = v || ' moved'")
    _settled(pair)
    assert_same(pair, [ITEMS])
    ids = {r[0] for r in pair.site().execute(f"SELECT id FROM {ITEMS}").fetchall()}
    assert ids == {500001, AGENT_KEYS + 500000}, ids
    # The side that wrote logged its change; the side it was applied to logged nothing (no echo).
    site_logged, agent_logged = logged(pair.site_dsn, marks[0]), logged(pair.agent_dsn, marks[1])
    assert (site_logged > 0, agent_logged > 0) == (side == "site", side == "agent"), (site_logged, agent_logged)


@pytest.mark.parametrize("side", ["site", "agent"])
def test_a_truncate_on_either_side_empties_both_and_replication_goes_on(pair: DbPair, side: str) -> None:
    two_way(pair)
    site, agent = pair.site(), pair.agent()
    site.execute(f"INSERT INTO {ITEMS} SELECT g, 'from site', NULL, NULL FROM generate_series(1, 50) g")
    agent.execute(
        f"INSERT INTO {ITEMS} SELECT g, 'from agent', 'new', 1 FROM generate_series({AGENT_KEYS}, {AGENT_KEYS + 49}) g"
    )
    _settled(pair)
    assert_same(pair, [ITEMS])
    marks = last_seq(pair.site_dsn), last_seq(pair.agent_dsn)
    (site if side == "site" else agent).execute(f"TRUNCATE {ITEMS}")
    _settled(pair)
    for conn in (pair.site(), pair.agent()):
        assert conn.execute(f"SELECT count(*) FROM {ITEMS}").fetchone()[0] == 0  # type: ignore[index]
    site_logged, agent_logged = logged(pair.site_dsn, marks[0]), logged(pair.agent_dsn, marks[1])
    assert (site_logged > 0, agent_logged > 0) == (side == "site", side == "agent"), (site_logged, agent_logged)
    # Both directions go on after it.
    site.execute(f"INSERT INTO {ITEMS} VALUES (7, 'after', NULL, NULL)")
    agent.execute(f"INSERT INTO {ITEMS} VALUES ({AGENT_KEYS + 7}, 'after', 'new', 1)")
    _settled(pair)
    assert_same(pair, [ITEMS])
    assert pair.agent().execute(f"SELECT count(*) FROM {ITEMS}").fetchone()[0] == 2  # type: ignore[index]


# -- poison and the initial copy, in the write-back direction -------------------------------------
CAP = f"ALTER TABLE {ITEMS} ADD CONSTRAINT site_score_cap CHECK (score < 1000)"
UNCAP = f"ALTER TABLE {ITEMS} DROP CONSTRAINT site_score_cap"


def _status(pair: DbPair) -> dict[str, Any]:
    proc = dbsync_cmd("status", "--json", env=pair.env())
    assert proc.returncode in (0, 1) and proc.stdout, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _site_has(pair: DbPair, key: int) -> bool:
    row = pair.site().execute(f"SELECT count(*) FROM {ITEMS} WHERE id = %s", (key,)).fetchone()
    return bool(row and row[0])


def test_write_back_poison_stop_waits_and_says_why(pair: DbPair, tmp_path: Path) -> None:
    """The Site DB rejects an Agent row: the write-back direction retries, skips nothing, and
    `dbsync status` shows it under write_back; once fixed, everything arrives in order."""
    two_way(pair)
    site, agent = pair.site(), pair.agent()
    site.execute(CAP)
    bad, later = AGENT_KEYS, AGENT_KEYS + 1
    agent.execute(f"INSERT INTO {ITEMS} VALUES ({bad}, 'rejected by the Site', 'new', 5000)")
    agent.execute(f"INSERT INTO {ITEMS} VALUES ({later}, 'fine, but after it', 'new', 1)")
    site.execute(f"INSERT INTO {ITEMS} VALUES (1, 'the other direction goes on', NULL, NULL)")
    log = tmp_path / "daemon.log"
    with Daemon(pair, log_path=log) as d:
        st = wait_until(lambda: (s := _status(pair))["write_back"]["last_error"] and s, 30, 0.2, "the error in status")
        error = st["write_back"]["last_error"]
        assert "public.items" in error and 'violates check constraint "site_score_cap"' in error, error
        assert not st["healthy"], st
        wait_until(lambda: pair.agent().execute(f"SELECT count(*) FROM {ITEMS} WHERE id = 1").fetchone()[0], 30)  # type: ignore[index]
        assert not _site_has(pair, bad) and not _site_has(pair, later)  # nothing after it skipped ahead
        site.execute(UNCAP)
        wait_until(lambda: same(pair, [ITEMS]), 30, 0.1, "both sides equal")
        wait_until(lambda: _status(pair)["write_back"]["last_error"] is None, 30, 0.2, "the error to clear")
        assert d.proc.poll() is None
    assert_same(pair, [ITEMS])
    assert "site_score_cap" in log.read_text()


def test_write_back_poison_park_and_retry_from_agent(pair: DbPair, tmp_path: Path) -> None:
    """With poison_policy park the rejected Agent row waits in the Site DB's parked events, the
    rest flows, and `dbsync retry --from agent` applies it once the cause is fixed."""
    two_way(pair)
    site, agent = pair.site(), pair.agent()
    site.execute(CAP)
    bad, good = AGENT_KEYS, AGENT_KEYS + 1
    agent.execute(f"INSERT INTO {ITEMS} VALUES ({bad}, 'rejected by the Site', 'new', 5000)")
    log = tmp_path / "daemon.log"
    with Daemon(pair, "--poison-policy", "park", log_path=log) as d:
        parked = "SELECT count(*) FROM dbsync.parked_events WHERE source = 'agent'"
        wait_until(lambda: pair.site().execute(parked).fetchone()[0] == 1, 30, 0.1, "the Agent row parked")  # type: ignore[index]
        agent.execute(f"INSERT INTO {ITEMS} VALUES ({good}, 'flows past it', 'new', 1)")
        wait_until(lambda: _site_has(pair, good), 30, 0.1, "the other key to flow")
        assert not _site_has(pair, bad)
        assert _status(pair)["write_back"]["parked_events"] == 1
        site.execute(UNCAP)
        out = dbsync_cmd("retry", "--from", "agent", env=pair.env())
        assert out.returncode == 0 and "all parked events applied" in out.stdout, out.stdout + out.stderr
        wait_until(lambda: same(pair, [ITEMS]), 30, 0.1, "both sides equal")
        assert d.proc.poll() is None
    assert pair.site().execute(parked).fetchone()[0] == 0  # type: ignore[index]
    assert_same(pair, [ITEMS])


def test_backfill_from_agent_copies_the_agent_rows_to_the_site(pair: DbPair) -> None:
    """A table registered for write-back after the Agent already held rows: `dbsync backfill
    --from agent` sends them through the Agent's log, and the write-back direction applies them."""
    env = pair.env()
    ok(dbsync_cmd("migrate", "--two-way", env=env))
    pair.site().execute(TABLE)
    pair.agent().execute(TABLE)
    pair.agent().execute(
        f"INSERT INTO {ITEMS} SELECT g, 'old', 'new', 1 FROM generate_series({AGENT_KEYS}, {AGENT_KEYS + 99}) g"
    )
    ok(dbsync_cmd("tables", "add", "--from", "agent", ITEMS, env=env))
    both_ways(pair)
    assert not _site_has(pair, AGENT_KEYS)  # capture sees changes, not the rows already there
    out = ok(dbsync_cmd("backfill", "--from", "agent", ITEMS, env=env))
    assert "backfill complete: 100 rows" in out, out
    both_ways(pair)
    assert_same(pair, [ITEMS])


@pytest.mark.parametrize(
    "command",
    [("retry", "--from", "agent"), ("backfill", "--from", "agent", ITEMS), ("reconcile", "--from", "agent", "--deep")],
)
def test_from_agent_without_write_back_is_one_line(pair: DbPair, command: tuple[str, ...]) -> None:
    pair.site().execute(TABLE)
    pair.agent().execute(TABLE)
    proc = dbsync_cmd(*command, env=pair.env())
    assert proc.returncode != 0 and "dbsync migrate --two-way" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_write_back_schema_drift_stops_it_until_the_site_has_the_column(pair: DbPair, tmp_path: Path) -> None:
    """A column added on the Agent DB only: the write-back direction stops with an error naming
    it (nothing skipped, the Site -> Agent direction goes on); once the Site has the column too,
    it resumes by itself with nothing lost."""
    two_way(pair)
    site, agent = pair.site(), pair.agent()
    agent.execute(f"ALTER TABLE {ITEMS} ADD COLUMN tier text NOT NULL DEFAULT 'silver'")
    agent.execute(f"INSERT INTO {ITEMS} VALUES ({AGENT_KEYS}, 'drifted', 'new', 1, 'gold')")
    log = tmp_path / "daemon.log"
    with Daemon(pair, log_path=log) as d:
        st = wait_until(lambda: (s := _status(pair))["write_back"]["last_error"] and s, 30, 0.2, "the drift in status")
        assert "tier" in st["write_back"]["last_error"] and "public.items" in st["write_back"]["last_error"], st
        assert not st["healthy"] and any(p.startswith("write-back: ") for p in st["problems"]), st
        site.execute(f"INSERT INTO {ITEMS} VALUES (1, 'the other direction goes on', NULL, NULL)")
        wait_until(lambda: pair.agent().execute(f"SELECT count(*) FROM {ITEMS} WHERE id = 1").fetchone()[0], 30)  # type: ignore[index]
        assert not _site_has(pair, AGENT_KEYS)
        site.execute(f"ALTER TABLE {ITEMS} ADD COLUMN tier text NOT NULL DEFAULT 'silver'")
        wait_until(lambda: same(pair, [ITEMS]), 30, 0.1, "both sides equal")
        wait_until(lambda: _status(pair)["write_back"]["last_error"] is None, 30, 0.2, "the error to clear")
        assert d.proc.poll() is None
    assert pair.site().execute(f"SELECT tier FROM {ITEMS} WHERE id = %s", (AGENT_KEYS,)).fetchone() == ("gold",)
    assert_same(pair, [ITEMS])


def test_reconcile_from_agent_finds_and_repairs_site_drift(pair: DbPair) -> None:
    """Rows of a write-back table changed on the Site DB behind dbsync's back (no capture): `dbsync
    reconcile --from agent --deep` names them as the Site's differences from the Agent, and
    `--repair` brings the Site rows back to the Agent's through the Agent's log."""
    two_way(pair)
    agent = pair.agent()
    agent.execute(f"INSERT INTO {ITEMS} SELECT g, 'v', 'new', 1 FROM generate_series({AGENT_KEYS}, {AGENT_KEYS + 9}) g")
    both_ways(pair)
    assert_same(pair, [ITEMS])
    with psycopg.connect(pair.site_dsn, autocommit=True) as behind:  # not captured: replica role
        behind.execute("SET session_replication_role = replica")
        behind.execute(f"UPDATE {ITEMS} SET stage = 'tampered' WHERE id = {AGENT_KEYS}")
        behind.execute(f"DELETE FROM {ITEMS} WHERE id IN ({AGENT_KEYS + 1}, {AGENT_KEYS + 2})")
        behind.execute(f"INSERT INTO {ITEMS} VALUES ({AGENT_KEYS + 50}, 'only on the Site', NULL, NULL)")
    env = pair.env()
    found = dbsync_cmd("reconcile", "--from", "agent", "--deep", "--json", "--apply", env=env)
    assert found.returncode == 1, found.stdout + found.stderr
    table = json.loads(found.stdout)["tables"][ITEMS]
    # "missing" and "extra" are the copy's (the Site's); each count under its database's name.
    assert (table["changed"], table["missing"], table["extra"]) == (1, 2, 1), table
    assert (table["agent_rows"], table["site_rows"]) == (10, 9), table
    text = dbsync_cmd("reconcile", "--from", "agent", "--deep", "--apply", env=env)
    assert "(Agent 10 rows, Site 9 rows)" in text.stdout, text.stdout
    fixed = dbsync_cmd("reconcile", "--from", "agent", "--repair", "--apply", env=env)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert_same(pair, [ITEMS])
    assert ok(dbsync_cmd("reconcile", "--from", "agent", "--deep", "--apply", env=env)).strip().endswith("in sync")
