"""TLS for the daemon's connections with libpq's rules: which root certificate, what is verified,
which client certificate is sent (libpq's fe-secure-openssl.c is the reference)."""

from __future__ import annotations

import os
import ssl
import stat
import urllib.parse
from pathlib import Path
from typing import Any

from dbsync.errors import ConfigError

_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TLS_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def choice(p: dict[str, str], name: str, allowed: tuple[str, ...], what: str) -> str:
    """p[name], one of `allowed`; unset means the first."""
    value = p.get(name) or allowed[0]
    if value not in allowed:
        raise ConfigError(f"{what}: {name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def tls_kwargs(p: dict[str, str], given: set[str], what: str) -> dict[str, Any]:
    """`ssl` for asyncpg. For require and above the daemon builds the context itself, so what is
    verified is written here; allow and prefer verify nothing in libpq either, and need asyncpg's
    own plain-text fallback, so they go as its URL parameters."""
    rootcert = p.get("sslrootcert", "")
    mode = p.get("sslmode") or "prefer"
    if rootcert == "system":
        # libpq 16+: the system's trusted roots, and nothing weaker than verify-full with them.
        if "sslmode" not in given and not os.environ.get("PGSSLMODE"):
            mode = "verify-full"
        if mode != "verify-full":
            raise ConfigError(
                f'{what}: weak sslmode "{mode}" may not be used with sslrootcert=system (use "verify-full")'
            )
    if mode not in _SSLMODES:
        raise ConfigError(f"{what}: unknown sslmode {mode!r}")
    negotiation = choice(p, "sslnegotiation", ("postgres", "direct"), what)
    direct = negotiation == "direct"
    if direct and mode in ("disable", "allow", "prefer"):
        raise ConfigError(
            f'{what}: weak sslmode "{mode}" may not be used with sslnegotiation=direct '
            '(use "require", "verify-ca", or "verify-full")'
        )
    if mode == "disable":
        return {"ssl": False, "direct_tls": False}
    cert = _client_cert(p, what)
    ctx = _context(p, mode, cert, what)  # for allow and prefer too: the files are checked at start
    if mode in ("require", "verify-ca", "verify-full"):
        return {"ssl": ctx, "direct_tls": direct}
    query = {"sslmode": mode}
    if cert:
        query["sslcert"], query["sslkey"] = cert
        if p.get("sslpassword"):
            query["sslpassword"] = p["sslpassword"]
    for name in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        if p.get(name):
            query[name] = p[name]
    return {"dsn": "postgresql://?" + urllib.parse.urlencode(query, safe=""), "direct_tls": False}


def _pg_home() -> Path:
    return Path.home() / ".postgresql"


def _context(p: dict[str, str], mode: str, cert: tuple[str, str] | None, what: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])  # PostgreSQL 17+ requires it for direct TLS; libpq sends it
    low, high = (_tls_version(p, name, what) for name in ("ssl_min_protocol_version", "ssl_max_protocol_version"))
    if low and high and low > high:
        raise ConfigError(f"{what}: invalid SSL protocol version range")
    if low:
        ctx.minimum_version = low
    if high:
        ctx.maximum_version = high
    if mode in ("require", "verify-ca", "verify-full"):
        _verification(ctx, p, mode, what)
    if cert:
        password = p.get("sslpassword", "")
        try:
            ctx.load_cert_chain(cert[0], cert[1], password=lambda: password)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{what}: cannot load the client certificate {cert[0]}: "
                f"{getattr(exc, 'reason', None) or type(exc).__name__}"
            ) from None
    return ctx


def _tls_version(p: dict[str, str], name: str, what: str) -> ssl.TLSVersion | None:
    value = p.get(name, "")
    if not value:
        return None
    if value not in _TLS_VERSIONS:
        raise ConfigError(f"{what}: {name} must be one of {', '.join(_TLS_VERSIONS)}, got {value!r}")
    return _TLS_VERSIONS[value]


def _verification(ctx: ssl.SSLContext, p: dict[str, str], mode: str, what: str) -> None:
    """libpq's rules: the root file is sslrootcert or ~/.postgresql/root.crt; verify-ca and
    verify-full need it; require verifies the chain when the file exists, and does not otherwise."""
    rootcert = p.get("sslrootcert") or str(_pg_home() / "root.crt")
    if rootcert == "system":
        ctx.load_default_certs()
    elif os.path.isfile(rootcert):
        _load(ctx, rootcert, "root certificate", what)
    elif mode == "require":
        return
    else:
        raise ConfigError(
            f'{what}: root certificate file "{rootcert}" does not exist '
            f"(sslmode={mode} needs it; name it with sslrootcert)"
        )
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = mode == "verify-full"
    crl = p.get("sslcrl")
    if crl and not os.path.isfile(crl):
        raise ConfigError(f'{what}: sslcrl file "{crl}" does not exist')
    crl = crl or str(_pg_home() / "root.crl")
    if os.path.isfile(crl):
        _load(ctx, crl, "certificate revocation list", what)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def _load(ctx: ssl.SSLContext, path: str, kind: str, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f'{what}: cannot read the {kind} "{path}": {getattr(exc, "reason", None) or type(exc).__name__}'
        ) from None


def _client_cert(p: dict[str, str], what: str) -> tuple[str, str] | None:
    """The client certificate and key libpq would send: sslcert/sslkey, else the files in
    ~/.postgresql when they exist. A key others can read is refused, as libpq refuses it."""
    cert = p.get("sslcert")
    if cert:
        if not os.path.isfile(cert):
            raise ConfigError(f'{what}: sslcert file "{cert}" does not exist')
    else:
        cert = str(_pg_home() / "postgresql.crt")
        if not os.path.isfile(cert):
            return None
    key = p.get("sslkey") or str(_pg_home() / "postgresql.key")
    if ":" in key:
        raise ConfigError(f"{what}: the daemon cannot use an OpenSSL engine key (sslkey={key})")
    try:
        st = os.stat(key)
    except OSError:
        raise ConfigError(f'{what}: certificate present, but not private key file "{key}"') from None
    if (st.st_uid == os.geteuid() and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO)) or (
        st.st_uid == 0 and st.st_mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO)
    ):
        raise ConfigError(
            f'{what}: private key file "{key}" has group or world access; file must have '
            "permissions u=rw (0600) or less if owned by the current user, or u=rw,g=r (0640) "
            "or less if owned by root"
        )
    return cert, key
