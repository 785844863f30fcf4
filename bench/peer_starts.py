"""peer_starts: one fleet node against the Vision Agents agent server, starts per second.

The peer is the ``vision-agents`` package's agent server (``Runner(launcher).serve()``: one
uvicorn process, its ``POST /calls/{call_id}/sessions``), installed in a virtualenv of its
own, named by ``BENCH_PEER_PYTHON`` (its Python)::

    python3 -m venv /tmp/peer
    /tmp/peer/bin/pip install vision-agents redis uvloop httptools
    BENCH_PEER_PYTHON=/tmp/peer/bin/python python -m bench peer_starts

(``redis`` for its Redis registry; ``uvloop`` and ``httptools`` so that its uvicorn runs
the same event loop and HTTP parser as fleet's.) Without it the benchmark fails, and its
section is left as it was.

Its agents need an edge network (Stream, an account and its API keys) and model
providers, which this machine cannot reach: the peer runs its own launcher and HTTP route
with a do-nothing agent instead, whose edge transport, LLM, speech-to-text and audio
filter are stubs (the default filter downloads a VAD model) and whose ``join_call`` idles
for an hour, as fleet's counter with ``interval`` 3600 does. A real start would also
join the call over the network, so the peer measured here does less than a real one.

Each run measures, one after the other on fresh processes: one fleet node
(``start_throughput``'s settings) and the peer with its in-memory registry and with its
Redis registry (``RedisSessionKVStore`` on a fresh redis-server), each under ``wrk -t1
-c16`` for 5 s after 10 warm-up starts. The figures are starts per second (2xx answers)
and the server's CPU per start.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common, start_throughput

NAME = "peer_starts"
TITLE = "peer_starts: one fleet node vs the Vision Agents agent server (wrk, 16 connections)"
CONNECTIONS = 16
DURATION = 5
QUICK_DURATION = 2
TARGET_RATIO = 3.0
PEER_ENV = "BENCH_PEER_PYTHON"
VARIANTS = ("fleet", "peer (in-memory registry)", "peer (Redis registry)")

PEER_AGENT = '''\
"""The Vision Agents agent server with a do-nothing agent (bench/peer_starts.py)."""
import asyncio, os, sys
from typing import Any

from vision_agents.core import Agent, AgentLauncher, Runner, User
from vision_agents.core.agents.session_registry import SessionRegistry
from vision_agents.core.edge.edge_transport import EdgeTransport
from vision_agents.core.llm.llm import LLM
from vision_agents.core.stt.stt import STT
from vision_agents.core.utils.audio_filter import AudioFilter


class StubEdge(EdgeTransport):
    async def authenticate(self, user: Any) -> None: ...
    async def create_call(self, call_id: str, **kwargs: Any) -> Any: return None
    def create_audio_track(self) -> Any: return None
    def open_demo(self, *args: Any, **kwargs: Any) -> None: ...
    async def join(self, agent: Any, call: Any, **kwargs: Any) -> Any: return None
    async def publish_tracks(self, audio_track: Any, video_track: Any) -> None: ...
    async def create_conversation(self, call: Any, user: Any, instructions: str) -> None: ...
    def add_track_subscriber(self, track_id: str) -> Any: return None
    async def send_custom_event(self, data: Any) -> None: ...


class StubLLM(LLM):
    async def simple_response(self, text: str, participant: Any = None) -> Any: return None


class StubSTT(STT):
    async def process_audio(self, *args: Any, **kwargs: Any) -> None: ...


class PassFilter(AudioFilter):
    async def process_audio(self, pcm: Any, participant: Any) -> Any: return pcm
    def clear(self, participant: Any = None) -> None: ...


def create_agent(**kwargs: Any) -> Agent:
    return Agent(edge=StubEdge(), llm=StubLLM(), agent_user=User(name="bench", id="agent"),
                 stt=StubSTT(), multi_speaker_filter=PassFilter())


async def join_call(agent: Agent, call_type: str, call_id: str) -> None:
    await asyncio.sleep(3600)


url = os.environ.get("PEER_REDIS_URL")
if url:
    from vision_agents.core.agents.session_registry.redis_store import RedisSessionKVStore
    registry = SessionRegistry(RedisSessionKVStore(url=url))
else:
    registry = SessionRegistry()
launcher = AgentLauncher(create_agent=create_agent, join_call=join_call, registry=registry,
                         agent_idle_timeout=0)
Runner(launcher).serve(host="127.0.0.1", port=int(sys.argv[1]), agents_log_level="WARNING",
                       http_log_level="WARNING")
'''
PEER_BODY = '{"call_type":"default"}'


@dataclass
class Result:
    rate: float
    cpu_per_start: float
    p50: float


def peer_python() -> tuple[str, str]:
    """The peer's Python and its vision-agents version."""
    python = os.environ.get(PEER_ENV, "")
    if not python or not Path(python).exists():
        raise RuntimeError(
            f"{PEER_ENV} does not name a Python with vision-agents installed (see the "
            "docstring of bench/peer_starts.py)"
        )
    probe = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('vision-agents'))"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise RuntimeError(f"{python} has no vision-agents: {probe.stderr.strip()}")
    return python, probe.stdout.strip()


