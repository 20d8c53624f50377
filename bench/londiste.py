"""Londiste 3 as a second reference (issue 10), side by side with dbsync and native logical
replication in one run: write cost, bulk statements and catch-up.

Londiste runs where Debian packages it for PostgreSQL 15: postgresql-15-pgq3 (PgQ and its C row
trigger), postgresql-15-londiste-sql, python3-londiste (the `londiste` command) and pgqd (the
ticker). So this section starts its own Site/Agent pair from Debian's PostgreSQL 15 binaries, on
ports of its own, and measures every side there. Londiste is driven as a user drives it: an ini
file per node, the `londiste` command (create-root, create-leaf, add-table, worker) and pgqd.

* write cost: pgbench's WhatsApp transaction at 8 clients (the cluster's own pgbench) on fresh
  clones of an uncaptured, a dbsync-captured and a Londiste-captured Site database, rotating
  order; no consumer and no ticker runs, as in writecost's "no daemon" row;
* bulk statements: designs.bulk_statements (one statement each: INSERT of `rows` rows, UPDATE of their
  status, DELETE) on fresh clones of the same three;
* catch-up: bench.bulk_backlog written while the consumer is stopped (native: subscription
  disabled; dbsync: no daemon; Londiste: leaf worker stopped, while pgqd ticks and the root
  worker runs, as they would in production), then the time from consumer start until the
  backlog's sentinel row is visible on the Agent; every Agent is then compared row for row.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench import catchup, designs, writecost
from bench.env import TABLES, BenchError, Server, World, connect, stop_process, uncapture, wait_for
from bench.stats import median

PG15_BINDIR = Path("/usr/lib/postgresql/15/bin")
EXTENSIONS = Path("/usr/share/postgresql/15/extension")
PORTS = (56501, 56502)  # Site, Agent: apart from the free ports the other sections and the tests take
QUEUE = "bench_q"
CLIENTS = 8
SIDES = ("native", "dbsync", "londiste")
LABELS = {
    "none": "no capture (reference)",
    "dbsync": "dbsync capture, no daemon running",
    "londiste": "Londiste 3 capture (PgQ's C row trigger), no worker or ticker running",
    "native": "native logical replication",
    "dbsync-daemon": "dbsync `run --once`",
    "londiste-worker": "Londiste 3 leaf worker (pgqd ticking, root worker running)",
}
# What each Debian package leaves on disk.
PACKAGE_FILES = {
    "postgresql-15": PG15_BINDIR / "postgres",
    "postgresql-15-pgq3": EXTENSIONS / "pgq.control",
    "postgresql-15-pgq-node": EXTENSIONS / "pgq_node.control",
    "postgresql-15-londiste-sql": EXTENSIONS / "londiste.control",
}
PACKAGE_COMMANDS = {"python3-londiste": "londiste", "pgqd": "pgqd"}


def missing() -> str | None:
    """Why Londiste cannot be measured on this machine, or None."""
    absent = [pkg for pkg, path in PACKAGE_FILES.items() if not path.exists()]
    absent += [pkg for pkg, command in PACKAGE_COMMANDS.items() if shutil.which(command) is None]
    if absent:
        return f"Debian package(s) not installed: {', '.join(absent)}"
    return None


# -- Londiste as a user runs it -------------------------------------------------------------------
def _ini(path: Path, section: str, settings: dict[str, str]) -> Path:
    path.write_text(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return path


def _node_ini(workdir: Path, dsn: str) -> Path:
    """One node's ini, named after its database (every clone is a node of its own queue)."""
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    return _ini(
        workdir / f"londiste-{name}.ini",
        "londiste",
        {
            "job_name": f"londiste_{name}",
            "db": dsn,
            "queue_name": QUEUE,
            "logfile": str(workdir / f"londiste-{name}.log"),
            "pidfile": str(workdir / f"londiste-{name}.pid"),
        },
    )


