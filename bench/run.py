"""Run the replication benchmarks: `python -m bench.run [--quick]` from the repository root.

Starts two throwaway clusters (Site, Agent), runs the selected measurements, destroys the
clusters, writes bench/results/<UTC timestamp>.json and the "Replication" section of
docs/benchmarks.md. A measurement that fails is recorded in the JSON and the report, and the
others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import catchup, code, designs, latency, londiste, report, triggercpu, writecost
from bench.env import BENCH_DIR, DURABLE, FAST, World, machine_facts, world

SECTIONS = ("writecost", "triggercpu", "designs", "profile", "latency", "catchup", "catchup-bulk", "londiste")


@dataclass(frozen=True)
class Profile:
    seconds: int  # per pgbench run
    latency_s: float  # per latency rep, after the warm-up
    warmup_s: float
    events: int  # catch-up backlog


PROFILES = {"quick": Profile(5, 10.0, 2.0, 100_000), "full": Profile(15, 30.0, 3.0, 1_000_000)}
CLIENTS = (1, 8, 32)
PROFILE_CLIENTS = 8


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100k-event backlog and short runs (~15 min)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every comparison (default 3)")
    p.add_argument(
        "--events", type=int, help="catch-up backlog size in row changes, also londiste's (default 1M, --quick 100k)"
    )
    p.add_argument("--seconds", type=int, help="pgbench seconds per run (default 15, --quick 5)")
    p.add_argument("--latency-seconds", type=float, help="latency seconds per rep (default 30, --quick 10)")
    p.add_argument("--rate", type=float, default=1000.0, help="latency: row changes/s (default 1000)")
    p.add_argument("--writers", type=int, default=8, help="latency: writer connections (default 8)")
    p.add_argument(
        "--bulk-rows", type=int, default=200_000, help="designs, londiste: rows per bulk statement (default 200k)"
    )
    p.add_argument("--big-every", type=int, default=1000, help="catch-up: every Nth message has a 100 kB body")
    p.add_argument(
        "--loop-transactions", type=int, default=3000, help="triggercpu: transactions per timed loop (default 3000)"
    )
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument(
        "--mode",
        choices=("durable", "fast"),
        default="durable",
        help="server settings: durable = PostgreSQL defaults (fsync, synchronous_commit, "
        "full_page_writes on; default), fast = all three off",
    )
    p.add_argument(
        "--no-fast-profile",
        action="store_true",
        help="run the trigger profile in --mode only, not also with fsync etc. off",
    )
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument(
        "--code",
        metavar="GIT_REF",
        help="measure this commit (exported with git archive: migrations, trigger, daemon) instead of "
        "the work tree, e.g. --code HEAD; bench/ itself always comes from the work tree",
    )
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


def _writecost(w: World, args: argparse.Namespace, seconds: int, workdir: Path, res: dict[str, Any]) -> None:
    wanted = writecost.MAIN + (writecost.PROFILE if "profile" in args.only else ())
    usable, skipped = writecost.prepare(w.site, wanted)
    profile = [v for v in writecost.PROFILE if v in usable]
    if skipped:
        res["profile_skipped"] = skipped
        log(f"trigger variants skipped: {skipped}")
    plan: list[tuple[writecost.Variant, int]] = []
    if "writecost" in args.only:
        plan += [(v, c) for c in CLIENTS for v in writecost.MAIN]
    else:
        plan += [(v, PROFILE_CLIENTS) for v in writecost.MAIN]
    plan += [(v, PROFILE_CLIENTS) for v in profile]
    log(f"pgbench ({w.mode}): {len(plan)} runs x {args.reps} reps x {seconds} s")
    runs = writecost.run_matrix(w, plan, args.reps, seconds, workdir, log)
    summary = writecost.summarize(runs)
    if "writecost" in args.only:
        res["writecost"] = {
            "mode": w.mode,
            "seconds": seconds,
            "reps": args.reps,
            "clients": list(CLIENTS),
            "runs": runs,
            "summary": summary,
        }
    if "profile" in args.only:
        res.setdefault("profile", {})[w.mode] = _profile_entry(runs, summary, seconds, args.reps)
        if not args.no_fast_profile:
            other, settings = ("fast", FAST) if w.mode == "durable" else ("durable", DURABLE)
            order = (writecost.NONE, writecost.DBSYNC, writecost.DBSYNC_LIVE, *profile, writecost.NAIVE)
            log(f"pgbench trigger profile ({other}): {len(order)} runs x {args.reps} reps x {seconds} s")
            w.site.set_mode(settings)
            try:
                fruns = writecost.run_matrix(w, [(v, PROFILE_CLIENTS) for v in order], args.reps, seconds, workdir, log)
            finally:
                w.site.set_mode(DURABLE if w.mode == "durable" else FAST)
            res["profile"][other] = _profile_entry(fruns, writecost.summarize(fruns), seconds, args.reps)


def _londiste(args: argparse.Namespace, seconds: int, events: int, workdir: Path, res: dict[str, Any]) -> None:
    """On its own PostgreSQL 15 pair (Debian's binaries), or a note where Londiste is not installed."""
    reason = londiste.missing()
    if reason:
        log(f"londiste: skipped: {reason}")
        res["londiste"] = f"skipped: {reason}"
        return
    with world(args.mode, londiste.PG15_BINDIR, londiste.PORTS) as w:
        res["londiste"] = londiste.run(
            w, args.reps, seconds, args.bulk_rows, londiste.backlog_rows(events), workdir, log
        )


def _profile_entry(runs: list[dict[str, Any]], summary: dict[str, Any], seconds: int, reps: int) -> dict[str, Any]:
    order = ["none", "dbsync", "dbsync-live", *(v.name for v in writecost.PROFILE), "naive"]
    key = str(PROFILE_CLIENTS)
    return {
        "clients": PROFILE_CLIENTS,
        "seconds": seconds,
        "reps": reps,
        "summary": {n: {key: summary[n][key]} for n in order if key in summary.get(n, {})},
        "runs": [r for r in runs if r["clients"] == PROFILE_CLIENTS],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.code and not os.environ.get(code.DIR_ENV):
        code.reexec(args.code, sys.argv[1:] if argv is None else argv)  # does not return
    prof = PROFILES["quick" if args.quick else "full"]
    seconds = args.seconds or prof.seconds
    events = args.events or prof.events
    lat_s = args.latency_seconds or prof.latency_s

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: clusters are destroyed

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_path = BENCH_DIR / "results" / f"{stamp}.json"
    workdir = Path(tempfile.mkdtemp(prefix="dbsync-bench-"))
    res: dict[str, Any] = {
        "meta": {
            "command": "python -m bench.run" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:])),
            "profile": "quick" if args.quick else "full",
            "started_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_facts(),
            "code": code.measured_code(),
            "server_settings": f"{args.mode}: "
            + ", ".join(f"{k}={v}" for k, v in (DURABLE if args.mode == "durable" else FAST).items())
            + "; max_wal_size=8GB, checkpoint_timeout=30min, CHECKPOINT before each timed phase; "
            "the rest as LocalCluster sets it (shared_buffers=128MB)",
            "reps": args.reps,
        },
        "labels": writecost.labels(),
        "errors": {},
    }
    failed = False

    def section(name: str, body: Callable[[], None]) -> None:
        nonlocal failed
        t = time.monotonic()
        log(f"== {name}")
        try:
            body()
        except Exception as exc:  # noqa: BLE001 - recorded, and the other sections still run
            failed = True
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"{name} FAILED: {exc}\n{traceback.format_exc()}")
        res["meta"].setdefault("section_s", {})[name] = round(time.monotonic() - t, 1)
        _save(out_path, res)

    log(f"results: {out_path}; logs: {workdir}")
    interrupted = False
    try:
        if set(args.only) - {"londiste"}:
            with world(args.mode) as w:
                res["meta"]["postgres_version"] = w.site.version().split(" on ")[0]
                if {"writecost", "profile"} & set(args.only):
                    section("writecost", lambda: _writecost(w, args, seconds, workdir, res))
                if "triggercpu" in args.only:
                    section(
                        "triggercpu",
                        lambda: res.__setitem__(
                            "triggercpu", triggercpu.run(w, args.loop_transactions, 2 * args.reps + 1, log)
                        ),
                    )
                if "designs" in args.only:
                    section(
                        "designs",
                        lambda: res.__setitem__(
                            "designs", designs.run(w, args.loop_transactions, args.bulk_rows, 2 * args.reps + 1, log)
                        ),
                    )
                if "latency" in args.only:
                    section(
                        "latency",
                        lambda: res.__setitem__(
                            "latency",
                            latency.run(w, args.rate, lat_s, prof.warmup_s, args.reps, args.writers, workdir, log),
                        ),
                    )
                if "catchup" in args.only:
                    section(
                        "catchup",
                        lambda: res.__setitem__(
                            "catchup", catchup.run(w, events, args.big_every, args.reps, workdir, log)
                        ),
                    )
                if "catchup-bulk" in args.only:
                    section(
                        "catchup-bulk",
                        lambda: res.__setitem__(
                            "catchup_bulk", catchup.run(w, events, args.big_every, args.reps, workdir, log, "bulk")
                        ),
                    )
        if "londiste" in args.only:
            section("londiste", lambda: _londiste(args, seconds, events, workdir, res))
    finally:
        res["meta"]["duration_s"] = round(time.monotonic() - started, 1)
        res["meta"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        _save(out_path, res)
        if not args.no_docs and not interrupted:
            report.update_doc(report.render(res))
            log(f"updated {report.DOC}")
        code.cleanup()
        if failed:
            log(f"daemon logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    log(f"done in {res['meta']['duration_s'] / 60:.1f} min; {out_path}")
    return 1 if failed else 0


def _save(path: Path, res: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
