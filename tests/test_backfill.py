"""Initial copy (`dbsync backfill`, `tables add --backfill`): consistent with live writes, resumable."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Self

import psycopg

from tests.helpers import (
    Daemon,
    DbPair,
    assert_same,
    count,
    dbsync_cmd,
    same,
    sync_once,
    wait_until,
)

ITEMS = """
CREATE TABLE public.items (
    id bigint PRIMARY KEY,
    payload text,
    n integer NOT NULL DEFAULT 0,
    f double precision,
    tags text[],
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""
ROWS = 20000


def make_items(pair: DbPair, rows: int = ROWS) -> None:
    """The table exists and holds rows on the Site DB before it is replicated."""
    pair.site().execute(ITEMS)
    pair.agent().execute(ITEMS)
    pair.site().execute(
        "INSERT INTO public.items (id, payload, n, f, tags) "
        "SELECT g, 'item ' || g, g %% 97, g / 3.0, ARRAY['t' || (g %% 5)] FROM generate_series(1, %s) g",
        (rows,),
    )


def state(pair: DbPair) -> tuple[int, bool] | None:
    row = (
        pair.site()
        .execute(
            "SELECT rows_done, finished_at IS NOT NULL FROM dbsync.backfill_state b "
            "JOIN dbsync.replicated_tables r USING (table_id) WHERE r.table_name = 'items'"
        )
        .fetchone()
    )
    return (int(row[0]), bool(row[1])) if row else None


class Writers:
    """Threads inserting, updating, deleting and re-keying items until stopped."""

    def __init__(self, pair: DbPair, threads: int = 2) -> None:
        self.dsn = pair.site_dsn
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.writes = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def check(self) -> None:
        assert not self.errors, self.errors
        assert self.writes > 0

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("SET lock_timeout = '5s'")
                i = 0
                while not self.stop.is_set() and i < 50000:
                    i += 1
                    key = rng.randint(1, ROWS)
                    op = rng.random()
                    try:
                        if op < 0.3:
                            conn.execute(
                                "INSERT INTO public.items (id, payload) VALUES (%s, 'new') "
                                "ON CONFLICT (id) DO UPDATE SET payload = 'reinserted'",
                                (rng.choice([key, ROWS + rng.randint(1, 10**6)]),),
                            )
                        elif op < 0.8:
                            conn.execute(
                                "UPDATE public.items SET n = n + 1, f = random(), updated_at = now() WHERE id = %s",
                                (key,),
                            )
                        elif op < 0.95:
                            conn.execute("DELETE FROM public.items WHERE id = %s", (key,))
                        else:  # move a row to another key, ahead of or behind the copy
                            conn.execute(
                                "UPDATE public.items SET id = %s WHERE id = %s", (rng.randint(1, 3 * ROWS), key)
                            )
                    except (
                        psycopg.errors.UniqueViolation,
                        psycopg.errors.DeadlockDetected,
                        psycopg.errors.LockNotAvailable,
                    ):
                        continue
                    self.writes += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


def test_tables_add_backfill_under_concurrent_writes(pair: DbPair, tmp_path: Path) -> None:
    make_items(pair)
    with Daemon(pair, log_path=tmp_path / "daemon.log"):
        with Writers(pair) as writers:
            wait_until(lambda: writers.writes > 50, 30, what="writers started")
            proc = dbsync_cmd("tables", "add", "items", "--backfill", "--chunk-size", "700", env=pair.env())
            assert proc.returncode == 0, proc.stderr
            assert "backfill complete" in proc.stdout
            assert "rows copied" in proc.stderr  # progress, a line a second and at the end
            wait_until(lambda: writers.writes > 200, 30, what="writes after the copy")
        writers.check()
        wait_until(lambda: same(pair, ["public.items"]), 60, what="Agent DB caught up")
    assert_same(pair, ["public.items"])
    assert count(pair.agent_dsn, "public.items") > ROWS // 2
    proc = dbsync_cmd("reconcile", "--deep", "--table", "items", env=pair.env())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_backfill_stops_after_n_chunks_and_resumes(pair: DbPair) -> None:
    make_items(pair, 5000)
    pair.site().execute("SELECT dbsync.add_table('public.items')")
    proc = dbsync_cmd("backfill", "items", "--chunk-size", "1000", "--max-chunks", "2", env=pair.env())
    assert proc.returncode == 0, proc.stderr
    assert "paused after 2000 rows" in proc.stdout
    assert state(pair) == (2000, False)
    sync_once(pair)
    assert count(pair.agent_dsn, "public.items") == 2000
    # Rows change before the copy resumes: in the copied part and beyond it.
    pair.site().execute("UPDATE public.items SET payload = 'changed' WHERE id IN (10, 4000)")
    pair.site().execute("DELETE FROM public.items WHERE id IN (11, 4001)")
    proc = dbsync_cmd("backfill", "items", "--chunk-size", "1000", env=pair.env())
    assert proc.returncode == 0, proc.stderr
    assert "backfill complete: 4999 rows" in proc.stdout  # 2000 before + 2999 after
    sync_once(pair)
    assert_same(pair, ["public.items"])

    proc = dbsync_cmd("backfill", "items", env=pair.env())
    assert "already complete" in proc.stdout
    proc = dbsync_cmd("backfill", "items", "--restart", env=pair.env())
    assert "backfill complete: 4998 rows" in proc.stdout


def test_backfill_killed_mid_chunk_resumes(pair: DbPair) -> None:
    make_items(pair, 10000)
    pair.site().execute("SELECT dbsync.add_table('public.items')")
    blocker = pair.site()
    blocker.execute("BEGIN")
    blocker.execute("UPDATE public.items SET payload = 'locked' WHERE id = 6500")  # holds the row lock
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbsync", "backfill", "items", "--chunk-size", "500"],
        env=pair.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: (state(pair) or (0, False))[0] == 6000, 30, what="backfill blocked at row 6500")
        watcher = pair.site()
        wait_until(
            lambda: (
                watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%backfill_step%%'"
                ).fetchone()
                == (1,)
            ),
            30,
            what="chunk waiting on the row lock",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    blocker.execute("COMMIT")
    assert state(pair) == (6000, False)  # the killed chunk left nothing behind
    done = dbsync_cmd("backfill", "items", "--chunk-size", "500", env=pair.env())
    assert done.returncode == 0, done.stderr
    assert "backfill complete: 10000 rows" in done.stdout
    sync_once(pair)
    assert_same(pair, ["public.items"])


