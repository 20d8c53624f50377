"""Pictures of a benchmark run, for docs/benchmarks.md: `python -m bench.charts [RESULTS.json]`.

Draws what readers would rather look at than read, from the JSON a run of bench.run (and of its
`designs` section) wrote: commit-to-visible latency dbsync vs native, catch-up throughput per
workload, and what capture costs the Site by concurrent clients and by statement size. Only
the sections the file holds are drawn. matplotlib is a bench-only dependency (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.env import REPO
from bench.stats import median

OUT = REPO / "docs" / "img"
RESULTS = REPO / "bench" / "results"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("bench.charts needs matplotlib: pip install -e '.[bench]'")
    return plt


def latency(plt: Any, res: dict[str, Any], out: Path) -> Path:
    """Percentiles of commit -> visible, per side, median over reps (log scale: native is ~10x lower)."""
    runs = res["latency"]["runs"]
    marks = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
    sides = sorted({r["side"] for r in runs})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        values = [median([r[m] for r in runs if r["side"] == side]) for m in marks]
        ax.bar([x + i * width for x in range(len(marks))], values, width, label=side)
    ax.set_xticks([x + width * (len(sides) - 1) / 2 for x in range(len(marks))], [m[:-3] for m in marks])
    ax.set_yscale("log")
    ax.set_ylabel("commit -> visible on the Agent (ms)")
    ax.set_title(f"Latency at {res['latency']['rate']:.0f} changes/s, {res['latency']['connections']} writers")
    ax.legend()
    return _save(plt, fig, out / "latency.png")


def catchup(plt: Any, res: dict[str, Any], out: Path) -> Path:
    """Events per second draining a backlog, every rep as a point and the median as a bar."""
    c = res["catchup"]
    workloads = {"WhatsApp small transactions": c["runs"]}
    for name, section in (c.get("workloads") or {}).items():
        workloads[name] = section["runs"]
    sides = ("native", "dbsync")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for w, runs in enumerate(workloads.values()):
        for i, side in enumerate(sides):
            rates = [r["events_per_s"] / 1000 for r in runs if r["side"] == side]
            x = w * 3 + i
            ax.bar(x, median(rates), 0.8, color=f"C{i}", label=side if w == 0 else None)
            ax.plot([x] * len(rates), rates, "k.", ms=4)
    ax.set_xticks([w * 3 + 0.5 for w in range(len(workloads))], list(workloads))
    ax.set_ylabel("thousand events/s")
    ax.set_title(f"Catch-up of a {c['events']:,}-event backlog")
    ax.legend()
    return _save(plt, fig, out / "catchup.png")


def write_cost(plt: Any, res: dict[str, Any], out: Path) -> Path:
    """Site throughput with capture relative to without, by pgbench clients."""
    summary = res["writecost"]["summary"]
    labels = res.get("labels", {})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for variant, by_clients in summary.items():
        clients = sorted(by_clients, key=int)
        ax.plot(
            [int(c) for c in clients],
            [by_clients[c]["ratio_median"] for c in clients],
            "o-",
            label=labels.get(variant, variant),
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({int(c) for by in summary.values() for c in by}))
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("pgbench clients (WhatsApp transaction: insert + status update)")
    ax.set_ylabel("throughput vs no capture")
    ax.set_ylim(0, 1.1)
    ax.set_title("What capture costs the Site DB, by clients")
    ax.legend(fontsize=7)
    return _save(plt, fig, out / "writecost.png")


def statement_size(plt: Any, res: dict[str, Any], out: Path) -> Path:
    """Throughput vs no capture for one-row transactions and for 200k-row statements, per design."""
    d = res["designs"]
    kinds = [
        ("one-row txn loop", None),
        *((f"{op} {d['rows'] // 1000}k rows", op) for op in ("insert", "update", "delete")),
    ]
    designs = [n for n in d["labels"] if n != "none"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(designs)
    for i, name in enumerate(designs):
        values = [d["loop_ratio"][name] if op is None else d["bulk_ratio"][name][op] for _, op in kinds]
        ax.bar([x + i * width for x in range(len(kinds))], values, width, label=d["labels"][name])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([x + width * (len(designs) - 1) / 2 for x in range(len(kinds))], [k for k, _ in kinds])
    ax.set_ylabel("throughput vs no capture")
    ax.set_ylim(0, 1.45)
    ax.set_title("What capture costs the Site DB, by statement size")
    ax.legend(fontsize=7, loc="upper left")
    return _save(plt, fig, out / "statement_size.png")


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.charts", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", type=Path, help="results JSON files (default: the newest one per section)")
    p.add_argument("--out", type=Path, default=OUT, help=f"directory for the PNGs (default {OUT})")
    args = p.parse_args(argv)
    files = args.results or sorted(RESULTS.glob("2*.json"), reverse=True)
    plt = _pyplot()
    drawn: dict[str, Path] = {}
    for f in files:
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            sys.exit(f"cannot read {f}: {exc}")
        for section, draw in (
            ("latency", latency),
            ("catchup", catchup),
            ("writecost", write_cost),
            ("designs", statement_size),
        ):
            if section not in drawn and section in res:
                drawn[section] = draw(plt, res, args.out)
                print(
                    f"{drawn[section].relative_to(REPO) if drawn[section].is_relative_to(REPO) else drawn[section]}"
                    f" <- {f.name} ({section})"
                )
    if not drawn:
        sys.exit("no results with a latency, catchup, writecost or designs section")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
