"""Steady-state latency: Site commit -> visible on the Agent DB, at a paced WhatsApp load.

Two helper processes, so neither's event loop delays the other's timestamps:

* the writer runs an open-loop schedule at `rate` row changes/s: per message, an insert that
  also bumps its conversation (2 changes), 'delivered' 0.3 s later, 'read' 1.0 s later, and for
  every 10th message a delete 2.0 s later, each its own transaction on one of several
  connections. It records when each COMMIT returned (time.monotonic, which is system-wide);
* the observer LISTENs on the Agent DB, where an ENABLE ALWAYS trigger (bench/sql/agent.sql)
  notifies every change of a benchmark message. Notifications are delivered at commit, so
  their arrival is the moment the change became visible there.

A write counts as visible when its own state or any later state of the same message arrives
(dbsync coalesces a page to the last image per key, which is correct for state replication).
Writes in the first `warmup` seconds are not counted.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.catchup import setup_dbsync, setup_native, teardown_native
from bench.env import REPO, BenchError, World, connect, stop_process, wait_for
from bench.stats import median, percentile
from dbsync.daemon.pg import connect_kwargs

RANK = {"sent": 0, "delivered": 1, "read": 2, "deleted": 3}
# Row changes per message lifecycle: insert + conversation bump, delivered, read, 1/10 delete.
EVENTS_PER_MESSAGE = 4.1
BASE_ID = 100_000_000  # the Agent trigger only reports ids from here on
SITE_DB, AGENT_DB = "bench_lat_site", "bench_lat_agent"

INSERT = """
WITH m AS (
    INSERT INTO public.whatsapp_messages (id, message_id, conversation_id, phone_number, direction, content)
    VALUES ($1, $3, $2, bench.phone($2), 'inbound', bench.text_for($1))
    RETURNING conversation_id)
UPDATE public.conversations c
   SET unread_count = c.unread_count + 1, last_message_at = now(), updated_at = now()
  FROM m WHERE c.id = m.conversation_id
