"""Site write cost: pgbench with a WhatsApp transaction, with and without capture.

Every configuration is a template database cloned fresh for each pgbench run, so no run
inherits the previous run's table and log growth. Within a rep the configurations run
back to back in a rotating order; a configuration's ratio is computed against the
uncaptured run of the same rep, and the report gives the median of those ratios.

Variants of dbsync's own trigger are made by patching the installed function's definition
(pg_get_functiondef), each patch asserting that it matched, so a changed trigger makes this
fail loudly instead of measuring the wrong thing.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.env import (
    AGENT_TEMPLATE,
    BENCH_DIR,
    SITE_TEMPLATE,
    TABLES,
    BenchError,
    Server,
    World,
    connect,
    uncapture,
    wait_for,
)
from bench.latency import Consumer
from bench.stats import median

SCRIPT = BENCH_DIR / "sql" / "pgbench_whatsapp.sql"
TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
# WAL flushes (pg_stat_io, PostgreSQL 16+). Fewer than one per transaction means group commit
# works; NOTIFY's lock, held across the flush, pushes it to one per transaction.
WAL_FSYNCS = "SELECT sum(fsyncs)::float8 FROM pg_catalog.pg_stat_io WHERE object = 'wal'"


class NotApplicable(BenchError):
    """A variant that makes no sense for the trigger under test (e.g. json images when it uses json)."""


def _patch(pattern: str, repl: str, *, flags: int = 0) -> Callable[[str], str]:
    def apply(src: str) -> str:
        out, n = re.subn(pattern, repl, src, flags=flags)
        if n == 0:
            raise NotApplicable(f"pattern {pattern!r} not found in dbsync.capture()")
        return out

    return apply


NO_NOTIFY = _patch(r"^\s*PERFORM pg_catalog\.pg_notify\('dbsync', ''\);\n", "", flags=re.MULTILINE)
NO_SET = _patch(r"^ SET .*\n", "", flags=re.MULTILINE)
NO_SECDEF = _patch(r"^ SECURITY DEFINER\n", "", flags=re.MULTILINE)
# The capture trigger of 637f07b and earlier built json images inline.
INLINE_JSONB_PATCHES = [
    _patch(r"\bto_json\(", "to_jsonb("),
    _patch(r"\bjson_build_object\(", "jsonb_build_object("),
    _patch(r"\bjson_object_agg\(", "jsonb_object_agg("),
    _patch(r"(v_\w+\s+)json;", r"\1jsonb;"),
]
# Later triggers build images through helpers whose types follow sync_log's columns (%TYPE):
# swapping the helpers and the column types swaps the image format.
IMAGE_HELPERS = """
DROP FUNCTION dbsync.row_image(anyelement);
CREATE FUNCTION dbsync.row_image(anyelement) RETURNS {t}
    LANGUAGE sql STABLE AS 'SELECT pg_catalog.to_{t}($1)';
CREATE FUNCTION dbsync.key_image({t}, text[]) RETURNS {t}
    LANGUAGE sql STABLE
    AS 'SELECT pg_catalog.{t}_object_agg(k, $1 OPERATOR(pg_catalog.->) k) FROM pg_catalog.unnest($2) AS k';
CREATE FUNCTION dbsync.with_key(anyelement, {t}) RETURNS anyelement
    LANGUAGE sql STABLE AS 'SELECT pg_catalog.{t}_populate_record($1, $2)';
"""


# The function the capture triggers of public.whatsapp_messages call: generated per table since
# 0006_site_key_capture (dbsync.capture_t<id>()), dbsync.capture() before.
CAPTURE_FUNCTION = """
SELECT coalesce(
    (SELECT t.tgfoid FROM pg_trigger t WHERE t.tgrelid = 'public.whatsapp_messages'::regclass
        AND t.tgname IN ('dbsync_capture_insert', 'dbsync_capture') LIMIT 1),
    'dbsync.capture()'::regprocedure)
