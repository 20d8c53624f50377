"""`dbsync status --watch`: every source's status, redrawn in place until Ctrl-C.

The numbers are dbsync.status's, read again every refresh over connections kept open between
refreshes; the rate is the change of `events_applied` between two refreshes. The configured
source is measured against the Site DB at hand; the Agent DB's other sources (other Site DBs)
show what the Agent DB knows of them, without a lag. Only the first read may fail the command:
later failures are shown in the view, which keeps retrying.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import click
import psycopg

from dbsync.config import Settings, describe_dsn, redact_dsn
from dbsync.db import connect, first_line
from dbsync.errors import DbsyncError
from dbsync.status import Consumer, Status, read_consumers, read_status

# Cursor home, then clear the screen: on a terminal each frame replaces the one before.
CLEAR = "\x1b[H\x1b[2J"
COLUMNS = ("source", "behind", "lag", "rate", "active daemon", "parked", "health")


@dataclass(frozen=True)
class Row:
    """One source in the view."""

    source: str
    behind: str  # "-": not measured (another Site DB's source)
    lag: str
    events_applied: int
    active_daemon: str | None
    parked_events: int
    problems: Sequence[str]

    @classmethod
    def of(cls, item: Status | Consumer) -> Row:
        return cls(
            source=item.source,
            behind=f"{item.events_behind} events" if isinstance(item, Status) else "-",
            lag=f"{item.seconds_behind:.1f} s" if isinstance(item, Status) else "-",
            events_applied=item.events_applied,
            active_daemon=item.active_daemon,
            parked_events=item.parked_events,
            problems=item.problems,
        )


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic() of the read
    wall: datetime
    statuses: Sequence[Row]


def rates(before: Sample | None, now: Sample) -> dict[str, float | None]:
    """Events applied per second by each source since the previous sample (None: not known yet)."""
    applied = {s.source: s.events_applied for s in before.statuses} if before else {}
    elapsed = now.at - before.at if before else 0.0
    out: dict[str, float | None] = {}
    for st in now.statuses:
        was = applied.get(st.source)
        ok = was is not None and elapsed > 0 and st.events_applied >= was
        out[st.source] = (st.events_applied - was) / elapsed if ok and was is not None else None
    return out


def render(header: str, sample: Sample | None, rate: dict[str, float | None], error: str | None = None) -> str:
    """One frame: the header, the failure of the last refresh if any, a row per source and
    what is wrong with each unhealthy one."""
    lines = [header]
    if error is not None:
        lines.append(f"refresh failed: {error}")
        if sample is not None:
            lines.append(f"(below: the last good read, at {sample.wall:%H:%M:%S} UTC; retrying)")
    lines.append("")
    if sample is None:
        return "\n".join(lines) + "\n"
    rows = [COLUMNS]
    for st in sample.statuses:
        r = rate.get(st.source)
        rows.append(
            (
                st.source,
                st.behind,
                st.lag,
                "-" if r is None else f"{r:.1f} events/s",
                st.active_daemon or "none",
                str(st.parked_events),
                "UNHEALTHY" if st.problems else "ok",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if any(st.behind == "-" for st in sample.statuses):
        lines.append("(-: another Site DB's source; `dbsync status --source NAME` with its --site-dsn has its lag)")
    problems = [f"{st.source}: {'; '.join(st.problems)}" for st in sample.statuses if st.problems]
    if problems:
        lines += ["", *problems]
    return "\n".join(lines) + "\n"


class Watch:
    def __init__(self, settings: Settings, interval: float, source: str | None, tty: bool) -> None:
        assert settings.site_dsn and settings.agent_dsn
        self.settings = settings
        self.interval = interval
        self.source = source
        self.tty = tty
        self.site: psycopg.Connection | None = None
        self.agent: psycopg.Connection | None = None

    def read(self) -> Sample:
        assert self.settings.site_dsn and self.settings.agent_dsn
        if self.site is None:
            self.site = connect(self.settings.site_dsn, "Site")
        if self.agent is None:
            self.agent = connect(self.settings.agent_dsn, "Agent")
        here = read_status(self.site, self.agent, self.source or self.settings.source, self.settings.lag_threshold)
        items: list[Status | Consumer] = [here]
        if self.source is None:
            items += [c for c in read_consumers(self.agent) if c.source != here.source]
        return Sample(time.monotonic(), datetime.now(UTC), [Row.of(item) for item in items])

    def close(self) -> None:
        for conn in (self.site, self.agent):
            if conn is not None:
                conn.close()
        self.site = self.agent = None

    def header(self) -> str:
        assert self.settings.site_dsn and self.settings.agent_dsn
        return (
            f"dbsync status, every {self.interval:g} s; Ctrl-C to stop.  {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC\n"
            f"Site {describe_dsn(self.settings.site_dsn)} -> Agent {describe_dsn(self.settings.agent_dsn)}"
        )

    def show(self, frame: str) -> None:
        click.echo((CLEAR if self.tty else "") + frame, nl=not self.tty)

    def run(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Until Ctrl-C. The first read's failure is the command's (one line, non-zero exit)."""
        try:
            last = self.read()
            self.show(render(self.header(), last, rates(None, last)))
            next_at = last.at + self.interval
            while True:
                sleep(max(next_at - time.monotonic(), 0.0))
                next_at = max(next_at + self.interval, time.monotonic())
                try:
                    sample = self.read()
                except (DbsyncError, psycopg.Error) as exc:
                    self.close()  # reconnect at the next refresh
                    self.show(render(self.header(), last, {}, redact_dsn(first_line(exc))))
                    continue
                # After failed refreshes the rate spans them: still the true average.
                self.show(render(self.header(), sample, rates(last, sample)))
                last = sample
        except KeyboardInterrupt:
            if self.tty:
                click.echo()  # the prompt after the terminal's ^C goes on a line of its own
        finally:
            self.close()
