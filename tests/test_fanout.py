"""Fan-out and fan-in (issue 12 item 4): one Site DB to several Agent DBs, several Site DBs to one.

The Site log is kept until every registered consumer (dbsync.consumers) has applied it: a
second Agent DB whose daemon starts late still receives everything, a consumer that is gone is
reported and, once dropped, frees the log; a daemon's Site role moves only its own position.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dbsync.consumers import agent_consumer_name
from dbsync.embedded.cluster import free_port
from tests.helpers import Daemon, DbPair, Server, assert_same, dbname, dbsync_cmd, replicate, same, wait_until
from tests.test_privileges import SITE_GRANTS
from tests.test_service import Webhook, scrape_when, serving

_n = iter(range(1_000_000))


def _create(server: Server, name: str, template: str) -> str:
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    return server.dsn_for(name)


def _drop(server: Server, dsn: str) -> None:
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {dbname(dsn)} WITH (FORCE)")


@pytest.fixture
def second_agent(pair: DbPair, templates: tuple[str, str]) -> Iterator[DbPair]:
    """The same Site DB with a second, migrated Agent DB."""
    dsn = _create(pair.agent_server, f"dbsync_agent2_{os.getpid()}_{next(_n)}", templates[1])
    other = DbPair(pair.site_dsn, dsn, pair.site_server, pair.agent_server)
    yield other
    other.close()
    _drop(pair.agent_server, dsn)


@pytest.fixture
def second_site(pair: DbPair, templates: tuple[str, str]) -> Iterator[DbPair]:
    """A second, migrated Site DB replicated into the same Agent DB."""
    dsn = _create(pair.site_server, f"dbsync_site2_{os.getpid()}_{next(_n)}", templates[0])
    other = DbPair(dsn, pair.agent_dsn, pair.site_server, pair.agent_server)
    yield other
    other.close()
    _drop(pair.site_server, dsn)


def log_rows(pair: DbPair) -> int:
    with psycopg.connect(pair.site_dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM dbsync.sync_log").fetchone()[0])  # type: ignore[index]


def consumer_name(pair: DbPair, source: str = "site") -> str:
    with psycopg.connect(pair.agent_dsn, autocommit=True) as agent:
        return agent_consumer_name(agent, source, None)


class Writer:
    """Writes conversations and messages to the Site DB in a thread until stopped."""

    def __init__(self, pair: DbPair) -> None:
        self.pair = pair
        self.done = threading.Event()
        self.written = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with psycopg.connect(self.pair.site_dsn, autocommit=True) as conn:
                while not self.done.is_set():
                    with conn.transaction():
                        cid = conn.execute(
                            "INSERT INTO conversations (phone_number) VALUES (%s) RETURNING id", (f"+49{self.written}",)
                        ).fetchone()[0]  # type: ignore[index]
                        conn.execute(
                            "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction, "
                            "content) VALUES (%s, %s, %s, 'inbound', 'hallo')",
                            (f"wamid.{self.written}", cid, f"+49{self.written}"),
                        )
                        conn.execute("UPDATE conversations SET unread_count = unread_count + 1 WHERE id = %s", (cid,))
                    self.written += 1
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def wait_for(self, n: int) -> None:
        wait_until(lambda: self.written >= n or self.error is not None, what=f"{n} writes")

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)
        assert self.error is None, self.error


def test_second_agent_registered_first_starts_late_and_receives_everything(
    pair: DbPair, second_agent: DbPair, tmp_path: Path
) -> None:
    # Registered before anything is written (as `dbsync consumers add` with its own settings).
    added = dbsync_cmd("consumers", "add", env=second_agent.env())
    assert added.returncode == 0, added.stderr
    assert consumer_name(second_agent) in added.stdout
    writer = Writer(pair)
    with Daemon(pair, log_path=tmp_path / "a.log"):
        writer.wait_for(150)
        # The first daemon has applied and pruned what it could; the second consumer holds the log.
        wait_until(lambda: rows_applied(pair) >= 100, what="the first Agent DB to apply")
        assert log_rows(pair) > 0
        with Daemon(second_agent, log_path=tmp_path / "b.log"):
            writer.wait_for(writer.written + 150)  # both daemons running under writes
            writer.stop()
            wait_until(lambda: same(pair), timeout=60, what="the first Agent DB to catch up")
            wait_until(lambda: same(second_agent), timeout=60, what="the second Agent DB to catch up")
            wait_until(lambda: log_rows(pair) == 0, timeout=30, what="the log to be pruned once both applied it")
    assert_same(pair)
    assert_same(second_agent)
    assert rows_applied(second_agent) == writer.written


def rows_applied(pair: DbPair) -> int:
    with psycopg.connect(pair.agent_dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM conversations").fetchone()[0])  # type: ignore[index]


def test_late_consumer_not_registered_is_told_to_backfill(pair: DbPair, second_agent: DbPair, tmp_path: Path) -> None:
    site = pair.site()
    site.execute("INSERT INTO conversations (phone_number) SELECT '+49' || g FROM generate_series(1, 300) g")
    with Daemon(pair):
        wait_until(lambda: same(pair) and log_rows(pair) == 0, what="the first consumer to apply and prune")
    added = dbsync_cmd("consumers", "add", env=second_agent.env())
    assert added.returncode == 0, added.stderr
    assert "dbsync backfill" in added.stderr
    listed = dbsync_cmd("consumers", "list", env=pair.env())
    assert listed.returncode == 1 and "missed history" in listed.stdout
    backfill = dbsync_cmd("backfill", "conversations", "leads", "whatsapp_messages", env=second_agent.env())
    assert backfill.returncode == 0, backfill.stderr
    with Daemon(pair), Daemon(second_agent):
        wait_until(lambda: same(second_agent) and same(pair), timeout=60, what="both Agent DBs to match")
    assert rows_applied(second_agent) == 300
    name = consumer_name(second_agent)
    cleared = dbsync_cmd("consumers", "backfilled", name, env=pair.env())
    assert cleared.returncode == 0, cleared.stderr
    listed = dbsync_cmd("consumers", "list", env=pair.env())
    assert listed.returncode == 0 and "missed history" not in listed.stdout, listed.stdout
    unknown = dbsync_cmd("consumers", "backfilled", "nobody", env=pair.env())
    assert unknown.returncode == 1 and "nobody" in unknown.stderr and "Traceback" not in unknown.stderr
    assert_same(second_agent)


def test_dropping_a_consumer_frees_the_log(pair: DbPair, tmp_path: Path) -> None:
    added = dbsync_cmd("consumers", "add", "reporting-copy", env=pair.env())
    assert added.returncode == 0, added.stderr
    again = dbsync_cmd("consumers", "add", "reporting-copy", env=pair.env())
    assert again.returncode == 0 and "registered already" in again.stdout, again.stdout + again.stderr
    site = pair.site()
    site.execute("INSERT INTO conversations (phone_number) SELECT '+49' || g FROM generate_series(1, 50) g")
    site.execute("UPDATE conversations SET unread_count = 1")
    me = consumer_name(pair)
    with Daemon(pair):
        wait_until(lambda: same(pair), what="the Agent DB to apply")
        # The daemon has reported what it applied; the log stays for the other consumer.
        wait_until(lambda: covers_log(pair, me), what="the daemon to report its position")
        before = log_rows(pair)
        assert before > 0
        dropped = dbsync_cmd("consumers", "drop", "reporting-copy", env=pair.env())
        assert dropped.returncode == 0, dropped.stderr
        wait_until(lambda: log_rows(pair) == 0, what="the log to shrink after the drop")
    again = dbsync_cmd("consumers", "drop", "reporting-copy", env=pair.env())
    assert again.returncode != 0
    assert again.stderr.strip().count("\n") == 0 and "reporting-copy" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr
    assert_same(pair)


def covers_log(pair: DbPair, consumer: str) -> bool:
    """Whether `consumer`'s recorded snapshot sees every event in the log."""
    with psycopg.connect(pair.site_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT NOT EXISTS (SELECT FROM dbsync.sync_log l, dbsync.consumers c WHERE c.name = %s "
            "AND NOT pg_visible_in_snapshot(l.txid, c.applied_snapshot))",
            (consumer,),
        ).fetchone()
        return bool(row and row[0])


def test_stale_consumer_is_reported(pair: DbPair, tmp_path: Path) -> None:
    """Logged once, counted in /metrics, alerted through the webhook, listed by `consumers list`
    and `dbsync status`, never dropped by itself; dropping it resolves the alert and frees the log."""
    added = dbsync_cmd("consumers", "add", "gone-copy", env=pair.env())
    assert added.returncode == 0, added.stderr
    pair.site().execute("INSERT INTO conversations (phone_number) VALUES ('+491')")
    log = tmp_path / "daemon.log"
    port, hook = free_port(), Webhook()
    args = ("--consumer-timeout", "1", "--http", f"127.0.0.1:{port}", "--alert-webhook", hook.url)
    try:
        with Daemon(pair, *args, log_path=log):
            wait_until(lambda: same(pair), what="the Agent DB to apply")
            wait_until(
                lambda: "'gone-copy' has not been seen" in log.read_text(), what="the daemon to log the stale one"
            )
            wait_until(lambda: serving(port), what="the daemon's HTTP endpoint")
            wait_until(lambda: scrape_when(port, lambda m: m.get("dbsync_stale_consumers") == 1), what="the gauge")
            (fired,) = wait_until(lambda: hook.messages("consumer", "firing"), what="the alert")
            assert "gone-copy" in fired["summary"], fired

            listed = dbsync_cmd("consumers", "list", "--consumer-timeout", "1", env=pair.env())
            assert listed.returncode == 1
            lines = listed.stdout.splitlines()
            assert any(line.startswith("gone-copy") and "STALE" in line for line in lines), listed.stdout
            status = dbsync_cmd("status", "--json", "--consumer-timeout", "1", env=pair.env())
            assert status.returncode == 1
            report = json.loads(status.stdout)
            ghost = [c for c in report["consumers"] if c["name"] == "gone-copy"]
            assert ghost and ghost[0]["stale"] and ghost[0]["events_behind"] >= 1
            assert any("gone-copy" in p for p in report["problems"])
            human = dbsync_cmd("status", "--consumer-timeout", "1", env=pair.env())
            assert "consumer gone-copy" in human.stdout and "STALE" in human.stdout
            # Reported, never dropped by itself; the log is still kept for it.
            assert "gone-copy" in dbsync_cmd("consumers", "list", "--json", env=pair.env()).stdout
            assert log_rows(pair) >= 1

            dropped = dbsync_cmd("consumers", "drop", "gone-copy", env=pair.env())
            assert dropped.returncode == 0, dropped.stderr
            wait_until(lambda: scrape_when(port, lambda m: m.get("dbsync_stale_consumers") == 0), what="gauge 0")
            wait_until(lambda: hook.messages("consumer", "resolved"), what="the alert to resolve")
            wait_until(lambda: log_rows(pair) == 0, what="the log to be freed")
    finally:
        hook.close()


@dataclass
class EnvPair(DbPair):
    """A pair whose daemon and commands also get `extra` in their environment."""

    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra}


