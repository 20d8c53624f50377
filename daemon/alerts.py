"""Incidents: logged once when they start and once when they clear, and POSTed to a webhook.

An incident is a kind of trouble ("lag", "stalled") that is either open or not; the service
re-evaluates every kind about once a second and only a change of state makes a message. Messages
go out in order, one at a time; each is retried with capped exponential backoff and dropped
(with a log line) after ATTEMPTS failures, or at once on a 4xx answer other than 408 and 429.
The URL may carry a token, so logs only ever name its scheme and host.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from dbsync.daemon.backoff import Backoff
from dbsync.errors import ConfigError

log = logging.getLogger("dbsync.alerts")

ATTEMPTS = 10
RETRY_INITIAL = 0.5
RETRY_MAX = 30.0
POST_TIMEOUT = 10.0


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("alert_webhook must be an http:// or https:// URL")
    return url


def describe_url(url: str) -> str:
    """scheme://host[:port]: the path and query of a webhook URL are often its secret."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


@dataclass
class Incident:
    kind: str
    id: str
    started_at: datetime
    summary: str


class Alerter:
    def __init__(
        self,
        url: str | None,
        *,
        source: str,
        daemon: str,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.url = url
        self.source = source
        self.daemon = daemon
        self.sleep = sleep
        self.open: dict[str, Incident] = {}
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def update(self, kind: str, firing: bool, summary: str, details: Mapping[str, Any]) -> None:
        """The current truth about `kind`; a message goes out only when it changes."""
        incident = self.open.get(kind)
        now = datetime.now(UTC)
        if firing and incident is None:
            incident = self.open[kind] = Incident(kind, uuid.uuid4().hex, now, summary)
            log.warning("alert %s: %s", kind, summary)
            self._send("firing", incident, summary, details, now)
        elif not firing and incident is not None:
            del self.open[kind]
            log.info("alert %s resolved: %s", kind, summary)
            self._send("resolved", incident, summary, details, now)

    def _send(self, status: str, incident: Incident, summary: str, details: Mapping[str, Any], now: datetime) -> None:
        if self.url is None:
            return
        headline = f"dbsync {self.source}: {incident.kind} {status.upper()}: {summary}"
        self.queue.put_nowait(
            {
                "text": headline,  # what chat webhooks (Slack, Mattermost) display
                "status": status,
                "alert": incident.kind,
                "summary": summary,
                "source": self.source,
                "daemon": self.daemon,
                "incident": incident.id,
                "started_at": incident.started_at.isoformat(),
                "resolved_at": now.isoformat() if status == "resolved" else None,
                **details,
            }
        )

    async def run(self) -> None:
        """Deliver queued messages until cancelled, each to the URL of the moment (see reload)."""
        if self.url is None:
            return
        async with httpx.AsyncClient(timeout=POST_TIMEOUT, headers={"User-Agent": "dbsync"}) as client:
            while True:
                message = await self.queue.get()
                if self.url is not None:  # a reload may have turned the webhook off
                    await self._deliver(client, self.url, message)

    async def _deliver(self, client: httpx.AsyncClient, url: str, message: dict[str, Any]) -> None:
        backoff = Backoff(RETRY_INITIAL, RETRY_MAX)
        where = describe_url(url)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                answer = await client.post(url, json=message)
                if answer.is_success:
                    return
                reason = f"HTTP {answer.status_code}"
                if answer.is_client_error and answer.status_code not in (408, 429):
                    log.error("alert webhook %s refused the %s alert: %s; dropped", where, message["alert"], reason)
                    return
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                reason = reason.replace(url, where)
            if attempt == 1:
                log.warning("alert webhook %s failed (%s); retrying", where, reason)
            if attempt < ATTEMPTS:
                await self.sleep(backoff.next_delay())
        log.error(
            "alert webhook %s failed %d times (%s); the %s alert is dropped", where, ATTEMPTS, reason, message["alert"]
        )
