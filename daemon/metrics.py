"""The daemon's Prometheus metrics, in the text exposition format, written by hand.

Counters and histograms are accumulated here from page reports; gauges are read from the
daemon's state at scrape time (a `Gauges` snapshot), so they can never go stale.
docs/operations.md lists every series; keep the two in step.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dbsync.daemon.runner import PageReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OP_NAMES = {"I": "insert", "U": "update", "D": "delete", "T": "truncate"}
# Events per Agent DB transaction (batch_size defaults to 10000), and seconds per page.
SIZE_BUCKETS = (1, 10, 100, 500, 1000, 2500, 5000, 10000, 20000)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.buckets = [0] * len(self.bounds)  # not cumulative; summed when rendered
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.buckets[i] += 1
                break


@dataclass(frozen=True)
class Gauges:
    """The daemon's state when scraped."""

    active: bool
    site_connected: bool
    agent_connected: bool
    lag_seconds: float | None  # None: not measured (standby, or the Site DB is unreachable)
    lag_events: int | None
    parked_events: int
    reconnects: int
    last_apply_at: float | None
    verify: VerifyGauges | None = None  # None: full verification is off
    # Consumers of the Site log not seen for consumer_timeout (Replicator.retention.stale);
    # None: not known (a standby, or not wired).
    stale_consumers: int | None = None


@dataclass(frozen=True)
class VerifyGauges:
    """The full verification's counters (dbsync.daemon.verify) when scraped."""

    mismatches_found: int
    open_mismatches: int
    repaired: int
    rows: int
    passes: int
    seconds_since_pass: float | None  # None: no pass has finished yet
    # The incremental verification's (dbsync.daemon.verify_keys); None while it is off.
    verified_seq: int | None = None  # None also before its first look at the mark
    keys_verified: int | None = None
    key_passes: int | None = None


class Metrics:
    """One direction's metrics. The forward one (Site -> Agent) is named dbsync_*; write-back's
    (Agent -> Site) are the same set named `prefix`* (dbsync_write_back_*), so the forward names,
    labels and the rules that use them stay as they are."""

    def __init__(self, prefix: str = "dbsync_") -> None:
        self.prefix = prefix
        self.applied: Counter[tuple[str, str]] = Counter()
        self.parked = 0
        self.batch_size = Histogram(SIZE_BUCKETS)
        self.batch_seconds = Histogram(SECONDS_BUCKETS)

    def record(self, report: PageReport) -> None:
        self.applied.update(report.applied)
        self.parked += report.parked
        self.batch_size.observe(sum(report.applied.values()) + report.parked)
        self.batch_seconds.observe(report.seconds)

    def render(self, g: Gauges) -> str:
        out = _Text(self.prefix)
        out.family("dbsync_events_applied_total", "counter", "Events applied to the Agent DB.")
        for (table, op), n in sorted(self.applied.items()):
            out.sample("dbsync_events_applied_total", n, table=table, op=OP_NAMES.get(op, op))
        out.single("dbsync_events_parked_total", "counter", "Events parked (policy park).", self.parked)
        out.histogram("dbsync_batch_size", "Events per Agent DB transaction.", self.batch_size)
        out.histogram("dbsync_batch_duration_seconds", "Time to read and apply one page.", self.batch_seconds)
        if g.lag_seconds is not None and g.lag_events is not None:
            out.single(
                "dbsync_lag_seconds", "gauge", "Age of the oldest committed event not yet applied.", g.lag_seconds
            )
            out.single("dbsync_lag_events", "gauge", "Committed events not yet applied.", g.lag_events)
        out.single("dbsync_parked_events", "gauge", "Events waiting in dbsync.parked_events.", g.parked_events)
        out.single("dbsync_reconnects_total", "counter", "Failures that closed the connections.", g.reconnects)
        if g.last_apply_at is not None:
            out.single("dbsync_last_apply_timestamp_seconds", "gauge", "When a page last committed.", g.last_apply_at)
        if g.verify is not None:
            _verify(out, g.verify)
        if g.stale_consumers is not None:
            out.single(
                "dbsync_stale_consumers",
                "gauge",
                "Consumers of the Site log not seen for consumer_timeout; they hold the log.",
                g.stale_consumers,
            )
        out.single("dbsync_active", "gauge", "1 while this daemon holds the source's lock.", int(g.active))
        out.family("dbsync_connected", "gauge", "1 while the daemon's connection to the database is open.")
        out.sample("dbsync_connected", int(g.site_connected), database="site")
        out.sample("dbsync_connected", int(g.agent_connected), database="agent")
        return out.text()


def _verify(out: _Text, v: VerifyGauges) -> None:
    series: list[tuple[str, str, str, float | None]] = [
        (
            "dbsync_verify_mismatches_total",
            "counter",
            "Rows the full or incremental verification found differing.",
            v.mismatches_found,
        ),
        ("dbsync_verify_open_mismatches", "gauge", "Rows found differing and not equal again yet.", v.open_mismatches),
        ("dbsync_verify_repaired_total", "counter", "Differing rows repaired (verify_repair).", v.repaired),
        ("dbsync_verify_rows_total", "counter", "Rows compared by the full verification.", v.rows),
        ("dbsync_verify_passes_total", "counter", "Full verification passes completed.", v.passes),
        ("dbsync_seconds_since_full_verify", "gauge", "Seconds since a full pass last finished.", v.seconds_since_pass),
        (
            "dbsync_verified_seq",
            "gauge",
            "Highest sync-log seq whose key the incremental verification compared.",
            v.verified_seq,
        ),
        ("dbsync_verify_keys_total", "counter", "Keys compared by the incremental verification.", v.keys_verified),
        ("dbsync_verify_key_passes_total", "counter", "Incremental verification passes completed.", v.key_passes),
    ]
    for name, kind, help_text, value in series:
        if value is not None:
            out.single(name, kind, help_text, value)


class _Text:
    def __init__(self, prefix: str = "dbsync_") -> None:
        self.lines: list[str] = []
        self.prefix = prefix

    def _name(self, name: str) -> str:
        return self.prefix + name.removeprefix("dbsync_")

    def family(self, name: str, kind: str, help_text: str) -> None:
        name = self._name(name)
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{self._name(name)}{_labels(labels)} {_number(value)}")

    def single(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value)

    def histogram(self, name: str, help_text: str, h: Histogram) -> None:
        self.family(name, "histogram", help_text)
        total = 0
        for bound, n in zip(h.bounds, h.buckets, strict=True):
            total += n
            self.sample(f"{name}_bucket", total, le=_number(bound))
        self.sample(f"{name}_bucket", h.count, le="+Inf")
        self.sample(f"{name}_sum", h.sum)
        self.sample(f"{name}_count", h.count)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