def with_env(pair: DbPair, **extra: str) -> EnvPair:
    return EnvPair(pair.site_dsn, pair.agent_dsn, pair.site_server, pair.agent_server, extra=extra)


ORDERS = "CREATE TABLE public.orders (id bigint PRIMARY KEY, note text NOT NULL)"


def test_two_site_dbs_into_one_agent_db(pair: DbPair, second_site: DbPair, tmp_path: Path) -> None:
    """One source name per Site DB: each has its own progress, lock and consumer registry."""
    replicate(second_site, ORDERS, "public.orders")
    other = with_env(second_site, DBSYNC_SOURCE="site2")
    writer = Writer(pair)
    orders = second_site.site()
    with Daemon(pair, log_path=tmp_path / "a.log"), Daemon(other, log_path=tmp_path / "b.log"):
        for i in range(1, 201):
            orders.execute("INSERT INTO orders VALUES (%s, %s)", (i, f"order {i}"))
            if i % 3 == 0:
                orders.execute("UPDATE orders SET note = note || '!' WHERE id = %s", (i - 1,))
        orders.execute("DELETE FROM orders WHERE id % 10 = 0")
        writer.wait_for(100)
        writer.stop()
        wait_until(lambda: same(pair), timeout=60, what="the first Site's tables on the Agent DB")
        wait_until(lambda: same(second_site, ["public.orders"]), timeout=60, what="the second Site's table")
        wait_until(lambda: log_rows(pair) == 0 and log_rows(second_site) == 0, what="both logs pruned")
    assert_same(pair)
    assert_same(second_site, ["public.orders"])
    with psycopg.connect(pair.agent_dsn, autocommit=True) as agent:
        sources = [r[0] for r in agent.execute("SELECT source FROM dbsync.apply_progress ORDER BY 1").fetchall()]
    assert sources == ["site", "site2"]
    for site, source in ((pair, "site"), (second_site, "site2")):
        with psycopg.connect(site.site_dsn, autocommit=True) as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM dbsync.consumers").fetchall()]
        assert names == [consumer_name(pair, source)]


