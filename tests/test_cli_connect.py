"""The CLI connects as the DSN says: its own connect_timeout (or PGCONNECT_TIMEOUT) is honoured,
10 s is only the default when neither says; its application_name is kept, "dbsync" is only the
fallback (hardening issue, item 10)."""

from __future__ import annotations

import time

import pytest
from psycopg.conninfo import conninfo_to_dict

from dbsync.db import DEFAULT_CONNECT_TIMEOUT, connect, timeout_kwargs
from tests.helpers import DbPair, count, dbsync_cmd
from tests.proxy import Proxy


@pytest.mark.unit
def test_default_only_when_the_dsn_sets_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    assert timeout_kwargs("host=db dbname=x") == {"connect_timeout": DEFAULT_CONNECT_TIMEOUT}
    assert timeout_kwargs("postgresql://u@db/x") == {"connect_timeout": DEFAULT_CONNECT_TIMEOUT}
    assert timeout_kwargs("host=db dbname=x connect_timeout=30") == {}
    assert timeout_kwargs("host=db dbname=x connect_timeout=0") == {}  # 0: wait forever, as libpq
    assert timeout_kwargs("postgresql://u@db/x?connect_timeout=3") == {}
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "25")
    assert timeout_kwargs("host=db dbname=x") == {}


def test_a_stalled_server_fails_after_the_dsns_timeout(pair: DbPair) -> None:
    """A server that accepts the TCP connection and never answers: `dbsync status` gives up after
    the DSN's 2 s, not after the default 10 s, with one line."""
    parts = conninfo_to_dict(pair.site_dsn)
    with Proxy(str(parts.get("host", "127.0.0.1")), int(parts.get("port", 5432))) as proxy:
        proxy.stall()
        env = pair.env()
        env["DBSYNC_SITE_DSN"] = proxy.route(pair.site_dsn) + " connect_timeout=2"
        env.pop("PGCONNECT_TIMEOUT", None)
        started = time.monotonic()
        result = dbsync_cmd("status", env=env, timeout=60)
        took = time.monotonic() - started
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect to the Site DB" in lines[0], result.stderr
    assert 2 <= took < DEFAULT_CONNECT_TIMEOUT - 2, f"gave up after {took:.1f} s"
    # The database itself is untouched and answers directly.
    assert count(pair.site_dsn, "conversations") == 0
    assert dbsync_cmd("status", env=pair.env(), timeout=60).returncode in (0, 1)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [("", "dbsync"), (" application_name=crm-ops", "crm-ops"), (" fallback_application_name=cron", "cron")],
)
def test_the_dsns_application_name_is_kept(pair: DbPair, extra: str, expected: str) -> None:
    with connect(pair.site_dsn + extra, "Site") as conn:
        row = conn.execute("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()
    assert row == (expected,)
