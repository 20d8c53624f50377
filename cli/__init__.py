"""The `dbsync` command."""
