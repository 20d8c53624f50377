"""bench/charts.py draws every picture docs/benchmarks.md shows from the results committed in bench/results."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import charts

pytestmark = pytest.mark.unit


def test_every_chart_is_drawn_from_the_committed_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="bench.charts needs the bench extra (matplotlib)")
    assert charts.main(["--out", str(tmp_path)]) == 0
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert drawn == ["catchup.png", "latency.png", "statement_size.png", "writecost.png"]
    assert all((tmp_path / name).stat().st_size > 5000 for name in drawn)
    doc = (charts.REPO / "docs" / "benchmarks.md").read_text()
    for name in drawn:
        assert f"img/{name}" in doc, f"docs/benchmarks.md does not show {name}"


def test_a_file_without_any_known_section_is_one_clear_line(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="bench.charts needs the bench extra (matplotlib)")
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        charts.main([str(empty), "--out", str(tmp_path)])
    assert str(exc.value).startswith("no results with a latency")
