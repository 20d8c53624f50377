"""The command line starts without loading what a command does not need (no server needed)."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

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
heavy = ("psycopg", "asyncpg", "httpx", "yoyo", "dbsync.daemon")
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
    out = subprocess.run([sys.executable, "-m", "dbsync"], capture_output=True, text=True, timeout=60)
    assert "Commands:" in out.stdout
    assert "error:" not in (out.stdout + out.stderr).lower()


def test_a_command_loads_only_what_it_needs() -> None:
    stdout, loaded = _loaded("migrate", "--help")
    assert "Apply pending migrations" in stdout
    assert not any(m.startswith(("asyncpg", "httpx", "dbsync.daemon")) for m in loaded), loaded


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_listed_help_is_the_commands_own(name: str) -> None:
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    listed = click.Command(name, help=COMMANDS[name][1])
    assert listed.get_short_help_str(200) == command.get_short_help_str(200)
