"""The replication daemon."""
