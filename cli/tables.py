"""`dbsync tables add|alter|remove|list`: choose what is replicated."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from typing import Any, TypeVar

import click
import psycopg

from dbsync import rls
from dbsync import tables as registry
from dbsync.backfill import BackfillError
from dbsync.cli.backfill import chunk_options, run_backfill
from dbsync.cli.options import connection_options, json_option, origin_option
from dbsync.config import load_settings
from dbsync.db import connect, first_line
from dbsync.errors import DbsyncError, SchemaError
from dbsync.protocol import ReplicatedTable

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
def tables() -> None:
    """Install or remove capture on Site DB tables."""


def _column_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names:
        raise click.BadParameter("name at least one column", ctx=ctx, param=param)
    return names


COLUMNS_HELP = (
    "Replicate only these columns (comma-separated; the key columns must be among them). "
    "The others never leave the Site DB."
)
WHERE_HELP = (
    "Replicate only the rows matching this SQL boolean expression over the table's columns "
    "(immutable, built-in functions and operators only)."
)


@tables.command("add")
@connection_options
@click.option("--columns", "listed", callback=_column_list, metavar="A,B,C", help=COLUMNS_HELP)
@click.option("--where", "where", metavar="PREDICATE", help=WHERE_HELP)
@click.option(
    "--backfill",
    "do_backfill",
    is_flag=True,
    help="Also copy the rows the tables already hold (see `dbsync backfill`).",
)
@click.option(
    "--identity",
    "identity",
    metavar="INDEX",
    help="For a table without a primary key: the unique index on NOT NULL columns whose columns are its key.",
)
@click.option(
    "--insert-only",
    "insert_only",
    is_flag=True,
    help="For append-only tables without a key: replicate inserts; the Site refuses UPDATE, DELETE and TRUNCATE.",
)
@origin_option(
    "Which side's changes to capture: agent registers the tables for write-back (Agent -> Site), "
    "which `dbsync migrate --two-way` installs."
)
@click.option(
    "--conflict",
    type=click.Choice(registry.CONFLICT_POLICIES),
    help="With --from agent: who wins when both sides changed a row (default site-wins). Stored with the "
    "table, NOT enforced yet: a row changed on both sides before either change arrived can end up different "
    "on the two sides (`dbsync reconcile` finds it).",
)
@click.option(
    "--agent-owns",
    "agent_owns",
    callback=_column_list,
    metavar="A,B",
    help="With --from agent: the columns whose Agent values win (not key columns). Stored; not enforced yet.",
)
@chunk_options
@click.argument("names", nargs=-1, required=True)
def add(
    config_file: str | None,
    site_dsn: str | None,
    agent_dsn: str | None,
    listed: tuple[str, ...] | None,
    where: str | None,
    do_backfill: bool,
    identity: str | None,
    insert_only: bool,
    origin: str,
    conflict: str | None,
    agent_owns: tuple[str, ...] | None,
    chunk_size: int,
    restart: bool,
    max_chunks: int | None,
    names: tuple[str, ...],
) -> None:
    """Replicate the tables NAMES (each must exist on the Agent DB, and have a primary key unless
    --identity or --insert-only says how to replicate it).

    Every table is checked first; if any cannot be replicated, none is added. With --insert-only
    --backfill, the rows already there are logged in the same Site transaction that installs the
    capture (exactly once: there is no key to tell a copied row from a new one).

    With --from agent the Agent DB's changes to NAMES are captured instead, for the Agent -> Site
    direction that `dbsync run` then also replicates (`dbsync migrate --two-way` first)."""
    settings = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn).require("site_dsn", "agent_dsn")
    assert settings.site_dsn and settings.agent_dsn
    selection = registry.Selection(listed, where)
    policy = None
    if origin == "agent":
        policy = registry.Policy(conflict or "site-wins", agent_owns or ())
    elif conflict is not None or agent_owns is not None:
        raise click.UsageError("--conflict and --agent-owns are for write-back tables: add --from agent")
    with connect(settings.site_dsn, "Site") as site, connect(settings.agent_dsn, "Agent") as agent:
        if origin == "agent":
            if not registry.captures(agent):
                raise SchemaError("the Agent DB does not capture changes yet: run `dbsync migrate --two-way` first")
            site, agent = agent, site  # the Agent's changes are captured, the Site applies them
        infos = registry.add(
            site,
            agent,
            names,
            selection,
            identity=identity,
            insert_only=insert_only,
            copy_appends=do_backfill,
            policy=policy,
        )  # all or none
        chosen = registry.selections(site)
        for info in infos:
            what = describe(info) if policy is None else f"from agent, {describe(info)}, {_policy(policy)}"
            click.echo(f"replicating {info.label} ({what}){_described(chosen.get(info.table_id))}")
            if info.copied is not None:
                click.echo(f"{info.label}: backfill complete: {info.copied} rows")
            try:  # capture works regardless; the copy and repair would refuse
                rls.require_definer_reads_all(site, [(info.schema, info.name)], "backfill and repair")
            except rls.RowSecurityError as exc:
                click.echo(f"warning: {exc}", err=True)
        if do_backfill and not insert_only:
            backfill_all(
                site, [info.label for info in infos], chunk_size=chunk_size, restart=restart, max_chunks=max_chunks
            )


def describe(info: ReplicatedTable) -> str:
    """How a table is replicated, for `tables add` and `tables list`."""
    if info.insert_only:
        return "insert-only"
    if info.identity:
        return f"identity: {info.identity}, key: {', '.join(info.keys)}"
    return f"key: {', '.join(info.keys)}"


class BackfillStopped(BackfillError):
    """The tables are added, and a copy stopped before the end."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def backfill_all(
    site: psycopg.Connection, labels: list[str], *, chunk_size: int, restart: bool, max_chunks: int | None
) -> None:
    """Copy the tables' rows, one after the other, once capture is on for all of them (so no change
    falls in between). A copy that stops leaves the tables added: the error says which rows are
    queued, which are not, and the command that copies the rest."""
    finished: list[str] = []
    for at, label in enumerate(labels):
        try:
            done = run_backfill(site, label, chunk_size=chunk_size, restart=restart, max_chunks=max_chunks)
        except KeyboardInterrupt:
            raise BackfillStopped(_stopped(labels, finished, at, "was interrupted"), exit_code=130) from None
        except (DbsyncError, psycopg.Error) as exc:
            reason = (
                first_line(exc).removeprefix(f"backfill of {label} failed: ").removeprefix(f"backfill of {label}: ")
            )
            raise BackfillStopped(_stopped(labels, finished, at, f"failed: {reason}")) from None
        if done.finished:
            finished.append(label)


