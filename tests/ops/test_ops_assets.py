"""The ops assets: alert rules and their unit tests, the Grafana dashboard, the example
scrape config and the runbooks, checked against each other and against fleet/metrics.py.

Nothing here is skipped. promtool is required (`apt-get install -y prometheus`); node and
npm are required for the dashboard schema check, whose packages `npm ci` installs once
into tests/ops/dashboard-schema/node_modules (git-ignored).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"
ALERTS = OPS / "prometheus" / "alerts.yaml"
ALERT_TESTS = OPS / "prometheus" / "alerts.test.yaml"
SCRAPE_EXAMPLE = OPS / "prometheus" / "scrape-example.yaml"
DASHBOARD = OPS / "grafana" / "fleet-overview.json"
RUNBOOKS = OPS / "runbooks"
SCHEMA_CHECK = Path(__file__).resolve().parent / "dashboard-schema"
RUNBOOK_BASE = "https://github.com/fleet-dev/fleet/blob/main/ops/runbooks/"
SEVERITIES = {"critical", "warning"}


@dataclass(frozen=True)
class Metric:
    kind: str  # counter | gauge | histogram
    labels: dict[str, frozenset[str] | None]  # label -> allowed values (None: open set)


STATES = frozenset({"starting", "running", "closing"})
REASONS = frozenset(
    {"completed", "closed", "failed", "max_duration", "idle", "node_lost", "node_shutdown"}
)
CODES = frozenset({"max_sessions_per_call", "max_sessions", "no_capacity", "not_ready"})
CHECKPOINT_RESULTS = frozenset({"ok", "stale", "too_large", "error"})
FAILOVER_RESULTS = frozenset({"resumed", "lost"})
MESSAGE_OUTCOMES = frozenset(
    {"accepted", "duplicate", "busy", "full", "ended", "not_found", "too_large"}
)
REPLY_DESTINATIONS = frozenset({"sender", "event"})
STATUS_CLASSES = frozenset({"1xx", "2xx", "3xx", "4xx", "5xx"})

# What the nodes expose (names as scraped), and so what dashboards and alerts may use.
METRICS: dict[str, Metric] = {
    "fleet_sessions_active": Metric("gauge", {"state": STATES}),
    "fleet_sessions_started_total": Metric("counter", {}),
    "fleet_sessions_ended_total": Metric("counter", {"reason": REASONS}),
    "fleet_session_start_seconds": Metric("histogram", {}),
    "fleet_session_close_seconds": Metric("histogram", {}),
    "fleet_admission_rejected_total": Metric("counter", {"code": CODES}),
    "fleet_checkpoints_total": Metric("counter", {"result": CHECKPOINT_RESULTS}),
    "fleet_checkpoint_bytes": Metric("histogram", {}),
    "fleet_events_emitted_total": Metric("counter", {}),
    "fleet_event_listeners": Metric("gauge", {}),
    "fleet_failovers_total": Metric("counter", {"result": FAILOVER_RESULTS}),
    "fleet_messages_sent_total": Metric("counter", {"outcome": MESSAGE_OUTCOMES}),
    "fleet_message_replies_total": Metric("counter", {"to": REPLY_DESTINATIONS}),
    "fleet_message_delivery_seconds": Metric("histogram", {}),
    "fleet_message_ask_seconds": Metric("histogram", {}),
    "fleet_redis_up": Metric("gauge", {}),
    "fleet_redis_command_seconds": Metric("histogram", {"command": None}),
    "fleet_node_lease_renewal_failures_total": Metric("counter", {}),
    "fleet_node_draining": Metric("gauge", {}),
    "fleet_node_lease_renewal_gap_max_seconds": Metric("gauge", {}),
    "fleet_event_loop_lag_seconds": Metric("histogram", {}),
    "fleet_node_ready": Metric("gauge", {}),
    "fleet_nodes_live": Metric("gauge", {}),
    "fleet_build_info": Metric("gauge", {"version": None}),
    "fleet_http_requests_total": Metric(
        "counter", {"method": None, "route": None, "status": STATUS_CLASSES}
    ),
    "fleet_http_request_duration_seconds": Metric("histogram", {"method": None, "route": None}),
    "up": Metric("gauge", {}),  # written by Prometheus for every target
}
TARGET_LABELS = {"job", "instance", "namespace", "pod"}  # added by Prometheus
UNBOUNDED_LABELS = {"session_id", "call_id", "node_id", "pid"}

# Grafana template variables and a concrete value that makes the query plain PromQL.
GRAFANA_VARIABLES = {
    "${datasource}": "prometheus",
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "$job": "fleet",
}


# ---- helpers ----------------------------------------------------------------------------


@cache
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run `apt-get install -y prometheus` (Debian/Ubuntu; "
            "it ships /usr/bin/promtool)",
            pytrace=False,
        )
    return path


def run(*args: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"{' '.join(proc.args)}\n{proc.stdout}\n{proc.stderr}"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alert_names() -> set[str]:
    return {rule["alert"] for rule in alert_rules()}


def kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_exprs() -> dict[str, str]:
    """`panel_<id>_<refId>` -> the query with Grafana variables replaced."""
    exprs = {}
    for panel in panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r}: unknown variable in {expr}"
            exprs[f"panel_{panel['id']}_{target['refId']}"] = expr
    return exprs


def runbook_exprs() -> dict[str, str]:
    """Every ```promql block of the runbooks; blank lines separate expressions."""
    exprs = {}
    for path in sorted(RUNBOOKS.glob("*.md")):
        blocks = re.findall(r"```promql\n(.*?)```", path.read_text(), flags=re.S)
        for b, block in enumerate(blocks):
            for e, expr in enumerate(x for x in block.split("\n\n") if x.strip()):
                exprs[f"{path.stem.replace('-', '_')}_{b}_{e}"] = expr.strip()
    return exprs


def assert_promql_parses(exprs: dict[str, str], tmp_path: Path) -> None:
    """promtool has no `parse` command: check the expressions as recording rules."""
    rules = {
        "groups": [
            {
                "name": "parse",
                "rules": [{"record": name, "expr": expr} for name, expr in exprs.items()],
            }
        ]
    }
    path = tmp_path / "exprs.rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    assert_ok(run(promtool(), "check", "rules", str(path)))


def assert_known_metrics(exprs: Iterable[str]) -> None:
    """Every series and label matcher exists in METRICS; no label by session or call."""
    for expr in exprs:
        for label in UNBOUNDED_LABELS:
            assert not re.search(rf"\b{label}\b", expr), f"unbounded label {label}: {expr}"
        for name, matchers in re.findall(r"\b(up|fleet_\w+)\b(?:\{([^}]*)\})?", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            metric = METRICS.get(name) or METRICS.get(base)
            assert metric is not None, f"unknown metric {name} in: {expr}"
            if name != base and name not in METRICS:
                assert metric.kind == "histogram", f"{name}: {base} is not a histogram"
            allowed = TARGET_LABELS | set(metric.labels)
            if name.endswith("_bucket"):
                allowed.add("le")
            for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
                assert label in allowed, f"{name} has no label {label}: {expr}"
                values = metric.labels.get(label)
                if op == "=" and values is not None:
                    assert value in values, f'{name}{{{label}="{value}"}} is never exposed'


# ---- alert rules ------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    assert_ok(run(promtool(), "check", "rules", str(ALERTS)))


def test_alert_rules_unit_tests_pass() -> None:
    assert_ok(run(promtool(), "test", "rules", str(ALERT_TESTS)))


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in load_yaml(ALERT_TESTS)["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alert_names() - firing == set(), "alerts never tested firing"
    assert alert_names() - quiet == set(), "alerts never tested staying quiet"


def test_alert_rules_follow_conventions() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Fleet[A-Za-z]+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= annotations.keys(), name
        assert annotations["runbook_url"] == f"{RUNBOOK_BASE}{kebab(name)}.md", name
        assert 'job="fleet"' in rule["expr"], f'{name} must select job="fleet"'
    assert_known_metrics(rule["expr"] for rule in alert_rules())


# ---- scrape config ----------------------------------------------------------------------


def test_scrape_example_is_a_valid_prometheus_config() -> None:
    assert_ok(run(promtool(), "check", "config", str(SCRAPE_EXAMPLE)))
    config = load_yaml(SCRAPE_EXAMPLE)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "fleet"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"]
    assert (SCRAPE_EXAMPLE.parent / config["rule_files"][0]).resolve() == ALERTS.resolve()


# ---- dashboard --------------------------------------------------------------------------


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    assert_promql_parses(exprs, tmp_path)


def test_dashboard_uses_only_exposed_metrics_and_shows_them_all() -> None:
    exprs = dashboard_exprs().values()
    assert_known_metrics(exprs)
    text = " ".join(exprs)
    missing = [name for name in METRICS if not re.search(rf"\b{name}(_bucket)?\b", text)]
    assert missing == [], "metrics with no panel on the dashboard"


def test_dashboard_queries_follow_conventions() -> None:
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert 'job=~"$job"' in expr, f"{panel['title']}: filter by $job: {expr}"
            # Windows follow the scrape interval and zoom; a fixed [5m] hides spikes.
            windows = re.findall(r"\[([^\]]+)\]", expr)
            assert set(windows) <= {"$__rate_interval"}, f"{panel['title']}: {expr}"
            if "histogram_quantile" in expr:
                assert re.search(r"by \(([\w, ]*\b)?le\)", expr) and "_bucket{" in expr, expr


def test_dashboard_variables_and_layout() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["type"] == "query"
    assert board["uid"] == "fleet-overview" and 36 <= board["schemaVersion"] <= 41
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels():
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    titles = " | ".join(p["title"].lower() for p in panels())
    for wanted in (
        "live nodes",
        "sessions by state",
        "starts and ends",
        "start latency",
        "close latency",
        "admission rejections",
        "failovers",
        "event listeners",
        "messages sent by outcome",
        "message delivery latency",
        "ask latency",
        "replies",
        "redis up",
        "redis command latency",
        "request rate",
        "5xx",
        "lease renewal",
        "draining",
        "ready",
    ):
        assert wanted in titles, f"no panel about {wanted!r}"


@pytest.fixture(scope="session")
def schema_checker() -> Path:
    """`npm ci` into tests/ops/dashboard-schema/node_modules once per lockfile."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.fail(
            "node and npm are required for the Grafana schema check: run "
            "`apt-get install -y nodejs npm`, then `npm ci` in tests/ops/dashboard-schema",
            pytrace=False,
        )
    digest = hashlib.sha256((SCHEMA_CHECK / "package-lock.json").read_bytes()).hexdigest()
    stamp = SCHEMA_CHECK / "node_modules" / ".installed-lock-sha256"
    if not stamp.is_file() or stamp.read_text() != digest:
        proc = run(npm, "ci", "--no-audit", "--no-fund", cwd=SCHEMA_CHECK, timeout=540)
        if proc.returncode != 0:
            pytest.fail(f"`npm ci` in {SCHEMA_CHECK} failed:\n{proc.stderr}", pytrace=False)
        stamp.write_text(digest)
    return SCHEMA_CHECK


def broken_dashboards(tmp_path: Path) -> dict[str, Path]:
    """Mistakes the schema check must catch, to prove it is not vacuous."""

    def edit(name: str, change: Any) -> Path:
        board = dashboard()
        change(board, board["panels"][1])
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(board))
        return path

    return {
        "unknown panel key": edit("typo", lambda b, p: p.update(fieldconfig={})),
        "bad enum": edit(
            "enum",
            lambda b, p: p["fieldConfig"]["defaults"].update(
                thresholds={"mode": "absolutely", "steps": []}
            ),
        ),
        "target without expr": edit("expr", lambda b, p: p["targets"][0].pop("expr")),
        "bad stat option": edit("stat", lambda b, p: p["options"].update(colorMode="loud")),
        "no schemaVersion": edit("version", lambda b, p: b.pop("schemaVersion")),
    }


@pytest.mark.timeout(600)
def test_dashboard_matches_grafana_schema(schema_checker: Path, tmp_path: Path) -> None:
    broken = broken_dashboards(tmp_path)
    node = shutil.which("node") or "node"
    files = [str(DASHBOARD), *map(str, broken.values())]
    proc = run(node, "validate-dashboard.mjs", *files, cwd=schema_checker, timeout=120)
    report = proc.stdout + proc.stderr
    assert f"ok: {DASHBOARD}" in proc.stdout, report
    for mistake, path in broken.items():
        assert f"INVALID: {path}" in proc.stdout, f"schema check missed: {mistake}\n{report}"


# ---- runbooks ---------------------------------------------------------------------------


def test_every_alert_has_a_runbook_and_every_runbook_an_alert() -> None:
    expected = {f"{kebab(name)}.md" for name in alert_names()}
    present = {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"}
    assert expected - present == set(), "alerts whose runbook file is missing"
    assert present - expected == set(), "runbooks no alert links to"
    index = (RUNBOOKS / "README.md").read_text()
    for name in alert_names():
        assert f"]({kebab(name)}.md)" in index and name in index, f"README.md: {name}"


def test_runbooks_say_what_it_means_how_to_confirm_and_what_to_do() -> None:
    for name in alert_names():
        text = (RUNBOOKS / f"{kebab(name)}.md").read_text()
        assert text.startswith(f"# {name}\n"), name
        for section in ("## What it means", "## Confirm", "## What to do", "## Resolved when"):
            assert section in text, f"{name}: no {section!r}"
        assert "```promql" in text and "curl " in text, f"{name}: give the exact commands"


