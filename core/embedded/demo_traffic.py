"""WhatsApp CRM traffic for `dbsync demo`, written to the Site DB the way the web app writes it.

Four kinds of write transaction, each what one user-visible action costs the app:

* outbound: an agent sends a message. The app calls the WhatsApp Business API first (simulated
  by a 1-3 ms await, outside any transaction), then stores the message as 'sent', bumps the
  conversation and adds a notification for the UI;
* inbound: a webhook delivers a customer's message. The conversation is found or opened, the
  message stored, the lead created or its score bumped, the assigned agent notified;
* status: a webhook moves an outbound message sent -> delivered -> read, or to failed (~5%);
* crm: now and then an agent reads or closes a conversation, or files the email of a lead the
  Agent DB's automation has closed (demo_automation: the stage and score of a lead are the
  Agent's, and reach the Site by write-back).

Writers share one pacer, so the total rate is what was asked for however many writers there are.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from dbsync.db import first_line
from dbsync.errors import DbsyncError

AGENTS = ("anna", "ben", "chiara", "deniz", "emre", "fatima")
NAMES = (
    "Lena Müller",
    "Jonas Schmidt",
    "Aylin Yılmaz",
    "Marco Rossi",
    "Sofia Weber",
    "Lukas Fischer",
    "Mia Wagner",
    "Noah Becker",
    "Elif Kaya",
    "Paul Hoffmann",
    None,
)
INBOUND_TEXTS = (
    "Hallo, ist das Angebot noch gültig?",
    "Wann können Sie liefern?",
    "Danke!",
    "Können wir morgen telefonieren?",
    "Was kostet die Premium-Variante?",
    "👍",
    "Ich habe die Rechnung nicht bekommen",
    "Is there an English brochure?",
    "Ok, passt.",
)
OUTBOUND_TEXTS = (
    "Gerne! Ich schicke Ihnen das Angebot gleich.",
    "Lieferung ist am Donnerstag möglich.",
    "Passt 10 Uhr für einen Anruf?",
    "Die Premium-Variante kostet 49 € im Monat.",
    "Danke für Ihre Nachricht, wir melden uns.",
    "Here is the brochure: https://example.com/b.pdf",
)
# WhatsApp Cloud API error codes a real integration sees.
FAILURES = (
    "131026: Message undeliverable",
    "131047: Re-engagement message: more than 24 hours since the customer last replied",
    "131051: Unsupported message type",
    "130429: Rate limit hit",
)
KIND_WEIGHTS = {"outbound": 30, "inbound": 25, "status": 40, "crm": 5}

UPSERT_CONVERSATION = """
WITH found AS (
    SELECT id FROM public.conversations
    WHERE phone_number = %(phone)s AND status <> 'closed' ORDER BY id DESC LIMIT 1),
bumped AS (
    UPDATE public.conversations c
    SET unread_count = c.unread_count + 1, status = 'open', last_message_at = now(), updated_at = now()
    FROM found WHERE c.id = found.id
    RETURNING c.id, c.assigned_agent),
opened AS (
    INSERT INTO public.conversations (phone_number, contact_name, assigned_agent, unread_count, last_message_at)
    SELECT %(phone)s, %(name)s, %(agent)s, 1, now() WHERE NOT EXISTS (SELECT 1 FROM found)
    RETURNING id, assigned_agent)
SELECT id, assigned_agent FROM bumped UNION ALL SELECT id, assigned_agent FROM opened
"""
INSERT_INBOUND = """
INSERT INTO public.whatsapp_messages
    (message_id, conversation_id, phone_number, direction, content, media_url, status, delivered_at)