def _stopped(labels: list[str], finished: list[str], at: int, what: str) -> str:
    pending = [label for label in labels[:at] if label not in finished] + labels[at:]
    copied = f"the existing rows of {', '.join(finished)} are queued; those of" if finished else "the existing rows of"
    command = " ".join(["dbsync", "backfill", *map(shlex.quote, pending)])
    return (
        f"backfill of {labels[at]} {what}. The tables are added: capture is installed on {', '.join(labels)}, "
        f"so their changes reach the Agent DB from now on; {copied} {', '.join(pending)} are not yet: "
        f"run `{command}` with the same settings to copy them (it resumes where it stopped)"
    )


def _policy(policy: registry.Policy) -> str:
    owns = f", agent owns: {', '.join(policy.agent_owns)}" if policy.agent_owns else ""
    return f"conflict: {policy.conflict}{owns} (stored, not enforced yet)"


def _described(selection: registry.Selection | None) -> str:
    if selection is None:
        return ""
    parts = []
    if selection.columns is not None:
        parts.append(f"columns: {', '.join(selection.columns)}")
    if selection.where is not None:
        parts.append(f"where: {selection.where}")
    return "".join(f"\t{p}" for p in parts)


@tables.command("alter")
@connection_options
@click.option("--columns", "listed", callback=_column_list, metavar="A,B,C", help=COLUMNS_HELP)
@click.option("--all-columns", is_flag=True, help="Replicate every column again.")
@click.option("--where", "where", metavar="PREDICATE", help=WHERE_HELP)
@click.option("--no-where", is_flag=True, help="Replicate every row again.")
@click.option(
    "--chunk-size", type=click.IntRange(min=1), default=5000, show_default=True, help="Resync: rows per transaction."
)
@click.argument("name")
def alter(
    config_file: str | None,
    site_dsn: str | None,
    agent_dsn: str | None,
    listed: tuple[str, ...] | None,
    all_columns: bool,
    where: str | None,
    no_where: bool,
    chunk_size: int,
    name: str,
) -> None:
    """Change which columns and rows of the replicated table NAME are replicated.

    What is not named stays as it is. Then every row of the table is resynced through the sync
    log, so the running daemon deletes on the Agent DB the rows that no longer match, inserts the
    ones that now do and fills newly listed columns. A column taken off the list keeps its last
    replicated values on the Agent DB."""
    settings = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn).require("site_dsn", "agent_dsn")
    assert settings.site_dsn and settings.agent_dsn
    with connect(settings.site_dsn, "Site") as site, connect(settings.agent_dsn, "Agent") as agent:
        done = registry.alter(site, agent, name, listed=listed, all_columns=all_columns, where=where, no_where=no_where)
        click.echo(f"{done.table}: now replicating{_described(done.after) or ' every column and row'}")
        try:
            run_backfill(site, done.table, chunk_size=chunk_size, restart=True, max_chunks=None)
        except (DbsyncError, psycopg.Error) as exc:
            raise BackfillStopped(
                f"{done.table}: the new selection is in force, but resyncing its rows stopped: {first_line(exc)}; "
                f"run `dbsync backfill {shlex.quote(done.table)}` to finish it (it resumes where it stopped)"
            ) from None