def test_sigkill_of_one_consumer_loses_nothing_for_either(pair: DbPair, second_agent: DbPair, tmp_path: Path) -> None:
    added = dbsync_cmd("consumers", "add", env=second_agent.env())  # before anything is written
    assert added.returncode == 0, added.stderr
    writer = Writer(pair)
    with Daemon(pair, log_path=tmp_path / "a.log"):
        killed = Daemon(second_agent, "--batch-size", "20", log_path=tmp_path / "b.log")
        try:
            writer.wait_for(100)
            wait_until(lambda: rows_applied(second_agent) >= 20, what="the second daemon to apply some")
            killed.kill()  # mid-stream, while writes go on
            writer.wait_for(writer.written + 100)
        finally:
            killed.close()
        with Daemon(second_agent, "--batch-size", "20", log_path=tmp_path / "b2.log"):
            writer.wait_for(writer.written + 50)
            writer.stop()
            wait_until(lambda: same(pair), timeout=60, what="the first Agent DB to catch up")
            wait_until(lambda: same(second_agent), timeout=60, what="the second Agent DB to catch up")
    assert_same(pair)
    assert_same(second_agent)
    assert rows_applied(pair) == rows_applied(second_agent) == writer.written
    listed = json.loads(dbsync_cmd("consumers", "list", "--json", env=pair.env()).stdout)
    assert sorted(c["name"] for c in listed) == sorted([consumer_name(pair), consumer_name(second_agent)])
    assert not any(c["missed_history"] for c in listed)


