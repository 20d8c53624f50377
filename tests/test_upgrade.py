"""Upgrading the Site DB to key-only capture (0006_site_key_capture) under a live backlog.

The old daemon is stopped, so events in the row-image format wait in the log; the migration runs
while writers keep writing, and the new daemon drains both formats: nothing lost, nothing doubled.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import psycopg
from psycopg import errors
from yoyo import read_migrations

from dbsync import migrations
from tests.helpers import DbPair, assert_same, sync_once, wait_until

KEY_CAPTURE = "0006_site_key_capture"
STABLE_READ = "0007_site_stable_read"
IDENTITY = "0008_site_identity"
FILTERS = "0009_site_filters"
CONSUMERS = "0010_site_consumers"
KEYED_READS = "0011_site_keyed_reads"
SMALL_STATEMENTS = "0012_site_small_statements"
WRITE_BACK = "0013_site_write_back"


def apply_site_before(dsn: str, last_excluded: str) -> list[str]:
    """Every shipped Site migration (core and the WhatsApp pack) that does not depend on
    `last_excluded`, nor is it."""
    shipped = read_migrations(*(str(d) for d in migrations.migration_dirs("site", ["whatsapp"])))
    with migrations._backend(dsn) as backend, backend.lock():
        todo = backend.to_apply(shipped)
        keep = todo.filter(lambda m: m.id < last_excluded or not m.id[:4].isdigit())
        backend.apply_migrations(keep)
    return [m.id for m in keep]


class Writer(threading.Thread):
    """The CRM's writes, one small transaction at a time, with now and then a bulk statement,
    until stopped. Deadlocks with the migration's DDL are retried, as an application would."""

    def __init__(self, dsn: str, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rng, self.stop = dsn, random.Random(seed), stop
        self.seed = seed
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                n = 0
                while not self.stop.is_set():
                    n += 1
                    try:
                        self._one(conn, n)
                        self.transactions += 1
                    except (errors.DeadlockDetected, errors.LockNotAvailable):
                        continue
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _one(self, conn: psycopg.Connection[Any], n: int) -> None:
        rng = self.rng
        with conn.transaction():
            cid = conn.execute(
                "INSERT INTO conversations (phone_number, contact_name) VALUES (%s, %s) RETURNING id",
                (f"+{self.seed}{n}", f"contact {n}"),
            ).fetchone()[0]  # type: ignore[index]
            conn.execute(
                "INSERT INTO whatsapp_messages (message_id, conversation_id, phone_number, direction, content) "
                "VALUES (%s, %s, %s, 'outbound', %s)",
                (f"wamid.{self.seed}.{n}", cid, f"+{self.seed}{n}", "x" * rng.randrange(1, 3000)),
            )
        status = rng.choice(["delivered", "read", "failed"])
        conn.execute(
            "UPDATE whatsapp_messages SET status = %s, updated_at = now() WHERE message_id = %s",
            (status, f"wamid.{self.seed}.{rng.randrange(1, n + 1)}"),
        )
        if n % 7 == 0:
            conn.execute("DELETE FROM whatsapp_messages WHERE message_id = %s", (f"wamid.{self.seed}.{n - 3}",))
        if n % 25 == 0:
            conn.execute(
                "UPDATE conversations SET unread_count = unread_count + 1 WHERE phone_number LIKE %s",
                (f"+{self.seed}%",),
            )


def formats(dsn: str) -> tuple[int, int]:
    """(events with a row image, key-only events) among inserts and updates in the log."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE row_image IS NOT NULL), count(*) FILTER (WHERE row_image IS NULL) "
            "FROM dbsync.sync_log WHERE op IN ('I', 'U')"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_migrating_under_writers_over_an_old_backlog_loses_and_doubles_nothing(bare_pair: DbPair) -> None:
    pair = bare_pair
    applied = apply_site_before(pair.site_dsn, KEY_CAPTURE)
    assert KEY_CAPTURE not in applied and "whatsapp_0001_site_tables" in applied
    migrations.apply(pair.agent_dsn, "agent", ["whatsapp"])

    stop = threading.Event()
    writers = [Writer(pair.site_dsn, seed, stop) for seed in (11, 22)]
    for w in writers:
        w.start()
    try:
        wait_until(lambda: formats(pair.site_dsn)[0] >= 300, timeout=60, what="an old-format backlog")
        assert migrations.apply(pair.site_dsn, "site", ["whatsapp"]) == [
            KEY_CAPTURE,
            STABLE_READ,
            IDENTITY,
            FILTERS,
            CONSUMERS,
            KEYED_READS,
            SMALL_STATEMENTS,
            WRITE_BACK,
        ]
        wait_until(lambda: formats(pair.site_dsn)[1] >= 300, timeout=60, what="key-only events after the upgrade")
    finally:
        stop.set()
        for w in writers:
            w.join(timeout=30)
    for w in writers:
        assert w.error is None, w.error
        assert w.transactions > 0
    old, new = formats(pair.site_dsn)
    assert old >= 300 and new >= 300

    sync_once(pair)
    assert_same(pair)
    # Once drained, the log's events are applied and retention may drop them: a second pass
    # changes nothing.
    sync_once(pair)
    assert_same(pair)


def test_rollback_is_refused_while_key_only_events_wait(pair: DbPair) -> None:
    pair.site().execute("INSERT INTO conversations (phone_number) VALUES ('+1')")
    shipped = read_migrations(*(str(d) for d in migrations.migration_dirs("site", ["whatsapp"])))
    with migrations._backend(pair.site_dsn) as backend, backend.lock():
        try:
            backend.rollback_migrations(shipped.filter(lambda m: m.id == KEY_CAPTURE))
        except psycopg.Error as exc:
            assert "key-only events" in str(exc)
        else:
            raise AssertionError("the rollback ran over key-only events")
    # Drained, it runs, and the old capture writes row images again.
    sync_once(pair)
    with psycopg.connect(pair.site_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM dbsync.sync_log")
    with migrations._backend(pair.site_dsn) as backend, backend.lock():
        backend.rollback_migrations(shipped.filter(lambda m: m.id == KEY_CAPTURE))
    site = pair.site()
    site.execute("UPDATE conversations SET contact_name = 'after rollback'")
    assert formats(pair.site_dsn) == (1, 0)


def test_an_older_daemon_is_stopped_not_fed_key_only_events(pair: DbPair) -> None:
    """The previous daemon read every page through dbsync.image_json; after the migration that
    call refuses with one line, so an old daemon left running stops instead of skipping the
    key-only inserts and updates it cannot apply."""
    site = pair.site()
    site.execute("INSERT INTO conversations (phone_number) VALUES ('+1')")
    try:
        site.execute("SELECT dbsync.image_json(pk) FROM dbsync.sync_log")
    except errors.FeatureNotSupported as exc:
        assert "upgrade the dbsync daemon and CLI" in str(exc) and "nothing has been skipped" in str(exc)
    else:
        raise AssertionError("dbsync.image_json still answers")
