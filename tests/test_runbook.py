"""docs/operations.md's procedures for a Site whose transaction ids go back (a dump restored into
a new cluster; a failover to a standby that lost WAL), run as written.

The progress on the Agent DB is a Site snapshot in xid8 values: a restored cluster hands out
small xids again, so its new transactions look applied. With the epoch step (`pg_resetwal -e`
before the restore) nothing is lost; without it, the runbook's recovery (commit empty transactions
past the stored snapshot, then `dbsync reconcile --deep --repair`) brings the Agent DB back.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dbsync import migrations
from dbsync.embedded.cluster import LocalCluster
from dbsync.errors import ProgressError
from tests.helpers import Daemon, DbPair, Server, dbsync_cmd, same, sync_once, wait_until

pytestmark = pytest.mark.slow

# As in docs/operations.md: one committed transaction per round, each taking an xid.
BURN = "DO $$ BEGIN FOR i IN 1..{n} LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
# docs/operations.md, "Move the Site DB with pg_dump and restore", step 4.
NEW_OIDS = """
UPDATE dbsync.replicated_tables
   SET relid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', schema_name, table_name))
 WHERE removed_at IS NULL
"""
STALE_OIDS = """
SELECT count(*) FROM dbsync.replicated_tables
WHERE removed_at IS NULL
  AND relid IS DISTINCT FROM pg_catalog.to_regclass(pg_catalog.format('%I.%I', schema_name, table_name))
