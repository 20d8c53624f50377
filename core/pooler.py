"""Transaction-mode poolers are refused when a session starts.

dbsync needs a server session of its own: the daemon LISTENs, holds a session advisory lock,
prepares statements and SETs session settings; the CLI sets its search_path. A pooler in
session mode (PgBouncer `pool_mode = session`, Supabase's pooler on port 5432) gives each client
one server connection for as long as it stays connected, and that works. In transaction (or
statement) mode it hands each transaction to whichever server connection is free: the lock and
the LISTEN stay behind on a server another client gets next, prepared statements collide
(DuplicatePreparedStatementError), SETs leak to other clients. Nothing in the protocol says
which mode a pooler runs in, so the session looks:

1. session A asks for its backend's pid;
2. a second, short connection B to the same DSN asks for its own;
3. A asks again.

A server connection is never shared while its client stays connected, unless the pooler shares
it: B got A's backend (PgBouncer reuses the server connection freed last), or A's backend changed
between two transactions, means a transaction-mode pooler. Directly and in session mode neither
can happen, so a session is never refused wrongly. The probe is one qualified call into
pg_catalog (no operator, nothing a search_path can redirect), so it runs before anything else,
before the session's own SETs, which would otherwise stay on a pooled server for other clients.
"""

from __future__ import annotations

from dbsync.config import describe_dsn
from dbsync.errors import PoolerError

# The probe; each driver runs it without a prepared statement (see dbsync.db, dbsync.daemon.pg).
BACKEND_PID = "SELECT pg_catalog.pg_backend_pid()"


def check_own_session(role: str, dsn: str, first: int, other: int, again: int) -> None:
    """Refuse the session when its backend is shared: `first` and `again` are the pids session
    A saw before and after connection B saw `other`."""
    if other != first and again == first:
        return
    raise PoolerError(
        f"the {role} DB ({describe_dsn(dsn)}) is reached through a transaction-mode pooler (its server "
        "sessions are shared between clients), which dbsync cannot work through: connect directly or "
        "through a session-mode pooler (Supabase: the direct connection, or the session-mode pooler on "
        "port 5432 instead of 6543; PgBouncer: pool_mode = session)"
    )
