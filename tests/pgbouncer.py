"""A real PgBouncer in front of the test clusters, with its default settings.

    with PgBouncer(tmp_path, "transaction", {"db1": (host, port)}) as bouncer:
        dsn = bouncer.route(dsn)   # the same DSN, through the pooler

The generated pgbouncer.ini sets only what a test must: where it listens, the databases it
serves, trust authentication, the pool mode and its log file. Everything else is PgBouncer's
default (ignore_startup_parameters empty, LIFO server reuse, server_reset_query DISCARD ALL).
PgBouncer refuses to run as root; as root it runs as the embedded clusters' service user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dbsync.embedded.cluster import _ensure_service_user, _open_path_for, free_port

BINARY = "/usr/sbin/pgbouncer"


def binary() -> str | None:
    """PgBouncer's path, or None when it is not installed (the Debian package `pgbouncer`)."""
    return BINARY if os.access(BINARY, os.X_OK) else shutil.which("pgbouncer")


class PgBouncer:
    def __init__(self, root: Path, pool_mode: str, databases: dict[str, tuple[str, int]]) -> None:
        found = binary()
        if found is None:
            raise RuntimeError("pgbouncer is not installed")
        self.binary = found
        self.root = root
        self.pool_mode = pool_mode
        self.databases = databases
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = root / "pgbouncer.log"

    def _write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        users = self.root / "users.txt"
        users.write_text('"postgres" ""\n')
        lines = ["[databases]"]
        lines += [f"{name} = host={host} port={port} dbname={name}" for name, (host, port) in self.databases.items()]
        lines += [
            "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {users}",
            f"pool_mode = {self.pool_mode}",
            f"logfile = {self.logfile}",
        ]
        ini = self.root / "pgbouncer.ini"
        ini.write_text("\n".join(lines) + "\n")
        return ini

    def start(self) -> Self:
        ini = self._write_config()
        user = group = None
        if os.geteuid() == 0:
            account = _ensure_service_user()
            user, group = account.pw_uid, account.pw_gid
            for path in (self.root, ini, self.root / "users.txt"):
                os.chown(path, user, group)
            _open_path_for(self.root)
        # Its log goes to the log file and, in the foreground, to stderr: a file too, never a pipe
        # nobody reads.
        with open(self.root / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen([self.binary, str(ini)], user=user, group=group, stdout=err, stderr=err)
        deadline = time.monotonic() + 10
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.root / "stderr.log").read_text(errors="replace").strip()[-500:]
                raise RuntimeError(f"pgbouncer did not start: {tail}")
            time.sleep(0.02)
        return self

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def route(self, dsn: str) -> str:
        """`dsn` through this pooler (the database must be one it serves)."""
        name = str(conninfo_to_dict(dsn)["dbname"])
        assert name in self.databases, f"pgbouncer does not serve {name}"
        return make_conninfo(dsn, host="127.0.0.1", port=str(self.port))

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
