"""`dbsync run`: the replication daemon in the foreground (systemd runs it like this)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import click

from dbsync.cli.options import connection_options
from dbsync.config import POISON_POLICIES, Settings, load_settings
from dbsync.daemon.alerts import check_url
from dbsync.daemon.dsn import connect_kwargs
from dbsync.daemon.http import parse_address
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
) -> None:
    """Replicate continuously until SIGTERM or SIGINT.

    Under systemd (Type=notify) it reports readiness, status and watchdog pings itself.
    SIGHUP does not reload the configuration: restart the service to apply changes.
    """
    settings = load_settings(
        config_file,
        site_dsn=site_dsn,
        agent_dsn=agent_dsn,
        batch_size=batch_size,
        poll_interval=poll_interval,
        poison_policy=poison_policy,
        lag_threshold=lag_threshold,
        http=http,
        alert_webhook=alert_webhook,
    ).require("site_dsn", "agent_dsn")
    for name in ("site_dsn", "agent_dsn"):
        connect_kwargs(getattr(settings, name), name)  # a parameter the daemon cannot honour stops it now
    if settings.http:
        parse_address(settings.http)
    if settings.alert_webhook:
        check_url(settings.alert_webhook)
    asyncio.run(_serve(settings, once))


async def _serve(settings: Settings, once: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        log.info("%s received: stopping after the current page", signal.Signals(signum).name)
        stop.set()

    def on_hup() -> None:
        log.warning("SIGHUP ignored: dbsync does not reload its configuration; restart it to apply changes")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    service = Service(settings, stop=stop)
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