def test_runbook_promql_parses_and_uses_exposed_metrics(tmp_path: Path) -> None:
    exprs = runbook_exprs()
    assert len(exprs) >= 30
    assert_promql_parses(exprs, tmp_path)
    assert_known_metrics(e for e in exprs.values() if "container_cpu" not in e)


def test_relative_links_in_ops_docs_resolve() -> None:
    for path in [*OPS.rglob("*.md")]:
        for link in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", link) or link.startswith("#"):
                continue
            target = (path.parent / link.split("#")[0]).resolve()
            assert target.exists(), f"{path.relative_to(REPO)}: broken link {link}"


# ---- the code exposes what the ops assets use ------------------------------------------


def test_metrics_catalog_matches_fleet_metrics() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from fleet import metrics
    from fleet.models import EndReason

    exposed: dict[str, tuple[str, set[str]]] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            kind = str(obj._type)
            name = obj._name + ("_total" if kind == "counter" else "")
            exposed[name] = (kind, set(obj._labelnames))
    catalog = {name: (m.kind, set(m.labels)) for name, m in METRICS.items() if name != "up"}
    assert {reason.value for reason in EndReason} == REASONS
    assert exposed == catalog, (
        "fleet/metrics.py and the ops catalog (tests/ops/test_ops_assets.py METRICS) "
        "differ: update the catalog, the dashboard and the alerts together"
    )
