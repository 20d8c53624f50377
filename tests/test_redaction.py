"""No part of a password survives redact_dsn, describe_dsn or check_dsn, whatever the DSN's form.

Each password is made of characters that occur nowhere else in its DSN, so any fragment of it
that leaks (three characters or more) is detectable.
"""

from __future__ import annotations

import pytest

from dbsync.config import check_dsn, describe_dsn, dsn_has_password, redact_dsn
from dbsync.errors import ConfigError

pytestmark = pytest.mark.unit

PW = "Qx7Zk9Wv"  # nothing else in these DSNs has three of these characters in a row


def fragments(secret: str, size: int = 3) -> set[str]:
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def assert_hidden(text: str, *secrets: str) -> None:
    for secret in secrets:
        leaked = sorted(f for f in fragments(secret) if f in text)
        assert not leaked, f"{leaked} of the password {secret!r} in {text!r}"


# (DSN, the secrets it holds: raw as typed and as libpq decodes them)
FORMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "url": (f"postgresql://alice:{PW}@db.example.com:5432/app", (PW,)),
    "url-postgres-scheme": (f"postgres://alice:{PW}@db.example.com/app", (PW,)),
    "url-unencoded-at": ("postgresql://alice:Qx7@Zk9Wv@db.example.com:5432/app", ("Qx7@Zk9Wv",)),
    "url-issue-example": ("postgresql://someone:Mj4@Leak77@db.example.com/app", ("Mj4@Leak77",)),
    "url-unencoded-colon": ("postgresql://alice:Qx7:Zk9:Wv@db.example.com/app", ("Qx7:Zk9:Wv",)),
    "url-unencoded-slash": ("postgresql://alice:Qx7/Zk9Wv@db.example.com/app", ("Qx7/Zk9Wv",)),
    "url-everything": ("postgresql://alice:Q@x7:Z/k9?W#v&@db.example.com/app", ("Q@x7:Z/k9?W#v&",)),
    "url-percent-encoded": (
        "postgresql://alice:Qx7%40Zk9%3AWv%2F@db.example.com/app",
        ("Qx7%40Zk9%3AWv%2F", "Qx7@Zk9:Wv/"),
    ),
    "url-no-user": (f"postgresql://:{PW}@db.example.com/app", (PW,)),
    "url-multi-host": ("postgresql://alice:Qx7@Zk9Wv@h1.example.com:5432,h2.example.com:5433/app", ("Qx7@Zk9Wv",)),
    "url-multi-host-clean": (f"postgresql://alice:{PW}@h1.example.com:5432,h2.example.com:5433/app", (PW,)),
    "url-query-password": (f"postgresql://alice@db.example.com/app?sslmode=require&password={PW}", (PW,)),
    "url-query-password-first": (f"postgresql://alice@db.example.com/app?password={PW}&sslmode=require", (PW,)),
    "url-query-encoded-key": (f"postgresql://alice@db.example.com/app?p%61ssword={PW}", (PW,)),
    "url-query-ampersand": ("postgresql://alice@db.example.com/app?password=Qx7&Zk9=Wv", ("Qx7&Zk9=Wv",)),
    "url-query-sslpassword": (f"postgresql://alice@db.example.com/app?sslpassword={PW}", (PW,)),
    "url-userinfo-and-query": ("postgresql://alice:Qx7Zk9@db.example.com/app?password=Mj4Lp8", ("Qx7Zk9", "Mj4Lp8")),
    "kv": (f"host=db.example.com user=alice password={PW} dbname=app", (PW,)),
    "kv-password-first": (f"password={PW} host=db.example.com", (PW,)),
    "kv-spaces-around-equals": (f"host=db.example.com password = {PW} dbname=app", (PW,)),
    "kv-quoted": ("host=db.example.com password='Qx7 Zk9 Wv' dbname=app", ("Qx7 Zk9 Wv", "Qx7", "Zk9")),
    "kv-quoted-escapes": (r"host=db.example.com password='Qx7\' Zk9\\Wv' dbname=app", ("Qx7' Zk9\\Wv", "Zk9")),
    "kv-escaped-space": (r"host=db.example.com password=Qx7\ Zk9Wv dbname=app", ("Qx7 Zk9Wv", "Zk9Wv")),
    "kv-url-chars": ("host=db.example.com password=Qx7@Zk9://Wv dbname=app", ("Qx7@Zk9://Wv",)),
    "kv-sslpassword": (f"host=db.example.com sslkey=/k.pem sslpassword={PW}", (PW,)),
    "kv-oauth-secret": (f"host=db.example.com oauth_client_id=app oauth_client_secret={PW}", (PW,)),
    "kv-dbname-is-a-dsn": (f"dbname='host=db.example.com password={PW}'", (PW,)),
    "kv-dbname-is-a-url": ("dbname=postgresql://alice:Qx7@Zk9Wv@db.example.com/app", ("Qx7@Zk9Wv",)),
    # Malformed: libpq refuses them, yet they are echoed nowhere either.
    "bad-unterminated-quote": (f"host=db.example.com password='{PW} dbname=app", (PW,)),
    "bad-unquoted-space": ("host=db.example.com password=Qx7 Zk9Wv dbname=app", ("Qx7", "Zk9Wv")),
    "bad-no-keyword": (f"host=db.example.com user=alice {PW}", (PW,)),
    "bad-unknown-keyword": (f"host=db.example.com password={PW} bogus=1", (PW,)),
    "bad-url-space": ("postgresql://alice:Qx7 Zk9Wv@db.example.com/app", ("Qx7 Zk9Wv", "Qx7", "Zk9Wv")),
    "bad-url-query-key": (f"postgresql://alice:{PW}@db.example.com/app?bogus=1", (PW,)),
    "kv-trailing-backslash": ("host=db.example.com password=Qx7Zk9Wv\\", ("Qx7Zk9Wv\\",)),
}


