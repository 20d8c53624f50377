"""The full and incremental verifications' settings and arithmetic, without a server."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dbsync.config import load_settings
from dbsync.daemon.apply import TEST_DROP_EVENT, _test_drop_event
from dbsync.daemon.consume import Event
from dbsync.daemon.verify import _END, _resume, budget_wait, range_rows
from dbsync.daemon.verify_keys import CHUNK_KEYS, HandedKeys, chunk_keys, next_rows, pass_cap
from dbsync.reconcile import ComparedTable
from dbsync.rowhash import TableShape
from dbsync.verify import Progress
from tests.helpers import dbsync_cmd

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def no_dbsync_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DBSYNC_"):
            monkeypatch.delenv(name)


def test_off_by_default_and_read_from_flags_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = load_settings(None)
    assert (default.full_verify_interval, default.verify_rows_per_second, default.verify_repair) == (None, 5000, False)
    conf = tmp_path / "dbsync.toml"
    conf.write_text("full_verify_interval = 3600\nverify_rows_per_second = 200\nverify_repair = true\n")
    from_file = load_settings(conf)
    assert (from_file.full_verify_interval, from_file.verify_rows_per_second, from_file.verify_repair) == (
        3600.0,
        200,
        True,
    )
    monkeypatch.setenv("DBSYNC_VERIFY_REPAIR", "off")
    monkeypatch.setenv("DBSYNC_FULL_VERIFY_INTERVAL", "60")
    from_env = load_settings(conf)
    assert (from_env.full_verify_interval, from_env.verify_repair) == (60.0, False)
    flagged = load_settings(conf, full_verify_interval=5.0, verify_repair=True)
    assert (flagged.full_verify_interval, flagged.verify_repair) == (5.0, True)


def test_the_incremental_interval_is_off_by_default_and_read_like_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(None).verify_interval is None
    conf = tmp_path / "dbsync.toml"
    conf.write_text("verify_interval = 30\n")
    assert load_settings(conf).verify_interval == 30.0
    monkeypatch.setenv("DBSYNC_VERIFY_INTERVAL", "2.5")
    assert load_settings(conf).verify_interval == 2.5
    assert load_settings(conf, verify_interval=1.0).verify_interval == 1.0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--full-verify-interval", "0"], {}, "option --full-verify-interval: full_verify_interval must be a positive"),
        (["--full-verify-interval", "-5"], {}, "full_verify_interval must be a positive float, got -5.0"),
        (["--verify-rows-per-second", "0"], {}, "verify_rows_per_second must be a positive int, got 0"),
        ([], {"DBSYNC_FULL_VERIFY_INTERVAL": "0"}, "environment DBSYNC_FULL_VERIFY_INTERVAL: full_verify_interval"),
        ([], {"DBSYNC_VERIFY_ROWS_PER_SECOND": "fast"}, "verify_rows_per_second must be a positive int, got 'fast'"),
        ([], {"DBSYNC_VERIFY_REPAIR": "perhaps"}, "verify_repair must be true or false, got 'perhaps'"),
        (["--verify-interval", "0"], {}, "option --verify-interval: verify_interval must be a positive float, got 0"),
        (["--verify-interval", "-1"], {}, "verify_interval must be a positive float, got -1.0"),
        ([], {"DBSYNC_VERIFY_INTERVAL": "0"}, "environment DBSYNC_VERIFY_INTERVAL: verify_interval must be a positive"),
        ([], {"DBSYNC_VERIFY_INTERVAL": "often"}, "verify_interval must be a positive float, got 'often'"),
    ],
)
def test_bad_settings_are_refused_in_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBSYNC_")}
    environ.update({"DBSYNC_SITE_DSN": "host=localhost dbname=x", "DBSYNC_AGENT_DSN": "host=localhost dbname=y", **env})
    proc = dbsync_cmd("run", *args, env=environ, timeout=60)
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dbsync: error: ") and message in lines[0], proc.stderr


def test_ranges_and_the_budget() -> None:
    assert range_rows(5000) == 500
    assert range_rows(1) == 10  # never fewer than a few rows a statement
    assert range_rows(10**9) == 5000
    # 500 rows at 5000 a second: a tenth of a second per range, less what the range took.
    assert budget_wait(500, 5000, 0.04) == pytest.approx(0.06)
    assert budget_wait(500, 5000, 0.5) == 0.0  # slower than the budget: no wait


def _table(schema: str, name: str) -> ComparedTable:
    shape = TableShape(schema, name, ("id",), ("id",), "id bigint")
    return ComparedTable(1, shape, shape)


def _at(schema: str | None, table: str | None, last_key: str | None) -> Progress:
    now = datetime.now(UTC)
    return Progress(now, schema, table, last_key, 0, None, None, None, None)


def test_a_pass_resumes_where_it_stands() -> None:
    a, b, c = _table("public", "a"), _table("public", "b"), _table("sales", "a")
    tables = [a, b, c]
    assert _resume(tables, _at(None, None, None)) == (a, None)  # a new pass: the first table
    assert _resume(tables, _at("public", "b", '{"id" : "7"}')) == (b, '{"id" : "7"}')
    assert _resume(tables, _at("public", "b", _END)) == (c, None)  # b is done
    assert _resume(tables, _at("public", "aa", '{"id" : "7"}')) == (b, None)  # that table is gone
    assert _resume(tables, _at("sales", "a", _END)) == (None, None)  # the pass is complete
    assert _resume([], _at(None, None, None)) == (None, None)


def test_a_bad_incremental_interval_in_the_file_is_refused_in_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "dbsync.toml"
    conf.write_text('site_dsn = "host=x"\nagent_dsn = "host=y"\nverify_interval = -3\n')
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBSYNC_")}
    proc = dbsync_cmd("run", "--config", str(conf), env=environ, timeout=60)
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "verify_interval must be a positive float, got -3" in lines[0], proc.stderr


def test_incremental_chunks_and_the_cap_per_pass() -> None:
    assert chunk_keys(5000) == 500 and chunk_keys(50) == 10 and chunk_keys(10**6) == CHUNK_KEYS
    # A pass compares what the budget allows in one interval, and never less than one chunk.
    assert pass_cap(5000, 10) == 50_000 and pass_cap(100, 0.5) == 50


def test_the_lost_apply_hook_is_off_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from dbsync.daemon import apply

    now = datetime.now(UTC)
    page = [Event(1, 1, "I", '{"id" : "6"}', now), Event(2, 1, "I", '{"id" : "7"}', now)]
    assert _test_drop_event(page) is page
    monkeypatch.setattr(apply, "_test_dropped", False)
    monkeypatch.setenv(TEST_DROP_EVENT, '{"id": "7"}')
    assert [e.seq for e in _test_drop_event(page)] == [1]
    assert _test_drop_event(page) is page  # once per process


def _events(*seqs_keys: tuple[int, str | None]) -> list[Event]:
    now = datetime.now(UTC)
    return [Event(seq, 1, "U", key, now) for seq, key in seqs_keys]


def test_handed_batches_chain_from_the_mark_in_seq_order() -> None:
    """Batches count once whole; a pass takes those chaining from the mark, sorted by seq (a
    transaction that committed later may hold an earlier seq), and drops what came before."""
    handed = HandedKeys()
    handed.page("s0", "s1", _events((5, "a"), (6, "b")), True, 3)
    assert handed.take("s0") is None and handed.latest is None  # the batch is not whole yet
    handed.page("s0", "s1", _events((7, "c")), False, 3)
    handed.page("s1", "s2", _events((4, "d"), (8, None)), False, 2)
    handed.page("s5", "s6", _events((20, "z")), False, 1)  # after a gap
    assert handed.latest == "s6"
    assert handed.take("s9") is None
    target, rows = handed.take("s0") or ("", [])
    assert target == "s2" and [r[0] for r in rows] == [4, 5, 6, 7, 8] and rows[-1][2] is None
    assert handed.take("s0") is None  # taken
    handed.forget("s6")
    assert handed.take("s5") is None


def test_a_batch_opened_again_or_short_is_not_trusted_and_the_cap_empties_memory() -> None:
    handed = HandedKeys(cap=3)
    handed.page("s0", "s1", _events((1, "a")), True, 2)
    handed.page("s0", "s1b", _events((1, "a"), (2, "b")), False, 2)  # reopened at a new snapshot
    assert (handed.take("s0") or ("", []))[0] == "s1b"
    handed.page("s1b", "s2", _events((3, "c")), False, 2)  # fewer events than the batch opened with
    assert handed.take("s1b") is None and handed.latest is None
    handed.page("s2", "s3", _events((4, "d"), (5, "e"), (6, "f"), (7, "g")), False, 4)
    assert handed.take("s2") is None and handed.overflows == 1


def test_memory_chunks_are_whole_log_rows() -> None:
    rows = [(1, 1, "a"), (2, 1, "b"), (2, 1, "c"), (2, 1, "d"), (3, 1, "e")]
    seqs = [r[0] for r in rows]
    assert next_rows(rows, seqs, 0, 2) == rows[:4]  # log row 2 taken whole
    assert next_rows(rows, seqs, 2, 2) == rows[4:]
    assert next_rows(rows, seqs, 3, 2) == []
