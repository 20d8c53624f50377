"""`auto_add_columns`: a column the Site DB gained is added to the Agent table by the daemon.

The apply path raises DriftError when a Site row carries a column the Agent table lacks; with the
setting on, the runner hands it here instead of waiting for a person to run `dbsync schema diff
--apply`. Only what `dbsync.schema.auto_addable` allows is added (the rows the Agent already
holds must end up equal to the Site's), through the same statements `schema diff --apply` runs,
in one transaction; anything else stops replication with its reason, as without the setting.
"""

from __future__ import annotations

import psycopg

from dbsync.config import Settings
from dbsync.db import connect, display_name, first_line
from dbsync.errors import DriftError, SchemaError
from dbsync.schema import apply, auto_addable, table_def

# ADD COLUMN takes an ACCESS EXCLUSIVE lock: rather than queue behind a long Agent reader (and
# hold every other session up behind it), give up and try again on the next attempt.
LOCK_TIMEOUT = "5s"


def add_missing_columns(settings: Settings, drift: DriftError) -> list[str]:
    """Add the drift's columns to the Agent table; returns the names added. Raises SchemaError
    with the reason when one of them may not be added by the daemon."""
    assert settings.site_dsn and settings.agent_dsn
    label = display_name(drift.schema, drift.table)
    with connect(settings.site_dsn, "Site") as site, connect(settings.agent_dsn, "Agent") as agent:
        site_def = table_def(site, drift.schema, drift.table)
        agent_def = table_def(agent, drift.schema, drift.table)
        if site_def is None or agent_def is None:
            return []  # dropped meanwhile: the apply path says so in its own words
        chosen, refused = auto_addable(site_def, agent_def, drift.columns)
        if refused:
            raise SchemaError("; ".join(refused) + f"; see `dbsync schema diff` for {label}")
        try:
            agent.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
            applied = apply(agent, chosen)
        except psycopg.Error as exc:  # the SET itself, through a broken link
            raise SchemaError(f"auto_add_columns could not alter {label} on the Agent DB: {first_line(exc)}") from None
        except SchemaError as exc:  # the ALTER failed (no right to alter the table, a lock timeout...)
            raise SchemaError(f"auto_add_columns: {exc}") from None
    return [c.column for c in applied if c.column]
