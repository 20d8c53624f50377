"""A cancelled statement (SQLSTATE 57014) is retried, never parked as a bad row.

The Agent DB cancels a statement for reasons that say nothing about the event being applied:
the Agent role's statement_timeout, or an operator's pg_cancel_backend. The runner retries such
an error (it reconnects); the apply path must agree, or the same error parks a good row.
"""

from __future__ import annotations

import asyncpg
import pytest

from dbsync.daemon import pg
from tests.helpers import Daemon, DbPair, dbname, replicate, rows_of, wait_until

ITEMS = "public.items"
ITEMS_DDL = "CREATE TABLE public.items (id integer PRIMARY KEY, qty integer)"

# The Agent table's trigger fires in replica mode too (ENABLE ALWAYS). The sequence is not rolled
# back by the failing statement, so only the first two writes are cancelled: the set-based write
# and, without the fix, the event-by-event retry that would park the row.
CANCEL_TWICE = """
CREATE SEQUENCE public.cancels;
CREATE FUNCTION public.cancel_twice() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('public.cancels') <= 2 THEN
        {cancel}
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER cancel_twice BEFORE INSERT ON public.items FOR EACH ROW EXECUTE FUNCTION public.cancel_twice();
ALTER TABLE public.items ENABLE ALWAYS TRIGGER cancel_twice;
"""
CAUSES = {
    # A real query_canceled from the Agent's statement_timeout (set on the Agent DB below).
    "statement_timeout": "PERFORM pg_sleep(5);",
    # A real pg_cancel_backend of the daemon's own Agent backend, in the middle of the write.
    "pg_cancel_backend": "PERFORM pg_cancel_backend(pg_backend_pid()); PERFORM pg_sleep(5);",
}


@pytest.mark.parametrize("cause", sorted(CAUSES))
def test_a_cancelled_apply_is_retried_not_parked(pair: DbPair, cause: str) -> None:
    replicate(pair, ITEMS_DDL, ITEMS)
    agent = pair.agent()
    agent.execute(CANCEL_TWICE.format(cancel=CAUSES[cause]))
    if cause == "statement_timeout":
        agent.execute(f'ALTER DATABASE "{dbname(pair.agent_dsn)}" SET statement_timeout = 300')
    pair.site().execute("INSERT INTO public.items VALUES (1, 10), (2, 20)")

    def settled() -> bool:
        parked = agent.execute("SELECT count(*) FROM dbsync.parked_events").fetchone()
        return parked != (0,) or len(rows_of(pair.agent_dsn, ITEMS)) == 2

    with Daemon(pair, "--poison-policy", "park"):
        wait_until(settled, timeout=30, what="the rows applied or parked")
        assert agent.execute("SELECT count(*) FROM dbsync.parked_events").fetchone() == (0,)
        assert rows_of(pair.agent_dsn, ITEMS) == ["(1,10)", "(2,20)"]
    # Both cancels happened: the test did cancel the apply, twice.
    assert agent.execute("SELECT last_value >= 3 FROM public.cancels").fetchone() == (True,)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), True),
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"), True),
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), True),
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (asyncpg.UniqueViolationError("duplicate key"), False),
        (asyncpg.CheckViolationError("violates check constraint"), False),
        (asyncpg.InsufficientPrivilegeError("permission denied"), False),
    ],
)
def test_one_classifier_of_transient_errors(exc: BaseException, transient: bool) -> None:
    assert pg.is_transient(exc) is transient
