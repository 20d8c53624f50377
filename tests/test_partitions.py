"""Partitioned tables on the Site DB, replicated into an Agent table that is not partitioned:
rows in every partition, rows moving between partitions, TRUNCATE of the root, of a
sub-partitioned member and of one leaf, partitions attached and detached later."""

from __future__ import annotations

import os

import psycopg
import pytest

from tests.helpers import DbPair, assert_same, dbsync_cmd, sync_once

T = "public.events"
SITE_DDL = f"""
CREATE TABLE {T} (id integer, k integer, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
CREATE TABLE public.events_low PARTITION OF {T} FOR VALUES FROM (0) TO (100);
CREATE TABLE public.events_mid PARTITION OF {T} FOR VALUES FROM (100) TO (200) PARTITION BY LIST (id);
CREATE TABLE public.events_mid_odd PARTITION OF public.events_mid FOR VALUES IN (1, 3, 5, 7, 9);
CREATE TABLE public.events_mid_rest PARTITION OF public.events_mid DEFAULT;
CREATE TABLE public.events_high PARTITION OF {T} FOR VALUES FROM (200) TO (300);
"""
AGENT_DDL = f"CREATE TABLE {T} (id integer, k integer, v text, PRIMARY KEY (id, k))"


def _setup(pair: DbPair) -> psycopg.Connection:
    site = pair.site()
    site.execute(SITE_DDL)
    pair.agent().execute(AGENT_DDL)
    result = dbsync_cmd("tables", "add", T, env=pair.env())
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def _fill(site: psycopg.Connection) -> None:
    site.execute(
        f"INSERT INTO {T} SELECT g, (g * 37) % 300, 'v' || g FROM generate_series(1, 60) g ON CONFLICT DO NOTHING"
    )


def _count(dsn: str, where: str = "true") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {T} WHERE {where}").fetchone()[0])  # type: ignore[index]


def test_changes_in_every_partition_and_truncates_at_every_level(pair: DbPair) -> None:
    site = _setup(pair)
    _fill(site)
    site.execute(f"UPDATE {T} SET k = k + 100 WHERE k < 100 AND id % 2 = 0")  # rows move partitions
    site.execute(f"UPDATE {T} SET v = 'changed' WHERE k >= 200")
    site.execute(f"DELETE FROM {T} WHERE id % 5 = 0")
    sync_once(pair)
    assert_same(pair, [T])
    assert _count(pair.agent_dsn) == _count(pair.site_dsn) > 30

    # One leaf of a sub-partitioned member, then the member itself, then a top-level leaf.
    for member in ("public.events_mid_odd", "public.events_mid", "public.events_low"):
        before = _count(pair.site_dsn)
        site.execute(f"TRUNCATE {member}")
        assert _count(pair.site_dsn) < before, f"{member} held no rows: the test proves nothing"
        sync_once(pair)
        assert_same(pair, [T])

    # TRUNCATE of the root is one 'T' event, not a delete per row of its partitions.
    _fill(site)
    sync_once(pair)
    newest = site.execute("SELECT max(seq) FROM dbsync.sync_log").fetchone()[0]  # type: ignore[index]
    site.execute(f"TRUNCATE {T}")
    ops = [r[0] for r in site.execute("SELECT op FROM dbsync.sync_log WHERE seq > %s", (newest,)).fetchall()]
    assert ops == ["T"]
    sync_once(pair)
    assert _count(pair.agent_dsn) == 0
    assert site.execute("SELECT count(*) FROM dbsync.truncating").fetchone() == (0,)