"""
STORED_XMAX = """
SELECT greatest(pg_snapshot_xmax(prev_snapshot), pg_snapshot_xmax(batch_snapshot))::text::bigint
FROM dbsync.apply_progress
"""
SITE_NEXT_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"


def one(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute(sql).fetchone()[0])  # type: ignore[index]


def run(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture
def dumped(pair: DbPair) -> bytes:
    """The Site after applied changes and changes still pending, dumped with pg_dump."""
    if pair.site_server.cluster is None:
        pytest.skip("needs the PostgreSQL binaries (pg_dump, pg_resetwal): not with DBSYNC_TEST_SITE_DSN")
    run(pair.site_dsn, BURN.format(n=2000))  # the old Site's xids are well above a new cluster's
    run(pair.site_dsn, "INSERT INTO conversations (id, phone_number) SELECT g, '+' || g FROM generate_series(1, 50) g")
    sync_once(pair)
    run(pair.site_dsn, "UPDATE conversations SET contact_name = 'pending at the dump' WHERE id <= 5")
    bindir = pair.site_server.cluster.bindir
    return subprocess.run([str(bindir / "pg_dump"), "-Fc", pair.site_dsn], capture_output=True, check=True).stdout


@pytest.fixture
def new_site(pair: DbPair) -> Iterator[LocalCluster]:
    assert pair.site_server.cluster is not None
    cluster = LocalCluster(pair.site_server.cluster.bindir, name="restored").init()
    try:
        yield cluster
    finally:
        cluster.destroy()


def restore(cluster: LocalCluster, dump: bytes, pair: DbPair) -> DbPair:
    """Start the cluster, restore the dump into it, give the registry the new OIDs; the pair of
    the restored Site and the old Agent."""
    cluster.start()
    run(cluster.dsn(), "CREATE DATABASE crm")
    dsn = cluster.dsn("crm")
    restored = subprocess.run([str(cluster.bindir / "pg_restore"), "-d", dsn], input=dump, capture_output=True)
    assert restored.returncode == 0, restored.stderr.decode()
    assert one(dsn, STALE_OIDS) == 3  # a restore gives the tables new OIDs
    run(dsn, NEW_OIDS)
    assert one(dsn, STALE_OIDS) == 0
    return DbPair(dsn, pair.agent_dsn, Server(cluster.dsn(), cluster), pair.agent_server)


def write_after_restore(moved: DbPair) -> None:
    run(
        moved.site_dsn,
        "INSERT INTO conversations (id, phone_number) VALUES (100, '+100')",
        "UPDATE conversations SET status = 'closed' WHERE id BETWEEN 10 AND 14",
    )


def reconcile(moved: DbPair, *extra: str) -> subprocess.CompletedProcess[str]:
    return dbsync_cmd("reconcile", "--deep", *extra, "--site-dsn", moved.site_dsn, "--agent-dsn", moved.agent_dsn)


def active_daemon(moved: DbPair) -> bool:
    status = dbsync_cmd("status", "--json", "--site-dsn", moved.site_dsn, "--agent-dsn", moved.agent_dsn)
    return bool(json.loads(status.stdout or "{}").get("active_daemon"))


def test_restore_with_the_epoch_step_loses_nothing(
    pair: DbPair, dumped: bytes, new_site: LocalCluster, tmp_path: Path
) -> None:
    old_epoch = one(pair.site_dsn, SITE_NEXT_XID) >> 32
    # Before the new cluster runs any transaction (docs/operations.md, step 3).
    new_site._run(str(new_site.bindir / "pg_resetwal"), "-e", str(old_epoch + 1), str(new_site.datadir))
    moved = restore(new_site, dumped, pair)
    assert one(moved.site_dsn, SITE_NEXT_XID) > one(pair.agent_dsn, STORED_XMAX)
    write_after_restore(moved)
    with Daemon(moved, log_path=tmp_path / "daemon.log"):
        # Both the events pending at the dump and those written after the restore arrive.
        wait_until(lambda: same(moved), what="the restored Site's changes on the Agent DB")
    assert reconcile(moved).returncode == 0


def test_restore_without_it_is_recovered_by_the_runbook(
    pair: DbPair, dumped: bytes, new_site: LocalCluster, tmp_path: Path
) -> None:
    moved = restore(new_site, dumped, pair)
    write_after_restore(moved)
    # The symptom: the counter went back, so the new transactions' events would look applied;
    # the daemon refuses to go on, in one line, instead of skipping them.
    with pytest.raises(ProgressError, match="transaction ids went back below what the Agent DB has applied"):
        sync_once(moved)
    stored = one(pair.agent_dsn, STORED_XMAX)
    assert one(moved.site_dsn, SITE_NEXT_XID) < stored
    assert one(pair.agent_dsn, "SELECT count(*) FROM conversations WHERE id = 100") == 0
    assert reconcile(moved).returncode == 1

    # The recovery: past the stored snapshot, then repair through the log with the daemon running.
    run(moved.site_dsn, BURN.format(n=stored - one(moved.site_dsn, SITE_NEXT_XID) + 1))
    assert one(moved.site_dsn, SITE_NEXT_XID) > stored
    with Daemon(moved, log_path=tmp_path / "daemon.log"):
        wait_until(lambda: active_daemon(moved), what="the daemon to take the source")
        repaired = reconcile(moved, "--repair")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        run(moved.site_dsn, "INSERT INTO conversations (id, phone_number) VALUES (101, '+101')")
        wait_until(lambda: same(moved), what="the Agent DB to match the restored Site")


def standby_of(primary: LocalCluster) -> LocalCluster:
    """A streaming standby of `primary` (pg_basebackup -R), not started."""
    standby = LocalCluster(primary.bindir, name="standby")
    standby.datadir.mkdir(mode=0o700)
    standby.sockdir.mkdir()
    if os.geteuid() == 0:  # the clusters run as the service user (LocalCluster does the same)
        for path in (standby.root, standby.datadir, standby.sockdir):
            os.chown(path, primary.datadir.stat().st_uid, primary.datadir.stat().st_gid)
    basebackup = str(primary.bindir / "pg_basebackup")
    standby._run(basebackup, "-D", str(standby.datadir), "-R", "-c", "fast", "-d", primary.dsn())
    return standby.configure(f"port = {standby.port}\nunix_socket_directories = '{standby.sockdir}'")


def caught_up(primary: LocalCluster) -> bool:
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE replay_lsn >= pg_current_wal_lsn()) FROM pg_stat_replication"
        ).fetchone()
    return row == (1,)


def test_failover_that_lost_wal_is_recovered_by_the_runbook(pair: DbPair, tmp_path: Path) -> None:
    if pair.site_server.cluster is None:
        pytest.skip("needs the PostgreSQL binaries (pg_basebackup): not with DBSYNC_TEST_SITE_DSN")
    primary = LocalCluster(pair.site_server.cluster.bindir, name="primary").init().start()
    standby: LocalCluster | None = None
    try:
        run(primary.dsn(), "CREATE DATABASE crm")
        old = DbPair(primary.dsn("crm"), pair.agent_dsn, Server(primary.dsn(), primary), pair.agent_server)
        migrations.apply(old.site_dsn, "site", ["whatsapp"])
        run(old.site_dsn, "INSERT INTO conversations (id, phone_number) SELECT g, 'x' FROM generate_series(1, 20) g")
        standby = standby_of(primary).start()
        wait_until(lambda: caught_up(primary), what="the standby to replay everything")
        sync_once(old)
        # The standby stops receiving; the primary commits more, which reaches the Agent DB, then dies.
        standby.stop()
        run(old.site_dsn, BURN.format(n=500))
        run(old.site_dsn, "INSERT INTO conversations (id, phone_number) VALUES (50, 'lost with the primary')")
        run(old.site_dsn, "UPDATE conversations SET contact_name = 'lost too' WHERE id = 1")
        sync_once(old)
        primary.kill()
        standby.start()
        standby._run(str(standby.bindir / "pg_ctl"), "-D", str(standby.datadir), "-w", "promote")

        new = DbPair(standby.dsn("crm"), pair.agent_dsn, Server(standby.dsn(), standby), pair.agent_server)
        stored = one(pair.agent_dsn, STORED_XMAX)
        assert one(new.site_dsn, SITE_NEXT_XID) < stored  # the counter went back
        run(new.site_dsn, "UPDATE conversations SET status = 'closed' WHERE id BETWEEN 10 AND 12")
        with pytest.raises(ProgressError, match="went back"):
            sync_once(new)  # refused: these changes would look applied
        assert one(pair.agent_dsn, "SELECT count(*) FROM conversations WHERE status = 'closed'") == 0
        assert reconcile(new).returncode == 1

        run(new.site_dsn, BURN.format(n=stored - one(new.site_dsn, SITE_NEXT_XID) + 1))
        with Daemon(new, log_path=tmp_path / "daemon.log"):
            wait_until(lambda: active_daemon(new), what="the daemon to take the source")
            repaired = reconcile(new, "--repair")
            assert repaired.returncode == 0, repaired.stdout + repaired.stderr
            wait_until(lambda: same(new), what="the Agent DB to match the promoted Site")
        # What the old primary lost is gone from the Agent DB too; what the new one wrote is there.
        assert one(pair.agent_dsn, "SELECT count(*) FROM conversations WHERE id = 50") == 0
        assert one(pair.agent_dsn, "SELECT count(*) FROM conversations WHERE status = 'closed'") == 3
    finally:
        for cluster in (standby, primary):
            if cluster is not None:
                cluster.destroy()


def test_pg_upgrade_keeps_the_progress(pair: DbPair, tmp_path: Path) -> None:
    """docs/operations.md: pg_upgrade needs nothing done (the counter, the log and the OIDs stay)."""
    if pair.site_server.cluster is None:
        pytest.skip("needs the PostgreSQL binaries (pg_upgrade): not with DBSYNC_TEST_SITE_DSN")
    bindir = pair.site_server.cluster.bindir
    old_cluster = LocalCluster(bindir, name="old").init().start()
    new_cluster = LocalCluster(bindir, name="new").init()
    try:
        run(old_cluster.dsn(), "CREATE DATABASE crm")
        old = DbPair(old_cluster.dsn("crm"), pair.agent_dsn, Server(old_cluster.dsn(), old_cluster), pair.agent_server)
        migrations.apply(old.site_dsn, "site", ["whatsapp"])
        run(old.site_dsn, "INSERT INTO conversations (id, phone_number) SELECT g, 'x' FROM generate_series(1, 20) g")
        sync_once(old)
        run(old.site_dsn, "UPDATE conversations SET contact_name = 'pending at the upgrade' WHERE id <= 5")
        old_cluster.stop()
        # The same major version both sides (the binaries at hand); what pg_upgrade carries over is the same.
        # The same major version on both sides (the binaries at hand): what it carries over is the same.
        upgrade = [str(bindir / "pg_upgrade"), "-b", str(bindir), "-B", str(bindir), "-U", "postgres"]
        upgrade += ["-d", str(old_cluster.datadir), "-D", str(new_cluster.datadir), "-s", str(new_cluster.sockdir)]
        upgrade += ["-p", str(old_cluster.port), "-P", str(new_cluster.port)]
        owner = new_cluster.datadir.stat()  # pg_upgrade runs as the clusters' owner, in a folder it may write
        done = subprocess.run(
            upgrade, cwd=new_cluster.root, user=owner.st_uid, group=owner.st_gid, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr
        new_cluster.start()
        new = DbPair(new_cluster.dsn("crm"), pair.agent_dsn, Server(new_cluster.dsn(), new_cluster), pair.agent_server)
        assert one(new.site_dsn, SITE_NEXT_XID) >= one(pair.agent_dsn, STORED_XMAX)
        assert one(new.site_dsn, STALE_OIDS) == 0
        run(new.site_dsn, "UPDATE conversations SET status = 'closed' WHERE id BETWEEN 10 AND 12")
        with Daemon(new, log_path=tmp_path / "daemon.log"):
            wait_until(lambda: same(new), what="the upgraded Site's changes on the Agent DB")
    finally:
        new_cluster.destroy()
        old_cluster.destroy()