"""


def _capture_source(conn: psycopg.Connection) -> str:
    fn = conn.execute(CAPTURE_FUNCTION).fetchone()[0]  # type: ignore[index]
    return str(conn.execute("SELECT pg_get_functiondef(%s)", (fn,)).fetchone()[0])  # type: ignore[index]


def _rewrite(*patches: Callable[[str], str]) -> Callable[[psycopg.Connection], None]:
    def setup(conn: psycopg.Connection) -> None:
        src = _capture_source(conn)
        for p in patches:
            src = p(src)
        conn.execute(src)

    return setup


def _drop_txid_index(conn: psycopg.Connection) -> None:
    conn.execute("DROP INDEX dbsync.sync_log_txid_idx")


def _image_format(fmt: str) -> Callable[[psycopg.Connection], None]:
    def setup(conn: psycopg.Connection) -> None:
        current = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'dbsync.sync_log'::regclass AND attname = 'row_image'"
        ).fetchone()[0]  # type: ignore[index]
        if current.endswith(fmt):  # "json", "jsonb", or a schema-qualified "x.hstore"
            raise NotApplicable(f"row images are already {fmt}")
        helpers = conn.execute("SELECT to_regprocedure('dbsync.row_image(anyelement)') IS NOT NULL").fetchone()[0]  # type: ignore[index]
        conn.execute(
            f"ALTER TABLE dbsync.sync_log ALTER pk TYPE {fmt} USING NULL, ALTER row_image TYPE {fmt} USING NULL"
        )
        if helpers:
            conn.execute(IMAGE_HELPERS.format(t=fmt))
        elif fmt == "jsonb" and current == "json":
            _rewrite(*INLINE_JSONB_PATCHES)(conn)
        else:
            raise NotApplicable(f"cannot switch this trigger's {current} images to {fmt}")

    return setup


def _minimal(conn: psycopg.Connection) -> None:
    _rewrite(NO_NOTIFY, NO_SET, NO_SECDEF)(conn)
    _drop_txid_index(conn)


def _other_trigger(function: str) -> Callable[[psycopg.Connection], None]:
    def setup(conn: psycopg.Connection) -> None:
        uncapture(conn.info.dsn)
        for table in TABLES:
            conn.execute(
                f"CREATE TRIGGER bench_capture AFTER INSERT OR UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {function}"
            )

    return setup


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    setup: Callable[[psycopg.Connection], None] | None
    # Run `dbsync run` into a fresh Agent database while pgbench writes: the Site then also
    # serves the daemon's reads, and a doorbell the daemon arms and disarms is exercised.
    live_daemon: bool = False


NONE = Variant("none", "no capture (reference)", lambda conn: uncapture(conn.info.dsn))
DBSYNC = Variant("dbsync", "dbsync capture, no daemon running", None)
NAIVE = Variant(
    "naive", "naive: to_jsonb(NEW) into a log + pg_notify per row", _other_trigger("bench.naive_capture('notify')")
)
# The main comparison, at 1, 8 and 32 clients.
DBSYNC_LIVE = Variant(
    "dbsync-live", "dbsync capture, daemon running (consuming into the Agent cluster)", None, live_daemon=True
)
MAIN = (NONE, DBSYNC, DBSYNC_LIVE, NAIVE)
# The trigger profile, at the profile's client count.
PROFILE = (
    Variant("dbsync-no-notify", "dbsync without the NOTIFY", _rewrite(NO_NOTIFY)),
    Variant("dbsync-no-txid-index", "dbsync without the sync_log txid index", _drop_txid_index),
    Variant("dbsync-no-set", "dbsync without the function's SET clauses", _rewrite(NO_SET)),
    Variant("dbsync-no-secdef", "dbsync without SECURITY DEFINER", _rewrite(NO_SECDEF)),
    Variant("dbsync-json", "dbsync with json row images", _image_format("json")),
    Variant("dbsync-jsonb", "dbsync with jsonb row images", _image_format("jsonb")),
    Variant("dbsync-minimal", "dbsync without NOTIFY, txid index, SET clauses, SECURITY DEFINER", _minimal),
    Variant(
        "naive-no-notify",
        "naive without the NOTIFY (plain PL/pgSQL row trigger)",
        _other_trigger("bench.naive_capture()"),
    ),
    Variant("notify-only", "only a constant-payload pg_notify per row (no log)", _other_trigger("bench.notify_only()")),
)


def template_name(variant: Variant) -> str:
    return "bench_pgb_" + variant.name.replace("-", "_")


def prepare(site: Server, variants: tuple[Variant, ...]) -> tuple[list[Variant], dict[str, str]]:
    """One seeded template database per variant; returns the usable ones and why others were skipped."""
    usable: list[Variant] = []
    skipped: dict[str, str] = {}
    for variant in variants:
        dsn = site.create_db(template_name(variant), SITE_TEMPLATE)
        try:
            with connect(dsn) as conn:
                if variant.setup is not None:
                    variant.setup(conn)
                conn.execute("CALL bench.seed(1000)")
                conn.execute("VACUUM ANALYZE")
        except (NotApplicable, psycopg.Error) as exc:
            if variant in MAIN:
                raise
            skipped[variant.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            site.drop_db(template_name(variant))
            continue
        usable.append(variant)
    return usable, skipped


def _wal_fsyncs(site: Server) -> float | None:
    with connect(site.admin_dsn) as conn:
        try:
            conn.execute("SELECT pg_stat_force_next_flush()")
            value = conn.execute(WAL_FSYNCS).fetchone()[0]  # type: ignore[index]
        except psycopg.Error:
            return None
    return float(value) if value is not None else None


def _server_cpu_s(site: Server) -> float | None:
    """CPU seconds used by the cluster's processes so far: exited backends (reaped by the
    postmaster, so in its cutime/cstime) plus the live ones. Unlike tps, this hardly depends on
    what else runs on the machine, so it shows a trigger's cost even on a busy host."""
    pid = site.cluster.pid
    if pid is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                f = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(f[1]) == pid:
                total += int(f[11]) + int(f[12])
    except OSError:
        return None
    return total / tick


