"""`dbsync backfill`: copy the rows a Site table already holds, consistently with live changes."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import psycopg

from dbsync import tables as registry
from dbsync.backfill import BackfillError, BackfillProgress, backfill
from dbsync.cli.options import connection_options, direction, origin_option
from dbsync.config import load_settings
from dbsync.db import connect, first_line
from dbsync.errors import SchemaError
from dbsync.rls import from_error, is_rls_error


def chunk_options(func: Callable[..., None]) -> Callable[..., None]:
    func = click.option(
        "--chunk-size",
        type=click.IntRange(min=1),
        default=5000,
        show_default=True,
        help="Backfill: rows per transaction.",
    )(func)
    func = click.option("--restart", is_flag=True, help="Backfill: start over instead of resuming.")(func)
    func = click.option(
        "--max-chunks",
        type=click.IntRange(min=1),
        default=None,
        help="Backfill: stop after this many chunks (the next run resumes).",
    )(func)
    return func


@click.command("backfill")
@connection_options
@chunk_options
@origin_option("Whose rows: agent copies write-back tables' Agent rows to the Site DB.")
@click.argument("names", nargs=-1, required=True)
def backfill_cmd(
    config_file: str | None,
    site_dsn: str | None,
    agent_dsn: str | None,
    chunk_size: int,
    restart: bool,
    max_chunks: int | None,
    origin: str,
    names: tuple[str, ...],
) -> None:
    """Copy the existing rows of the replicated tables NAMES to the Agent DB.

    The rows go through the sync log in key order, a chunk per transaction, and the running daemon
    applies them in order with live changes. An interrupted backfill resumes where it stopped.
    With --from agent, the Agent DB's rows of the write-back tables NAMES go to the Site DB.
    """
    loaded = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn)
    settings, source, _ = direction(loaded.require("site_dsn" if origin == "site" else "agent_dsn"), origin)
    assert settings.site_dsn
    with connect(settings.site_dsn, source) as db:
        if origin == "agent" and not registry.captures(db):
            raise SchemaError("the Agent DB does not capture changes: run `dbsync migrate --two-way` first")
        for name in names:
            run_backfill(db, name, chunk_size=chunk_size, restart=restart, max_chunks=max_chunks, where=source)


def run_backfill(
    site: psycopg.Connection,
    name: str,
    *,
    chunk_size: int,
    restart: bool,
    max_chunks: int | None,
    where: str = "Site",
) -> BackfillProgress:
    """One table, with progress on stderr (a bar on a terminal, a line a second otherwise); `where`
    names the database `site` is (the Agent DB for write-back tables)."""
    report = _Reporter()
    try:
        done = backfill(
            site, name, chunk_size=chunk_size, restart=restart, max_chunks=max_chunks, on_chunk=report, where=where
        )
    except psycopg.Error as exc:
        if is_rls_error(exc):
            raise from_error(exc, where) from None
        raise BackfillError(f"backfill of {name} failed: {first_line(exc)}") from None
    finally:
        report.close()
    if done.chunks == 0 and done.finished:
        click.echo(f"{done.table}: backfill already complete ({done.rows_done} rows); --restart copies it again")
    elif done.finished:
        click.echo(f"{done.table}: backfill complete: {done.rows_done} rows queued in the sync log for the daemon")
    else:
        resume = shlex.join(["dbsync", "backfill", *(["--from", "agent"] if where == "Agent" else []), done.table])
        click.echo(f"{done.table}: backfill paused after {done.rows_done} rows; run `{resume}` to resume")
    return done


class _Reporter:
    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.bar: Any = None  # click.progressbar, entered on the first chunk
        self.shown = 0
        self.last_line = 0.0

    def __call__(self, p: BackfillProgress) -> None:
        if self.tty:
            if self.bar is None:
                self.bar = click.progressbar(length=max(p.estimate, p.rows_done, 1), label=p.table, file=sys.stderr)
                self.bar.__enter__()
            self.bar.length = max(self.bar.length or 0, p.rows_done)
            self.bar.update(p.rows_done - self.shown)
            self.shown = p.rows_done
        elif p.finished or time.monotonic() - self.last_line >= 1.0:
            total = f" of ~{p.estimate}" if p.estimate else ""
            click.echo(f"{p.table}: {p.rows_done}{total} rows copied", err=True)
            self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