@tables.command("remove")
@connection_options
@origin_option("Which side's capture to remove: agent for write-back tables.")
@click.argument("names", nargs=-1, required=True)
def remove(
    config_file: str | None, site_dsn: str | None, agent_dsn: str | None, origin: str, names: tuple[str, ...]
) -> None:
    """Stop capturing the tables NAMES; changes already logged are still applied.

    If any of them is missing or not replicated, none is removed."""
    field = f"{origin}_dsn"
    settings = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn).require(field)
    dsn = getattr(settings, field)
    with connect(dsn, origin.capitalize()) as conn:
        if origin == "agent" and not registry.captures(conn):
            raise SchemaError("the Agent DB does not capture changes: nothing to remove (`dbsync migrate --two-way`)")
        for label in registry.remove(conn, names):  # all or none
            click.echo(f"no longer replicating {label}" + (" from the Agent DB" if origin == "agent" else ""))


@tables.command("list")
@connection_options
@json_option
def list_(config_file: str | None, site_dsn: str | None, agent_dsn: str | None, as_json: bool) -> None:
    """List the replicated tables: Site -> Agent, and Agent -> Site (write-back) when the Agent DB
    is configured and captures."""
    settings = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn).require("site_dsn")
    assert settings.site_dsn
    directions = [("site", settings.site_dsn)]
    if settings.agent_dsn:
        directions.append(("agent", settings.agent_dsn))
    out = []
    lines = []
    for origin, dsn in directions:
        with connect(dsn, origin.capitalize()) as conn:
            if origin == "agent" and not registry.captures(conn):
                continue
            infos = registry.listing(conn)
            chosen = registry.selections(conn)
            policies = registry.policies(conn) if origin == "agent" else {}
        for i in infos:
            selection = chosen.get(i.table_id, registry.EVERYTHING)
            entry = {
                "table": i.label,
                "key": i.keys,
                "table_id": i.table_id,
                "mode": i.mode,
                "identity": i.identity,
                "columns": None if selection.columns is None else list(selection.columns),
                "where": selection.where,
                "from": origin,
            }
            policy = policies.get(i.table_id)
            if policy is not None:
                entry.update(conflict=policy.conflict, agent_owns=list(policy.agent_owns))
            out.append(entry)
            what = describe(i) if policy is None else f"from agent, {describe(i)}, {_policy(policy)}"
            lines.append(f"{i.label}\t{what}{_described(chosen.get(i.table_id))}")
    if as_json:
        click.echo(json.dumps(out))
        return
    for line in lines:
        click.echo(line)


@tables.command("refresh")
@connection_options
@click.argument("names", nargs=-1, required=True)
def refresh(config_file: str | None, site_dsn: str | None, agent_dsn: str | None, names: tuple[str, ...]) -> None:
    """After ATTACH or DETACH PARTITION on the replicated partitioned tables NAMES: install
    capture on new partitions and resync the rows that came or went.

    Exit status: 0 done, 1 a detached partition was dropped before this ran (its rows may still
    be on the Agent DB: the message says which reconcile finds them), 2 error."""
    settings = load_settings(config_file, site_dsn=site_dsn, agent_dsn=agent_dsn).require("site_dsn")
    assert settings.site_dsn
    follow_up = []
    with connect(settings.site_dsn, "Site") as site:
        for name in names:
            changes = registry.refresh(site, name)
            if not changes:
                click.echo(f"{name}: capture matches the partition tree")
            for change in changes:
                if change.change == "dropped":
                    follow_up.append(name)
                    click.echo(f"{name}: {change.member} was detached and dropped; its rows cannot be read any more")
                else:
                    click.echo(f"{name}: {change.member} {change.change}, {change.resynced} row(s) resynced")
    if follow_up:
        tables_args = " ".join(f"--table {n}" for n in dict.fromkeys(follow_up))
        click.echo(f"the Agent DB may still hold their rows: run `dbsync reconcile --repair {tables_args}`", err=True)
        raise SystemExit(1)