def fleet_run(seconds: int, script: Path) -> Result:
    run = start_throughput.one_run(1, CONNECTIONS, seconds, script)
    return Result(run.rate, run.node_cpu / max(1, run.requests), run.worst("p50"))


def peer_run(python: str, agent: Path, redis: bool, seconds: int, script: Path) -> Result:
    if str(common.ROOT) not in sys.path:
        sys.path.insert(0, str(common.ROOT))
    from tests.redis_server import RedisServer, free_port

    server = RedisServer().start() if redis else None
    env = {k: v for k, v in os.environ.items() if k != "PEER_REDIS_URL"}
    if server is not None:
        env["PEER_REDIS_URL"] = server.url
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([python, str(agent), str(port)], env=env, stdout=log, stderr=log)
        try:
            asyncio.run(_peer_warm_up(port, proc))
            cpu0 = common.cpu_seconds(proc.pid)
            wrk = start_throughput.run_wrk(
                [f"http://127.0.0.1:{port}"], [CONNECTIONS], seconds, script
            )[0]
            cpu = common.cpu_seconds(proc.pid) - cpu0
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-2000:])
            raise
        finally:
            proc.kill()
            proc.wait(10)
            if server is not None:
                server.stop()
    ok = wrk.requests - sum(wrk.errors.values())
    return Result(ok / wrk.seconds, cpu / max(1, wrk.requests), wrk.p50)