def test_a_daemon_role_moves_only_its_own_position(pair: DbPair, second_agent: DbPair) -> None:
    tag = f"{os.getpid()}_{next(_n)}"
    one, two = f"dbsync_reader_a_{tag}", f"dbsync_reader_b_{tag}"
    site = pair.site()
    for role in (one, two):
        site.execute(f"CREATE ROLE {role} LOGIN")
        site.execute(SITE_GRANTS.format(role=role))
    try:
        # Each daemon registers itself under its own role (the consumer's first start).
        a = make_conninfo(pair.site_dsn, user=one)
        b = make_conninfo(pair.site_dsn, user=two)
        name_a, name_b = consumer_name(pair), consumer_name(second_agent)
        with psycopg.connect(a, autocommit=True) as conn:
            conn.execute("SELECT dbsync.register_consumer(%s, '3:3:')", (name_a,))
        with psycopg.connect(b, autocommit=True) as conn:
            conn.execute("SELECT dbsync.register_consumer(%s, '3:3:')", (name_b,))
        site.execute("INSERT INTO conversations (phone_number) VALUES ('+491')")
        with psycopg.connect(a, autocommit=True) as conn:
            now = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]  # type: ignore[index]
            # Its own position it may report (as what its Agent DB has applied: nothing yet; a
            # position ahead of that would let the other daemon's prune delete what it still needs).
            assert conn.execute("SELECT dbsync.consumer_applied(%s, '3:3:')", (name_a,)).fetchone() == (True,)
            attacks = [
                ("SELECT dbsync.consumer_applied(%s, %s)", (name_b, now)),
                ("UPDATE dbsync.consumers SET applied_snapshot = %s::pg_snapshot WHERE name = %s", (now, name_b)),
                ("DELETE FROM dbsync.consumers WHERE name = %s", (name_b,)),
                (
                    "INSERT INTO dbsync.consumers (name, reporter, applied_snapshot) VALUES (%s, %s, %s)",
                    ("x", one, now),
                ),
                ("SELECT dbsync.register_consumer(%s, %s, %s)", ("y", now, two)),
                ("DELETE FROM dbsync.sync_log WHERE true", None),
                ("UPDATE dbsync.log_horizon SET pruned_txid = NULL", None),
            ]
            for sql, params in attacks:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql, params)
            # The prune it may run deletes nothing the other consumer has not applied.
            assert conn.execute("SELECT dbsync.prune_log(1000)").fetchone() == (0,)
        assert log_rows(pair) == 1
        # Both daemons, each with its own least-privilege role, replicate everything.
        first = with_env(pair, DBSYNC_SITE_DSN=a)
        second = with_env(second_agent, DBSYNC_SITE_DSN=b)
        with Daemon(first), Daemon(second):
            wait_until(lambda: same(pair) and same(second_agent), what="both Agent DBs to apply")
            wait_until(lambda: log_rows(pair) == 0, what="the log to be pruned")
        assert_same(pair)
        assert_same(second_agent)
    finally:
        for role in (one, two):
            site.execute(f"DROP OWNED BY {role}")
            site.execute(f"DROP ROLE {role}")


