"""`dbsync migrate`: apply the SQL migrations to the Site DB and/or the Agent DB, or roll them back."""

from __future__ import annotations

import click

from dbsync import migrations
from dbsync.cli.options import connection_options
from dbsync.config import describe_dsn, load_settings
from dbsync.errors import ConfigError
from dbsync.packs import register_write_back, write_back_tables


@click.command()
@connection_options
@click.option("--pack", "packs", multiple=True, help="Also apply (or roll back) a schema pack (e.g. whatsapp).")
@click.option(
    "--two-way",
    is_flag=True,
    help="Also install write-back (Agent -> Site): the capture chain on the Agent DB and the apply chain on "
    "the Site DB, registering each DSN's role as the one dbsync applies with there. Needs both DSNs. "
    "With --pack, also registers the pack's write-back tables (whatsapp: leads, the Agent owning stage, score).",
)
@click.option(
    "--rollback",
    is_flag=True,
    help="Roll back every dbsync migration instead (uninstall): drops the dbsync schema, its log and progress.",
)
def migrate(
    config_file: str | None,
    site_dsn: str | None,
    agent_dsn: str | None,
    packs: tuple[str, ...],
    two_way: bool,
    rollback: bool,
) -> None:
    """Apply pending migrations to every database configured (Site, Agent, or both).

    With --rollback, remove them instead, newest first: capture triggers, the sync log and the
    Site functions, or the Agent's progress and parked events; on a --two-way install both
    chains of each database. Stop every daemon first.
    """
    settings = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn)
    targets = [(side, getattr(settings, f"{side}_dsn")) for side in migrations.SIDES]
    targets = [(side, dsn) for side, dsn in targets if dsn]
    if not targets:
        raise ConfigError("no database to migrate: pass --site-dsn and/or --agent-dsn (or set them in the config)")
    if two_way and not rollback and len(targets) < len(migrations.SIDES):
        raise ConfigError("--two-way installs write-back on both databases: pass --site-dsn and --agent-dsn")
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
        if two_way:
            done += migrations.apply_two_way(dsn, side)
        what = ", ".join(done) if done else "nothing pending"
        click.echo(f"{side} DB ({describe_dsn(dsn)}): {what}")
    if two_way and packs:
        assert settings.site_dsn and settings.agent_dsn
        wanted = write_back_tables(list(packs))
        for label in register_write_back(settings.site_dsn, settings.agent_dsn, list(packs)):
            owns = ", ".join(wanted[label].agent_owns)
            click.echo(
                f"agent DB: {label} registered for write-back (Agent -> Site"
                + (f"; the Agent owns {owns})" if owns else ")")
            )
