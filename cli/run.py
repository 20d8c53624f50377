"""`dbsync run`: the replication daemon in the foreground (systemd runs it like this)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import click

from dbsync.cli.options import connection_options
from dbsync.config import Settings, load_settings
from dbsync.daemon.runner import Replicator

log = logging.getLogger("dbsync.daemon")


@click.command()
@connection_options
@click.option("--once", is_flag=True, help="Apply everything committed so far, then exit.")
@click.option("--batch-size", type=int, default=None, help="Events per Agent DB transaction (default 5000).")
@click.option("--poll-interval", type=float, default=None, help="Seconds between polls without a notification.")
def run(
    config_file: str | None,
    site_dsn: str | None,
    agent_dsn: str | None,
    once: bool,
    batch_size: int | None,
    poll_interval: float | None,
) -> None:
    """Replicate continuously until SIGTERM or SIGINT."""
    settings = load_settings(
        config_file, site_dsn=site_dsn, agent_dsn=agent_dsn, batch_size=batch_size, poll_interval=poll_interval
    ).require("site_dsn", "agent_dsn")
    asyncio.run(_serve(settings, once))


async def _serve(settings: Settings, once: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        log.info("%s received: finishing the current batch", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    replicator = Replicator(settings, stop=stop)
    await replicator.run(once=once)
    if once:
        log.info("applied %d events; exiting", replicator.stats.events)