def test_upgrade_gives_the_old_daemon_role_what_it_calls_now(bare_pair: DbPair) -> None:
    """A role that pruned with DELETE before 0010 gets EXECUTE on what the daemon calls now."""
    from dbsync import migrations
    from tests.test_upgrade import CONSUMERS, apply_site_before

    role = f"dbsync_old_reader_{os.getpid()}_{next(_n)}"
    apply_site_before(bare_pair.site_dsn, CONSUMERS)
    site = bare_pair.site()
    site.execute(f"CREATE ROLE {role} LOGIN")
    try:
        site.execute(f"GRANT USAGE ON SCHEMA dbsync TO {role}; GRANT SELECT, DELETE ON dbsync.sync_log TO {role}")
        assert migrations.apply(bare_pair.site_dsn, "site", ["whatsapp"])[:1] == [CONSUMERS]  # and any later
        for function in (
            "dbsync.register_consumer(text, text, name)",
            "dbsync.consumer_applied(text, text)",
            "dbsync.prune_log(integer)",
        ):
            row = site.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, function)).fetchone()
            assert row == (True,), function
        assert site.execute("SELECT has_table_privilege(%s, 'dbsync.consumers', 'SELECT')", (role,)).fetchone() == (
            True,
        )
        assert site.execute(
            "SELECT has_function_privilege('public', 'dbsync.prune_log(integer)', 'EXECUTE')"
        ).fetchone() == (False,)
    finally:
        site.execute(f"DROP OWNED BY {role}")
        site.execute(f"DROP ROLE {role}")


