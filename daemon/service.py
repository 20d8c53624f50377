"""`dbsync run` as a service: the Replicator plus what systemd and monitoring see of it.

Around the replication loop run the systemd notifications (READY, STATUS, RELOADING, STOPPING;
WATCHDOG comes from the loop's own ticks), a lag probe about once a second, incident alerts,
configuration reloads (dbsync.daemon.reload) and the optional HTTP listener. They only read the
Replicator's state (a reload swaps its settings), so none of them can hold replication up; a
bug in one of them stops the daemon (non-zero exit, systemd restarts it) rather than leaving it
running blind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any

import asyncpg

from dbsync.config import Settings
from dbsync.daemon import pg
from dbsync.daemon.alerts import Alerter
from dbsync.daemon.backoff import Backoff
from dbsync.daemon.http import Response, serve
from dbsync.daemon.lag import Lag, LagProbe
from dbsync.daemon.metrics import CONTENT_TYPE, Gauges, Metrics, VerifyGauges
from dbsync.daemon.reload import Reloader
from dbsync.daemon.runner import APPLYING, STANDBY, Replicator, holder_name
from dbsync.daemon.sdnotify import Notifier
from dbsync.daemon.verify import Mismatch, Verifier
from dbsync.errors import DbsyncError
from dbsync.protocol import AGENT_SCHEMA_MARK, SCHEMA_EXISTS, SITE_SCHEMA_MARK

log = logging.getLogger("dbsync.daemon")

# Seconds between lag measurements; a slow measurement (a huge backlog) spaces them out.
LAG_INTERVAL = 1.0


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        stop: asyncio.Event,
        notifier: Notifier | None = None,
        reload: asyncio.Event | None = None,
        reloader: Reloader | None = None,
    ) -> None:
        settings.require("site_dsn", "agent_dsn")
        assert settings.site_dsn and settings.agent_dsn
        self.settings = settings
        self.stop = stop
        # Set (by SIGHUP) to read the settings again; `reloader` builds them.
        self.reload = reload or asyncio.Event()
        self.reloader = reloader
        self.replicator = r = Replicator(settings, stop=stop)
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.write_back_metrics = Metrics("dbsync_write_back_")
        self.probe = LagProbe(settings.site_dsn)
        # The write-back direction's lag, against the Agent DB's log, once that direction runs.
        self.back_probe = LagProbe(settings.agent_dsn, "Agent")
        self.back_lag: Lag | None = None
        self.alerter = Alerter(settings.alert_webhook, source=settings.source, daemon=holder_name())
        self.lag: Lag | None = None
        # The full and incremental verifications, in their own thread, while this daemon applies.
        self.verifier = (
            Verifier(settings, lambda: r.active and r.state == APPLYING)
            if settings.full_verify_interval is not None or settings.verify_interval is not None
            else None
        )
        # The Agent -> Site direction, once `run` has found write-back installed on both sides.
        self.write_back: Replicator | None = None
        self._sender: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()
        # Set once the Site -> Agent direction has connected (applying or standby).
        self._forward_up = asyncio.Event()
        self._crashed: BaseException | None = None
        r.on_report = self.metrics.record
        if self.verifier is not None and self.verifier.keys is not None:
            r.on_batch_page = self.verifier.keys.handed.page  # the applied keys, in memory
        r.on_state = self._on_state
        if self.notifier.watchdog_interval is not None:
            r.on_tick = self.notifier.watchdog
            r.tick_interval = self.notifier.watchdog_interval / 4

    async def run(self, *, once: bool = False) -> None:
        if once:
            await self.replicator.run(once=True)
            if await write_back_installed(self.settings):
                await Replicator(self.settings.write_back(), stop=self.stop).run(once=True)
            return
        server = None
        if self.settings.http:
            routes = {"/metrics": self.metrics_page, "/healthz": self.liveness, "/readyz": self.readiness}
            server = await serve(self.settings.http, routes)
        helpers = [
            self._helper(self._monitor(), "lag monitor"),
            self._helper(self._reloads(), "config reload"),
            self._helper(self._write_back(), "write-back"),
        ]
        self._sender = self._helper(self.alerter.run(), "alert sender")
        if self.verifier is not None:
            loop = asyncio.get_running_loop()
            # Every change is judged, in order: an incident repaired within a second still alerts.
            self.verifier.on_change = lambda found: loop.call_soon_threadsafe(self._evaluate_verify, found)
            self.verifier.on_crash = lambda exc: loop.call_soon_threadsafe(
                self._helper_failed, "full verification", exc
            )
            self.verifier.start()
        try:
            await self.replicator.run()
        finally:
            self.notifier.stopping()
            if self.verifier is not None:
                await asyncio.to_thread(self.verifier.close)
            helpers.append(self._sender)
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if server is not None:
                server.close()
                await server.wait_closed()
            await self.probe.close()
            await self.back_probe.close()
            self.notifier.close()
            if self.alerter.queue.qsize():
                log.warning("%d alert message(s) were not delivered before the stop", self.alerter.queue.qsize())
        if self._crashed is not None:
            raise DbsyncError(f"internal error: {self._crashed}") from self._crashed

    def _helper(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                self._helper_failed(name, task.exception())

        task = asyncio.ensure_future(coro)
        task.add_done_callback(done)
        return task

    def _helper_failed(self, name: str, exc: BaseException | None) -> None:
        log.error("the %s failed; stopping", name, exc_info=exc)
        self._crashed = exc
        self.stop.set()

    # -- write-back ------------------------------------------------------------------------------
    async def _write_back(self) -> None:
        """Replicate Agent -> Site too when `dbsync migrate --two-way` installed it: the Agent DB
        captures and the Site DB applies (found once, at start; retried while a database does not
        answer). Its source has its own progress and lock on the Site DB, so standbys work the same."""
        # Not before the Site -> Agent direction is up: a DSN it refuses (a transaction-mode
        # pooler) stops the daemon, and connections of this one through the same pooler at the
        # same moment could hand the first direction's pooler probe a server session of its own
        # twice (dbsync.pooler), so that it would not see the pooler at all.
        await self._forward_up.wait()
        backoff = Backoff(self.settings.retry_initial, self.settings.retry_max)
        while not self.stop.is_set():
            try:
                found = await write_back_installed(self.settings)
                break
            except (DbsyncError, asyncpg.PostgresError, *pg.CONNECTION_ERRORS):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=backoff.next_delay())
        else:
            return
        if not found:
            return
        log.info(
            "write-back is installed: also replicating Agent -> Site as source %r", self.settings.write_back_source
        )
        self.write_back = Replicator(self.settings.write_back(), stop=self.stop)
        self.write_back.on_report = self.write_back_metrics.record
        await self.write_back.run()

    # -- reloads ---------------------------------------------------------------------------------
    async def _reloads(self) -> None:
        while True:
            await self.reload.wait()
            self.reload.clear()
            self.notifier.reloading()
            try:
                plan = self.reloader(self.settings) if self.reloader is not None else None
                if plan is not None:
                    self.use_settings(plan.settings)
            finally:
                self.notifier.reloaded(self.status_line())

    def use_settings(self, settings: Settings) -> None:
        """Swap in reloaded settings (only dbsync.daemon.reload.LIVE may differ)."""
        self.settings = settings
        self.replicator.use_settings(settings)
        if self.write_back is not None:
            self.write_back.use_settings(settings.write_back())
        if self.verifier is not None:
            self.verifier.settings = settings  # read at each range
        logging.getLogger().setLevel(settings.log_level.upper())
        self.alerter.url = settings.alert_webhook
        if settings.alert_webhook and self._sender is not None and self._sender.done():
            # It returned at start for want of a URL.
            self._sender = self._helper(self.alerter.run(), "alert sender")
        self._poke.set()  # the lag threshold is judged now

    # -- the periodic look at the daemon --------------------------------------------------------
    async def _monitor(self) -> None:
        r = self.replicator
        while not self.stop.is_set():
            started = time.monotonic()
            self._poke.clear()
            measure_lag = r.progress_known and r.state != STANDBY
            lag = await self.probe.measure(r.progress if measure_lag else None)
            self.lag = lag if measure_lag else None
            back = self.write_back
            if back is not None:
                measure_back = back.progress_known and back.state != STANDBY
                back_lag = await self.back_probe.measure(back.progress if measure_back else None)
                self.back_lag = back_lag if measure_back else None
            self._evaluate()
            took = time.monotonic() - started
            waiters = {asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(self._poke.wait())}
            try:
                await asyncio.wait(
                    waiters, timeout=max(LAG_INTERVAL - took, 4 * took), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def _on_state(self, state: str) -> None:
        if state in (APPLYING, STANDBY):
            self._forward_up.set()
            self.notifier.ready(self.status_line())
        else:
            self.notifier.status(self.status_line())
        self._poke.set()  # measure now rather than within the second

    def _evaluate(self) -> None:
        self.notifier.status(self.status_line())
        r, lag, threshold = self.replicator, self.lag, self.settings.lag_threshold
        details: dict[str, Any] = {
            "lag_seconds": round(lag.seconds, 3) if lag else None,
            "events_behind": lag.events if lag else None,
            "lag_threshold": threshold,
            "state": r.state,
            "active": r.active,
            "last_error": r.problem,
        }
        self._lag_alert("lag", r, lag, details)
        if self.write_back is not None:  # its own incident: an operator sees which direction lags
            back, back_lag = self.write_back, self.back_lag
            self._lag_alert(
                "write-back lag",
                back,
                back_lag,
                details
                | {
                    "direction": "agent -> site",
                    "lag_seconds": round(back_lag.seconds, 3) if back_lag else None,
                    "events_behind": back_lag.events if back_lag else None,
                    "state": back.state,
                    "active": back.active,
                    "last_error": back.problem,
                },
            )
        stall = self._stall()
        self.alerter.update("stalled", stall is not None, stall or "replicating again", details)
        if r.active:
            stale = r.retention.stale
            summary = (
                f"{len(stale)} consumer(s) of the Site log not seen for over {self.settings.consumer_timeout:g} s "
                f"hold it for every consumer: {', '.join(stale)} (`dbsync consumers drop NAME` if gone)"
                if stale
                else "every consumer of the Site log has been seen again (or was dropped)"
            )
            self.alerter.update("consumer", bool(stale), summary, {"stale_consumers": list(stale)})

    def _lag_alert(self, kind: str, r: Replicator, lag: Lag | None, details: dict[str, Any]) -> None:
        threshold = self.settings.lag_threshold
        if lag is not None:
            over = lag.seconds > threshold
            verb = "is over" if over else "is back under"
            what = "write-back lag (Agent -> Site)" if kind != "lag" else "lag"
            summary = f"{what} {lag.seconds:.1f} s {verb} the threshold of {threshold:g} s ({lag.events} events behind)"
            self.alerter.update(kind, over, summary, details)
        elif r.state == STANDBY:
            self.alerter.update(kind, False, f"this daemon is a standby now; the active one reports {kind}", details)

    def _evaluate_verify(self, open_now: Mapping[tuple[int, str], Mismatch]) -> None:
        """One incident while any row is known to differ; it clears when rechecks find them equal."""
        by_table: dict[str, int] = {}
        for mismatch in open_now.values():
            by_table[mismatch.table] = by_table.get(mismatch.table, 0) + 1
        tables = ", ".join(f"{t} ({n})" for t, n in sorted(by_table.items()))
        summary = (
            f"{len(open_now)} row(s) differ between the Site and Agent DBs: {tables} "
            "(keys in the log and `dbsync status`)"
            if open_now
            else "every row found differing is equal again"
        )
        details = {"verify_mismatches": len(open_now), "tables": by_table, "verify_repair": self.settings.verify_repair}
        self.alerter.update("verify", bool(open_now), summary, details)

    def _stall(self) -> str | None:
        """Why replication is not moving, if it has not moved for longer than the lag threshold."""
        r, lag, now = self.replicator, self.lag, time.monotonic()
        if r.failing_since is not None:
            if now - r.failing_since > self.settings.lag_threshold:
                return f"failing for {now - r.failing_since:.0f} s: {r.problem}"
            return None
        # Not failing, yet not moving either: a step that does not return (a lock, a stalled link).
        quiet = max(self.settings.lag_threshold, 2 * self.settings.poll_interval)
        if r.state == APPLYING and lag and lag.events and r.last_step_at and now - r.last_step_at > quiet:
            return f"no page applied for {now - r.last_step_at:.0f} s while {lag.events} events wait"
        return None

    # -- what systemd and the HTTP endpoints say -------------------------------------------------
    def status_line(self) -> str:
        """systemd's STATUS=, which `systemctl status` shows to every local user: the same state
        and numbers as the health endpoints, never an error's text (it can quote key values)."""
        r = self.replicator
        if r.problem is not None and not self.stop.is_set():
            return f"{r.problem_state} (the reason is in the log and in `dbsync status`)"
        return self.public_status()

    def public_status(self) -> str:
        """What /healthz and /readyz say, to anyone who reaches the port: the state and numbers,
        never a message (an error can quote key values, row data, a host or a DSN; the log and
        `dbsync status` have those)."""
        r = self.replicator
        if self.stop.is_set():
            return "stopping"
        if r.problem is not None:
            text = r.problem_state
        elif r.state == APPLYING and self.lag is not None:
            text = f"applying; lag {self.lag.seconds:.2f} s, {self.lag.events} events behind"
        else:
            text = r.state
        if self.write_back is not None:
            text += f"; write-back {_state(self.write_back)}"
        return text

    def liveness(self) -> Response:
        return 200, "text/plain", f"alive; {self.public_status()}\n"

    def readiness(self) -> Response:
        r, lag = self.replicator, self.lag
        reason = None
        if self.stop.is_set() or r.problem is not None:
            reason = self.public_status()
        elif r.state == STANDBY:
            if not _is_open(r.agent):
                reason = "standby without an Agent DB connection"
            elif not self.probe.site_reachable:
                reason = "standby, but the Site DB does not answer"
        elif r.state != APPLYING:
            reason = r.state
        elif not (_is_open(r.site) and _is_open(r.agent)):
            reason = "not connected to both databases"
        elif lag is None:
            reason = "lag unknown"
        elif lag.seconds > self.settings.lag_threshold:
            reason = f"lag {lag.seconds:.1f} s is over the threshold of {self.settings.lag_threshold:g} s"
        elif self.write_back is not None and _state(self.write_back) not in (APPLYING, STANDBY):
            reason = f"write-back {_state(self.write_back)}"
        if reason is not None:
            return 503, "text/plain", f"not ready: {reason}\n"
        return 200, "text/plain", f"ready; {self.public_status()}\n"

    def metrics_page(self) -> Response:
        r, lag = self.replicator, self.lag
        lag_seconds, lag_events = (lag.seconds, lag.events) if lag else (None, None)
        page = self.metrics.render(_gauges(r, lag_seconds, lag_events, self._verify_gauges()))
        if self.write_back is not None:  # its "Site" is the Agent DB: connected{database} says which is which
            back = self.back_lag
            back_seconds, back_events = (back.seconds, back.events) if back else (None, None)
            page += self.write_back_metrics.render(_gauges(self.write_back, back_seconds, back_events, swapped=True))
        return 200, CONTENT_TYPE, page

    def _verify_gauges(self) -> VerifyGauges | None:
        v = self.verifier
        if v is None:
            return None
        since = None if v.last_pass_finished_at is None else max(0.0, time.time() - v.last_pass_finished_at)
        keys = v.keys
        return VerifyGauges(
            v.found,
            len(v.open),
            v.repaired,
            v.rows,
            v.passes,
            since,
            verified_seq=None if keys is None else keys.verified_seq,
            keys_verified=None if keys is None else keys.keys,
            key_passes=None if keys is None else keys.passes,
        )