def pgbench(site: Server, dbname: str, clients: int, seconds: int) -> dict[str, Any]:
    syncs_before = _wal_fsyncs(site)
    cpu_before = _server_cpu_s(site)
    cmd = [
        str(site.cluster.bindir / "pgbench"),  # the cluster's own pgbench
        "-h",
        "127.0.0.1",
        "-p",
        str(site.cluster.port),
        "-U",
        "postgres",
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        "-T",
        str(seconds),
        "-f",
        str(SCRIPT),
        dbname,
    ]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=seconds + 120)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"pgbench on {dbname} did not finish within {seconds + 120}s") from exc
    m = TPS.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise BenchError(f"pgbench on {dbname} failed (exit {proc.returncode}): {tail}")
    failed = FAILED.search(proc.stdout)
    lat = LATENCY.search(proc.stdout)
    processed = PROCESSED.search(proc.stdout)
    time.sleep(1.1)  # background processes report their I/O statistics at most once a second
    syncs_after = _wal_fsyncs(site)
    cpu_after = _server_cpu_s(site)
    done = int(processed.group(1)) if processed else 0
    per_tx = cpu_us = None
    if syncs_before is not None and syncs_after is not None and done:
        per_tx = round((syncs_after - syncs_before) / done, 3)
    if cpu_before is not None and cpu_after is not None and done:
        cpu_us = round((cpu_after - cpu_before) / done * 1e6, 1)
    return {
        "tps": float(m.group(1)),
        "wal_fsyncs_per_tx": per_tx,
        "server_cpu_us_per_tx": cpu_us,
        "loadavg": Path("/proc/loadavg").read_text().split()[0],
        "failed": int(failed.group(1)) if failed else 0,
        "latency_ms": float(lat.group(1)) if lat else None,
    }


