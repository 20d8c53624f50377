"""deploy/: the Grafana dashboard and the Prometheus alert rules query what a daemon exports.

Every metric name in the dashboard's and the rules' PromQL is checked against the /metrics of a
real `dbsync run` that has applied changes; the rules are checked by `promtool check rules` (and
their behaviour by `promtool test rules`) when promtool is installed, and link to runbook sections
that exist in docs/operations.md.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from dbsync.embedded.cluster import free_port
from tests.helpers import Daemon, DbPair, dbsync_cmd, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dbsync.json"
RULES = ROOT / "deploy" / "prometheus" / "dbsync-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "dbsync-rules.test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

# Series Prometheus makes itself rather than scraping them.
PROMETHEUS_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})
# Words of PromQL that look like names: operators and modifiers, and aggregations (which may be
# followed by `by (...)` rather than by their parenthesis). Functions are recognised by their `(`.
PROMQL_WORDS = frozenset(
    {
        *("and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"),
        *("bool", "offset", "inf", "nan", "atan2"),
        *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
        *("bottomk", "topk", "quantile", "limitk", "limit_ratio"),
    }
)
# Every family the daemon exports once it has applied something (daemon/metrics.py).
FAMILIES = (
    "dbsync_events_applied_total",
    "dbsync_events_parked_total",
    "dbsync_batch_size",
    "dbsync_batch_duration_seconds",
    "dbsync_lag_seconds",
    "dbsync_lag_events",
    "dbsync_parked_events",
    "dbsync_reconnects_total",
    "dbsync_last_apply_timestamp_seconds",
    "dbsync_active",
    "dbsync_connected",
)

# And those of the full verification, once a pass has finished (the dashboard has no panel for
# them yet; the rules use them).
VERIFY_FAMILIES = (
    "dbsync_verify_mismatches_total",
    "dbsync_verify_open_mismatches",
    "dbsync_verify_repaired_total",
    "dbsync_verify_rows_total",
    "dbsync_verify_passes_total",
    "dbsync_seconds_since_full_verify",
)


# -- reading PromQL and the exposition format ----------------------------------------------------
def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: not label names, functions, keywords, durations,
    strings or Grafana variables."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)  # label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables ($__rate_interval, ${job})
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", text):
        after = text[match.end() :].lstrip()
        if match.group() in PROMQL_WORDS or after.startswith("("):
            continue
        names.add(match.group())
    return names


def missing_names(exprs: list[str], exported: set[str]) -> dict[str, set[str]]:
    """For each expression that selects a series the scrape lacks, those names."""
    missing = {}
    for expr in exprs:
        absent = {n for n in metric_names(expr) if n not in exported and n not in PROMETHEUS_SERIES}
        if absent:
            missing[expr] = absent
    return missing


def exported_series(text: str) -> set[str]:
    """The series names in a scrape: a histogram exports only its _bucket, _sum and _count."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


# Labels Prometheus attaches to every scraped series (docs/operations.md's scrape configuration).
TARGET_LABELS = frozenset({"job", "instance", "source"})


def grouping_labels(expr: str) -> set[str]:
    """The labels an expression groups or matches by (`by (...)`, `on (...)`, ...)."""
    lists = re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", expr)
    return {name.strip() for names in lists for name in names.split(",") if name.strip()}


def exported_labels(text: str) -> set[str]:
    return set(re.findall(r'[{,]([A-Za-z_]\w*)="', "\n".join(line for line in text.splitlines() if "{" in line)))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in inner.get("targets", []) if t.get("expr")]
    return exprs


def rules_of(path: Path) -> list[dict[str, str]]:
    """Each rule's alert, expr and runbook_url. The file is read as the YAML it is written in (one
    `key: value` a line, `expr: |` blocks): PyYAML is no dependency of dbsync, and promtool, which
    CI runs, is the judge of the YAML itself."""
    rules: list[dict[str, str]] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        item = re.match(r"(\s*)(- )?(alert|expr|runbook_url):\s*(.*)$", lines[i])
        i += 1
        if item is None:
            continue
        indent, key, value = len(item.group(1)), item.group(3), item.group(4).strip()
        if key == "alert":
            rules.append({})
        if value == "|":  # a block: the lines indented deeper than the key
            block = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            value = "\n".join(block).strip()
        rules[-1][key] = value
    return rules


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page."""
    out = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


# -- a live daemon's scrape ----------------------------------------------------------------------
@pytest.fixture
def scrape(pair: DbPair, tmp_path: Path) -> str:
    """The /metrics of a two-way daemon that has applied inserts, updates and deletes and measured
    both directions' lag, and has finished a pass of the full verification."""
    proc = dbsync_cmd("migrate", "--pack", "whatsapp", "--two-way", env=pair.env())
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    verify = ("--full-verify-interval", "3600")
    with Daemon(pair, "--http", f"127.0.0.1:{port}", *verify, log_path=tmp_path / "daemon.log"):
        site = pair.site()
        site.execute("INSERT INTO conversations (id, phone_number) VALUES (1, '+1'), (2, '+2')")
        site.execute("UPDATE conversations SET status = 'closed' WHERE id = 1")
        site.execute("DELETE FROM conversations WHERE id = 2")

        def complete() -> str | None:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.TransportError:
                return None
            applied = 'dbsync_events_applied_total{table="public.conversations",op="delete"} 1' in text
            families = all(f"# TYPE {family} " in text for family in (*FAMILIES, *VERIFY_FAMILIES))
            lags = "dbsync_lag_events 0" in text and "dbsync_write_back_lag_events 0" in text
            return text if applied and families and lags else None

        return wait_until(complete, what="a scrape with every family, after the changes were applied")