"""
DELIVERED = """
UPDATE public.whatsapp_messages SET status = 'delivered', delivered_at = now(), updated_at = now() WHERE id = $1
"""
READ = "UPDATE public.whatsapp_messages SET status = 'read', read_at = now(), updated_at = now() WHERE id = $1"
DELETE = "DELETE FROM public.whatsapp_messages WHERE id = $1"


def schedule(rate: float, duration: float, base_id: int) -> list[tuple[float, str, int, int]]:
    """(offset s, kind, message id, conversation id), sorted by offset."""
    msg_rate = rate / EVENTS_PER_MESSAGE
    actions: list[tuple[float, str, int, int]] = []
    j = 0
    while j / msg_rate < duration:
        t, mid, conv = j / msg_rate, base_id + j, 1 + (j * 7919) % 1000
        actions += [(t, "sent", mid, conv), (t + 0.3, "delivered", mid, conv), (t + 1.0, "read", mid, conv)]
        if j % 10 == 0:
            actions.append((t + 2.0, "deleted", mid, conv))
        j += 1
    return sorted(a for a in actions if a[0] < duration)


# -- helper processes -----------------------------------------------------------------------------
async def _write(dsn: str, rate: float, duration: float, base_id: int, conns: int) -> dict[str, Any]:
    import asyncpg

    actions = schedule(rate, duration, base_id)
    pool = [await asyncpg.connect(**connect_kwargs(dsn, "site_dsn")) for _ in range(conns)]
    done: list[tuple[int, int, float, float]] = []  # id, rank, commit returned, lag behind schedule
    changes = 0
    cursor = 0
    t0 = time.monotonic() + 0.2

    async def worker(conn: Any) -> None:
        nonlocal cursor, changes
        while cursor < len(actions):
            at, kind, mid, conv = actions[cursor]
            cursor += 1
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if kind == "sent":
                status = await conn.execute(INSERT, mid, conv, f"lat-{mid}")
            elif kind == "delivered":
                status = await conn.execute(DELIVERED, mid)
            elif kind == "read":
                status = await conn.execute(READ, mid)
            else:
                status = await conn.execute(DELETE, mid)
            now = time.monotonic()
            if status.endswith(" 1"):
                done.append((mid, RANK[kind], now, now - (t0 + at)))
                changes += 2 if kind == "sent" else 1

    try:
        await asyncio.gather(*(worker(c) for c in pool))
    finally:
        for c in pool:
            await c.close()
    return {"writes": done, "changes": changes, "t0": t0, "elapsed": time.monotonic() - t0, "planned": len(actions)}


def writer_main(dsn: str, rate: float, duration: float, base_id: int, conns: int, out: Any) -> None:
    try:
        out.put(("ok", asyncio.run(_write(dsn, rate, duration, base_id, conns))))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put(("error", f"{type(exc).__name__}: {exc}"))


async def _observe(dsn: str, ready: Any, stop: Any) -> list[tuple[str, float]]:
    import asyncpg

    conn = await asyncpg.connect(**connect_kwargs(dsn, "agent_dsn"))
    arrivals: list[tuple[str, float]] = []
    await conn.add_listener("bench_arrival", lambda _c, _p, _ch, payload: arrivals.append((payload, time.monotonic())))
    ready.set()
    try:
        while not stop.is_set():
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    return arrivals


def observer_main(dsn: str, ready: Any, stop: Any, out: Any) -> None:
    try:
        out.put(("ok", asyncio.run(_observe(dsn, ready, stop))))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        ready.set()
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def _collect(queue: Any, proc: Any, timeout: float, what: str) -> Any:
    try:
        status, value = queue.get(timeout=timeout)
    except Exception as exc:  # queue.Empty
        raise BenchError(f"the latency {what} did not report within {timeout:.0f}s") from exc
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise BenchError(f"the latency {what} failed: {value}")
    return value


# -- consumers ------------------------------------------------------------------------------------
class Consumer:
    """Start/stop one side's replication between reps, so only one side ever runs at a time."""

    def __init__(self, side: str, site_dsn: str, agent_dsn: str, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        self.side, self.site_dsn, self.agent_dsn, self.workdir = side, site_dsn, agent_dsn, workdir
        self.extra = extra  # more `dbsync run` arguments (bench/verify_cost.py)
        self.daemon_site_dsn = site_dsn  # the daemon's own (bench/verify_cost.py names its sessions)
        self.proc: subprocess.Popen[bytes] | None = None
        self._probe = 0

    def start(self) -> None:
        if self.side == "native":
            with connect(self.agent_dsn) as conn:
                conn.execute("ALTER SUBSCRIPTION bench_sub ENABLE")
        else:
            env = {**os.environ, "DBSYNC_SITE_DSN": self.daemon_site_dsn, "DBSYNC_AGENT_DSN": self.agent_dsn}
            log = (self.workdir / "dbsync-latency.log").open("ab")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dbsync", "--log-level", "warning", "run", *self.extra],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
                cwd=REPO,
            )
            log.close()
        self.probe()

    def probe(self, timeout: float = 120) -> None:
        """A row written now shows on the Agent: the consumer is running and caught up."""
        self._probe += 1
        mid = 50_000_000 + self._probe
        with connect(self.site_dsn) as site:
            site.execute(
                "INSERT INTO public.whatsapp_messages (id, message_id, conversation_id, phone_number, direction) "
                "VALUES (%s, %s, 1, bench.phone(1), 'outbound')",
                (mid, f"probe-{mid}"),
            )
        with connect(self.agent_dsn) as agent:
            wait_for(
                lambda: agent.execute("SELECT 1 FROM public.whatsapp_messages WHERE id = %s", (mid,)).fetchone(),
                timeout,
                f"{self.side} to replicate a probe row",
                0.05,
            )

    def stop(self) -> None:
        if self.side == "native":
            with connect(self.agent_dsn) as conn:
                conn.execute("ALTER SUBSCRIPTION bench_sub DISABLE")
        elif self.proc is not None:
            stop_process(self.proc, signal.SIGTERM)
            self.proc = None


def _setup(w: World, side: str) -> tuple[str, str]:
    site_db, agent_db = f"{SITE_DB}_{side}", f"{AGENT_DB}_{side}"
    site_dsn, agent_dsn = (setup_native if side == "native" else setup_dbsync)(w, site_db, agent_db)
    with connect(agent_dsn) as conn:
        conn.execute(
            "CREATE TRIGGER bench_arrival AFTER INSERT OR UPDATE OR DELETE ON public.whatsapp_messages "
            "FOR EACH ROW EXECUTE FUNCTION bench.arrival()"
        )
        conn.execute("ALTER TABLE public.whatsapp_messages ENABLE ALWAYS TRIGGER bench_arrival")
    with connect(site_dsn) as conn:
        conn.execute("CALL bench.seed(1000)")
    return site_dsn, agent_dsn