@pytest.mark.parametrize("name", list(FORMS))
def test_redact_dsn_hides_every_part_of_the_password(name: str) -> None:
    dsn, secrets = FORMS[name]
    assert_hidden(redact_dsn(dsn), *secrets)


@pytest.mark.parametrize("name", list(FORMS))
def test_redact_dsn_inside_a_message(name: str) -> None:
    """The last guard on log lines: a DSN quoted inside other text."""
    dsn, secrets = FORMS[name]
    if " " in dsn:
        pytest.skip("a DSN with spaces cannot be told apart from the text around it")
    for text in (f"cannot use {dsn}: refused", f'"{dsn}"', f"dsn={dsn}\nnext line"):
        assert_hidden(redact_dsn(text), *secrets)


@pytest.mark.parametrize("name", list(FORMS))
def test_describe_dsn_shows_no_part_of_the_password(name: str) -> None:
    dsn, secrets = FORMS[name]
    assert_hidden(describe_dsn(dsn), *secrets)


@pytest.mark.parametrize("name", list(FORMS))
def test_check_dsn_accepts_or_refuses_without_quoting(name: str) -> None:
    dsn, secrets = FORMS[name]
    try:
        parts = check_dsn(dsn, "site_dsn")
    except ConfigError as exc:
        assert str(exc).startswith("site_dsn "), exc
        assert_hidden(str(exc), *secrets)
    else:
        assert not name.startswith("bad-"), parts


@pytest.mark.parametrize(
    "name",
    [
        "url-unencoded-at",
        "url-issue-example",
        "url-unencoded-slash",
        "url-everything",
        "url-multi-host",
        "kv-dbname-is-a-url",
    ],
)
def test_check_dsn_refuses_a_url_libpq_would_misread(name: str) -> None:
    """libpq ends the user info at the first '@' or '/': the rest of the password would become
    the host or the database name, and be quoted in its error messages."""
    dsn, secrets = FORMS[name]
    with pytest.raises(ConfigError, match="percent-encode") as caught:
        check_dsn(dsn, "site_dsn")
    assert_hidden(str(caught.value), *secrets)


@pytest.mark.parametrize(
    ("dsn", "expect"),
    [
        (f"postgresql://alice:{PW}@db.example.com:5432/app", "postgresql://alice:***@db.example.com:5432/app"),
        ("postgresql://alice:Qx7@Zk9Wv@db.example.com/app", "postgresql://alice:***@db.example.com/app"),
        ("postgresql://alice@db.example.com/app", "postgresql://alice@db.example.com/app"),
        ("postgresql://db.example.com/app", "postgresql://db.example.com/app"),
        (
            f"postgresql://alice@db.example.com/app?password={PW}&sslmode=require",
            "postgresql://alice@db.example.com/app?password=***&sslmode=require",
        ),
        (f"host=db.example.com password={PW} dbname=app", "host=db.example.com password=*** dbname=app"),
        ("host=db.example.com password='Qx7 Zk9' dbname=app", "host=db.example.com password=*** dbname=app"),
        ("host=db.example.com dbname=app", "host=db.example.com dbname=app"),
        ('connection to server at "127.0.0.1", port 1 failed', 'connection to server at "127.0.0.1", port 1 failed'),
        ('password authentication failed for user "alice"', 'password authentication failed for user "alice"'),
        ("serving on http://127.0.0.1:9187", "serving on http://127.0.0.1:9187"),
    ],
)
def test_redact_dsn_keeps_what_is_not_secret(dsn: str, expect: str) -> None:
    assert redact_dsn(dsn) == expect


@pytest.mark.parametrize(
    ("dsn", "expect"),
    [
        (f"postgresql://alice:{PW}@db.example.com:6543/app", "alice@db.example.com:6543/app"),
        ("postgresql://alice:Qx7@Zk9Wv@db.example.com/app", "alice@db.example.com:5432/app"),
        (f"postgresql://alice@db.example.com/app?password={PW}", "alice@db.example.com:5432/app"),
        (f"host=db.example.com user=alice password='{PW} x' dbname=app", "alice@db.example.com:5432/app"),
        (f"host=db.example.com user=alice {PW}", "a malformed connection string"),
    ],
)
def test_describe_dsn_names_the_database(dsn: str, expect: str) -> None:
    assert describe_dsn(dsn) == expect


@pytest.mark.parametrize(
    ("dsn", "expect"),
    [
        (f"postgresql://alice:{PW}@h/app", True),
        (f"postgresql://:{PW}@h/app", True),
        (f"postgresql://alice@h/app?password={PW}", True),
        (f"host=h password={PW}", True),
        (f"host=h sslpassword={PW}", True),
        ("postgresql://alice:Qx7/Zk9Wv@h/app", True),  # libpq reads no password here, but one is there
        (f"host=h user=alice {PW}", True),  # malformed: maybe one
        ("postgresql://alice@h/app", False),
        ("postgresql://alice:@h/app", False),
        ("host=h user=alice passfile=/etc/dbsync/pgpass", False),
        ("", False),
    ],
)
def test_dsn_has_password(dsn: str, expect: bool) -> None:
    assert dsn_has_password(dsn) is expect
