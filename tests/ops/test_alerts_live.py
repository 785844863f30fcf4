"""Alerts proven live (issue #19, point 5): a real ``prometheus`` scrapes a real fleet
(LocalFleet: a redis-server and three ``fleet serve`` processes) and evaluates
ops/prometheus/alerts.yaml. Its prometheus.yml is ops/prometheus/scrape-example.yaml (job
``fleet``, ``/metrics``, the ``namespace`` label) with only the targets, a 1s scrape and
evaluation interval and the rules file's path changed.

* SIGKILL of one node: FleetNodeDown's warning rule (``up{job="fleet"} == 0``, the one a
  dead target can trigger; the critical one wants the whole fleet gone) goes pending
  within a scrape and an evaluation, and firing its ``for`` later, for that node only. The
  critical rule stays quiet, and FleetFailoversHappening fires as the node's sessions
  resume elsewhere.
* SIGSTOP of the redis-server: FleetRedisDown pending, then firing, on every live node;
  after SIGCONT it resolves.
* Every query of ops/grafana/*.json returns data (a sample that is not NaN, no error)
  over the test's window, once the nodes have run, closed and answered sessions; the
  template variables resolve to the job and the nodes.
* SIGKILL of the other nodes: FleetNodeDown's critical rule pending, then firing.

The rules are rendered with every ``for:`` divided by 12 (2m -> 10s, 1m -> 5s) so that this
fits in CI; expressions, labels and annotations are the shipped ones, unchanged (checked
when rendering). What is proven live is that the expressions see what real nodes and a
real Prometheus produce; ``promtool test rules`` (test_ops_assets.py) covers the durations.
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.multinode.harness import LocalFleet, NodeProcess
from tests.ops.prometheus import LocalPrometheus, timestamp
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "ops" / "prometheus" / "alerts.yaml"
SCRAPE_EXAMPLE = REPO / "ops" / "prometheus" / "scrape-example.yaml"
DASHBOARDS = sorted((REPO / "ops" / "grafana").glob("*.json"))

FOR_DIVISOR = 12
SCRAPE = 1.0  # seconds between scrapes, and between rule evaluations
EVAL = 1.0
# On a loaded 2-core machine scrapes and evaluations run late, and this test polls the API
# every POLL seconds: what a deadline allows on top of the rule's own timing.
SLACK = 4.0
POLL = 0.2
STEP = 1.0  # of the dashboard's range queries, and so $__interval
NODE_TTL = 3.0  # LocalFleet's FLEET_NODE_TTL
WORKERS = "counter=fleet.workers.counter:Counter,chat=fleet.workers.chat:Chat"

# Dashboard queries ("<dashboard> / <panel> / <refId>") that may return no data in this
# test, and why. Keep it short: every other query must show something.
NO_DATA_EXPECTED: dict[str, str] = {}


# ---- the rules and the Prometheus config ------------------------------------------------

FOR_LINE = re.compile(r"^(\s+for: )(\d+)([smh])$", re.M)
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def scaled_rules(text: str) -> str:
    """``text`` with every ``for:`` divided by FOR_DIVISOR, all else as it was."""

    def scale(m: re.Match[str]) -> str:
        seconds = int(m[2]) * UNIT_SECONDS[m[3]]
        assert seconds % FOR_DIVISOR == 0, f"for: {m[2]}{m[3]} does not scale to whole seconds"
        return f"{m[1]}{seconds // FOR_DIVISOR}s"

    rendered = FOR_LINE.sub(scale, text)
    shipped, scaled = yaml.safe_load(text), yaml.safe_load(rendered)
    for group in scaled["groups"]:
        for rule in group["rules"]:
            assert re.fullmatch(r"\d+s", rule.pop("for", "0s")), f"for: not scaled: {rule}"
    for group in shipped["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    assert scaled == shipped, "rendering the rules changed more than their for: durations"
    return rendered


def for_seconds(rules_text: str, alert: str, severity: str) -> float:
    (rule,) = [
        r
        for group in yaml.safe_load(rules_text)["groups"]
        for r in group["rules"]
        if r["alert"] == alert and r["labels"]["severity"] == severity
    ]
    match = re.fullmatch(r"(\d+)s", rule["for"])
    assert match, rule["for"]
    return float(match[1])


def prometheus_config(rules: Path, targets: list[str]) -> dict[str, Any]:
    """The shipped example config, pointed at ``targets`` and scraping every second."""
    config: dict[str, Any] = yaml.safe_load(SCRAPE_EXAMPLE.read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE:g}s", "evaluation_interval": f"{EVAL:g}s"}
    config["rule_files"] = [str(rules)]
    (job,) = config["scrape_configs"]
    job.update(scrape_interval=f"{SCRAPE:g}s", scrape_timeout=f"{SCRAPE:g}s")
    (static,) = job["static_configs"]
    static["targets"] = targets
    return config


def target_labels(config: dict[str, Any]) -> dict[str, str]:
    """The labels every alert keeps from its targets: ``job`` and the static ones."""
    (job,) = config["scrape_configs"]
    return {"job": job["job_name"], **job["static_configs"][0].get("labels", {})}


def instance(node: NodeProcess) -> str:
    return f"127.0.0.1:{node.port}"


# ---- watching alerts --------------------------------------------------------------------


class Timeline:
    """What happened when, in seconds since the test began: shown with every failure."""

    def __init__(self) -> None:
        self.began = time.time()
        self.events: list[tuple[float, str]] = []

    def note(self, what: str, at: float | None = None) -> float:
        at = time.time() if at is None else at
        self.events.append((at, what))
        return at

    def __str__(self) -> str:
        lines = (f"{at - self.began:7.2f}s  {what}" for at, what in sorted(self.events))
        return "timeline:\n" + "\n".join(lines)


class AlertWatch:
    """The first sighting of each (instance, state) of one alert in /api/v1/alerts."""

    def __init__(self, prom: LocalPrometheus, name: str, labels: dict[str, str]) -> None:
        self.prom = prom
        self.name = name
        self.labels = {"alertname": name, **labels}
        self.first: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}

    def poll(self) -> list[dict[str, Any]]:
        now = time.time()
        found = [
            alert
            for alert in self.prom.alerts()
            if all(alert["labels"].get(k) == v for k, v in self.labels.items())
        ]
        for alert in found:
            key = (alert["labels"].get("instance", ""), alert["state"])
            self.first.setdefault(key, (now, alert))
        return found

    def wait(self, instances: list[str], state: str, deadline: float, tl: Timeline) -> None:
        """Until every instance has been seen in ``state``; fails at ``deadline``."""
        while True:
            self.poll()
            if all((i, state) in self.first for i in instances):
                return
            seen = sorted(self.first)
            assert time.time() < deadline, f"{self.name} not {state} for {instances}: {seen}\n{tl}"
            time.sleep(POLL)

    def wait_gone(self, instances: list[str], deadline: float, tl: Timeline) -> float:
        """Until none of ``instances`` has the alert active; when that was seen."""
        while True:
            left = [a for a in self.poll() if a["labels"].get("instance", "") in instances]
            if not left:
                return time.time()
            assert time.time() < deadline, f"{self.name} still active: {left}\n{tl}"
            time.sleep(POLL)

    def assert_timely(
        self, inst: str, cause: float, noticed: float, for_s: float, tl: Timeline
    ) -> dict[str, Any]:
        """Pending within ``noticed`` seconds of ``cause`` plus a scrape and an evaluation,
        seen pending before firing, and firing ``for_s`` after it went pending, not before
        and not more than an evaluation later. Returns the firing alert."""
        pending_seen, _ = self.first[(inst, "pending")]
        firing_seen, firing = self.first[(inst, "firing")]
        active = timestamp(firing["activeAt"])
        tl.note(f"{self.name} {inst or '(fleet)'} pending (activeAt)", active)
        tl.note(f"{self.name} {inst or '(fleet)'} seen pending", pending_seen)
        tl.note(f"{self.name} {inst or '(fleet)'} seen firing", firing_seen)
        assert cause - EVAL <= active <= cause + noticed + SCRAPE + EVAL + SLACK, str(tl)
        assert pending_seen < firing_seen, str(tl)
        assert firing_seen >= active + for_s - 0.1, f"fired before its for: {for_s}s\n{tl}"
        assert firing_seen <= active + for_s + EVAL + SLACK, f"late: for {for_s}s\n{tl}"
        return firing


# ---- fleet activity ---------------------------------------------------------------------


def run_sessions(fleet: LocalFleet, nodes: list[NodeProcess]) -> None:
    """Work for every panel: ticking counters on every node (events, checkpoints), invokes
    that complete, a chat asked through every node (delivery, asks, replies), closes."""
    ticking = [
        fleet.start("tick", node=node, params={"interval": 0.2})["session_id"]
        for node in nodes
        for _ in range(2)
    ]
    for node in nodes:
        resp = fleet.request(
            "POST",
            "/calls/invoke/sessions",
            node,
            params={"wait": 15},
            json={"params": {"limit": 3, "interval": 0.05}},
            timeout=20,
        )
        assert resp.status_code == 201 and resp.json()["end_reason"] == "completed", resp.text
    sid = fleet.start("chat", node=nodes[-1], worker="chat", params={"delay": 0})["session_id"]
    path = f"/calls/chat/sessions/{sid}/messages"
    for via in nodes:
        resp = fleet.request(
            "POST", path, via, params={"wait": 15}, json={"data": "hi"}, timeout=20
        )
        assert resp.status_code == 200 and "reply" in resp.json(), resp.text
    assert fleet.request("POST", path, nodes[0], json={"data": "no wait"}).status_code == 202
    for sid in ticking[::2]:  # one per node; the other ticks on
        resp = fleet.request("DELETE", f"/calls/tick/sessions/{sid}", params={"wait": 10})
        assert resp.status_code == 200 and resp.json()["state"] == "ended", resp.text


def wait_scraped(prom: LocalPrometheus, instances: list[str], timeout: float) -> None:
    """Until every instance has been scraped and is up."""
    deadline = time.monotonic() + timeout
    while True:
        up = {t["labels"]["instance"] for t in prom.targets() if t["health"] == "up"}
        if up >= set(instances):
            return
        assert time.monotonic() < deadline, f"targets not up: {prom.targets()}"
        time.sleep(POLL)


# ---- dashboard queries ------------------------------------------------------------------


def dashboard_targets() -> Iterator[tuple[str, dict[str, Any], str]]:
    """(``<dashboard> / <panel> / <refId>``, the dashboard, the query) for every target."""
    for path in DASHBOARDS:
        board = json_load(path)
        stack = list(board["panels"])
        while stack:
            panel = stack.pop(0)
            stack.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield f"{path.stem} / {panel['title']} / {target['refId']}", board, target["expr"]


def json_load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def substitute(expr: str, values: dict[str, str]) -> str:
    def value(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        assert name in values, f"no value for ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def template_values(
    board: dict[str, Any], prom: LocalPrometheus, start: float, end: float
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Grafana's variables as Grafana would set them over this window: the built-in
    intervals, and each query variable resolved against Prometheus (``All`` where the
    variable has it, else its first value). Also what each query variable resolved to."""
    values = {
        "__interval": f"{STEP:g}s",
        # Grafana: max($__interval + scrape interval, 4 * scrape interval)
        "__rate_interval": f"{max(STEP + SCRAPE, 4 * SCRAPE):g}s",
        "__range": f"{math.ceil(end - start)}s",
    }
    resolved: dict[str, list[str]] = {}
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = substitute(var["query"], values)
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"${var['name']}: only label_values(selector, label) is handled: {query}"
        found = prom.label_values(match[2], match[1], start, end)
        assert found, f"${var['name']} ({query}) has no values"
        resolved[var["name"]] = found
        values[var["name"]] = (var.get("allValue") or ".*") if var.get("includeAll") else found[0]
    return values, resolved


