"""dbsync: trigger-based replication from a Site PostgreSQL to an Agent PostgreSQL."""
