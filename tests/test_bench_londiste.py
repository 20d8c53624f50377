"""bench/londiste.py: skipped with one note where Londiste is not installed; its table renders
from the committed results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import londiste, run

pytestmark = pytest.mark.unit
RESULTS = Path(londiste.__file__).resolve().parent / "results"


def test_missing_names_every_absent_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(londiste, "PACKAGE_FILES", {"postgresql-15-pgq3": tmp_path / "pgq.control"})
    monkeypatch.setattr(londiste, "PACKAGE_COMMANDS", {"pgqd": "no-such-command-pgqd"})
    assert londiste.missing() == "Debian package(s) not installed: postgresql-15-pgq3, pgqd"
    (tmp_path / "pgq.control").write_text("")
    monkeypatch.setattr(londiste, "PACKAGE_COMMANDS", {})
    assert londiste.missing() is None


def test_without_the_packages_the_section_is_one_note_and_a_skipped_result(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(londiste, "missing", lambda: "Debian package(s) not installed: pgqd")

    def no_world(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("no cluster may start when Londiste is missing")

    monkeypatch.setattr(run, "world", no_world)
    res: dict[str, object] = {}
    run._londiste(run.parse(["--only", "londiste"]), 5, 100_000, tmp_path, res)
    assert res == {"londiste": "skipped: Debian package(s) not installed: pgqd"}
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    note = res["londiste"]
    assert isinstance(note, str)
    assert londiste.render(note) == f"Not measured in this run ({note}).\n"


def test_a_backlog_of_about_the_asked_events() -> None:
    rows = londiste.backlog_rows(1_000_000)
    assert 2000 + rows + rows // 2 + rows // 10 == 1_000_000


def test_the_table_renders_from_the_committed_results() -> None:
    sections = [
        json.loads(p.read_text())["londiste"]
        for p in sorted(RESULTS.glob("2*.json"))
        if isinstance(json.loads(p.read_text()).get("londiste"), dict)
    ]
    assert sections, "no committed results with a measured londiste section"
    table = londiste.render(sections[-1])
    for label in ("no capture (reference)", "Londiste 3 capture", "native logical replication", "Londiste 3 leaf"):
        assert label in table