def why_no_data(prom: LocalPrometheus, expr: str, start: float, end: float) -> str | None:
    """None if the range query has a sample that is not NaN; else what it returned."""
    body = prom.query_range(expr, start, end, STEP)
    if body["status"] != "success":
        return f"error: {body.get('errorType')}: {body.get('error')}"
    series = body["data"]["result"]
    if not series:
        return "no series"
    if all(value == "NaN" for s in series for _, value in s["values"]):
        return f"only NaN ({len(series)} series)"
    return None


def check_dashboards(
    prom: LocalPrometheus, start: float, end: float, instances: list[str], job: str
) -> None:
    # The check must be able to fail: a misspelt metric and an all-NaN result are caught.
    assert why_no_data(prom, f'sum(up{{job="{job}"}}) * NaN', start, end) == "only NaN (1 series)"
    assert why_no_data(prom, "sum(rate(fleet_sessions_startd_total[1m]))", start, end) == (
        "no series"
    )
    failures: dict[str, str] = {}
    checked = set()
    boards: dict[int, tuple[dict[str, str], dict[str, list[str]]]] = {}
    for name, board, expr in dashboard_targets():
        if id(board) not in boards:
            boards[id(board)] = template_values(board, prom, start, end)
            values, resolved = boards[id(board)]
            assert resolved.get("job") == [job], resolved
            assert sorted(resolved.get("instance", [])) == sorted(instances), resolved
        values = boards[id(board)][0]
        query = substitute(expr, values)
        checked.add(name)
        problem = why_no_data(prom, query, start, end)
        if problem is not None and name not in NO_DATA_EXPECTED:
            failures[name] = f"{problem}: {query}"
    assert len(checked) >= 20, checked
    assert set(NO_DATA_EXPECTED) <= checked, "NO_DATA_EXPECTED names queries no dashboard has"
    assert failures == {}, "dashboard queries without data:\n" + "\n".join(
        f"  {k}: {v}" for k, v in failures.items()
    )