def _londiste(ini: Path, *args: str, timeout: float = 120) -> None:
    try:
        proc = subprocess.run(
            ["londiste", "-q", str(ini), *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"londiste {args[0]} did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise BenchError(f"londiste {args[0]} failed (exit {proc.returncode}): {tail}")


def setup_root(site_dsn: str, workdir: Path) -> Path:
    """Make the Site database a Londiste root node replicating the WhatsApp tables."""
    ini = _node_ini(workdir, site_dsn)
    _londiste(ini, "create-root", "site", site_dsn)
    _londiste(ini, "add-table", *TABLES)
    return ini


def setup_leaf(agent_dsn: str, site_dsn: str, workdir: Path) -> Path:
    """A leaf node subscribed to the root's tables; they start empty on both sides, so no copy."""
    ini = _node_ini(workdir, agent_dsn)
    _londiste(ini, "create-leaf", "agent", agent_dsn, f"--provider={site_dsn}")
    _londiste(ini, "add-table", "--expect-sync", *TABLES)
    return ini


class Process:
    """A Londiste worker or pgqd in the foreground; stopped with SIGINT, its safe stop."""

    def __init__(self, what: str, argv: list[str], log_path: Path):
        self.what, self.argv, self.log_path = what, argv, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, start_new_session=True)
        return self

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-3:])
            raise BenchError(f"{self.what} exited with {self.proc.returncode}: {tail}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)


def pgqd(server: Server, dbname: str, workdir: Path) -> Process:
    """The ticker, limited to one database (it would otherwise also connect to the templates,
    and a template in use cannot be cloned)."""
    ini = _ini(
        workdir / f"pgqd-{dbname}.ini",
        "pgqd",
        {
            "base_connstr": f"host=127.0.0.1 port={server.cluster.port} user=postgres",
            "initial_database": "postgres",
            "database_list": dbname,
            "logfile": str(workdir / f"pgqd-{dbname}.log"),
            "pidfile": str(workdir / f"pgqd-{dbname}.pid"),
        },
    )
    return Process("pgqd", ["pgqd", str(ini)], workdir / f"pgqd-{dbname}.out")


def worker(ini: Path) -> Process:
    return Process(f"londiste worker ({ini.stem})", ["londiste", str(ini), "worker"], ini.with_suffix(".out"))


# -- (a) write cost and (b) bulk statements -------------------------------------------------------
def _capture_variant(site: Server, workdir: Path) -> writecost.Variant:
    def setup(conn: psycopg.Connection) -> None:
        uncapture(conn.info.dsn)
        # A plain DSN: conn.info.dsn carries options newer than Debian's psycopg2 accepts.
        setup_root(site.dsn(conn.info.dbname), workdir)

    return writecost.Variant("londiste", LABELS["londiste"], setup)


def _bulk(
    w: World, variants: list[writecost.Variant], rows: int, reps: int, log: Callable[[str], None]
) -> dict[str, Any]:
    took: dict[str, dict[str, list[float]]] = {v.name: {op: [] for op in designs.BULK} for v in variants}
    ratios: dict[str, dict[str, list[float]]] = {v.name: {op: [] for op in designs.BULK} for v in variants}
    for rep in range(reps):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        this: dict[str, dict[str, float]] = {}
        for variant in order:
            dsn = w.site.create_db("bench_lo_bulk", writecost.template_name(variant))
            try:
                this[variant.name] = designs.bulk_statements(w, dsn, rows)
            finally:
                w.site.drop_db("bench_lo_bulk")
        for name, ops in this.items():
            for op, seconds in ops.items():
                took[name][op].append(round(seconds, 3))
                ratios[name][op].append(round(this["none"][op] / seconds, 4))
        log(
            f"  bulk rep {rep + 1}/{reps}: "
            + "; ".join(f"{n} " + ", ".join(f"{op} {s:.2f} s" for op, s in ops.items()) for n, ops in this.items())
        )
    return {
        "rows": rows,
        "reps": reps,
        "seconds": took,
        "ratios": ratios,
        "seconds_median": {n: {op: median(v) for op, v in ops.items()} for n, ops in took.items()},
        "ratio_median": {n: {op: median(v) for op, v in ops.items()} for n, ops in ratios.items()},
    }


# -- (c) catch-up ---------------------------------------------------------------------------------
def _drain_londiste(leaf_ini: Path, agent_dsn: str, timeout: float) -> float:
    leaf = worker(leaf_ini)
    with connect(agent_dsn) as agent:
        started = time.monotonic()
        leaf.start()
        try:

            def arrived() -> bool:
                leaf.check()
                return catchup.sentinel_seen(agent)

            wait_for(arrived, timeout, "the Londiste worker to catch up")
            return time.monotonic() - started
        finally:
            leaf.stop()


def _catchup_one(w: World, side: str, rows: int, workdir: Path, rep: int, log: Callable[[str], None]) -> dict[str, Any]:
    site_db, agent_db = f"bench_lo_cu_site_{side}", f"bench_lo_cu_agent_{side}"
    timeout = 120 + rows / 200
    if side == "native":
        site_dsn, agent_dsn = catchup.setup_native(w, site_db, agent_db)
    else:
        site_dsn, agent_dsn = catchup.setup_dbsync(w, site_db, agent_db)
    running: list[Process] = []
    try:
        if side == "londiste":
            uncapture(site_dsn)
            setup_root(site_dsn, workdir)
            leaf_ini = setup_leaf(agent_dsn, site_dsn, workdir)
            running.append(pgqd(w.site, site_db, workdir).start())
            running.append(worker(_node_ini(workdir, site_dsn)).start())
        written, write_s = catchup.call_backlog(site_dsn, "CALL bench.bulk_backlog(%s, NULL)", (rows,), timeout)
        log(f"  catch-up rep {rep + 1} {side:<8}: backlog of {written} row changes written in {write_s:.1f}s")
        if side == "londiste":
            for p in running:
                p.check()
            with connect(site_dsn) as conn:  # the backlog's tail in a batch now, not at pgqd's next tick
                conn.execute("SELECT pgq.ticker(%s)", (QUEUE,))
        w.site.checkpoint()
        w.agent.checkpoint()
        out: dict[str, Any] = {"side": side, "rep": rep, "events": written, "write_s": round(write_s, 2)}
        if side == "native":
            out["drain_s"] = catchup.drain_native(agent_dsn, timeout)
        elif side == "dbsync":
            with connect(agent_dsn) as poll:
                daemon = catchup.run_daemon_once(
                    site_dsn, agent_dsn, timeout, workdir / f"londiste-section-dbsync-{rep}.log", poll
                )
            out["drain_s"] = daemon["sentinel_s"] or daemon["wall_s"]
            out["ru_maxrss_kb"] = daemon["ru_maxrss_kb"]
        else:
            out["drain_s"] = _drain_londiste(leaf_ini, agent_dsn, timeout)
        out["drain_s"] = round(out["drain_s"], 3)
        out["events_per_s"] = round(written / out["drain_s"])
        catchup.verify(site_dsn, agent_dsn, side)
        log(f"  catch-up rep {rep + 1} {side:<8}: drained in {out['drain_s']:.1f}s = {out['events_per_s']:,} events/s")
        return out
    finally:
        for p in reversed(running):
            p.stop()
        if side == "native":
            catchup.teardown_native(w, site_db, agent_db)
        else:
            w.agent.drop_db(agent_db)
            w.site.drop_db(site_db)


def _catchup(w: World, rows: int, reps: int, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for rep in range(reps):
        order = SIDES[rep % len(SIDES) :] + SIDES[: rep % len(SIDES)]
        for side in order:
            runs.append(_catchup_one(w, side, rows, workdir, rep, log))
    by = {s: [r for r in runs if r["side"] == s] for s in SIDES}
    native = {r["rep"]: r["events_per_s"] for r in by["native"]}
    ratios = {s: [round(r["events_per_s"] / native[r["rep"]], 4) for r in by[s]] for s in SIDES}
    return {
        "backlog_rows": rows,
        "events": runs[0]["events"],
        "reps": reps,
        "runs": runs,
        "events_per_s_median": {s: median([r["events_per_s"] for r in by[s]]) for s in SIDES},
        "drain_s_median": {s: median([r["drain_s"] for r in by[s]]) for s in SIDES},
        "write_s_median": {s: median([r["write_s"] for r in by[s]]) for s in SIDES},
        "ratios_to_native": ratios,
        "ratio_to_native_median": {s: median(v) for s, v in ratios.items()},
    }


# -- the section ----------------------------------------------------------------------------------
def _versions(w: World) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr).strip() else "?"

    return {
        "postgres": w.site.version().split(" on ")[0],
        "londiste": first_line(["londiste", "-V"]),
        "pgqd": first_line(["pgqd", "-V"]),
    }


def run(
    w: World,
    reps: int,
    seconds: int,
    bulk_rows: int,
    backlog_rows: int,
    workdir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """`w` must be a PostgreSQL 15 pair (world(mode, PG15_BINDIR, PORTS))."""
    out: dict[str, Any] = {"bindir": str(w.site.cluster.bindir), "ports": list(PORTS), "versions": _versions(w)}
    out["labels"] = LABELS
    variants = [writecost.NONE, writecost.DBSYNC, _capture_variant(w.site, workdir)]
    writecost.prepare(w.site, tuple(variants))
    # Every trigger must be installed as intended, or the ratios below measure something else.
    with connect(w.site.dsn(writecost.template_name(variants[2]))) as conn:
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE '\\_londiste%'"
        ).fetchone()[0]  # type: ignore[index]
    if triggers < len(TABLES):
        raise BenchError(f"Londiste installed {triggers} triggers on {len(TABLES)} tables")
    log(f"londiste: pgbench {len(variants)} runs x {reps} reps x {seconds} s at {CLIENTS} clients")
    runs = writecost.run_matrix(w, [(v, CLIENTS) for v in variants], reps, seconds, workdir, log)
    out["writecost"] = {
        "clients": CLIENTS,
        "seconds": seconds,
        "reps": reps,
        "runs": runs,
        "summary": writecost.summarize(runs),
    }
    log(f"londiste: bulk statements of {bulk_rows:,} rows x {reps} reps")
    out["bulk"] = _bulk(w, variants, bulk_rows, reps, log)
    log(f"londiste: catch-up of a bulk-statement backlog ({backlog_rows:,} messages) x {reps} reps")
    out["catchup"] = _catchup(w, backlog_rows, reps, workdir, log)
    return out


# -- the docs' table ------------------------------------------------------------------------------
def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(result: dict[str, Any] | str) -> str:
    """The medians of one run's londiste section as markdown (docs/benchmarks.md quotes it)."""
    if isinstance(result, str):
        return f"Not measured in this run ({result}).\n"
    wc, bulk, cu = result["writecost"], result["bulk"], result["catchup"]
    key = str(wc["clients"])
    lines = [
        f"{result['versions']['postgres']}; {result['versions']['londiste']}, {result['versions']['pgqd']}.",
        "",
        f"| Site DB | WhatsApp txn, {wc['clients']} clients (tps, ratio) | server CPU per txn "
        f"| {bulk['rows']:,}-row INSERT | UPDATE of status | DELETE |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("none", "dbsync", "londiste"):
        cell = wc["summary"][name][key]
        ops = bulk["ratio_median"][name]
        secs = bulk["seconds_median"][name]
        lines.append(
            f"| {LABELS[name]} | {cell['tps_median']:,.0f} ({_x(cell['ratio_median'])}) "
            f"| {cell['server_cpu_us_per_tx_median'] or 0:,.0f} us "
            + " ".join(f"| {_x(ops[op])} ({secs[op]:.2f} s)" for op in ("insert", "update", "delete"))
            + " |"
        )
    lines += [
        "",
        f"Catch-up of the bulk-statement backlog ({cu['events']:,} row changes: {cu['backlog_rows']:,} messages "
        "inserted in 10k-row statements, one UPDATE of half of them, one DELETE of a tenth), "
        f"{cu['reps']} reps:",
        "",
        "| Consumer | drain time | events/s | ratio to native (median of per-rep) | backlog write time on the Site |",
        "|---|---|---|---|---|",
    ]
    for side, label in zip(SIDES, ("native", "dbsync-daemon", "londiste-worker"), strict=True):
        lines.append(
            f"| {LABELS[label]} | {cu['drain_s_median'][side]:.1f} s | {cu['events_per_s_median'][side]:,.0f} "
            f"| {_x(cu['ratio_to_native_median'][side])} | {cu['write_s_median'][side]:.1f} s |"
        )
    return "\n".join(lines) + "\n"


def backlog_rows(events: int) -> int:
    """Messages of a bulk backlog of about `events` row changes: each message is inserted, half are
    updated and a tenth deleted (1.6 changes per message), plus the 2,000-row seed."""
    return max(10_000, (events - 2000) * 10 // 16)


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.londiste bench/results/<run>.json")
    try:
        section = json.loads(Path(sys.argv[1]).read_text())["londiste"]
    except (OSError, ValueError, KeyError) as exc:
        sys.exit(f"{sys.argv[1]}: no londiste results ({type(exc).__name__}: {exc})")
    print(render(section), end="")