def test_backfill_text_and_composite_keys(pair: DbPair) -> None:
    ddl = 'CREATE TABLE public.ck ("tenant id" text, n integer, v text, PRIMARY KEY ("tenant id", n));'
    pair.site().execute(ddl)
    pair.agent().execute(ddl)
    tenants = ["", "NULL", "a,b", 'q"', "z", "ä"]
    for t in tenants:
        for n in range(4):
            pair.site().execute("INSERT INTO public.ck VALUES (%s, %s, %s)", (t, n, [None, "", "NULL", "x"][n]))
    proc = dbsync_cmd("tables", "add", "ck", "--backfill", "--chunk-size", "5", env=pair.env())
    assert proc.returncode == 0, proc.stderr
    assert "backfill complete: 24 rows" in proc.stdout
    sync_once(pair)
    assert_same(pair, ["public.ck"])


def test_backfill_of_a_table_not_replicated_fails_clearly(pair: DbPair) -> None:
    for name, message in (("notifications", "is not replicated"), ("missing_table", "does not exist")):
        proc = dbsync_cmd("backfill", name, env=pair.env())
        assert proc.returncode == 2
        assert message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_uuid_keys_backfill_then_reconcile_and_repair(pair: DbPair) -> None:
    ddl = "CREATE TABLE public.docs (id uuid PRIMARY KEY, body jsonb, score numeric(8, 3));"
    pair.site().execute(ddl)
    pair.agent().execute(ddl)
    pair.site().execute(
        "INSERT INTO public.docs SELECT gen_random_uuid(), jsonb_build_object('n', g), g / 8.0 "
        "FROM generate_series(1, 300) g"
    )
    proc = dbsync_cmd("tables", "add", "docs", "--backfill", "--chunk-size", "64", env=pair.env())
    assert proc.returncode == 0, proc.stderr
    sync_once(pair)
    assert_same(pair, ["public.docs"])

    bounds = pair.agent().execute("SELECT min(id::text), max(id::text) FROM public.docs").fetchone()
    assert bounds is not None
    gone, changed = bounds
    pair.agent().execute("DELETE FROM public.docs WHERE id = %s", (gone,))
    pair.agent().execute("UPDATE public.docs SET score = score + 0.001 WHERE id = %s", (changed,))
    proc = dbsync_cmd("reconcile", "--deep", "--table", "docs", "--json", env=pair.env())
    assert proc.returncode == 1, proc.stderr
    table = json.loads(proc.stdout)["tables"]["public.docs"]
    assert table["missing_keys"] == [{"id": gone}]
    assert table["changed_keys"] == [{"id": changed}]
    proc = dbsync_cmd("reconcile", "--deep", "--table", "docs", "--repair", "--apply", env=pair.env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same(pair, ["public.docs"])
