"""A real headless Chromium on another origin drives a real ``fleet serve`` node: ``fetch``
starts sessions, ``EventSource`` and a WebSocket follow one, and ``navigator.sendBeacon``
closes them when the page goes away. With keys set, a beacon cannot send
``Authorization``: the token travels in its body or its URL instead.

The page is served by a small HTTP server on another loopback port; it reports back to
that server, which hands the reports to the test through a queue.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.multinode.harness import LocalFleet

CHROMIUM = shutil.which("chromium")
CALL = "browser"
ALICE, ADMIN = "alice-browser-token-0123456789", "admin-browser-token-0123456789"
# How each session's beacon carries the token; "none" is a beacon as pages send it today.
WITH_KEYS = ["urlencoded", "query", "multipart", "text", "none"]
WITHOUT_KEYS = ["none"]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>fleet browser test</title></head><body>
<script>
const C = __CONFIG__;
const tokenQuery = C.token ? "?access_token=" + encodeURIComponent(C.token) : "";

function within(ms, what, promise) {
  return Promise.race([
    promise,
    new Promise((_, fail) => setTimeout(() => fail(new Error(what + ": timed out")), ms)),
  ]);
}

async function start() {
  const headers = {"Content-Type": "application/json"};
  if (C.token) headers.Authorization = "Bearer " + C.token;
  const resp = await fetch(C.node + "/calls/" + C.call + "/sessions", {
    method: "POST", headers, body: JSON.stringify({params: {interval: 0.2}}),
  });
  const body = await resp.json();
  if (resp.status !== 201) throw new Error("start answered " + resp.status);
  return body.session_id;
}

function firstTickBySse(sid) {
  return new Promise((done, fail) => {
    const url = C.node + "/calls/" + C.call + "/sessions/" + sid + "/events" + tokenQuery;
    const source = new EventSource(url);
    source.addEventListener("tick", (event) => { source.close(); done(JSON.parse(event.data).n); });
    source.onerror = () => { source.close(); fail(new Error("EventSource failed")); };
  });
}

function firstTickByWebSocket(sid) {
  return new Promise((done, fail) => {
    const base = C.node.replace(/^http/, "ws");
    const path = "/calls/" + C.call + "/sessions/" + sid + "/ws";
    const socket = new WebSocket(base + path + tokenQuery);
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.event === "tick") { socket.close(1000); done(event.data.n); }
    };
    socket.onclose = (event) => fail(new Error("WebSocket closed " + event.code));
  });
}

function beacon(form, sid) {
  const url = C.node + "/calls/" + C.call + "/sessions/" + sid + "/close";
  const encoded = "access_token=" + encodeURIComponent(C.token);
  if (form === "urlencoded") {  // application/x-www-form-urlencoded
    return navigator.sendBeacon(url, new URLSearchParams({access_token: C.token}));
  }
  if (form === "multipart") {  // multipart/form-data
    const data = new FormData();
    data.append("access_token", C.token);
    return navigator.sendBeacon(url, data);
  }
  if (form === "text") return navigator.sendBeacon(url, encoded);  // text/plain
  if (form === "query") return navigator.sendBeacon(url + "?" + encoded);
  return navigator.sendBeacon(url);
}

async function main() {
  const report = {sessions: {}};
  try {
    for (const form of C.forms) report.sessions[form] = await within(10000, "start", start());
    const followed = report.sessions[C.forms[0]];
    report.sse_tick = await within(10000, "EventSource", firstTickBySse(followed));
    report.ws_tick = await within(10000, "WebSocket", firstTickByWebSocket(followed));
  } catch (error) {
    report.error = String(error);
  }
  await fetch("/report", {method: "POST", body: JSON.stringify(report)});
  if (report.error) return;
  // What a real page does: close its sessions as it goes away.
  window.addEventListener("pagehide", () => {
    const queued = {};
    for (const [form, sid] of Object.entries(report.sessions)) queued[form] = beacon(form, sid);
    sessionStorage.setItem("queued", JSON.stringify(queued));
  });
  location.href = "/gone";
}
main();
</script></body></html>
"""

GONE = """<!doctype html><html><body><script>
fetch("/report", {method: "POST", body: JSON.stringify({queued: JSON.parse(
  sessionStorage.getItem("queued") || "null")})});
</script></body></html>
"""


