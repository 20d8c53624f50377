"""`dbsync reconcile`: prove the Agent DB equals the Site DB, and repair it through the sync log."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click
import psycopg

from dbsync.catchup import CatchUp
from dbsync.cli.options import connection_options, direction, json_option, origin_option
from dbsync.config import Settings, load_settings
from dbsync.db import connect, first_line
from dbsync.errors import SchemaError
from dbsync.logcheck import LogReport, log_check
from dbsync.reconcile import (
    Comparer,
    ReconcileError,
    TableDiff,
    deep_check,
    render_keys,
    targets,
)
from dbsync.repair import Repair, repair
from dbsync.rls import from_error, is_rls_error
from dbsync.status import write_back_installed


@dataclass(frozen=True)
class Options:
    deep: bool
    tables: tuple[str, ...]
    repair: bool
    apply: bool
    wait: float
    max_keys: int
    as_json: bool
    # The names of the databases compared, source first: ("Site", "Agent"), or for write-back
    # ("Agent", "Site").
    where: tuple[str, ...] = ("Site", "Agent")


def _require_write_back(settings: Settings) -> None:
    assert settings.site_dsn and settings.agent_dsn
    with connect(settings.site_dsn, "Site") as site, connect(settings.agent_dsn, "Agent") as agent:
        if not write_back_installed(site, agent):
            raise SchemaError("no write-back is installed: run `dbsync migrate --two-way` first")


@click.command()
@connection_options
@json_option
@click.option("--deep", is_flag=True, help="Compare the rows themselves (hashes computed in each database).")
@click.option(
    "--table",
    "tables",
    multiple=True,
    help="Only this table (repeatable; implies --deep; default: every replicated table).",
)
@click.option(
    "--repair", "do_repair", is_flag=True, help="Fix the rows that differ, through the sync log (implies --deep)."
)
@click.option(
    "--apply",
    "do_apply",
    is_flag=True,
    help="When no daemon is running, apply pending events in this process instead of failing.",
)
@click.option(
    "--wait",
    "wait_seconds",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait for the daemon to apply what a comparison depends on.",
)
@click.option(
    "--max-keys",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Keys listed per table and kind of difference.",
)
@click.option(
    "--source", default=None, help="The direction's source name (default: site, or with --from agent: agent)."
)
@click.option(
    "--lag-threshold", type=float, default=None, help="Log check: seconds of lag that count as behind (default 5)."
)
@origin_option("Which direction: agent checks (and repairs) the write-back tables' Site rows against the Agent's.")
def reconcile(
    config_file: str | None,
    site_dsn: str | None,
    agent_dsn: str | None,
    as_json: bool,
    deep: bool,
    tables: tuple[str, ...],
    do_repair: bool,
    do_apply: bool,
    wait_seconds: float,
    max_keys: int,
    source: str | None,
    lag_threshold: float | None,
    origin: str,
) -> None:
    """Check that the Agent DB matches the Site DB.

    Without --deep, a fast check of the sync log: how far the daemon is behind, parked events,
    transactions holding events back. With --deep, every row is compared; changes in flight are
    rechecked once applied, so only real differences are reported. --repair writes the current
    Site rows (or deletes) for the differing keys into the sync log, waits for the daemon to
    apply them and checks again.

    With --from agent the write-back direction is checked: the Agent DB is the source, the Site
    DB the copy ("missing" rows are missing on the Site DB), and --repair logs on the Agent DB.

    Exit status: 0 in sync, 1 differences found (and not repaired), 2 error.
    """
    named = {"write_back_source" if origin == "agent" else "source": source}
    loaded = load_settings(
        config_file, site_dsn=site_dsn, agent_dsn=agent_dsn, lag_threshold=lag_threshold, **named
    ).require("site_dsn", "agent_dsn")
    settings, *where = direction(loaded, origin)
    opts = Options(
        deep or do_repair or bool(tables), tables, do_repair, do_apply, wait_seconds, max_keys, as_json, (*where,)
    )
    try:
        if origin == "agent":
            _require_write_back(loaded)
        if opts.deep:
            _deep(settings, opts)
        else:
            _log(settings, opts)
    except psycopg.Error as exc:
        if is_rls_error(exc):
            raise from_error(exc, None) from None
        # Never let a failure look like exit 1 ("differences found"), or worse, like success.
        raise ReconcileError(f"reconcile failed: {first_line(exc)}") from None


def _log(settings: Settings, opts: Options) -> None:
    assert settings.site_dsn and settings.agent_dsn
    source_db, target_db = opts.where
    with connect(settings.site_dsn, source_db) as site, connect(settings.agent_dsn, target_db) as agent:
        report = log_check(site, agent, settings.source, settings.lag_threshold)
    if opts.as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_log(report)
    if not report.in_sync:
        raise SystemExit(1)


def _print_log(report: LogReport) -> None:
    st = report.status
    oldest = f" (oldest {st.seconds_behind:.3f} s)" if st.events_behind else ""
    writers = f"{report.open_writers}"
    if report.open_writers and report.oldest_open_writer_seconds is not None:
        writers += f" (oldest open {report.oldest_open_writer_seconds:.1f} s)"
    rows = [
        ("source", st.source),
        ("high-water mark", st.high_water_mark),
        ("newest log seq", st.newest_seq),
        ("events behind", f"{st.events_behind}{oldest}"),
        ("open writers", writers),
        ("parked events", st.parked_events),
        ("active daemon", st.active_daemon or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    if report.tables:
        name_w = max(len("table"), *(len(t.table) for t in report.tables))
        click.echo(f"\n{'table':<{name_w}}  {'pending':>8}  {'oldest s':>8}  {'parked':>6}")
        for t in report.tables:
            age = f"{t.oldest_pending_seconds:.3f}" if t.oldest_pending_seconds is not None else "-"
            click.echo(f"{t.table:<{name_w}}  {t.pending_events:>8}  {age:>8}  {t.parked_events:>6}")
    click.echo("\n" + ("in sync (log check)" if report.in_sync else "NOT in sync: " + "; ".join(report.problems)))


def _deep(settings: Settings, opts: Options) -> None:
    assert settings.site_dsn and settings.agent_dsn
    results: list[tuple[TableDiff, Repair | None]] = []
    source_db, target_db = opts.where
    with connect(settings.site_dsn, source_db) as site, connect(settings.agent_dsn, target_db) as agent:
        chosen = targets(site, agent, opts.tables, (source_db, target_db))
        comparer = Comparer(site, agent)
        catchup = CatchUp(site, agent, settings, timeout=opts.wait, apply=opts.apply)
        try:
            with _progress(len(chosen)) as step:
                for target in chosen:
                    step(target.label)
                    diff = deep_check(comparer, catchup, target)
                    fixed = repair(comparer, catchup, target, diff) if opts.repair and diff.differs else None
                    results.append((diff, fixed))
        finally:
            comparer.close()
    differs = any((fixed.after if fixed else diff).differs for diff, fixed in results)
    if opts.as_json:
        click.echo(json.dumps(_as_json(results, opts.max_keys, not differs, opts.where), indent=2))
    else:
        _print_deep(results, opts.max_keys, not differs, opts.where)
    if differs:
        raise SystemExit(1)


@contextmanager
def _progress(total: int) -> Iterator[Any]:
    """A bar on stderr when it is a terminal; otherwise nothing."""
    if not sys.stderr.isatty() or total < 1:
        yield lambda label: None
        return
    with click.progressbar(length=total, label="comparing", file=sys.stderr, show_pos=True) as bar:
        first = True

        def step(label: str) -> None:
            nonlocal first
            bar.label = label
            if not first:
                bar.update(1)
            first = False

        yield step
        bar.update(1)


def _kinds(diff: TableDiff) -> list[tuple[str, list[str]]]:
    return [("missing", diff.missing), ("extra", diff.extra), ("changed", diff.changed), ("unsettled", diff.unsettled)]


def _table_json(diff: TableDiff, max_keys: int, where: tuple[str, ...]) -> dict[str, Any]:
    # Each count under its database's name: with --from agent the source is the Agent DB.
    out: dict[str, Any] = {f"{where[0].lower()}_rows": diff.site_rows, f"{where[1].lower()}_rows": diff.agent_rows}
    for kind, keys in _kinds(diff):
        out[kind] = len(keys)
        out[f"{kind}_keys"] = render_keys(keys, max_keys)
    return out


def _as_json(
    results: Sequence[tuple[TableDiff, Repair | None]], max_keys: int, in_sync: bool, where: tuple[str, ...]
) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for diff, fixed in results:
        entry = _table_json(diff, max_keys, where)
        entry["in_sync"] = not diff.differs
        if fixed is not None:
            entry["repair"] = {
                "upserts_logged": fixed.updated,
                "deletes_logged": fixed.deleted,
                "after": _table_json(fixed.after, max_keys, where),
            }
            entry["in_sync"] = not fixed.after.differs
        tables[diff.table] = entry
    return {"in_sync": in_sync, "tables": tables}


def _print_deep(
    results: Sequence[tuple[TableDiff, Repair | None]], max_keys: int, in_sync: bool, where: tuple[str, ...]
) -> None:
    for diff, fixed in results:
        if not diff.differs:
            click.echo(f"{diff.table}: in sync ({diff.site_rows} rows)")
            continue
        counts = ", ".join(f"{len(keys)} {kind}" for kind, keys in _kinds(diff) if keys)
        click.echo(f"{diff.table}: {counts} ({where[0]} {diff.site_rows} rows, {where[1]} {diff.agent_rows} rows)")
        for kind, keys in _kinds(diff):
            for key in keys[:max_keys]:
                click.echo(f"  {kind:<9} {key}")
            if len(keys) > max_keys:
                click.echo(f"  {kind:<9} ... and {len(keys) - max_keys} more")
        if fixed is not None:
            left = len(fixed.after.keys())
            result = "all fixed" if not left else f"{left} row(s) still differ"
            click.echo(f"  repair: logged {fixed.updated} upsert(s) and {fixed.deleted} delete(s); {result}")
    click.echo("in sync" if in_sync else "NOT in sync")