async def write_back_installed(settings: Settings) -> bool:
    """Whether the Agent DB captures (its Site chain) and the Site DB can apply (its Agent chain)."""
    assert settings.site_dsn and settings.agent_dsn
    found = []
    for dsn, role, mark in (
        (settings.agent_dsn, "Agent", SITE_SCHEMA_MARK),
        (settings.site_dsn, "Site", AGENT_SCHEMA_MARK),
    ):
        conn = await pg.connect(dsn, role, io_timeout=settings.io_timeout)
        try:
            found.append(bool(await conn.fetchval(SCHEMA_EXISTS.asyncpg, mark)))
        finally:
            await conn.close()
    return all(found)


def _gauges(
    r: Replicator,
    lag_seconds: float | None = None,
    lag_events: int | None = None,
    verify: VerifyGauges | None = None,
    *,
    swapped: bool = False,
) -> Gauges:
    source, target = _is_open(r.site), _is_open(r.agent)
    return Gauges(
        active=r.active,
        site_connected=target if swapped else source,
        agent_connected=source if swapped else target,
        lag_seconds=lag_seconds,
        lag_events=lag_events,
        parked_events=r.applier.parked,
        reconnects=r.stats.reconnects,
        last_apply_at=r.stats.last_apply_at,
        verify=verify,
        stale_consumers=len(r.retention.stale) if r.active else None,
    )


def _state(r: Replicator) -> str:
    """A direction's state in one word safe to show anyone."""
    return r.problem_state if r.problem is not None else r.state


def _is_open(conn: asyncpg.Connection | None) -> bool:
    return conn is not None and not conn.is_closed()