@pytest.mark.unit
def test_stale_consumers_metric_is_rendered_when_known() -> None:
    from dbsync.daemon.metrics import Gauges, Metrics

    base = {
        "active": True,
        "site_connected": True,
        "agent_connected": True,
        "lag_seconds": 0.0,
        "lag_events": 0,
        "parked_events": 0,
        "reconnects": 0,
        "last_apply_at": None,
    }
    assert "dbsync_stale_consumers 2" in Metrics().render(Gauges(**base, stale_consumers=2))
    assert "dbsync_stale_consumers" not in Metrics().render(Gauges(**base))


@pytest.mark.unit
def test_consumer_settings() -> None:
    from dbsync.config import load_settings
    from dbsync.consumers import default_name
    from dbsync.errors import ConfigError

    assert default_name("site", "agent", "7715") == "site@agent/7715"
    assert default_name("site", "agent", None) == "site@agent"
    settings = load_settings(consumer="reporting", consumer_timeout="90")
    assert (settings.consumer, settings.consumer_timeout) == ("reporting", 90.0)
    assert load_settings().consumer_timeout == 3600.0
    for bad in ("0", "-5", "soon"):
        with pytest.raises(ConfigError, match="consumer_timeout"):
            load_settings(consumer_timeout=bad)


def test_a_registration_waits_for_a_prune_in_progress_and_sees_what_it_deleted(pair: DbPair) -> None:
    """A prune must not miss a registration that commits while it runs, nor may the registration
    miss the prune's horizon: they exclude each other."""
    site = pair.site()
    site.execute("INSERT INTO conversations (phone_number) VALUES ('+491'), ('+492')")
    now = site.execute("SELECT pg_current_snapshot()::text").fetchone()[0]  # type: ignore[index]
    site.execute("SELECT dbsync.register_consumer('first', %s)", (now,))
    pruner = psycopg.connect(pair.site_dsn)  # a transaction, held open
    try:
        assert pruner.execute("SELECT dbsync.prune_log(1000)").fetchone() == (1,)
        result: list[object] = []

        def register() -> None:
            with psycopg.connect(pair.site_dsn, autocommit=True) as conn:
                result.append(conn.execute("SELECT dbsync.register_consumer('late', '3:3:')").fetchone())

        thread = threading.Thread(target=register)
        thread.start()
        wait_until(
            lambda: site.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()[0],  # type: ignore[index]
            what="the registration to wait for the prune",
        )
        assert result == []
        pruner.commit()
        thread.join(timeout=30)
    finally:
        pruner.close()
    assert result == [(True,)]  # told it missed what the prune deleted
    listed = dbsync_cmd("consumers", "list", "--json", env=pair.env())
    late = [c for c in json.loads(listed.stdout) if c["name"] == "late"]
    assert late and late[0]["missed_history"]


def test_a_position_that_goes_back_past_the_pruned_log_is_flagged(pair: DbPair) -> None:
    """Forward reports never flag a consumer; one that goes back past what was pruned (an Agent DB
    restored from a backup) has missed history, and `dbsync status` says so."""
    site = pair.site()
    snapshot = "SELECT pg_current_snapshot()::text"
    site.execute("SELECT dbsync.register_consumer('restored', %s)", (site.execute(snapshot).fetchone()[0],))  # type: ignore[index]
    for phone in ("+491", "+492"):
        site.execute("INSERT INTO conversations (phone_number) VALUES (%s)", (phone,))
        site.execute("SELECT dbsync.consumer_applied('restored', %s)", (site.execute(snapshot).fetchone()[0],))  # type: ignore[index]
        assert site.execute("SELECT dbsync.prune_log(1000)").fetchone() == (1,)
    missed = "SELECT missed_history FROM dbsync.consumers WHERE name = 'restored'"
    assert site.execute(missed).fetchone() == (False,)
    site.execute("SELECT dbsync.consumer_applied('restored', '3:3:')")
    assert site.execute(missed).fetchone() == (True,)
    report = json.loads(dbsync_cmd("status", "--json", env=pair.env()).stdout)
    (restored,) = [c for c in report["consumers"] if c["name"] == "restored"]
    assert restored["missed_history"], restored

