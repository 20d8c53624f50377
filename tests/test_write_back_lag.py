"""The write-back direction's lag (Agent -> Site), measured against the Agent DB's log: in
/metrics as dbsync_write_back_lag_seconds and _events, alerted as its own incident ("write-back
lag", apart from the Site -> Agent "lag"), and in `dbsync status`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dbsync.embedded.cluster import free_port
from tests.helpers import Daemon, DbPair, dbsync_cmd, wait_until
from tests.test_service import Webhook, log_text, metrics, ready, scrape_when, status, webhook

__all__ = ["webhook"]  # the fixture, used by name

LEAD = 4711


def two_way(pair: DbPair) -> None:
    proc = dbsync_cmd("migrate", "--pack", "whatsapp", "--two-way", env=pair.env())
    assert proc.returncode == 0 and "public.leads registered for write-back" in proc.stdout, (proc.stdout, proc.stderr)


def test_write_back_lag_is_measured_alerted_and_shown(
    pair: DbPair, webhook: Callable[..., Webhook], tmp_path: Path
) -> None:
    """A Site DB constraint the Agent DB does not have stops the write-back of one Agent change
    (policy stop): the write-back lag grows past the threshold and alerts once, as "write-back
    lag", while the Site -> Agent direction stays healthy (no "lag" incident); once the
    constraint goes, the change is applied and the incident resolves."""
    two_way(pair)
    hook = webhook()
    port = free_port()
    log = tmp_path / "daemon.log"
    site, agent = pair.site(), pair.agent()
    args = ("--poison-policy", "stop", "--lag-threshold", "1", "--alert-webhook", hook.url)
    with Daemon(pair, *args, "--http", f"127.0.0.1:{port}", log_path=log):
        wait_until(lambda: ready(port), what="/readyz 200")
        # Both directions' lag series, at 0 while nothing waits.
        wait_until(
            lambda: scrape_when(
                port, lambda m: m.get("dbsync_write_back_lag_events") == 0 and m.get("dbsync_lag_events") == 0
            ),
            what="both directions' lag at 0",
        )
        site.execute("INSERT INTO public.leads (id, phone_number) VALUES (%s, '+4915100004711')", (LEAD,))
        wait_until(
            lambda: agent.execute("SELECT 1 FROM public.leads WHERE id = %s", (LEAD,)).fetchone(),
            what="the lead on the Agent DB",
        )
        site.execute("ALTER TABLE public.leads ADD CONSTRAINT no_666 CHECK (score <> 666)")
        agent.execute("UPDATE public.leads SET stage = 'qualified', score = 666 WHERE id = %s", (LEAD,))

        wait_until(lambda: hook.messages("write-back lag", "firing"), what="the write-back lag alert")
        fired = hook.messages("write-back lag")[0]
        assert fired["text"].startswith("dbsync site: write-back lag FIRING: write-back lag (Agent -> Site) "), fired
        assert fired["direction"] == "agent -> site" and fired["events_behind"] == 1, fired
        assert fired["lag_seconds"] >= 1 and fired["lag_threshold"] == 1, fired
        m = metrics(port)
        assert m["dbsync_write_back_lag_events"] == 1 and m["dbsync_write_back_lag_seconds"] >= 1, m
        assert m["dbsync_lag_events"] == 0, m
        code, out = status(pair, "--lag-threshold", "1")
        back = out[out.index("write-back (Agent DB -> Site DB):") :]
        assert code == 1 and "events behind" in back and "no_666" in back, out
        assert not hook.messages("lag"), hook.received  # the Site -> Agent direction is not behind

        site.execute("ALTER TABLE public.leads DROP CONSTRAINT no_666")
        wait_until(lambda: hook.messages("write-back lag", "resolved"), what="the write-back lag to resolve")
        resolved = hook.messages("write-back lag")[1]
        assert resolved["incident"] == fired["incident"] and "is back under" in resolved["summary"], resolved
        row = site.execute("SELECT stage, score FROM public.leads WHERE id = %s", (LEAD,)).fetchone()
        assert row == ("qualified", 666)
        wait_until(
            lambda: scrape_when(port, lambda m: m.get("dbsync_write_back_lag_events") == 0),
            what="the write-back lag back at 0",
        )
    assert len(hook.messages("write-back lag")) == 2 and not hook.messages("lag"), hook.received
    assert "Traceback" not in log_text(log)
