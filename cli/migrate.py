"""`dbsync migrate`: apply the SQL migrations to the Site DB and/or the Agent DB."""

from __future__ import annotations

import click

from dbsync import migrations
from dbsync.cli.options import connection_options
from dbsync.config import describe_dsn, load_settings
from dbsync.errors import ConfigError


@click.command()
@connection_options
@click.option("--pack", "packs", multiple=True, help="Also apply a schema pack (e.g. whatsapp).")
def migrate(config_file: str | None, site_dsn: str | None, agent_dsn: str | None, packs: tuple[str, ...]) -> None:
    """Apply pending migrations to every database configured (Site, Agent, or both)."""
    settings = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn)
    targets = [(side, getattr(settings, f"{side}_dsn")) for side in migrations.SIDES]
    targets = [(side, dsn) for side, dsn in targets if dsn]
    if not targets:
        raise ConfigError("no database to migrate: pass --site-dsn and/or --agent-dsn (or set them in the config)")
    # Every database must be reachable (and new enough) before any is changed.
    for side, dsn in targets:
        migrations.check(dsn, side)
    for side, dsn in targets:
        done = migrations.apply(dsn, side, list(packs))
        what = ", ".join(done) if done else "nothing pending"
        click.echo(f"{side} DB ({describe_dsn(dsn)}): {what}")
