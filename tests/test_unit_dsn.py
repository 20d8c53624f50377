"""The daemon's translation of a libpq DSN into asyncpg arguments: every libpq parameter is
honoured with libpq's meaning or refused with one line naming it (design notes section 8)."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import psycopg
import pytest
import trustme
from psycopg import pq

from dbsync.daemon import pg
from dbsync.daemon.dsn import DEFAULT_SOCKET_DIR, LIBPQ_PARAMETERS
from dbsync.errors import ConfigError

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-Pw"
BASE = "host=db.example.com port=5432 dbname=app user=sync"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PG* variable and an empty home: only what a test sets counts (libpq reads both)."""
    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_ca(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "root.crt"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def write_client(ca: trustme.CA, tmp_path: Path, mode: int = 0o600) -> tuple[str, str]:
    leaf = ca.issue_cert("sync", common_name="sync")
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(mode)
    return str(cert), str(key)


def refused(dsn: str, what: str = "agent_dsn") -> str:
    with pytest.raises(ConfigError) as info:
        pg.connect_kwargs(dsn, what)
    message = str(info.value)
    assert "\n" not in message and SECRET not in message
    assert message.startswith(what)
    return message


def test_verify_full_uses_the_named_root_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    root = write_ca(ca, tmp_path)
    kwargs = pg.connect_kwargs(f"{BASE} sslmode=verify-full sslrootcert={root}", "agent_dsn")
    ctx = kwargs["ssl"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.get_ca_certs(binary_form=True) == [ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())]


def test_verify_ca_checks_the_chain_but_not_the_name(ca: trustme.CA, tmp_path: Path) -> None:
    root = write_ca(ca, tmp_path)
    ctx = pg.connect_kwargs(f"{BASE} sslmode=verify-ca sslrootcert={root}", "agent_dsn")["ssl"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname


def test_require_without_a_root_file_encrypts_without_verifying() -> None:
    ctx = pg.connect_kwargs(f"{BASE} sslmode=require", "agent_dsn")["ssl"]
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


def test_require_with_the_default_root_file_verifies_like_libpq(ca: trustme.CA, clean_env: Path) -> None:
    # libpq: "if a root CA file exists, sslmode=require behaves like verify-ca".
    (clean_env / ".postgresql").mkdir()
    ca.cert_pem.write_to_path(str(clean_env / ".postgresql" / "root.crt"))
    ctx = pg.connect_kwargs(f"{BASE} sslmode=require", "agent_dsn")["ssl"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname


def test_verify_full_without_a_root_file_is_refused() -> None:
    message = refused(f"{BASE} password={SECRET} sslmode=verify-full")
    assert "root.crt" in message and "does not exist" in message


def test_sslmode_and_root_certificate_come_from_the_environment(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    monkeypatch.setenv("PGSSLROOTCERT", write_ca(ca, tmp_path))
    ctx = pg.connect_kwargs(BASE, "agent_dsn")["ssl"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_default_sslmode_is_prefer_with_asyncpgs_fallback() -> None:
    kwargs = pg.connect_kwargs(BASE, "agent_dsn")
    assert "ssl" not in kwargs
    assert kwargs["dsn"] == "postgresql://?sslmode=prefer&ssl_min_protocol_version=TLSv1.2"


def test_disable_sends_no_tls() -> None:
    assert pg.connect_kwargs(f"{BASE} sslmode=disable", "agent_dsn")["ssl"] is False


def test_unknown_sslmode_is_refused() -> None:
    assert "sslmode" in refused(f"{BASE} sslmode=bogus")


def test_client_certificate_is_loaded_and_passed_in_prefer_mode(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_client(ca, tmp_path)
    kwargs = pg.connect_kwargs(
        f"{BASE} sslmode=verify-ca sslrootcert={write_ca(ca, tmp_path)} sslcert={cert} sslkey={key}", "agent_dsn"
    )
    assert isinstance(kwargs["ssl"], ssl.SSLContext)
    kwargs = pg.connect_kwargs(f"{BASE} sslcert={cert} sslkey={key}", "agent_dsn")
    assert f"sslcert={cert.replace('/', '%2F')}" in kwargs["dsn"]
    assert f"sslkey={key.replace('/', '%2F')}" in kwargs["dsn"]


def test_client_key_readable_by_others_is_refused_like_libpq(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_client(ca, tmp_path, mode=0o644)
    message = refused(f"{BASE} sslmode=require sslcert={cert} sslkey={key}")
    assert "group or world access" in message


def test_missing_client_certificate_file_is_refused(tmp_path: Path) -> None:
    assert "sslcert" in refused(f"{BASE} sslmode=require sslcert={tmp_path}/nothing.crt")


def test_tls_protocol_versions(ca: trustme.CA, tmp_path: Path) -> None:
    ctx = pg.connect_kwargs(f"{BASE} sslmode=require ssl_min_protocol_version=TLSv1.3", "agent_dsn")["ssl"]
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert "ssl_max_protocol_version" in refused(f"{BASE} sslmode=require ssl_max_protocol_version=TLSv9")


def test_sslrootcert_system_means_verify_full_and_refuses_weaker_modes() -> None:
    ctx = pg.connect_kwargs(f"{BASE} sslrootcert=system", "agent_dsn")["ssl"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert "sslrootcert=system" in refused(f"{BASE} sslrootcert=system sslmode=require")


def test_direct_tls_needs_a_required_sslmode() -> None:
    assert pg.connect_kwargs(f"{BASE} sslmode=require sslnegotiation=direct", "agent_dsn")["direct_tls"] is True
    assert "sslnegotiation" in refused(f"{BASE} sslnegotiation=direct")


@pytest.mark.parametrize(
    "param",
    [
        "hostaddr=10.0.0.1",
        "require_auth=scram-sha-256",
        "channel_binding=require",
        "gssencmode=require",
        "load_balance_hosts=random",
        "sslcrldir=/tmp",
        "sslcertmode=require",
        "sslsni=0",
        "requirepeer=postgres",
        "replication=database",
        "client_encoding=LATIN1",
        "min_protocol_version=3.2",
    ],
)
def test_parameters_asyncpg_cannot_honour_are_refused_by_name(param: str) -> None:
    name = param.split("=")[0]
    message = refused(f"{BASE} password={SECRET} {param}")
    assert f"libpq parameter '{name}'" in message


def test_service_is_refused_from_the_dsn_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "'service'" in refused(f"{BASE} service=prod")
    monkeypatch.setenv("PGSERVICE", "prod")
    assert "'service' (set by PGSERVICE)" in refused(BASE)


def test_a_refused_parameter_from_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGREQUIREAUTH", "scram-sha-256")
    message = refused(f"{BASE} password={SECRET}")
    assert "'require_auth'" in message and "PGREQUIREAUTH" in message


def test_defaults_that_cost_nothing_are_accepted() -> None:
    pg.connect_kwargs(
        f"{BASE} channel_binding=disable gssencmode=disable sslsni=1 sslcertmode=allow "
        "load_balance_hosts=disable client_encoding=UTF8 require_auth=",
        "agent_dsn",
    )


def test_every_libpq_parameter_is_honoured_or_refused() -> None:
    """A parameter a future libpq adds must not be dropped silently either."""
    keywords = {o.keyword.decode() for o in pq.Conninfo.get_defaults()}
    assert keywords <= LIBPQ_PARAMETERS


def test_target_session_attrs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pg.connect_kwargs(f"{BASE} target_session_attrs=read-write", "agent_dsn")["target_session_attrs"] == (
        "read-write"
    )
    assert pg.connect_kwargs(BASE, "agent_dsn")["target_session_attrs"] == "any"
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "primary")
    assert pg.connect_kwargs(BASE, "agent_dsn")["target_session_attrs"] == "primary"


def test_several_hosts_and_ports() -> None:
    kwargs = pg.connect_kwargs("host=a,b,::1 port=5432,5433,5434 dbname=x user=u", "site_dsn")
    assert kwargs["host"] == ["a", "b", "::1"] and kwargs["port"] == [5432, 5433, 5434]
    kwargs = pg.connect_kwargs("host=a,b port=6000 dbname=x user=u", "site_dsn")
    assert kwargs["port"] == [6000, 6000]
    assert "port" in refused("host=a,b,c port=1,2 dbname=x", "site_dsn")
    assert "port" in refused("host=a port=99999 dbname=x", "site_dsn")


def test_url_form_is_read_by_libpqs_parser() -> None:
    kwargs = pg.connect_kwargs(f"postgresql://sync:{SECRET}@db.example.com:6543/app?sslmode=disable", "site_dsn")
    assert (kwargs["host"], kwargs["port"], kwargs["user"], kwargs["database"]) == (
        ["db.example.com"],
        [6543],
        "sync",
        "app",
    )
    assert kwargs["password"] == SECRET and kwargs["ssl"] is False


def test_default_host_is_libpqs_socket_directory() -> None:
    """The constant is what the bundled libpq uses: its own error names the socket it tried."""
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect("port=1 connect_timeout=2")
    assert f'"{DEFAULT_SOCKET_DIR}/.s.PGSQL.1"' in str(info.value)
    assert pg.connect_kwargs("port=1", "site_dsn")["host"] == [DEFAULT_SOCKET_DIR]


def test_user_and_database_defaults_are_libpqs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "not-the-os-user")  # asyncpg would read this; libpq does not
    kwargs = pg.connect_kwargs("host=h", "site_dsn")
    libpq_user = next(o.val for o in pq.Conninfo.get_defaults() if o.keyword == b"user")
    assert kwargs["user"] == (libpq_user or b"").decode() and kwargs["database"] == kwargs["user"]
    monkeypatch.setenv("PGDATABASE", "fromenv")
    assert pg.connect_kwargs("host=h", "site_dsn")["database"] == "fromenv"


def test_empty_password_means_the_password_file() -> None:
    assert pg.connect_kwargs(f"{BASE} password=", "site_dsn")["password"] is None


def test_connect_timeout_like_libpq() -> None:
    assert pg.connect_kwargs(f"{BASE} connect_timeout=0", "site_dsn")["timeout"] is None
    assert pg.connect_kwargs(f"{BASE} connect_timeout=1", "site_dsn")["timeout"] == 2
    # libpq's timeout is per host; asyncpg's covers every host.
    assert pg.connect_kwargs("host=a,b connect_timeout=5", "site_dsn")["timeout"] == 10
    assert pg.connect_kwargs(BASE, "site_dsn")["timeout"] == 10
    assert "connect_timeout" in refused(f"{BASE} connect_timeout=1.5", "site_dsn")


def test_application_name_options_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pg.connect_kwargs(BASE, "site_dsn")["server_settings"] == {"application_name": "dbsync"}
    settings = pg.connect_kwargs(f"{BASE} fallback_application_name=fb options='-c work_mem=64MB'", "site_dsn")[
        "server_settings"
    ]
    assert settings == {"application_name": "fb", "options": "-c work_mem=64MB"}
    monkeypatch.setenv("PGAPPNAME", "mine")
    assert pg.connect_kwargs(BASE, "site_dsn")["server_settings"]["application_name"] == "mine"


def test_keepalives_become_socket_options() -> None:
    kwargs = pg.connect_kwargs(
        f"{BASE} keepalives_idle=30 keepalives_interval=5 keepalives_count=3 tcp_user_timeout=9000", "site_dsn"
    )
    assert kwargs["connection_class"].socket_options == (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 9000),
    )
    # libpq's default is keepalives on; keepalives=0 leaves the socket alone.
    assert pg.connect_kwargs(BASE, "site_dsn")["connection_class"].socket_options == (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    )
    assert pg.connect_kwargs(f"{BASE} keepalives=0", "site_dsn")["connection_class"].socket_options == ()
    assert "keepalives_idle" in refused(f"{BASE} keepalives_idle=soon", "site_dsn")


def test_invalid_dsn_never_echoes_the_password() -> None:
    refused(f"host=h password={SECRET} nonsense")