# ---- the test ---------------------------------------------------------------------------


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    try:
        server = RedisServer().start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)
    server.stop()


@dataclass
class Live:
    """A fleet, the Prometheus scraping it, and what the phases below share."""

    fleet: LocalFleet
    prom: LocalPrometheus
    redis: RedisServer
    rules: str  # the rendered rules file
    labels: dict[str, str]  # of every alert: job and the scrape config's static labels
    tl: Timeline

    def for_seconds(self, alert: str, severity: str) -> float:
        return for_seconds(self.rules, alert, severity)


def kill_one_node(live: Live, victim: NodeProcess) -> None:
    """FleetNodeDown's warning rule fires for the dead node, on time; nothing pages; its
    sessions fail over and FleetFailoversHappening fires."""
    prom, tl, where = live.prom, live.tl, instance(victim)
    for_s = live.for_seconds("FleetNodeDown", "warning")
    node_down = AlertWatch(prom, "FleetNodeDown", {**live.labels, "severity": "warning"})
    fleet_down = AlertWatch(prom, "FleetNodeDown", {**live.labels, "severity": "critical"})
    failovers = AlertWatch(prom, "FleetFailoversHappening", live.labels)
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    killed = tl.note(f"SIGKILL {victim.name} ({where})")
    node_down.wait([where], "firing", killed + SCRAPE + 2 * EVAL + for_s + 2 * SLACK, tl)
    firing = node_down.assert_timely(where, killed, 0, for_s, tl)
    assert firing["annotations"]["summary"] == f"fleet node {where} is down"
    # A live node's scrape may time out now and then on a loaded machine (pending for a
    # moment): only the dead one fires, and nothing pages.
    assert {i for i, state in node_down.first if state == "firing"} == {where}, str(tl)
    assert [a for a in fleet_down.poll() if a["state"] == "firing"] == [], str(tl)
    # Its sessions are claimed once its lease (NODE_TTL) has run out.
    failovers.wait([""], "firing", killed + NODE_TTL + 20, tl)
    tl.note("FleetFailoversHappening seen firing", failovers.first[("", "firing")][0])


