"""What a SIGHUP takes from the config file: the diff of two settings, the log lines that
report it, the refusals, and the RELOADING=1 / READY=1 pair (on a real datagram socket)."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbsync.config import LOG_LEVELS, Settings, load_settings
from dbsync.daemon.reload import LIVE, Reloader, diff, shadowed
from dbsync.daemon.sdnotify import Notifier

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-Pw"
SITE = f"host=site.example.com dbname=app user=sync password={SECRET}"
AGENT = "host=agent.example.com dbname=app user=sync"
BASE = Settings(site_dsn=SITE, agent_dsn=AGENT)


@pytest.fixture(autouse=True)
def no_dbsync_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DBSYNC_"):
            monkeypatch.delenv(name)


def test_live_settings_take_their_new_value() -> None:
    new = Settings(
        site_dsn=SITE,
        agent_dsn=AGENT,
        batch_size=500,
        poll_interval=0.25,
        lag_threshold=30.0,
        log_level="debug",
        alert_webhook=f"https://hooks.example.com/services/{SECRET}",
        poison_policy="park",
        verify_rows_per_second=250,
        verify_repair=True,
        auto_add_columns=True,
    )
    plan = diff(BASE, new)
    assert plan.settings == new
    assert list(plan.changed) == [name for name in Settings.__dataclass_fields__ if name in LIVE]
    assert plan.restart == []
    (line,) = plan.lines()
    assert line == (
        "configuration reloaded: batch_size=500, poll_interval=0.25, poison_policy=park, lag_threshold=30, "
        "alert_webhook=https://hooks.example.com/..., log_level=debug, verify_rows_per_second=250, verify_repair=true, "
        "auto_add_columns=true"
    )


def test_structural_settings_keep_their_old_value_and_are_named() -> None:
    new = Settings(
        site_dsn=SITE.replace("site.example.com", "other.example.com"),
        agent_dsn=AGENT,
        source="crm",
        http="127.0.0.1:9187",
        io_timeout=5.0,
        batch_size=7,
        full_verify_interval=600.0,
    )
    plan = diff(BASE, new)
    assert plan.settings == Settings(site_dsn=SITE, agent_dsn=AGENT, batch_size=7)
    assert plan.changed == {"batch_size": 7}
    assert plan.restart == ["site_dsn", "source", "io_timeout", "http", "full_verify_interval"]
    assert plan.lines() == [
        "configuration reloaded: batch_size=7",
        "configuration reload: site_dsn, source, io_timeout, http, full_verify_interval changed but need a restart; "
        "the old value stays in use until then",
    ]
    assert not any(SECRET in line or "example.com" in line for line in plan.lines())


def test_nothing_changed_and_turning_the_webhook_off() -> None:
    assert diff(BASE, BASE).lines() == ["configuration reloaded: nothing changed"]
    hooked = Settings(site_dsn=SITE, agent_dsn=AGENT, alert_webhook="http://127.0.0.1:8080/x")
    assert diff(hooked, BASE).lines() == ["configuration reloaded: alert_webhook=off"]
    assert (
        diff(BASE, Settings(site_dsn=SITE, agent_dsn=AGENT, http="x:1"))
        .lines()[-1]
        .startswith("configuration reload: http changed but needs a restart")
    )


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "dbsync.toml"
    path.write_text(f"site_dsn = '{SITE}'\nagent_dsn = '{AGENT}'\nbatch_size = 100\n")
    return path


def reloader(conf: Path, **flags: object) -> Reloader:
    return Reloader(lambda: load_settings(conf, **flags))


def test_reloader_reads_the_file_again(conf: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dbsync")
    current = load_settings(conf)
    conf.write_text(conf.read_text().replace("100", "250") + "log_level = 'warning'\n")
    plan = reloader(conf)(current)
    assert plan is not None and plan.settings.batch_size == 250 and plan.settings.log_level == "warning"
    assert caplog.messages == ["configuration reloaded: batch_size=250, log_level=warning"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("poll_interval = 0\n", "poll_interval must be a positive float, got 0"),
        ("batch_size = \n", "is not valid TOML"),
        ("bacth_size = 5\n", "unknown setting 'bacth_size'"),
        ("log_level = 'loud'\n", "log_level must be one of debug, info, warning, error, got 'loud'"),
        ("poison_policy = 'skip'\n", "poison_policy must be one of stop, park"),
        ("alert_webhook = 'ftp://example.com/x'\n", "alert_webhook must be an http:// or https:// URL"),
        ("http = '9187'\n", "http must be host:port"),
        ("full_verify_interval = 0\n", "full_verify_interval must be a positive float, got 0"),
        ("verify_rows_per_second = -10\n", "verify_rows_per_second must be a positive int, got -10"),
        ("verify_repair = 'sometimes'\n", "verify_repair must be true or false, got 'sometimes'"),
    ],
)
def test_an_invalid_file_is_refused_in_one_line(
    conf: Path, caplog: pytest.LogCaptureFixture, text: str, problem: str
) -> None:
    caplog.set_level(logging.INFO, "dbsync")
    current = load_settings(conf)
    conf.write_text(conf.read_text() + text)
    assert reloader(conf)(current) is None
    (line,) = caplog.messages
    assert line.startswith("configuration reload refused, the old settings stay in use: "), line
    assert problem in line and SECRET not in line


def test_a_missing_file_and_a_dsn_that_breaks_are_refused(conf: Path, caplog: pytest.LogCaptureFixture) -> None:
    current = load_settings(conf)
    text = conf.read_text()
    conf.write_text(text.replace("host=site.example.com", "hostaddr=10.0.0.1 host=site.example.com"))
    assert reloader(conf)(current) is None
    conf.unlink()
    assert reloader(conf)(current) is None
    assert len(caplog.messages) == 2 and "does not exist" in caplog.messages[1]
    assert "hostaddr" in caplog.messages[0] and SECRET not in caplog.messages[0]


def test_a_flag_still_wins_over_the_file_and_the_log_says_so(conf: Path, caplog: pytest.LogCaptureFixture) -> None:
    current = load_settings(conf, batch_size=40)
    conf.write_text(conf.read_text().replace("100", "250"))
    plan = reloader(conf, batch_size=40)(current)
    assert plan is not None and plan.settings.batch_size == 40 and plan.changed == {}
    assert shadowed(plan.settings) == ["batch_size"]
    assert caplog.messages[-1] == (
        "configuration reload: batch_size in the config file is overridden by a flag or the environment"
    )


def test_without_a_config_file_nothing_is_reloaded(caplog: pytest.LogCaptureFixture) -> None:
    current = load_settings(None, site_dsn=SITE, agent_dsn=AGENT)
    assert Reloader(lambda: load_settings(None, site_dsn=SITE, agent_dsn=AGENT))(current) is None
    (line,) = caplog.messages
    assert "there is no config file" in line


# -- systemd ------------------------------------------------------------------------------------
@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, Notifier]]:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": address})
    yield sock, notifier
    notifier.close()
    sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())


def test_reloading_then_ready_with_the_monotonic_time(systemd: tuple[socket.socket, Notifier]) -> None:
    sock, notifier = systemd
    notifier.reloading()  # before the first READY=1: a start, not a reload; nothing is sent
    notifier.reloaded("starting")
    assert received(sock) == {"STATUS": "starting"}
    notifier.ready("applying")
    assert received(sock) == {"READY": "1", "STATUS": "applying"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    message = received(sock)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert message["RELOADING"] == "1" and before <= int(message["MONOTONIC_USEC"]) <= after
    notifier.reloaded("applying")
    assert received(sock) == {"READY": "1", "STATUS": "applying"}


def test_the_log_levels_are_those_of_the_flag() -> None:
    import click

    from dbsync.cli.main import cli

    (option,) = [p for p in cli.params if p.name == "log_level"]
    assert isinstance(option.type, click.Choice)
    assert tuple(option.type.choices) == LOG_LEVELS
