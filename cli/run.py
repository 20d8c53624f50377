"""`dbsync run`: the replication daemon in the foreground (systemd runs it like this)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal

import click
from click.core import ParameterSource

from dbsync.cli.options import connection_options, consumer_timeout_option
from dbsync.config import POISON_POLICIES, Settings, load_settings
from dbsync.daemon.reload import Reloader, check
from dbsync.daemon.service import Service

log = logging.getLogger("dbsync.daemon")

# SIGTERM/SIGINT: the current page may finish for this long; then it is rolled back.
STOP_GRACE = 4.0


@click.command()
@connection_options
@click.option("--once", is_flag=True, help="Apply everything committed so far, then exit.")
@click.option("--batch-size", type=int, default=None, help="Events per Agent DB transaction (default 10000).")
@click.option("--poll-interval", type=float, default=None, help="Seconds between polls without a notification.")
@click.option(
    "--poison-policy",
    type=click.Choice(POISON_POLICIES),
    default=None,
    help="On an event the Agent DB rejects: stop and retry (default) or park it and carry on.",
)
@click.option(
    "--lag-threshold", type=float, default=None, help="Seconds of lag that fail /readyz and raise an alert (default 5)."
)
@click.option("--http", metavar="HOST:PORT", default=None, help="Serve /metrics, /healthz and /readyz (default: off).")
@click.option("--alert-webhook", metavar="URL", default=None, help="POST alerts as JSON here (default: only log them).")
@click.option(
    "--full-verify-interval",
    type=float,
    metavar="SECONDS",
    default=None,
    help="Compare every replicated table with the Site DB this often (default: off).",
)
@click.option(
    "--verify-interval",
    type=float,
    metavar="SECONDS",
    default=None,
    help="Compare the rows this daemon applied with the Site DB this often (default: off).",
)
@click.option(
    "--verify-rows-per-second",
    type=int,
    default=None,
    help="Rows a second the verification reads from each database (default 5000).",
)
@click.option(
    "--verify-repair/--no-verify-repair",
    default=None,
    help="Repair rows the full verification finds differing, through the sync log (default: report only).",
)
@click.option(
    "--consumer",
    metavar="NAME",
    default=None,
    help="This daemon's name among the consumers of the Site log (default: <source>@<Agent DB>/<cluster id>).",
)
@consumer_timeout_option
@click.option(
    "--auto-add-columns/--no-auto-add-columns",
    default=None,
    help="Add a column the Site DB gained to the Agent table, when its existing rows stay equal (default: off).",
)
def run(
    config_file: str | None,
    site_dsn: str | None,
    agent_dsn: str | None,
    once: bool,
    batch_size: int | None,
    poll_interval: float | None,
    poison_policy: str | None,
    lag_threshold: float | None,
    http: str | None,
    alert_webhook: str | None,
    full_verify_interval: float | None,
    verify_interval: float | None,
    verify_rows_per_second: int | None,
    verify_repair: bool | None,
    consumer: str | None,
    consumer_timeout: float | None,
    auto_add_columns: bool | None,
) -> None:
    """Replicate continuously until SIGTERM or SIGINT.

    Under systemd (Type=notify) it reports readiness, status and watchdog pings itself.
    SIGHUP reads the config file again: batch size, poll interval, lag threshold, log level,
    alert webhook, poison policy, verification budget and repair, and
    auto_add_columns change at once; other settings need a restart.
    """
    load = functools.partial(
        load_settings,
        config_file,
        site_dsn=site_dsn,
        agent_dsn=agent_dsn,
        batch_size=batch_size,
        poll_interval=poll_interval,
        poison_policy=poison_policy,
        lag_threshold=lag_threshold,
        http=http,
        alert_webhook=alert_webhook,
        full_verify_interval=full_verify_interval,
        verify_interval=verify_interval,
        verify_rows_per_second=verify_rows_per_second,
        verify_repair=verify_repair,
        consumer=consumer,
        consumer_timeout=consumer_timeout,
        auto_add_columns=auto_add_columns,
        log_level=_log_level_flag(),
    )
    settings = check(load())
    logging.getLogger().setLevel(settings.log_level.upper())
    asyncio.run(_serve(settings, once, Reloader(load)))


def _log_level_flag() -> str | None:
    """`dbsync --log-level` when given (it wins over the config file), else None."""
    parent = click.get_current_context().parent
    if parent is None or parent.get_parameter_source("log_level") in (None, ParameterSource.DEFAULT):
        return None
    return str(parent.params["log_level"])


async def _serve(settings: Settings, once: bool, reloader: Reloader) -> None:
    stop = asyncio.Event()
    reload = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        log.info("%s received: stopping after the current page", signal.Signals(signum).name)
        stop.set()

    def on_hup() -> None:
        if once:
            log.warning("SIGHUP ignored: --once does not reload its configuration")
            return
        log.info("SIGHUP received: reading the configuration again")
        reload.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    service = Service(settings, stop=stop, reload=reload, reloader=reloader)
    task = asyncio.ensure_future(service.run(once=once))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        done, _ = await asyncio.wait({task}, timeout=STOP_GRACE)
        if not done:
            log.warning("the current page did not finish within %.0f s; rolling it back", STOP_GRACE)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            stopper.cancel()
            return
    stopper.cancel()
    task.result()  # re-raise a --once failure
    if once:
        log.info("applied %d events; exiting", service.replicator.stats.events)
    else:
        log.info("stopped")