def stop_redis(live: Live, nodes: list[NodeProcess]) -> None:
    """SIGSTOP of the redis-server: every node goes not ready, refuses a start (503
    not_ready) and fires FleetRedisDown on time; after SIGCONT the alert resolves."""
    fleet, tl, proc = live.fleet, live.tl, live.redis.proc
    assert proc is not None
    for_s = live.for_seconds("FleetRedisDown", "critical")
    redis_down = AlertWatch(live.prom, "FleetRedisDown", live.labels)
    instances = [instance(node) for node in nodes]
    proc.send_signal(signal.SIGSTOP)
    stopped = tl.note("SIGSTOP redis-server")
    try:
        # A node gives Redis up after two failed lease renewals (well within NODE_TTL).
        deadline = stopped + NODE_TTL + SCRAPE + 2 * EVAL + for_s + 2 * SLACK
        while any(fleet.ready(node) for node in nodes):
            assert time.time() < deadline, f"nodes still ready\n{tl}"
            time.sleep(POLL)
        tl.note("nodes not ready")
        resp = fleet.request("POST", "/calls/refused/sessions", nodes[0])
        assert resp.status_code == 503 and resp.json()["code"] == "not_ready", resp.text
        redis_down.wait(instances, "firing", deadline, tl)
    finally:
        proc.send_signal(signal.SIGCONT)
    resumed = tl.note("SIGCONT redis-server")
    for where in instances:
        firing = redis_down.assert_timely(where, stopped, NODE_TTL, for_s, tl)
        assert firing["annotations"]["summary"] == f"fleet node {where} cannot reach Redis"
    assert {i for i, _ in redis_down.first} == set(instances), str(tl)
    tl.note("FleetRedisDown resolved", redis_down.wait_gone(instances, resumed + 30, tl))
    fleet.wait_ready(nodes, timeout=30)
    tl.note("nodes ready again")