class PageServer:
    """The page's own origin: serves the page and collects its reports."""

    def __init__(self) -> None:
        self.reports: queue.Queue[dict[str, Any]] = queue.Queue()
        self.page = ""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = {"/page": owner.page, "/gone": GONE}.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self._answer(200, body.encode(), "text/html; charset=utf-8")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                owner.reports.put(json.loads(self.rfile.read(length)))
                self._answer(204, b"", "text/plain")

            def _answer(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def report(self, timeout: float, what: str, browser_log: Path) -> dict[str, Any]:
        try:
            return self.reports.get(timeout=timeout)
        except queue.Empty:
            pass
        log = browser_log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"no {what} from the page in {timeout} s; chromium:\n{log}")


@contextmanager
def chromium(url: str) -> Iterator[Path]:
    """Headless Chromium showing ``url``; yields the path of its log."""
    assert CHROMIUM is not None
    profile = Path(tempfile.mkdtemp(prefix="fleet-chromium-"))
    log_path = profile / "chromium.log"
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests may run as root, where the sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile / 'profile'}",
        url,
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield log_path
    finally:
        # Its own process group: the renderer and helper processes go with it.
        with _gone_already():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with _gone_already():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def _gone_already() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        pass


def _session(fleet: LocalFleet, sid: str, headers: dict[str, str]) -> dict[str, Any]:
    resp = fleet.request("GET", f"/calls/{CALL}/sessions/{sid}", headers=headers)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def _wait_ended(fleet: LocalFleet, sid: str, headers: dict[str, str], form: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (data := _session(fleet, sid, headers))["state"] != "ended":
        assert time.monotonic() < deadline, f"the {form!r} beacon did not end {sid}: {data}"
        time.sleep(0.05)
    return data


def _refused_beacons(fleet: LocalFleet) -> float:
    """4xx answers of the beacon route so far, from the node's Prometheus metrics."""
    labels = (
        'method="POST"',
        'route="/calls/{call_id}/sessions/{session_id}/close"',
        'status="4xx"',
    )
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in fleet.request("GET", "/metrics").text.splitlines()
        if line.startswith("fleet_http_requests_total{") and all(x in line for x in labels)
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("keys", [True, False], ids=["with-keys", "without-keys"])
def test_a_page_on_another_origin_starts_follows_and_beacons_a_session_closed(
    keys: bool,
) -> None:
    forms = WITH_KEYS if keys else WITHOUT_KEYS
    headers = {"Authorization": f"Bearer {ADMIN}"} if keys else {}
    with PageServer() as page:
        settings = {"FLEET_CORS_ORIGINS": page.origin}
        if keys:
            settings["FLEET_API_KEYS"] = f"alice:{ALICE},admin:{ADMIN}"
        with LocalFleet(1, None, **settings) as fleet:  # None: a redis-server of its own
            config = {
                "node": fleet.nodes[0].url,
                "call": CALL,
                "token": ALICE if keys else "",
                "forms": forms,
            }
            page.page = PAGE.replace("__CONFIG__", json.dumps(config))
            with chromium(f"{page.origin}/page") as browser_log:
                report = page.report(30, "report", browser_log)
                assert "error" not in report, report
                assert report["sse_tick"] >= 1 and report["ws_tick"] >= 1, report
                sessions: dict[str, str] = report["sessions"]
                assert sorted(sessions) == sorted(forms)
                gone = page.report(15, "report after leaving the page", browser_log)
                assert gone["queued"] == {form: True for form in forms}, gone
                # The browser stays up meanwhile: its beacons may still be on the way.
                _check_beacons(fleet, sessions, headers, keys)


def _check_beacons(
    fleet: LocalFleet, sessions: dict[str, str], headers: dict[str, str], keys: bool
) -> None:
    # Each beacon that carried a valid token ended its session as closed.
    for form, sid in sessions.items():
        if form == "none" and keys:
            continue
        ended = _wait_ended(fleet, sid, headers, form)
        assert ended["end_reason"] == "closed", (form, ended)
    if keys:
        # The beacon without a token was refused, and its session runs on.
        deadline = time.monotonic() + 10
        while _refused_beacons(fleet) < 1:
            assert time.monotonic() < deadline, "the tokenless beacon never arrived"
            time.sleep(0.05)
        left = _session(fleet, sessions["none"], headers)
        assert left["state"] == "running", left