def test_a_writer_truncating_a_partition_is_captured_and_cannot_forge_a_mark(pair: DbPair) -> None:
    site = _setup(pair)
    _fill(site)
    sync_once(pair)
    writer = f"dbsync_pwriter_{os.getpid()}"
    site.execute(f"CREATE ROLE {writer} LOGIN")
    try:
        site.execute(f"GRANT SELECT, TRUNCATE ON public.events_high TO {writer}")
        with psycopg.connect(pair.site_dsn, autocommit=True) as conn:
            conn.execute(f"SET ROLE {writer}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    "INSERT INTO dbsync.truncating VALUES (pg_current_xact_id(), 'public.events_high'::regclass)"
                )
            conn.execute("TRUNCATE public.events_high")
        sync_once(pair)
        assert_same(pair, [T])
        assert _count(pair.agent_dsn, "k >= 200") == 0
    finally:
        site.execute(f"DROP OWNED BY {writer}")
        site.execute(f"DROP ROLE {writer}")


def test_attach_and_detach_are_found_and_refreshed(pair: DbPair) -> None:
    site = _setup(pair)
    _fill(site)
    sync_once(pair)
    # A table with rows of its own becomes a partition; two partitions leave, one is dropped.
    site.execute("CREATE TABLE public.events_top (id integer, k integer, v text, PRIMARY KEY (id, k))")
    site.execute("INSERT INTO public.events_top SELECT g, 300 + g, 'top' FROM generate_series(1, 10) g")
    site.execute(f"ALTER TABLE {T} ATTACH PARTITION public.events_top FOR VALUES FROM (300) TO (400)")
    site.execute(f"ALTER TABLE {T} DETACH PARTITION public.events_low")
    site.execute(f"ALTER TABLE {T} DETACH PARTITION public.events_high")
    site.execute("DROP TABLE public.events_high")

    status = dbsync_cmd("status", env=pair.env())
    assert status.returncode == 1
    assert "partitions changed" in status.stdout and "dbsync tables refresh public.events" in status.stdout
    assert "attached public.events_top" in status.stdout and "detached public.events_low" in status.stdout

    refresh = dbsync_cmd("tables", "refresh", T, env=pair.env())
    assert refresh.returncode == 1, refresh.stdout + refresh.stderr  # events_high was dropped
    assert "public.events_top attached, 10 row(s) resynced" in refresh.stdout
    assert "public.events_low detached" in refresh.stdout
    assert "dbsync reconcile --repair --table public.events" in refresh.stderr

    sync_once(pair)
    assert _count(pair.agent_dsn, "k >= 300") == 10  # the attached rows arrived
    assert _count(pair.agent_dsn, "k < 100") == 0  # the detached ones left
    assert _count(pair.agent_dsn, "k >= 200 AND k < 300") > 0  # the dropped member's rows: stale
    repair = dbsync_cmd("reconcile", "--repair", "--apply", "--table", T, env=pair.env())
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert_same(pair, [T])

    # Capture now covers the attached member's TRUNCATE, and the tree matches again.
    site.execute("TRUNCATE public.events_top")
    sync_once(pair)
    assert_same(pair, [T])
    again = dbsync_cmd("tables", "refresh", T, env=pair.env())
    assert again.returncode == 0 and "capture matches the partition tree" in again.stdout
    assert "partitions changed" not in dbsync_cmd("status", env=pair.env()).stdout


def test_a_tree_is_replicated_once_at_its_root(pair: DbPair) -> None:
    site = _setup(pair)
    pair.agent().execute("CREATE TABLE public.events_low (id integer, k integer, v text, PRIMARY KEY (id, k))")
    member = dbsync_cmd("tables", "add", "public.events_low", env=pair.env())
    assert member.returncode != 0
    assert "partition tree of public.events" in member.stderr and "Traceback" not in member.stderr
    removed = dbsync_cmd("tables", "remove", T, env=pair.env())
    assert removed.returncode == 0, removed.stdout + removed.stderr
    triggers = site.execute(
        "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE tgname LIKE 'dbsync%' AND NOT tgisinternal "
        "AND tgrelid IN (SELECT relid FROM pg_partition_tree('public.events'))"
    ).fetchall()
    assert triggers == [], "tables remove left capture triggers on the tree"
