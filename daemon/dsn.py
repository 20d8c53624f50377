"""A libpq DSN as asyncpg arguments, with libpq's meaning, or one line saying what cannot be.

The CLI connects with libpq (psycopg); the daemon with asyncpg. A component that connects
differently for the same string is a security bug (a DSN that says verify-full must not be
connected unverified), so the string is read by libpq itself: its parser, then its defaults
(PG* variables and compiled defaults, via PQconndefaults). Each libpq parameter is then either
translated with the same meaning or refused by name; none is dropped.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from typing import Any

import asyncpg
import psycopg
from psycopg import pq

from dbsync.config import check_dsn
from dbsync.daemon.tls import choice, tls_kwargs
from dbsync.errors import ConfigError

# Where the bundled libpq looks when no host is given (tests check its own error names it).
DEFAULT_SOCKET_DIR = "/var/run/postgresql"
DEFAULT_CONNECT_TIMEOUT = 10  # seconds, as the CLI (dbsync.db.connect) uses when the DSN names none

_TARGETS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")

# Translated below with libpq's meaning.
HONOURED = frozenset(
    {
        "host",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "connect_timeout",
        "application_name",
        "fallback_application_name",
        "options",
        "client_encoding",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "sslmode",
        "sslnegotiation",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslcrl",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
    }
)

# asyncpg cannot do what these ask; the values listed are the ones where that changes nothing
# ("" = unset). Any other value is refused, with the reason.
_ONLY = {
    "hostaddr": ({""}, "asyncpg cannot connect to one address and verify TLS against another name"),
    "require_auth": ({""}, "asyncpg cannot restrict the authentication methods it answers"),
    "channel_binding": ({"", "disable", "prefer"}, "asyncpg has no SCRAM channel binding"),
    "gssencmode": ({"", "disable", "prefer"}, "asyncpg has no GSSAPI encryption"),
    "gssdelegation": ({"", "0"}, "asyncpg does not delegate GSSAPI credentials"),
    "load_balance_hosts": ({"", "disable"}, "asyncpg tries hosts in order"),
    "sslcertmode": ({"", "allow"}, "asyncpg sends a client certificate when there is one"),
    "sslsni": ({"", "1"}, "asyncpg always sends SNI"),
    "sslcompression": ({"", "0"}, "TLS compression is off in Python's ssl"),
    "sslcrldir": ({""}, "asyncpg reads a CRL file (sslcrl), not a directory"),
    "sslkeylogfile": ({""}, "not supported"),
    "requirepeer": ({""}, "asyncpg cannot check the server's OS user"),
    "replication": ({""}, "dbsync needs no replication connection"),
    "min_protocol_version": ({"", "3.0"}, "asyncpg speaks protocol 3.0 only"),
    "max_protocol_version": ({"", "3.0", "3.2", "latest"}, "asyncpg speaks protocol 3.0 only"),
    "scram_client_key": ({""}, "not supported"),
    "scram_server_key": ({""}, "not supported"),
    "oauth_issuer": ({""}, "asyncpg has no OAuth"),
    "oauth_client_id": ({""}, "asyncpg has no OAuth"),
    "oauth_client_secret": ({""}, "asyncpg has no OAuth"),
    "oauth_scope": ({""}, "asyncpg has no OAuth"),
    # PQconndefaults expands PGSERVICE but says nothing when the service does not exist, where
    # libpq's connect fails: refused rather than risk connecting to what libpq would not.
    "service": ({""}, "name the parameters in the DSN itself"),
}

# Every parameter this module has an answer for; one libpq adds later is refused until it has one.
LIBPQ_PARAMETERS = HONOURED | frozenset(_ONLY)


def connect_kwargs(dsn: str, what: str) -> dict[str, Any]:
    """asyncpg.connect() keyword arguments for `dsn`; `what` names it in errors ("agent_dsn")."""
    p, given = _libpq_params(dsn, what)
    _refuse_what_asyncpg_cannot_do(p, given, what)
    hosts, ports = _addresses(p, what)
    user = p.get("user") or ""
    kwargs: dict[str, Any] = {
        "host": hosts,
        "port": ports,
        "user": user,
        "password": p.get("password") or None,  # empty: libpq reads the password file
        "passfile": p.get("passfile") or None,
        "database": p.get("dbname") or user,
        "target_session_attrs": choice(p, "target_session_attrs", _TARGETS, what),
        "krbsrvname": p.get("krbsrvname") or None,
        "timeout": _timeout(p, len(hosts), what),
        "server_settings": _startup_settings(p),
        "connection_class": _connection_class(_socket_options(p, what)),
    }
    if p.get("gsslib"):
        kwargs["gsslib"] = p["gsslib"]
    kwargs.update(tls_kwargs(p, given, what))
    return kwargs


def _libpq_params(dsn: str, what: str) -> tuple[dict[str, str], set[str]]:
    """What libpq would use: the DSN's own parameters over libpq's defaults."""
    given = check_dsn(dsn, what)
    try:
        defaults = pq.Conninfo.get_defaults()
    except psycopg.Error:
        raise ConfigError(f"{what}: libpq cannot read its defaults") from None
    params = {o.keyword.decode(): o.val.decode() for o in defaults if o.val is not None}
    params.update(given)
    return params, set(given)


def _refusal(what: str, name: str, given: set[str], why: str) -> str:
    if name in given:
        origin = ""
    else:
        env = next((o.envvar for o in pq.Conninfo.get_defaults() if o.keyword.decode() == name), None)
        origin = f" (set by {env.decode()})" if env and os.environ.get(env.decode()) else " (a libpq default)"
    return f"{what}: the daemon does not support the libpq parameter '{name}'{origin}: {why}"


def _refuse_what_asyncpg_cannot_do(p: dict[str, str], given: set[str], what: str) -> None:
    for name, value in p.items():
        if name in HONOURED:
            continue
        allowed, why = _ONLY.get(name, ({""}, "this dbsync does not know it"))
        if value not in allowed:
            raise ConfigError(_refusal(what, name, given, why))
    encoding = p.get("client_encoding", "")
    if encoding and encoding.upper().replace("-", "").replace("_", "") not in ("UTF8", "UNICODE"):
        raise ConfigError(_refusal(what, "client_encoding", given, "asyncpg speaks UTF8 only"))


def _integer(p: dict[str, str], name: str, what: str) -> int | None:
    raw = p.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{what}: {name} must be a whole number, got {raw!r}") from None


def _addresses(p: dict[str, str], what: str) -> tuple[list[str], list[int]]:
    hosts = [h or DEFAULT_SOCKET_DIR for h in (p.get("host") or "").split(",")]
    for host in hosts:
        if host.startswith("@"):
            raise ConfigError(f"{what}: the daemon cannot connect to an abstract socket ({host})")
    ports = (p.get("port") or "").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    elif len(ports) != len(hosts):
        raise ConfigError(f"{what}: could not match {len(ports)} port numbers to {len(hosts)} hosts")
    numbers = []
    for port in ports:
        port = port.strip() or "5432"
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{what}: port must be a number from 1 to 65535, got {port!r}")
        numbers.append(int(port))
    return hosts, numbers


def _timeout(p: dict[str, str], hosts: int, what: str) -> float | None:
    seconds = _integer(p, "connect_timeout", what)
    if seconds is None:
        seconds = DEFAULT_CONNECT_TIMEOUT
    if seconds <= 0:
        return None  # libpq: wait indefinitely
    # libpq waits this long for each host, at least 2 s; asyncpg's timeout covers them all.
    return float(max(seconds, 2) * hosts)


def _startup_settings(p: dict[str, str]) -> dict[str, str]:
    settings = {"application_name": p.get("application_name") or p.get("fallback_application_name") or "dbsync"}
    if p.get("options"):
        settings["options"] = p["options"]  # the startup packet's "options", as libpq sends it
    return settings


def _socket_options(p: dict[str, str], what: str) -> tuple[tuple[int, int, int], ...]:
    """libpq's client-side TCP settings: keepalives on unless keepalives=0; 0 = the OS default."""
    options: list[tuple[int, int, int]] = []
    if _integer(p, "keepalives", what) != 0:
        options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        for name, opt in (
            ("keepalives_idle", socket.TCP_KEEPIDLE),
            ("keepalives_interval", socket.TCP_KEEPINTVL),
            ("keepalives_count", socket.TCP_KEEPCNT),
        ):
            value = _integer(p, name, what)
            if value:
                options.append((socket.IPPROTO_TCP, opt, value))
    timeout = _integer(p, "tcp_user_timeout", what)
    if timeout:
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout))
    return tuple(options)


@cache
def _connection_class(options: tuple[tuple[int, int, int], ...]) -> type[asyncpg.Connection]:
    """asyncpg.Connection that sets `options` on its TCP socket (asyncpg sets none itself)."""

    class Connection(asyncpg.Connection):  # type: ignore[misc]
        socket_options = options

        def __init__(self, protocol: Any, transport: Any, *args: Any) -> None:
            super().__init__(protocol, transport, *args)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                for level, opt, value in options:
                    sock.setsockopt(level, opt, value)

    return Connection