def kill_every_node(live: Live, nodes: list[NodeProcess]) -> None:
    """FleetNodeDown's critical rule (every target down) fires, on time."""
    for_s = live.for_seconds("FleetNodeDown", "critical")
    fleet_down = AlertWatch(live.prom, "FleetNodeDown", {**live.labels, "severity": "critical"})
    for node in nodes:
        node.signal(signal.SIGKILL)
        node.wait(10)
    killed = live.tl.note("SIGKILL every other node")
    fleet_down.wait([""], "firing", killed + SCRAPE + 2 * EVAL + for_s + 2 * SLACK, live.tl)
    firing = fleet_down.assert_timely("", killed, 0, for_s, live.tl)
    assert firing["annotations"]["summary"] == "no live fleet node"


def test_alerts_fire_live_and_dashboard_queries_return_data(
    redis: RedisServer, tmp_path: Path
) -> None:
    tl = Timeline()
    rules = scaled_rules(ALERTS.read_text())
    (tmp_path / "alerts.yaml").write_text(rules)
    with LocalFleet(3, redis=redis, FLEET_WORKER=WORKERS) as fleet:
        instances = [instance(node) for node in fleet.nodes]
        config = prometheus_config(tmp_path / "alerts.yaml", instances)
        try:
            prometheus = LocalPrometheus(config, tmp_path)
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        with prometheus as prom:
            live = Live(fleet, prom, redis, rules, target_labels(config), tl)
            began = time.time()
            wait_scraped(prom, instances, timeout=30)
            tl.note("every node scraped")
            run_sessions(fleet, fleet.nodes)
            tl.note("sessions run, answered, closed")
            time.sleep(2 * SCRAPE)  # scraped after the work, for rate() to see it

            victim, *others = fleet.nodes
            kill_one_node(live, victim)
            stop_redis(live, others)
            run_sessions(fleet, others)
            tl.note("sessions run, answered, closed on the other nodes")
            time.sleep(2 * SCRAPE)

            check_dashboards(prom, began, time.time(), instances, live.labels["job"])
            tl.note("every dashboard query returned data")
            kill_every_node(live, others)
            print(tl)


def test_scaled_rules_change_only_for_durations() -> None:
    shipped = ALERTS.read_text()
    rendered = scaled_rules(shipped)
    assert "for: 10s" in rendered and "for: 2m" not in rendered
    changed = [
        (a, b) for a, b in zip(shipped.splitlines(), rendered.splitlines(), strict=True) if a != b
    ]
    assert changed and all(a.strip().startswith("for: ") for a, _ in changed), changed
