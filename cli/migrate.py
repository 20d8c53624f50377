"""`dbsync migrate`: apply the SQL migrations to the Site DB and/or the Agent DB, or roll them back."""

from __future__ import annotations

import click

from dbsync import migrations
from dbsync.cli.options import connection_options
from dbsync.config import describe_dsn, load_settings
from dbsync.errors import ConfigError


@click.command()
@connection_options
@click.option("--pack", "packs", multiple=True, help="Also apply (or roll back) a schema pack (e.g. whatsapp).")
@click.option(
    "--rollback",
    is_flag=True,
    help="Roll back every dbsync migration instead (uninstall): drops the dbsync schema, its log and progress.",
)
def migrate(
    config_file: str | None, site_dsn: str | None, agent_dsn: str | None, packs: tuple[str, ...], rollback: bool
) -> None:
    """Apply pending migrations to every database configured (Site, Agent, or both).

    With --rollback, remove them instead, newest first: capture triggers, the sync log and the
    Site functions, or the Agent's progress and parked events. Stop every daemon first.
    """
    settings = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn)
    targets = [(side, getattr(settings, f"{side}_dsn")) for side in migrations.SIDES]
    targets = [(side, dsn) for side, dsn in targets if dsn]
    if not targets:
        raise ConfigError("no database to migrate: pass --site-dsn and/or --agent-dsn (or set them in the config)")
    # Every database must be reachable (and the right one) before any is changed.
    if rollback:
        for side, dsn in targets:
            migrations.check_rollback(dsn, side, list(packs))
        for side, dsn in targets:
            done = migrations.rollback(dsn, side, list(packs))
            what = "rolled back " + ", ".join(done) if done else "nothing to roll back"
            click.echo(f"{side} DB ({describe_dsn(dsn)}): {what}")
        return
    for side, dsn in targets:
        migrations.check(dsn, side)
    for side, dsn in targets:
        done = migrations.apply(dsn, side, list(packs))
        what = ", ".join(done) if done else "nothing pending"
        click.echo(f"{side} DB ({describe_dsn(dsn)}): {what}")
