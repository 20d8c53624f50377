"""One root exception, a child per subsystem; the CLI turns them into one line and an exit code."""

from __future__ import annotations


class DbsyncError(Exception):
    """Anything dbsync expects can go wrong. The message is one line, safe to print."""

    exit_code = 2


class ConfigError(DbsyncError):
    """The settings are incomplete or malformed."""


class ConnectError(DbsyncError):
    """A database could not be reached or refused the login."""


class SchemaError(DbsyncError):
    """A table cannot be replicated as it stands (no primary key, missing on the Agent DB...)."""


class DriftError(SchemaError):
    """A replicated row carries a column the Agent DB does not have."""

    def __init__(self, message: str, schema: str = "", table: str = "", columns: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.schema, self.table, self.columns = schema, table, columns


class ApplyError(DbsyncError):
    """The Agent DB rejected a batch."""


class ProgressError(ApplyError):
    """The Site DB's transaction ids are behind the progress the Agent DB stores: new changes
    would look applied (a restore from a dump, a failover that lost transactions)."""


class MigrationError(DbsyncError):
    """A migration could not be applied."""


class PoolerError(ConfigError):
    """The DSN leads to a pooler that shares server sessions between clients (transaction mode)."""
