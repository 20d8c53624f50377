"""Applied events leave the Site's sync log; nothing a consumer still needs does."""

from __future__ import annotations

import psycopg

from tests.helpers import Daemon, DbPair, assert_same, same, wait_until


def log_rows(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM dbsync.sync_log").fetchone()[0])  # type: ignore[index]


def test_applied_events_are_deleted_and_pending_ones_kept(pair: DbPair) -> None:
    site = pair.site()
    site.execute(
        "INSERT INTO conversations (phone_number) SELECT '+49151' || g FROM generate_series(1, 3000) g"
    )
    # A transaction that stays open across several prunes: its event must survive them.
    held = psycopg.connect(pair.site_dsn)
    held.execute("INSERT INTO conversations (phone_number) VALUES ('+4915199999999')")
    with Daemon(pair):
        for _ in range(3):
            site.execute("UPDATE conversations SET unread_count = unread_count + 1 WHERE id <= 1000")
        wait_until(lambda: log_rows(site) == 0, 30, 0.1, "the applied events to be pruned")
        held.commit()
        held.close()
        wait_until(lambda: same(pair), 30, 0.05, "the held transaction to be applied")
        wait_until(lambda: log_rows(site) == 0, 30, 0.1, "its event to be pruned too")
    assert_same(pair)
