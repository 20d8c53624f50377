"""The helpers the other tests rely on: same() tells equal tables from unequal ones exactly as
rows_of does, though it polls on fingerprints computed in each database; a randomised test's
seed can be given, and a failure names it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SEED_ENV, DbPair, assert_same, pick_seed, replicate, rows_of, same

T = "public.fp"


def make(pair: DbPair) -> None:
    replicate(
        pair,
        "CREATE TABLE fp (a int, b int, x float8, t text, PRIMARY KEY (b, a))",
        T,
        # Another column order on the Agent: rows are compared column by column name.
        agent_ddl="CREATE TABLE fp (t text, x float8, b int, a int, PRIMARY KEY (b, a))",
    )


def both(pair: DbPair, sql: str) -> None:
    pair.site().execute(sql)
    pair.agent().execute(sql)


def test_same_tells_equal_from_unequal_tables(pair: DbPair) -> None:
    make(pair)
    assert same(pair, [T])  # both empty
    both(pair, "INSERT INTO fp (a, b, x, t) SELECT g, g % 3, g / 7.0, 'row ' || g FROM generate_series(1, 500) g")
    assert same(pair, [T])
    assert_same(pair, [T])
    site, agent = pair.site(), pair.agent()
    # One value, with the row count unchanged.
    agent.execute("UPDATE fp SET t = 'row 77 ' WHERE a = 77")
    assert not same(pair, [T])
    agent.execute("UPDATE fp SET t = 'row 77' WHERE a = 77")
    assert same(pair, [T])
    # A float that prints the same at the default precision, not at rows_of's.
    agent.execute("UPDATE fp SET x = 0.1::float8 + 0.2::float8 WHERE a = 1")
    site.execute("UPDATE fp SET x = 0.3 WHERE a = 1")
    assert not same(pair, [T])
    assert rows_of(pair.site_dsn, T) != rows_of(pair.agent_dsn, T)
    site.execute("UPDATE fp SET x = 0.1::float8 + 0.2::float8 WHERE a = 1")
    assert same(pair, [T])
    # A NULL against an empty string; a row missing on one side.
    agent.execute("UPDATE fp SET t = NULL WHERE a = 5")
    site.execute("UPDATE fp SET t = '' WHERE a = 5")
    assert not same(pair, [T])
    both(pair, "UPDATE fp SET t = 'five' WHERE a = 5")
    agent.execute("DELETE FROM fp WHERE a = 500")
    assert not same(pair, [T])
    agent.execute("INSERT INTO fp (a, b, x, t) VALUES (500, 500 % 3, 500 / 7.0, 'row 500')")
    assert same(pair, [T])


@pytest.mark.unit
def test_seed_comes_from_the_environment_or_at_random(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SEED_ENV, "4242")
    assert pick_seed() == 4242
    monkeypatch.delenv(SEED_ENV)
    drawn = {pick_seed() for _ in range(5)}
    assert len(drawn) > 1 and all(0 <= s < 1 << 31 for s in drawn)


@pytest.mark.unit
def test_a_failed_randomised_test_names_its_seed(tmp_path: Path) -> None:
    """The `seed` fixture's report: the failure shows the seed and the command that replays it."""
    (tmp_path / "test_draw.py").write_text("def test_draw(seed):\n    assert seed == -1\n")
    env = {**os.environ, SEED_ENV: "31337"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_draw.py")],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"replay with: {SEED_ENV}=31337 python -m pytest 'test_draw.py::test_draw'" in out.stdout, out.stdout
