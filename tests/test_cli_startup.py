"""The command line starts without loading what a command does not need (no server needed)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dbsync.cli.main import COMMANDS, cli

pytestmark = pytest.mark.unit

PROBE = """
import sys
sys.argv = ["dbsync", *sys.argv[1:]]
from dbsync.cli.main import main
try:
    main()
except SystemExit:
    pass
heavy = ("psycopg", "asyncpg", "httpx", "yoyo", "dbsync.daemon", "dbsync.embedded")
print(sorted({m for m in sys.modules if m.startswith(heavy)}), file=sys.stderr)
"""


def _loaded(*args: str) -> tuple[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)
    return out.stdout, eval(out.stderr.strip().splitlines()[-1])  # noqa: S307 - our own probe's list


@pytest.mark.parametrize("args", [["--help"], [], ["--version"]])
def test_the_group_loads_no_driver_and_no_daemon(args: list[str]) -> None:
    stdout, loaded = _loaded(*args)
    assert loaded == []
    if args != ["--version"]:
        assert "status" in stdout and "Show the high-water mark" in stdout


def test_bare_dbsync_prints_its_usage_not_an_error() -> None:
    """Bare `dbsync` is the --help text on stdout, exiting as click exits for a group called
    without a command (2 since click 8.2, which treats it as a usage error; 0 before)."""
    out = subprocess.run([sys.executable, "-m", "dbsync"], capture_output=True, text=True, timeout=60)
    helped = subprocess.run([sys.executable, "-m", "dbsync", "--help"], capture_output=True, text=True, timeout=60)
    assert "Commands:" in out.stdout
    assert "error:" not in (out.stdout + out.stderr).lower()
    assert out.stderr == ""
    assert out.stdout.strip() == helped.stdout.strip()
    assert out.returncode == CliRunner().invoke(cli, []).exit_code
    assert out.returncode in (0, 2)


def test_a_command_loads_only_what_it_needs() -> None:
    stdout, loaded = _loaded("migrate", "--help")
    assert "Apply pending migrations" in stdout
    assert not any(m.startswith(("asyncpg", "httpx", "dbsync.daemon", "dbsync.embedded")) for m in loaded), loaded


@pytest.mark.parametrize("command", ["run", "demo"])
def test_no_command_s_help_loads_the_demo_or_the_clusters(command: str) -> None:
    stdout, loaded = _loaded(command, "--help")
    assert "Usage:" in stdout
    assert not any(m.startswith("dbsync.embedded") for m in loaded), loaded


ROOT = Path(__file__).resolve().parent.parent


def test_only_dbsync_demo_imports_the_embedded_package() -> None:
    """dbsync.embedded (throwaway clusters, which run useradd as root, and the demo) is not the
    runtime: outside it, only the body of `dbsync demo` imports it."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    embedded = ROOT / mapping["dbsync"] / "embedded"
    found: list[str] = []
    for folder in mapping.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_relative_to(embedded):
                continue
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                if any(n == "dbsync.embedded" or n.startswith("dbsync.embedded.") for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}:{node.col_offset}")
    rel = [f.rsplit(":", 2) for f in found]
    assert {p for p, _, _ in rel} == {"cli/demo.py"}, found
    assert all(int(col) > 0 for _, _, col in rel), f"cli/demo.py imports dbsync.embedded at module level: {found}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_listed_help_is_the_commands_own(name: str) -> None:
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    listed = click.Command(name, help=COMMANDS[name][1])
    assert listed.get_short_help_str(200) == command.get_short_help_str(200)