# -- units: the checks can fail ----------------------------------------------------------------
@pytest.mark.unit
def test_metric_names_skip_labels_functions_and_keywords() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, job) (rate(dbsync_batch_size_bucket{job=~"$job", le!="x"}[5m])))'
        " / ignoring (op) group_left (table) dbsync_lag_events offset 1h > bool 1e3"
        ' and on (job) up{job="dbsync"} == 0 or max without (instance) (dbsync_active)'
        ' unless count(rate(made_up_total[$__rate_interval] @ end())) > inf or label_replace(x, "a", "b", "c", "d")'
    )
    assert metric_names(expr) == {
        "dbsync_batch_size_bucket",
        "dbsync_lag_events",
        "up",
        "dbsync_active",
        "made_up_total",
        "x",
    }
    assert metric_names("sum(rate(a:b_total[1m:10s]))") == {"a:b_total"}
    assert grouping_labels(expr) == {"le", "job", "op", "table", "instance"}
    assert exported_labels('x{table="t",op="insert"} 1\ny 2\nz{le="+Inf"} 3\n') == {"table", "op", "le"}


@pytest.mark.unit
def test_a_name_the_scrape_lacks_is_reported() -> None:
    text = (
        "# TYPE dbsync_batch_size histogram\n"
        'dbsync_batch_size_bucket{le="+Inf"} 1\ndbsync_batch_size_sum 3\ndbsync_batch_size_count 1\n'
        'dbsync_active 1\ndbsync_connected{database="site"} 1\n'
    )
    exported = exported_series(text)
    assert exported == {
        "dbsync_batch_size_bucket",
        "dbsync_batch_size_sum",
        "dbsync_batch_size_count",
        "dbsync_active",
        "dbsync_connected",
    }
    exprs = [
        "sum(dbsync_active) < 1",
        'up{job="dbsync"} == 0',
        "rate(dbsync_events_aplied_total[5m])",  # a typo
        "dbsync_batch_size > 10",  # a histogram has no series of its bare name
        "rate(dbsync_batch_size_count[5m])",
    ]
    assert missing_names(exprs, exported) == {
        "rate(dbsync_events_aplied_total[5m])": {"dbsync_events_aplied_total"},
        "dbsync_batch_size > 10": {"dbsync_batch_size"},
    }


@pytest.mark.unit
def test_anchors_follow_github() -> None:
    page = (
        "# Running dbsync\n## Alert: DbsyncLagHigh (lag over 30 s)\n```sh\n# not a heading\n```\n### `dbsync status`\n"
    )
    assert anchors(page) == {
        "running-dbsync",
        "alert-dbsynclaghigh-lag-over-30-s",
        "dbsync-status",
    }


@pytest.mark.unit
def test_links_within_the_operations_page_resolve() -> None:
    text = OPERATIONS.read_text()
    targets = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(targets) >= 5
    assert sorted(set(targets) - anchors(text)) == []


# -- the dashboard -------------------------------------------------------------------------------
@pytest.mark.unit
def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
    exprs = dashboard_exprs(dashboard)
    used = set().union(*(metric_names(e) for e in exprs))
    # Every family has a panel (conflicts get one once there is a metric for them).
    for family in FAMILIES:
        assert any(name == family or name.startswith(family + "_") for name in used), family


def test_dashboard_queries_only_exported_metrics(scrape: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 12
    assert missing_names(exprs, exported_series(scrape)) == {}
    # The labels it groups by and names in legends exist too.
    labels = exported_labels(scrape) | TARGET_LABELS
    assert {"table", "op", "database", "le"} <= labels
    legends = [t.get("legendFormat", "") for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set().union(*(grouping_labels(e) for e in exprs), *(re.findall(r"\{\{(\w+)\}\}", f) for f in legends))
    assert used - labels == set()


# -- the alert rules -----------------------------------------------------------------------------
@pytest.mark.unit
def test_every_rule_links_to_its_runbook_section() -> None:
    sections = anchors(OPERATIONS.read_text())
    rules = rules_of(RULES)
    assert {r["alert"] for r in rules} == {
        "DbsyncDown",
        "DbsyncNoActiveDaemon",
        "DbsyncLagHigh",
        "DbsyncWriteBackLagHigh",
        "DbsyncApplyStalled",
        "DbsyncParkedEvents",
        "DbsyncVerifyMismatch",
        "DbsyncStaleConsumer",
    }
    for rule in rules:
        url = rule["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("/docs/operations.md"), url
        assert anchor == rule["alert"].lower() and anchor in sections, f"{rule['alert']}: no section #{anchor}"


def test_rules_query_only_exported_metrics(scrape: str) -> None:
    exprs = [rule["expr"] for rule in rules_of(RULES)]
    assert missing_names(exprs, exported_series(scrape)) == {}
    assert set().union(*(grouping_labels(e) for e in exprs)) - (exported_labels(scrape) | TARGET_LABELS) == set()


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; .ci/run installs it)")
    return found


@pytest.mark.unit
def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


@pytest.mark.unit
def test_promtool_runs_the_rule_tests() -> None:
    """Each alert fires on the series that should fire it, and stays quiet on those that should not."""
    result = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULE_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