def _messages(dsn: str) -> int:
    with connect(dsn) as conn:
        return int(conn.execute("SELECT count(*) FROM public.whatsapp_messages").fetchone()[0])  # type: ignore[index]


def _one_run(w: World, variant: Variant, clients: int, seconds: int, workdir: Path) -> dict[str, Any]:
    db, agent_db = "bench_pgb_run", "bench_pgb_agent"
    site_dsn = w.site.create_db(db, template_name(variant))
    consumer: Consumer | None = None
    try:
        if variant.live_daemon:
            agent_dsn = w.agent.create_db(agent_db, AGENT_TEMPLATE)
            consumer = Consumer("dbsync", site_dsn, agent_dsn, workdir)
            consumer.start()  # returns once the seed and a probe row are on the Agent
        w.site.checkpoint()
        result = pgbench(w.site, db, clients, seconds)
        if consumer is not None:
            # How far behind the daemon was when the writers stopped.
            started = time.monotonic()
            target = _messages(site_dsn)
            wait_for(lambda: _messages(agent_dsn) >= target, 300, "the daemon to catch up after pgbench", 0.05)
            result["daemon_catchup_s"] = round(time.monotonic() - started, 2)
        return result
    finally:
        if consumer is not None:
            consumer.stop()
            w.agent.drop_db(agent_db)
        w.site.drop_db(db)


def run_matrix(
    w: World,
    plan: list[tuple[Variant, int]],
    reps: int,
    seconds: int,
    workdir: Path,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Run every (variant, clients) of `plan` once per rep, in a rotating order."""
    runs: list[dict[str, Any]] = []
    for rep in range(reps):
        shift = rep % len(plan)
        for variant, clients in plan[shift:] + plan[:shift]:
            result = _one_run(w, variant, clients, seconds, workdir)
            runs.append({"variant": variant.name, "clients": clients, "rep": rep, **result})
            log(
                f"  pgbench rep {rep + 1}/{reps} {variant.name:<22} c={clients:<3} {result['tps']:9.1f} tps, "
                f"WAL fsyncs/tx {result['wal_fsyncs_per_tx']}, server CPU {result['server_cpu_us_per_tx']} us/tx, "
                f"load {result['loadavg']}"
                + (f", daemon caught up {result['daemon_catchup_s']} s later" if "daemon_catchup_s" in result else "")
            )
    return runs


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> clients -> tps median and the median of per-rep ratios to 'none'."""
    ref = {(r["clients"], r["rep"]): r["tps"] for r in runs if r["variant"] == "none"}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["variant"], {}).setdefault(
            str(r["clients"]), {"tps": [], "ratios": [], "fsyncs": [], "cpu_us": []}
        )
    for r in runs:
        cell = out[r["variant"]][str(r["clients"])]
        cell["tps"].append(r["tps"])
        if r.get("wal_fsyncs_per_tx") is not None:
            cell["fsyncs"].append(r["wal_fsyncs_per_tx"])
        if r.get("server_cpu_us_per_tx") is not None:
            cell["cpu_us"].append(r["server_cpu_us_per_tx"])
        base = ref.get((r["clients"], r["rep"]))
        if base:
            cell["ratios"].append(round(r["tps"] / base, 4))
    for per_clients in out.values():
        for cell in per_clients.values():
            cell["tps_median"] = median(cell["tps"])
            cell["ratio_median"] = median(cell["ratios"]) if cell["ratios"] else None
            cell["wal_fsyncs_per_tx_median"] = median(cell["fsyncs"])
            cell["server_cpu_us_per_tx_median"] = median(cell["cpu_us"])
    for r in runs:
        if "daemon_catchup_s" in r:
            cell = out[r["variant"]][str(r["clients"])]
            cell.setdefault("daemon_catchup_s", []).append(r["daemon_catchup_s"])
    return out


def labels() -> dict[str, str]:
    return {v.name: v.label for v in (*MAIN, *PROFILE)}
