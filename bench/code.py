"""Benchmark one commit, not whatever the work tree holds right now.

`--code <git ref>` exports that commit with `git archive` (the repository is only read), lays
it out as the `dbsync` package the way its pyproject.toml maps folders to packages, and
re-executes the benchmark with that layout first on PYTHONPATH. Migrations, trigger, daemon and
CLI then all come from the one commit; bench/ itself still comes from the work tree. The
installed editable dbsync is only consulted after PYTHONPATH, so it cannot leak in.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path
from typing import NoReturn

from bench.env import REPO, BenchError

DIR_ENV = "DBSYNC_BENCH_CODE_DIR"
LABEL_ENV = "DBSYNC_BENCH_CODE"


def _git(*args: str) -> bytes:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"git {' '.join(args)} failed: {exc.stderr.decode(errors='replace').strip()}") from exc


def export(ref: str) -> tuple[Path, str]:
    """Unpack `ref` into a new temporary directory; returns (directory, full commit id)."""
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}").decode().strip()
    root = Path(tempfile.mkdtemp(prefix="dbsync-bench-code-"))
    src, pkg = root / "src", root / "pkg"
    with tarfile.open(fileobj=io.BytesIO(_git("archive", "--format=tar", commit))) as tar:
        tar.extractall(src, filter="data")
    mapping = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name in sorted(mapping, key=lambda n: n.count(".")):  # parents before children
        shutil.copytree(src / mapping[name], pkg.joinpath(*name.split(".")), dirs_exist_ok=True)
    return root, commit


def reexec(ref: str, argv: list[str]) -> NoReturn:
    root, commit = export(ref)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "pkg"), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env[DIR_ENV] = str(root)
    env[LABEL_ENV] = f"{ref} = {commit}"
    os.chdir(REPO)
    os.execve(sys.executable, [sys.executable, "-m", "bench.run", *argv], env)


def measured_code() -> str:
    """What is being measured, for the report; checks that a snapshot is really the one imported."""
    import dbsync

    root = os.environ.get(DIR_ENV)
    if root:
        if not Path(dbsync.__file__).resolve().is_relative_to(Path(root).resolve()):
            raise BenchError(f"dbsync was imported from {dbsync.__file__}, not from the snapshot in {root}")
        return f"commit {os.environ[LABEL_ENV]} (exported snapshot)"
    return f"work tree at {Path(dbsync.__file__).resolve().parent.parent}"


def cleanup() -> None:
    root = os.environ.get(DIR_ENV)
    if root:
        shutil.rmtree(root, ignore_errors=True)
