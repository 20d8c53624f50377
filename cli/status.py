"""`dbsync status`: how far behind the Agent DB is."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from dbsync.cli.options import connection_options, consumer_timeout_option, json_option
from dbsync.config import load_settings
from dbsync.db import connect
from dbsync.status import Status, read_status, write_back_installed


@click.command()
@connection_options
@json_option
@click.option("--source", default=None, help="Consumer name on the Agent DB (default: site).")
@click.option("--lag-threshold", type=float, default=None, help="Seconds of lag that count as unhealthy (default 5).")
@consumer_timeout_option
@click.option(
    "--watch",
    metavar="[SECONDS]",
    type=click.FloatRange(min=0, min_open=True),
    is_flag=False,
    flag_value=2.0,
    default=None,
    help="Redraw every SECONDS (default 2) until Ctrl-C, for every source unless --source is given.",
)
def status(
    config_file: str | None,
    site_dsn: str | None,
    agent_dsn: str | None,
    as_json: bool,
    source: str | None,
    lag_threshold: float | None,
    consumer_timeout: float | None,
    watch: float | None,
) -> None:
    """Show the high-water mark, the newest log sequence and the lag.

    Exits 1 when unhealthy (no active daemon, lag over the threshold, parked events, a failing
    apply), so monitoring scripts can use it. Where `dbsync migrate --two-way` installed
    write-back, the Agent -> Site direction is shown too (JSON: "write_back") and counts. With
    --watch it shows lag, apply rate, active daemon and parked events live, and exits 0 on Ctrl-C.
    """
    settings = load_settings(
        config_file,
        site_dsn=site_dsn,
        agent_dsn=agent_dsn,
        source=source,
        lag_threshold=lag_threshold,
        consumer_timeout=consumer_timeout,
    )
    settings.require("site_dsn", "agent_dsn")
    assert settings.site_dsn and settings.agent_dsn
    if watch is not None:
        if as_json:
            raise click.UsageError("--json and --watch cannot be combined")
        from dbsync.cli.watch import Watch

        Watch(settings, watch, source, tty=sys.stdout.isatty()).run()
        return
    with connect(settings.site_dsn, "Site") as site, connect(settings.agent_dsn, "Agent") as agent:
        st = read_status(site, agent, settings.source, settings.lag_threshold, settings.consumer_timeout)
        back = None
        if write_back_installed(site, agent):  # the Agent DB captures, the Site DB applies
            back = read_status(
                agent, site, settings.write_back_source, settings.lag_threshold, settings.consumer_timeout
            )
    healthy = st.healthy and (back is None or back.healthy)
    if as_json:
        out = st.as_dict()
        out["write_back"] = None if back is None else back.as_dict()
        if back is not None:  # the document's health is both directions' (each has its own too)
            out["healthy"] = healthy
            out["problems"] = [*st.problems, *(f"write-back: {p}" for p in back.problems)]
        click.echo(json.dumps(out, indent=2))
        if not healthy:
            raise SystemExit(1)
        return
    _show(st)
    if back is not None:
        click.echo("")
        click.echo("write-back (Agent DB -> Site DB):")
        _show(back)
    if not healthy:
        raise SystemExit(1)


def _show(st: Status) -> None:
    rows = [
        ("source", st.source),
        ("high-water mark", st.high_water_mark),
        ("newest log seq", st.newest_seq),
        ("events behind", st.events_behind),
        ("seconds behind", f"{st.seconds_behind:.3f}"),
        ("events applied", st.events_applied),
        ("last progress", st.progress_updated_at.isoformat() if st.progress_updated_at else "never"),
        ("active daemon", st.active_daemon or "none"),
        ("parked events", st.parked_events),
        ("tables", ", ".join(st.tables) or "none"),
    ]
    if st.verify is not None:
        if st.verify["verified_seq"] is None or st.verify["last_pass_started_at"] or st.verify["pass_started_at"]:
            rows.append(("full verify", _verify_line(st.verify)))
        if st.verify["verified_seq"] is not None:
            rows.append(("verified up to", f"seq {st.verify['verified_seq']} (incremental verification)"))
        rows.append(("verify mismatches", st.verify_mismatches))
    rows.append(("health", "ok" if st.healthy else "UNHEALTHY: " + "; ".join(st.problems)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    # Consumers after the table: a consumer's name is as long as its Agent DB's makes it.
    for c in st.consumers:
        state = "STALE" if c["stale"] else "ok"
        click.echo(
            f"consumer {c['name']}  {c['events_behind']} events, {c['seconds_behind']:.1f} s behind; "
            f"seen {c['seconds_since_seen']:.0f} s ago; {state}" + ("; missed history" if c["missed_history"] else "")
        )
    if st.verify is not None:
        for item in st.verify["mismatched_keys"]:
            click.echo(f"  {item['table']}  {item['kind']:<7}  {json.dumps(item['key'])}")
        if st.verify_mismatches > len(st.verify["mismatched_keys"]):
            click.echo(f"  ... and {st.verify_mismatches - len(st.verify['mismatched_keys'])} more")


def _verify_line(verify: dict[str, Any]) -> str:
    done = verify["last_pass_finished_at"]
    line = f"last pass finished {done}" if done else "no pass finished yet"
    if verify["pass_started_at"]:
        where = f" at {verify['pass_table']}" if verify["pass_table"] else ""
        line += f"; a pass is running{where} ({verify['pass_rows_checked']} rows compared)"
    return line