VALUES (%s, %s, %s, 'inbound', %s, %s, 'delivered', now())
"""
# A new number becomes a lead; a known one's lead is the automation's to score (demo_automation).
NEW_LEAD = """
INSERT INTO public.leads (phone_number, name, conversation_id, attributes)
VALUES (%s, %s, %s, %s)
ON CONFLICT (phone_number) DO NOTHING
"""
INSERT_OUTBOUND = """
INSERT INTO public.whatsapp_messages (message_id, conversation_id, phone_number, direction, content)
VALUES (%s, %s, %s, 'outbound', %s)
"""
TOUCH_CONVERSATION = "UPDATE public.conversations SET last_message_at = now(), updated_at = now() WHERE id = %s"
NOTIFY = "INSERT INTO public.notifications (user_id, kind, payload) VALUES (%s, %s, %s)"
DELIVERED = """
UPDATE public.whatsapp_messages SET status = 'delivered', delivered_at = now(), updated_at = now()
WHERE message_id = %s AND status = 'sent'
"""
READ = """
UPDATE public.whatsapp_messages SET status = 'read', read_at = now(), updated_at = now()
WHERE message_id = %s AND status = 'delivered'
"""
FAILED = """
UPDATE public.whatsapp_messages SET status = 'failed', error_message = %s, updated_at = now()
WHERE message_id = %s AND status = 'sent'
"""
# Only a lead the automation has closed, and whose close has reached the Site: the automation
# never writes it again, so the two sides never change one lead at once (demo_automation).
FILE_EMAIL = """
UPDATE public.leads
SET email = %(email)s, attributes = attributes || jsonb_build_object('filed_by', %(agent)s::text), updated_at = now()
WHERE id = (SELECT id FROM public.leads WHERE stage IN ('won', 'lost') AND email IS NULL
            ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, stage
"""
READ_CONVERSATION = """
UPDATE public.conversations SET unread_count = 0, status = %s, updated_at = now() WHERE id = %s
"""


class TrafficError(DbsyncError):
    """The simulated web app could not write to the Site DB."""


def phone_number(rng: random.Random) -> str:
    """A German mobile number in E.164, e.g. +4915112345678."""
    return f"+49{rng.choice(('151', '152', '157', '159'))}{rng.randrange(10**7, 10**8)}"


def wamid(rng: random.Random) -> str:
    return f"wamid.HBgN{rng.getrandbits(120):030X}"


@dataclass
class Crm:
    """What the app knows, shared by the writers (one event loop, so no locks)."""

    phones: list[str] = field(default_factory=list)
    open_conversations: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (phone, agent)
    sent: deque[str] = field(default_factory=deque)
    delivered: deque[str] = field(default_factory=deque)
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def transactions(self) -> int:
        return sum(v for k, v in self.counts.items() if k in KIND_WEIGHTS)


class Pacer:
    """Hands out send times at `rate` per second until `end`; does not make up more than 1 s."""

    def __init__(self, rate: float, start: float, end: float) -> None:
        self.interval = 1.0 / rate
        self.next = start
        self.end = end

    async def turn(self) -> bool:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.next = max(self.next, now - 1.0)
        due = self.next
        if due >= self.end:
            return False
        self.next += self.interval
        if due > now:
            await asyncio.sleep(due - now)
        return True


class Writer:
    """One app server connection, taking turns from the shared pacer."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], crm: Crm, rng: random.Random) -> None:
        self.conn = conn
        self.crm = crm
        self.rng = rng

    async def run(self, pacer: Pacer) -> None:
        actions = {"outbound": self.outbound, "inbound": self.inbound, "status": self.status, "crm": self.agent_action}
        kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
        while await pacer.turn():
            kind = self.rng.choices(kinds, weights)[0]
            if kind == "status" and not (self.crm.sent or self.crm.delivered):
                kind = "outbound"
            if kind in ("outbound", "crm") and not self.crm.open_conversations:
                kind = "inbound"
            await actions[kind]()
            self.crm.counts[kind] += 1

    async def outbound(self) -> None:
        conv_id = self.rng.choice(list(self.crm.open_conversations))
        phone, agent = self.crm.open_conversations[conv_id]
        text = self.rng.choice(OUTBOUND_TEXTS)
        await asyncio.sleep(self.rng.uniform(0.001, 0.003))  # POST /messages to the WhatsApp API
        message_id = wamid(self.rng)
        async with self.conn.transaction():
            await self.conn.execute(INSERT_OUTBOUND, (message_id, conv_id, phone, text))
            await self.conn.execute(TOUCH_CONVERSATION, (conv_id,))
            await self.conn.execute(
                NOTIFY, (agent, "message_sent", Jsonb({"conversation_id": conv_id, "message_id": message_id}))
            )
        self.crm.sent.append(message_id)

    async def inbound(self) -> None:
        rng, crm = self.rng, self.crm
        new = len(crm.phones) < 20 or rng.random() < 0.15
        phone = phone_number(rng) if new else rng.choice(crm.phones)
        name = rng.choice(NAMES)
        media = f"https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid={rng.getrandbits(64)}"
        text, media_url = (rng.choice(INBOUND_TEXTS), None) if rng.random() < 0.9 else (None, media)
        message_id = wamid(rng)
        attributes = Jsonb({"source": "whatsapp", "language": rng.choice(("de", "de", "en", "tr"))})
        async with self.conn.transaction():
            # Two webhooks for one new number must not open two conversations.
            await self.conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (phone,))
            cur = await self.conn.execute(
                UPSERT_CONVERSATION, {"phone": phone, "name": name, "agent": rng.choice(AGENTS)}
            )
            conv_id, agent = await _one(cur)
            await self.conn.execute(INSERT_INBOUND, (message_id, conv_id, phone, text, media_url))
            await self.conn.execute(NEW_LEAD, (phone, name, conv_id, attributes))
            await self.conn.execute(
                NOTIFY,
                (
                    agent,
                    "message_received",
                    Jsonb({"conversation_id": conv_id, "message_id": message_id, "preview": (text or "📎")[:40]}),
                ),
            )
        if new:
            crm.phones.append(phone)
        crm.open_conversations[conv_id] = (phone, agent)

    async def status(self) -> None:
        crm = self.crm
        # Delivery receipts come first, read receipts later: serve the older queue more often.
        if crm.sent and (not crm.delivered or self.rng.random() < 0.6):
            message_id = crm.sent.popleft()
            if self.rng.random() < 0.05:
                await self.conn.execute(FAILED, (self.rng.choice(FAILURES), message_id))
                crm.counts["failed"] += 1
            else:
                await self.conn.execute(DELIVERED, (message_id,))
                crm.delivered.append(message_id)
        else:
            await self.conn.execute(READ, (crm.delivered.popleft(),))

    async def agent_action(self) -> None:
        rng, crm = self.rng, self.crm
        agent = rng.choice(AGENTS)
        if rng.random() < 0.6:
            async with self.conn.transaction():
                email = f"kunde{rng.randrange(10**6)}@example.com"
                cur = await self.conn.execute(FILE_EMAIL, {"email": email, "agent": agent})
                row = await cur.fetchone()
                if row is not None:
                    await self.conn.execute(NOTIFY, (agent, "lead_closed", Jsonb({"lead_id": row[0], "stage": row[1]})))
            if row is not None:
                crm.counts["lead_edits"] += 1
                return
        conv_id = rng.choice(list(crm.open_conversations))
        close = rng.random() < 0.3
        await self.conn.execute(READ_CONVERSATION, ("closed" if close else "open", conv_id))
        if close:
            crm.open_conversations.pop(conv_id, None)


async def _one(cur: psycopg.AsyncCursor[Any]) -> Any:
    row = await cur.fetchone()
    assert row is not None
    return row


async def drive(dsn: str, crm: Crm, *, rate: float, duration: float, writers: int, seed: int) -> None:
    """Write at `rate` transactions/s for `duration` seconds over `writers` connections."""
    conns: list[psycopg.AsyncConnection[Any]] = []
    try:
        for _ in range(writers):
            conns.append(await psycopg.AsyncConnection.connect(dsn, autocommit=True, application_name="crm-web"))
        start = asyncio.get_running_loop().time()
        pacer = Pacer(rate, start, start + duration)
        await run_all(Writer(conn, crm, random.Random(seed * 1000 + i)).run(pacer) for i, conn in enumerate(conns))
    except psycopg.Error as exc:
        raise TrafficError(f"the simulated web app failed to write to the Site DB: {first_line(exc)}") from exc
    finally:
        for conn in conns:
            await conn.close()


async def run_all(aws: Iterable[Awaitable[None]]) -> None:
    """Await all of them; the first to fail cancels the others.

    Unlike gather, wait leaves them alone when it is cancelled: each is cancelled once, below
    (psycopg then cancels its query on the server)."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()
