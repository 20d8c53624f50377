"""Settings: one typed object built from flags, the environment and a TOML file, in that order."""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Conninfo

from dbsync.errors import ConfigError

ENV_PREFIX = "DBSYNC_"
POISON_POLICIES = ("stop", "park")
# The same choices as `dbsync --log-level` (cli/main.py keeps its own copy so `--help` stays light).
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Settings:
    site_dsn: str | None = None
    agent_dsn: str | None = None
    # Consumer identity on the Agent DB; one row of dbsync.apply_progress per source.
    source: str = "site"
    # This daemon's name among the consumers of the Site DB's log (dbsync.consumers; default:
    # "<source>@<Agent database>/<Agent cluster id>"), and the seconds after which a consumer
    # not seen is reported as stale (it holds the log until dropped).
    consumer: str | None = None
    consumer_timeout: float = 3600.0
    # Write-back (`dbsync migrate --two-way`): the source name of the Agent -> Site direction,
    # whose progress and lock live on the Site DB.
    write_back_source: str = "agent"
    batch_size: int = 10000
    # Poll even without a notification, in case one is lost (seconds).
    poll_interval: float = 1.0
    # Reconnect backoff (seconds): first delay, cap.
    retry_initial: float = 0.2
    retry_max: float = 10.0
    # Seconds before a query on a stalled link is abandoned and the connection remade.
    io_timeout: float = 30.0
    # What to do with an event the Agent DB rejects: "stop" (retry until fixed, skip nothing)
    # or "park" (move it and later events for its key to dbsync.parked_events, carry on).
    poison_policy: str = "stop"
    # Lag (seconds) above which status reports unhealthy and alerts fire.
    lag_threshold: float = 5.0
    # `dbsync run` only: where to serve /metrics, /healthz and /readyz ("host:port"), and the
    # URL that alerts are POSTed to. Both off by default.
    http: str | None = None
    alert_webhook: str | None = None
    # `dbsync run` only, from the file or DBSYNC_LOG_LEVEL when `dbsync --log-level` is not given.
    log_level: str = "info"
    # `dbsync run` only: a full verification of every replicated table starts this often
    # (seconds; off by default), reading at most verify_rows_per_second rows a second from each
    # database; with verify_repair, rows found differing are repaired through the sync log.
    full_verify_interval: float | None = None
    # `dbsync run` only: the keys applied since the verified mark are compared with the Site DB
    # this often (seconds; off by default), and the Site's sync log keeps their events until then.
    verify_interval: float | None = None
    verify_rows_per_second: int = 5000
    verify_repair: bool = False
    # `dbsync run`: a column the Site DB gained is added to the Agent table by the daemon, when
    # the Agent's existing rows then equal the Site's (dbsync.daemon.columns); off by default.
    auto_add_columns: bool = False
    config_file: Path | None = field(default=None, compare=False)

    def require(self, *names: str) -> Settings:
        for name in names:
            if not getattr(self, name):
                env = ENV_PREFIX + name.upper()
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} is not set: pass {flag}, set {env}, or put {name} in the config file")
        return self

    def write_back(self) -> Settings:
        """The Agent -> Site direction: the same machinery with the databases' roles swapped.
        The verifications and the HTTP listener stay with the forward direction."""
        return replace(
            self,
            site_dsn=self.agent_dsn,
            agent_dsn=self.site_dsn,
            source=self.write_back_source,
            consumer=None,
            http=None,
            full_verify_interval=None,
            verify_interval=None,
        )


