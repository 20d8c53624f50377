"""The full verification's settings and arithmetic, without a server."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dbsync.config import load_settings
from dbsync.daemon.verify import _END, _resume, budget_wait, range_rows
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


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--full-verify-interval", "0"], {}, "option --full-verify-interval: full_verify_interval must be a positive"),
        (["--full-verify-interval", "-5"], {}, "full_verify_interval must be a positive float, got -5.0"),
        (["--verify-rows-per-second", "0"], {}, "verify_rows_per_second must be a positive int, got 0"),
        ([], {"DBSYNC_FULL_VERIFY_INTERVAL": "0"}, "environment DBSYNC_FULL_VERIFY_INTERVAL: full_verify_interval"),
        ([], {"DBSYNC_VERIFY_ROWS_PER_SECOND": "fast"}, "verify_rows_per_second must be a positive int, got 'fast'"),
        ([], {"DBSYNC_VERIFY_REPAIR": "perhaps"}, "verify_repair must be true or false, got 'perhaps'"),
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