def _teardown(w: World, side: str) -> None:
    site_db, agent_db = f"{SITE_DB}_{side}", f"{AGENT_DB}_{side}"
    if side == "native":
        teardown_native(w, site_db, agent_db)
    else:
        w.agent.drop_db(agent_db)
        w.site.drop_db(site_db)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    consumer: Consumer, rate: float, duration: float, warmup: float, base_id: int, conns: int
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    obs_out, wr_out = ctx.Queue(), ctx.Queue()
    ready, stop = ctx.Event(), ctx.Event()
    observer = ctx.Process(target=observer_main, args=(consumer.agent_dsn, ready, stop, obs_out), daemon=True)
    writer = ctx.Process(
        target=writer_main, args=(consumer.site_dsn, rate, duration, base_id, conns, wr_out), daemon=True
    )
    observer.start()
    try:
        if not ready.wait(30):
            raise BenchError("the latency observer did not start")
        pid = consumer.proc.pid if consumer.proc is not None else None
        cpu0, wall0 = (_cpu_seconds(pid) if pid else 0.0), time.monotonic()
        writer.start()
        written = _collect(wr_out, writer, duration + 120, "writer")
        # The daemon's own CPU over the writing (its share of one core).
        cpu_share = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0) if pid else None
        # Wait for the tail: until every tracked write has arrived, or 30 s.
        tracked = {(mid, rank) for mid, rank, _, _ in written["writes"]}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _all_arrived(consumer.agent_dsn, tracked):
            time.sleep(0.1)
        time.sleep(0.2)
    finally:
        stop.set()
    arrivals = _collect(obs_out, observer, 60, "observer")
    return {**summarize(written, arrivals, warmup), "daemon_cpu_share": cpu_share}


def _all_arrived(agent_dsn: str, tracked: set[tuple[int, int]]) -> bool:
    """Cheap check on the Agent: does every tracked message show its last written state?"""
    final: dict[int, int] = {}
    for mid, rank in tracked:
        final[mid] = max(rank, final.get(mid, -1))
    with connect(agent_dsn) as conn:
        rows = conn.execute(
            "SELECT id, status FROM public.whatsapp_messages WHERE id = ANY(%s)", (list(final),)
        ).fetchall()
    present = {mid: RANK[status] for mid, status in rows}
    for mid, rank in final.items():
        if rank == RANK["deleted"]:
            if mid in present:
                return False
        elif present.get(mid, -1) < rank:
            return False
    return True


def summarize(written: dict[str, Any], arrivals: list[tuple[str, float]], warmup: float) -> dict[str, Any]:
    seen: dict[int, list[tuple[int, float]]] = {}
    for payload, t in arrivals:
        mid, status = payload.split(":")
        seen.setdefault(int(mid), []).append((RANK[status], t))
    t0 = written["t0"]
    lat: list[float] = []
    lost = 0
    for mid, rank, committed, _lag in written["writes"]:
        if committed - t0 < warmup:
            continue
        times = [t for r, t in seen.get(mid, []) if r >= rank]
        if not times:
            lost += 1
            continue
        lat.append((min(times) - committed) * 1000)
    lags = [lag * 1000 for _, _, _, lag in written["writes"]]
    return {
        "samples": len(lat),
        "lost": lost,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
        "achieved_changes_per_s": written["changes"] / written["elapsed"],
        "writer_lag_p99_ms": percentile(lags, 99),
        "planned_writes": written["planned"],
        "done_writes": len(written["writes"]),
    }


def run(
    w: World,
    rate: float,
    duration: float,
    warmup: float,
    reps: int,
    conns: int,
    workdir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    consumers: dict[str, Consumer] = {}
    runs: list[dict[str, Any]] = []
    try:
        for side in ("native", "dbsync"):
            site_dsn, agent_dsn = _setup(w, side)
            consumers[side] = Consumer(side, site_dsn, agent_dsn, workdir)
        for rep in range(reps):
            order = ("native", "dbsync") if rep % 2 == 0 else ("dbsync", "native")
            for side in order:
                consumer = consumers[side]
                consumer.start()
                try:
                    w.site.checkpoint()
                    w.agent.checkpoint()
                    result = measure(consumer, rate, duration, warmup, BASE_ID + rep * 1_000_000, conns)
                finally:
                    consumer.stop()
                runs.append({"side": side, "rep": rep, **result})
                log(
                    f"  latency rep {rep + 1}/{reps} {side:<6}: {result['achieved_changes_per_s']:.0f} changes/s, "
                    f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, lost {result['lost']}"
                    + (
                        f", daemon CPU {result['daemon_cpu_share']:.0%}"
                        if result.get("daemon_cpu_share") is not None
                        else ""
                    )
                )
    finally:
        for side, consumer in consumers.items():
            try:
                consumer.stop()
            finally:
                _teardown(w, side)
    out: dict[str, Any] = {"runs": runs, "rate": rate, "duration_s": duration, "warmup_s": warmup, "connections": conns}
    for side in ("native", "dbsync"):
        mine = [r for r in runs if r["side"] == side]
        out[side] = {
            key: median([r[key] for r in mine if r[key] is not None])
            for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "achieved_changes_per_s", "writer_lag_p99_ms")
        }
        shares = [r["daemon_cpu_share"] for r in mine if r.get("daemon_cpu_share") is not None]
        out[side]["daemon_cpu_share"] = round(median(shares), 3) if shares else None
        out[side]["lost"] = sum(r["lost"] for r in mine)
    return out