_TYPES = {f.name: f.type for f in fields(Settings)}


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(name: str, value: Any, origin: str) -> Any:
    kind = str(_TYPES[name]).split(" ")[0]  # "float | None": a float, when set
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{origin}: {name} must be true or false, got {value!r}")
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            out: Any = int(value)
            if out <= 0:
                raise ValueError
            return out
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if out <= 0:
                raise ValueError
            return out
        if kind.startswith("str"):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {name} must be a positive {kind}, got {value!r}") from None
    return value


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Flags (overrides that are not None) beat the environment, which beats the file."""
    values: dict[str, Any] = {}
    path = config_file or os.environ.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(read_config_file(Path(path)))
    for name in _TYPES:
        if name == "config_file":
            continue
        env = os.environ.get(ENV_PREFIX + name.upper())
        if env not in (None, ""):
            values[name] = _coerce(name, env, f"environment {ENV_PREFIX + name.upper()}")
    for name, value in overrides.items():
        if value is not None:
            if name not in _TYPES:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = _coerce(name, value, "option --" + name.replace("_", "-"))
    settings = Settings(config_file=Path(path) if path else None, **values)
    if settings.poison_policy not in POISON_POLICIES:
        raise ConfigError(f"poison_policy must be one of {', '.join(POISON_POLICIES)}, got {settings.poison_policy!r}")
    if settings.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {settings.log_level!r}")
    for dsn_name in ("site_dsn", "agent_dsn"):
        dsn = getattr(settings, dsn_name)
        if dsn:
            check_dsn(dsn, dsn_name)
    return settings


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings the TOML file itself sets, checked and typed (flags and environment aside)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    # Accept either a flat file or a [dbsync] table, not both (a key beside the table would
    # be silently ignored).
    table = raw.get("dbsync", raw)
    if "dbsync" in raw and len(raw) > 1:
        others = ", ".join(sorted(k for k in raw if k != "dbsync"))
        raise ConfigError(f"config file {path}: put every setting under [dbsync] or none; found also {others}")
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [dbsync] must be a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _TYPES or name == "config_file":
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        out[name] = _coerce(name, value, f"config file {path}")
    return out


def check_dsn(dsn: str, what: str = "dsn") -> dict[str, str]:
    misread = ConfigError(
        f"{what} is a URL with an '@' or '/' in its user name or password: percent-encode them "
        "(%40, %2F) or use the key=value form (not shown, it may hold a password)"
    )
    # libpq would take the rest of such a password for a host or database name, and quote it.
    if _misread_url(dsn):
        raise misread
    try:
        parts = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except Exception:  # noqa: BLE001 - psycopg's message may quote the password
        # Not echoed: a malformed string may hold a password where no pattern can find it.
        raise ConfigError(
            f"{what} is not a valid PostgreSQL connection string (not shown, it may hold a password)"
        ) from None
    if _misread_url(parts.get("dbname", "")):  # libpq reads such a dbname as a URL
        raise misread
    return parts


# What never appears in a message: libpq's keywords whose values are secrets.
SECRET_KEYWORDS = frozenset({"password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key"})
MASK = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A secret keyword and its value in free text: a quoted value (to its closing quote or the end)
# or an unquoted one (to whitespace, backslash escapes included), as libpq reads them.
_KV_SECRET = re.compile(
    r"(?<![\w.%-])(?P<key>" + "|".join(sorted(SECRET_KEYWORDS)) + r")(?P<eq>\s*=\s*)"
    r"(?:'(?:[^'\\]|\\.)*(?:'|\Z)|(?:\\.|[^\s\\])*\\?)",
    re.IGNORECASE | re.DOTALL,
)
# One keyword = value pair of a key=value DSN.
_KV_PAIR = re.compile(
    r"(?P<lead>\s*)(?P<key>\w+)(?P<eq>\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|(?!')(?:\\.|[^\s\\])*\\?)", re.DOTALL
)


@functools.cache
def _keywords() -> frozenset[str]:
    """Every keyword this libpq knows (a key=value DSN's keys, a URL's query parameters)."""
    return frozenset(d.keyword.decode() for d in Conninfo.get_defaults()) | SECRET_KEYWORDS


def _misread_url(dsn: str) -> bool:
    """A postgresql:// URL whose user info holds an unencoded '@' or '/': libpq ends the user
    info at the first of them, so the rest becomes the host or the database name."""
    text = dsn.strip()
    match = _SCHEME.match(text)
    if not match or text[: match.end()].lower() not in ("postgresql://", "postgres://"):
        return False
    rest = text[match.end() :]
    ends = [i for i in (rest.find("@"), rest.find("/")) if i >= 0]
    return bool(ends) and "@" in rest[min(ends) + 1 :]


def _redact_url(url: str) -> str:
    """A URL (scheme://...) with its user info's password and any secret query value masked.

    The user info runs to the LAST '@': a password may hold '@', ':' and '/' unencoded. When the
    user name itself would be ambiguous, it is masked too."""
    scheme = _SCHEME.match(url)
    assert scheme is not None
    head, rest = url[: scheme.end()], url[scheme.end() :]
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        head += (MASK if "@" in user else user + (":" + MASK if colon else "")) + "@"
        rest = rest[at + 1 :]
    query = rest.find("?")
    if query < 0:
        return head + rest
    kept: list[str] = []
    hiding = False
    for piece in rest[query + 1 :].split("&"):
        key, eq, _ = piece.partition("=")
        name = unquote(key).strip().lower()
        if hiding and not (eq and name in _keywords()):
            continue  # an unencoded '&' inside the secret: still the secret
        hiding = bool(eq) and name in SECRET_KEYWORDS
        kept.append(f"{key}={MASK}" if hiding else piece)
    return head + rest[: query + 1] + "&".join(kept)


def _redact_kv(dsn: str) -> str:
    """A key=value DSN read as libpq reads it; from the first thing that is not a known
    keyword's pair on, everything is masked (a password may have been typed without its key)."""
    out: list[str] = []
    pos = 0
    while pos < len(dsn):
        pair = _KV_PAIR.match(dsn, pos)
        if pair is None or pair["key"].lower() not in _keywords():
            rest = dsn[pos:]
            if rest.strip():
                out.append(rest[: len(rest) - len(rest.lstrip())] + MASK)
            break
        key, value = pair["key"], pair["value"]
        if key.lower() in SECRET_KEYWORDS:
            value = MASK
        elif key.lower() == "dbname" and ("=" in value or "://" in value):
            # libpq reads a dbname that looks like a connection string as one.
            if value.startswith("'"):
                inner = re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.DOTALL)
                value = "'" + redact_dsn(inner).replace("\\", "\\\\").replace("'", "\\'") + "'"
            else:
                value = redact_dsn(value)
        out.append(pair["lead"] + key + pair["eq"] + value)
        pos = pair.end()
    return "".join(out)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password masked, for messages and logs.

    Also the last guard on every log line: in other text, secret key=value pairs and the user
    info of any URL (up to whitespace) are masked."""
    text = dsn.strip()
    if _SCHEME.match(text):
        return _redact_url(text)
    first = _KV_PAIR.match(text)
    if first is not None and first["key"].lower() in _keywords():
        return _redact_kv(text)
    out = _KV_SECRET.sub(lambda m: m["key"] + m["eq"] + MASK, dsn)
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S*", lambda m: _redact_url(m[0]), out)


def describe_dsn(dsn: str) -> str:
    """A short, password-free name for a database: user@host:port/dbname."""
    try:
        # Parsed after masking: a password libpq would misread cannot become a host name here.
        parts = conninfo_to_dict(redact_dsn(dsn))
    except Exception:  # noqa: BLE001
        return "a malformed connection string"
    db = parts.get("dbname")
    if db and ("=" in str(db) or _SCHEME.match(str(db))):
        return describe_dsn(str(db))
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    user = parts.get("user") if parts.get("user") != MASK else None
    db = db or user or "?"
    return f"{str(user) + '@' if user else ''}{host}:{port}/{db}"


def dsn_has_password(dsn: str) -> bool:
    """Whether the DSN itself carries a secret (a password, in the user info or as a key)."""
    if _misread_url(dsn):
        return True  # libpq misreads where the password ends, but there is one
    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - malformed: it may hold one where no key says so
        return redact_dsn(dsn) != dsn.strip()
    return any(parts.get(key) for key in SECRET_KEYWORDS)


def with_overrides(settings: Settings, **values: Any) -> Settings:
    return replace(settings, **{k: v for k, v in values.items() if v is not None})
