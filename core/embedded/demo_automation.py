"""The Agent DB's automation in `dbsync demo`: it works a lead through its stages, and write-back
carries each change to the Site DB, where the web app shows it.

Each turn takes one open lead on the Agent DB, scores it by the customer's inbound messages
(replicated from the Site) and moves it one stage on: new -> contacted -> qualified -> won or
lost. It writes `stage` and `score` only, the columns the Agent owns (core/packs.py).

Conflict policies are not enforced yet, so the demo keeps the two sides off each other's rows
instead: the Site's web app writes a lead when it is created and never touches its stage or
score, and it edits a lead again only once the automation has closed it (won or lost) and that
has reached the Site; the automation never touches a closed lead. No row is then changed on both
sides before either change reached the other, and the two sides can be proven equal.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

from dbsync.db import connect, first_line
from dbsync.embedded.demo_traffic import Pacer
from dbsync.errors import DbsyncError

# A lead is won once its customer has written this many messages (score 10 each).
WON_SCORE = 30

ADVANCE = """
WITH pick AS (
    SELECT id FROM public.leads WHERE stage NOT IN ('won', 'lost')
    ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED),
scored AS (
    SELECT l.id, 10 * (SELECT count(*) FROM public.whatsapp_messages m
                       WHERE m.conversation_id = l.conversation_id AND m.direction = 'inbound') AS score
    FROM public.leads l JOIN pick USING (id))
UPDATE public.leads l
SET score = s.score,
    stage = CASE l.stage WHEN 'new' THEN 'contacted' WHEN 'contacted' THEN 'qualified'
            ELSE CASE WHEN s.score >= %(won)s THEN 'won' ELSE 'lost' END END
FROM scored s WHERE l.id = s.id
RETURNING l.stage
"""
# Leads the automation has moved (every lead starts, and stays on the Site, in 'new' otherwise).
MOVED = "SELECT count(*) FROM public.leads WHERE stage <> 'new'"


class AutomationError(DbsyncError):
    """The simulated automation could not write to the Agent DB."""


@dataclass
class Automation:
    """What the automation did: its transactions and the stages it moved leads to."""

    transactions: int = 0
    stages: Counter[str] = field(default_factory=Counter)

    @property
    def stage_changes(self) -> int:
        return sum(self.stages.values())


async def automate(dsn: str, done: Automation, *, rate: float, duration: float, seed: int) -> None:
    """Move lead stages on the Agent DB at `rate` transactions/s for `duration` seconds."""
    rng = random.Random(seed)
    try:
        conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name="crm-automation"
        )
        try:
            await conn.execute("SELECT setseed(%s)", (rng.random() * 2 - 1,))
            start = asyncio.get_running_loop().time()
            pacer = Pacer(rate, start, start + duration)
            while await pacer.turn():
                cur = await conn.execute(ADVANCE, {"won": WON_SCORE})
                row = await cur.fetchone()
                if row is not None:  # no open lead on the Agent DB yet: nothing was written
                    done.transactions += 1
                    done.stages[row[0]] += 1
        finally:
            await conn.close()
    except psycopg.Error as exc:
        raise AutomationError(f"the simulated automation failed to write to the Agent DB: {first_line(exc)}") from exc


def moved_leads(dsn: str, role: str) -> int:
    """How many leads a database holds in a stage only the automation sets."""
    with connect(dsn, role) as conn:
        row = conn.execute(MOVED).fetchone()
    return int(row[0]) if row else 0