async def _peer_warm_up(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the peer answers a start, then make 9 more."""
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the peer exited ({proc.returncode}) before it answered")
        try:
            async with common.RawHTTP("127.0.0.1", port) as conn:
                for i in range(10):
                    status, body = await conn.request(
                        "POST", f"/calls/warm-{i}/sessions", {"call_type": "default"}
                    )
                    if status != 201:
                        raise RuntimeError(f"the peer answered {status}: {body[:200]!r}")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


def run(opts: common.Options) -> common.Report:
    python, version = peer_python()
    seconds = QUICK_DURATION if opts.quick else DURATION
    load_before = common.load_average()
    results: dict[str, list[Result]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        agent = Path(tmp) / "peer_agent.py"
        agent.write_text(PEER_AGENT)
        fleet_script = Path(tmp) / "fleet.lua"
        fleet_script.write_text(start_throughput.LUA)
        peer_script = Path(tmp) / "peer.lua"
        peer_script.write_text(start_throughput.wrk_script("a start", "", PEER_BODY))
        for i in range(opts.runs):
            for variant in VARIANTS:
                if variant == "fleet":
                    r = fleet_run(seconds, fleet_script)
                else:
                    r = peer_run(python, agent, "Redis" in variant, seconds, peer_script)
                results[variant].append(r)
                common.progress(
                    f"run {i + 1}/{opts.runs}, {variant}: {r.rate:,.0f} starts/s, CPU per "
                    f"start {r.cpu_per_start * 1000:.2f} ms"
                )
    return report(opts, seconds, results, version, load_before)


def report(
    opts: common.Options,
    seconds: int,
    results: dict[str, list[Result]],
    version: str,
    load_before: str,
) -> common.Report:
    def agg(variant: str, get: Any) -> common.Agg:
        return common.Agg.of(get(r) for r in results[variant])

    fleet = results["fleet"]
    rows = [
        [
            variant,
            agg(variant, lambda r: r.rate).fmt("", 0),
            agg(variant, lambda r: r.p50).ms(),
            agg(variant, lambda r: r.cpu_per_start).ms(2),
            common.Agg.of(
                f.rate / p.rate for f, p in zip(fleet, results[variant], strict=True)
            ).fmt("×", 1)
            if variant != "fleet"
            else "",
        ]
        for variant in VARIANTS
    ]
    ratios = {
        v: common.Agg.of(f.rate / p.rate for f, p in zip(fleet, results[v], strict=True))
        for v in VARIANTS[1:]
    }
    # fleet keeps its sessions in Redis: the peer's Redis registry is the like-for-like
    # set-up; its in-memory registry (one node only) is its fastest.
    met = {v: ratios[v].median >= TARGET_RATIO for v in VARIANTS[1:]}
    body = [
        f"{opts.runs} runs; in each, one after the other on fresh processes: one fleet node "
        "(`start_throughput`'s settings, the idle counter) and the Vision Agents agent "
        f"server (`vision-agents` {version}: `Runner(launcher).serve()`, one uvicorn "
        "process with uvloop and httptools) with a do-nothing agent, with its in-memory "
        "registry and with its Redis registry. Each under `wrk -t1 "
        f"-c{CONNECTIONS} -d{seconds}s` after 10 warm-up starts, POSTing to "
        "`/calls/<call>/sessions` over 1,000 call ids. Target: fleet ≥ "
        f"{TARGET_RATIO:.0f}× the peer's starts per second.",
        "",
        *common.table(
            ["server", "starts/s", "p50", "CPU per start", "fleet's starts/s ÷ this one's"],
            rows,
        ),
        "",
        f"fleet against the peer (ratios within each run; target ≥ {TARGET_RATIO:.0f}×): "
        f"{ratios[VARIANTS[2]].fmt('×', 1)} the starts per second of its Redis registry, "
        f"the like-for-like set-up (fleet keeps its sessions in Redis too): "
        f"{common.verdict(met[VARIANTS[2]])}; {ratios[VARIANTS[1]].fmt('×', 1)} those of its "
        "in-memory registry, which serves one node only: "
        f"{common.verdict(met[VARIANTS[1]])}.",
    ]
    notes = [
        "The peer's agent is a stub: a real agent server needs a Stream account (its edge "
        "network, over WebRTC) and model providers, which this machine cannot reach. Its "
        "start path is its own (the FastAPI route, `AgentLauncher.start_session`: a new "
        "`Agent`, its warm-up, a task joining the call, the registry), but its join does "
        "nothing: a real start does more.",
        "The peer's starts are serialised by a lock (`AgentLauncher._start_lock`), one "
        "at a time; fleet's run concurrently. Neither limits sessions here.",
        "fleet's session is placed (`place.lua`) and its record written (`create_session."
        "lua`) in Redis before the answer: two round trips. The peer's Redis registry "
        "writes one key per start.",
        common.load_note(load_before),
    ]
    summary = (
        f"One fleet node: {agg('fleet', lambda r: r.rate).fmt(' starts/s', 0)} at "
        f"{CONNECTIONS} connections; the Vision Agents agent server with a do-nothing agent: "
        f"{agg(VARIANTS[1], lambda r: r.rate).fmt('', 0)} (in-memory registry), "
        f"{agg(VARIANTS[2], lambda r: r.rate).fmt('', 0)} (Redis registry): "
        f"{ratios[VARIANTS[1]].fmt('×', 1)} and {ratios[VARIANTS[2]].fmt('×', 1)} "
        f"(target ≥ {TARGET_RATIO:.0f}×: {common.verdict(met[VARIANTS[1]])} against the "
        f"in-memory registry, {common.verdict(met[VARIANTS[2]])} against the Redis one)."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
