"""A seeded fault-injection soak of a local fleet: the machinery that the CI test
(``tests/multinode/test_soak.py``) and the longer run before releases (``python -m bench
soak``) share.

A ``LocalFleet`` of real nodes runs ``tests.soak_worker:SoakWorker`` (it checkpoints
``{"n": n}`` every 0.1 s and logs what it did to one file all nodes append to; one session
in ten is ``stubborn``: asked to stop, it carries on for 8 s, swallowing cancellation).
While it runs, for ``FLEET_SOAK_SECONDS``:

* clients start sessions through random nodes (under ``FLEET_MAX_SESSIONS_PER_CALL`` and
  ``FLEET_MAX_SESSIONS``), close some, read some, and record every answer; the nodes place
  with ``FLEET_PLACEMENT=spread``, so most starts are forwarded to another node, and the
  faults land on forwards in flight too (a start given up as ``start_failed`` must never
  run: a worker copy of a session whose record says ``not_started`` is a violation);
* an observer reads Redis every second: every session's record and its kept checkpoints
  (``FLEET_CHECKPOINT_HISTORY=100``, about 10 s of them), so their union is the stream of
  accepted checkpoints; and the API's list of running sessions, against the limits;
* a nemesis, seeded, injects one fault at a time, in shuffled rounds of the five kinds:
  ``kill`` (SIGKILL a node, start a replacement), ``pause`` (SIGSTOP a node for twice the
  lease, then SIGCONT), ``term`` (SIGTERM: the node drains and exits; a replacement
  starts), ``migrate`` (move a session of the node elsewhere now, as an operator's
  ``POST …/migrate``) and ``redis`` (stop Redis, start it again empty on the same port).
  Some kill,
  term and redis faults get a pause of another node on top (timed to land as sessions
  move, or around the restart). After each it waits (bounded) until the fleet is back:
  every node ready, ``/nodes`` lists exactly the running nodes, no live session on a node
  that is gone. An outage window runs from the fault to a little after that recovery.
  Faults never leave a node dead while Redis restarts, which would lose its sessions
  legitimately (Redis without persistence).

Then it stops the faults and the clients, lets the fleet settle (bounded) and checks the
invariants listed in ``INVARIANTS``. Each violation carries its evidence (the worker's
lines and the nodes' log lines about the session). Times in reports are seconds since the
soak began (``t+12.3``).

How the checkpoint checks work: a session's first checkpoint is version 1 with ``n = 1``,
each accepted checkpoint adds one to both, and a resume continues from the last accepted
state, so in a correct stream ``n == version`` at every version, whatever the faults. A
checkpoint accepted twice, one accepted from a stale copy, or a resume from anything but
the last accepted checkpoint, breaks that equality at some version; an older epoch
accepted after a newer one shows as an epoch that goes back along the versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol, cast

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fleet.runtime.session import STUCK
from tests.multinode.harness import LocalFleet, NodeProcess
from tests.soak_worker import Copy, read_log

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("kill", "pause", "term", "migrate", "redis")
EXPECTED_ENDS = {"closed", "completed"}
LIVE_STATES = ("running", "starting", "closing")

INVARIANTS = {
    "checkpoint_unique": "no checkpoint accepted twice: a version is never seen with two "
    "states, and no two copies of a session are both told the same n was saved",
    "checkpoint_epoch": "no checkpoint accepted from an older epoch: epochs never go back "
    "along the versions",
    "checkpoint_sequence": "n == version at every accepted version: +1 per checkpoint, and "
    "after an epoch change the new owner continues from the last accepted n",
    "resume_from_last": "a copy that resumes is handed the last checkpoint accepted before "
    "it started; a session never starts again from nothing",
    "no_silent_stop": "every session is running (and checkpointing) on a live node, or ended "
    "with a reason; none is forgotten",
    "expected_end": "ends are closed or completed: with other nodes up, a killed, paused or "
    "drained node's sessions move (node_lost, node_shutdown, failed are failures)",
    "transitional": "no session stays starting or closing longer than the bound",
    "forgone_never_runs": "a start given up as start_failed (record not_started) never runs",
    "limits": "running sessions never exceed FLEET_MAX_SESSIONS_PER_CALL or FLEET_MAX_SESSIONS",
    "no_5xx": "no 5xx answer outside an outage window (readiness probes excepted)",
    "no_traceback": "no traceback in any node's log",
    "recovery": "after each fault the fleet is back within the bound",
    "drain": "a node sent SIGTERM exits 0 within the bound (drain timeout, close grace, "
    "cancel grace, 1 s and 3 s), whatever its workers do",
}


class KeysLike(Protocol):
    def live(self) -> str: ...
    def session(self, call_id: str, session_id: str) -> str: ...
    def checkpoint(self, call_id: str, session_id: str) -> str: ...


def make_keys(prefix: str) -> KeysLike:
    """``Keys`` from wherever it lives now (``fleet.keys`` may move to ``fleet.store``)."""
    for module in ("fleet.store.keys", "fleet.keys"):
        try:
            return cast(KeysLike, importlib.import_module(module).Keys(prefix))
        except ImportError:
            continue
    raise ImportError("no Keys in fleet.store.keys or fleet.keys")


@dataclass(frozen=True)
class SoakConfig:
    seed: int
    seconds: float = 90.0  # of faults
    nodes: int = 3
    node_ttl: float = 3.0
    calls: int = 4
    max_sessions_per_call: int = 3
    max_sessions: int = 10
    clients: int = 3
    interval: float = 0.1  # between the worker's checkpoints
    request_timeout: float = 5.0
    gap: tuple[float, float] = (1.0, 3.0)  # between a recovery and the next fault
    recovery_limit: float = 20.0
    window_margin: float = 2.0
    close_grace: float = 1.0
    drain_timeout: float = 1.0
    # a SIGTERMed node exits within this: drain, close grace, the cancel grace a worker
    # that swallows its cancellation gets (fleet.runtime.session.CANCEL_GRACE), 1 s, 3 s
    drain_limit: float = 8.0
    drain_kill: float = 30.0  # and is killed after this
    overlap: float = 0.3  # of kill, term and redis faults get a pause on top
    # A node paused through an empty Redis restart and past admission's settling second
    # writes its sessions back when it wakes, over a limit others filled meanwhile: a known
    # gap (docs/architecture.md, "Redis restarts"), left out unless asked for.
    pause_over_redis: bool = False
    stubborn: float = 0.1  # of sessions ignore close and cancel for stubborn_seconds
    stubborn_seconds: float = 8.0
    stall_limit: float = 15.0  # a running session checkpoints at least this often
    transitional_limit: float = 20.0
    settle_limit: float = 20.0
    observe_every: float = 1.0

    @classmethod
    def from_env(cls, default_seconds: float) -> SoakConfig:
        """``FLEET_SOAK_SEED`` (default: a fresh random seed) and ``FLEET_SOAK_SECONDS``."""
        seed_text = os.environ.get("FLEET_SOAK_SEED", "").strip()
        seed = int(seed_text) if seed_text else random.SystemRandom().randrange(1, 1_000_000)
        seconds = float(os.environ.get("FLEET_SOAK_SECONDS") or default_seconds)
        return cls(seed=seed, seconds=seconds)

    def node_settings(self, worker_log: Path) -> dict[str, str]:
        path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH", "")])]
        return {
            "FLEET_WORKER": "tests.soak_worker:SoakWorker",
            "SOAK_WORKER_LOG": str(worker_log),
            "PYTHONPATH": os.pathsep.join(path),
            "FLEET_NODE_TTL": str(self.node_ttl),
            "FLEET_MAINTENANCE_INTERVAL": "0.5",
            "FLEET_CLOSE_GRACE": str(self.close_grace),
            "FLEET_DRAIN_TIMEOUT": str(self.drain_timeout),
            "FLEET_CHECKPOINT_HISTORY": "100",
            "FLEET_MAX_SESSIONS_PER_CALL": str(self.max_sessions_per_call),
            "FLEET_MAX_SESSIONS": str(self.max_sessions),
            "FLEET_PLACEMENT": "spread",
        }


# -- what the soak records ------------------------------------------------------------------
@dataclass
class Fault:
    kind: str
    target: str
    began: float
    recovered: float | None = None
    note: str = ""

    def describe(self, t0: float) -> str:
        back = (
            "not back" if self.recovered is None else f"back in {self.recovered - self.began:.1f} s"
        )
        note = f", {self.note}" if self.note else ""
        return f"t+{self.began - t0:.1f} {self.kind} {self.target} ({back}{note})"

    def window(self, config: SoakConfig) -> tuple[float, float]:
        back = self.recovered if self.recovered is not None else self.began + config.recovery_limit
        return self.began, back + config.window_margin

    def covers(self, reply: Reply, config: SoakConfig) -> bool:
        """Whether ``reply`` came during this fault's outage: from any node for a Redis
        restart, from the node itself for the others (the rest of the fleet has no excuse),
        and a forwarded start's ``start_failed`` from any node."""
        lo, hi = self.window(config)
        # A start is forwarded to the node placement chose, which the client does not
        # know: one given up because that node died or froze (503 start_failed) may come
        # through any node.
        forwarded = reply.code == "start_failed" and self.kind in ("kill", "pause", "term")
        mine = self.kind == "redis" or self.target == reply.node or forwarded
        return mine and reply.began <= hi and reply.ended >= lo


@dataclass(frozen=True)
class Reply:
    began: float
    ended: float
    node: str
    method: str
    route: str
    status: int  # 0: no answer (the error's name is in ``code``)
    code: str


@dataclass(frozen=True)
class Envelope:
    version: int
    epoch: int
    n: int | None
    saved_at: float


@dataclass
class Track:
    """One session as the observer saw it in Redis."""

    call: str
    sid: str
    record: dict[str, str] = field(default_factory=dict)  # the last one read
    record_at: float = 0.0
    history: list[tuple[float, str, str, int]] = field(default_factory=list)  # state, node, epoch
    envelopes: dict[int, Envelope] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    missing_since: float | None = None
    transitional: tuple[str, float] | None = None
    progress: tuple[str, float] = ("", 0.0)  # "node:epoch:version" while running, since
    final: bool = False
    started_by: str = ""

    @property
    def ref(self) -> str:
        return f"{self.call}/{self.sid}"


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str


@dataclass
class SoakResult:
    config: SoakConfig
    directory: Path
    started: float
    seconds: float
    faults: list[Fault]
    violations: list[Violation]
    figures: dict[str, Any]

    def report(self, evidence: int = 12) -> str:
        """The figures and the violations (at most ``evidence`` in full), seed first."""
        seed = self.config.seed
        lines = [
            f"soak seed {seed} (rerun with FLEET_SOAK_SEED={seed}), {self.config.seconds:.0f} s "
            f"of faults, {self.seconds:.0f} s in all; worker and node logs in {self.directory}",
            *(f"  {k}: {v}" for k, v in self.figures.items()),
        ]
        by_kind = Counter(v.invariant for v in self.violations)
        lines.append("faults: " + "; ".join(f.describe(self.started) for f in self.faults))
        lines.append(f"violations: {dict(by_kind) or 'none'}")
        for v in self.violations[:evidence]:
            lines.append(f"--- [{v.invariant}] {v.detail}")
        if len(self.violations) > evidence:
            lines.append(f"... and {len(self.violations) - evidence} more")
        return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------
class Soak:
    """``Soak(config).run()`` starts a fleet, runs the clients, the observer and the
    nemesis, settles, checks and returns a ``SoakResult``."""

    def __init__(self, config: SoakConfig, progress: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = progress
        self.directory = Path(tempfile.mkdtemp(prefix="fleet-soak-"))
        self.worker_log = self.directory / "worker.jsonl"
        self.faults: list[Fault] = []
        self.replies: list[Reply] = []
        self.tracks: dict[str, Track] = {}
        self.violations: list[Violation] = []
        self.stalls: list[tuple[Track, str]] = []
        self.limit_max: dict[str, int] = {}
        self.copies: list[Copy] = []
        self.tombstones_lost = 0
        self.bad_lines = 0
        self.t0 = time.time()
        self._next_node = config.nodes
        self._fleet: LocalFleet | None = None
        self._members: list[NodeProcess] = []
        self._http: httpx.AsyncClient | None = None
        self._redis: aioredis.Redis | None = None
        self._keys: KeysLike | None = None

    def rel(self, t: float) -> str:
        return f"t+{t - self.t0:.1f}"

    def violation(self, invariant: str, detail: str) -> None:
        self.violations.append(Violation(invariant, detail))
        self.say(f"[soak {self.rel(time.time())}] VIOLATION {invariant}: {detail.splitlines()[0]}")

    @property
    def fleet(self) -> LocalFleet:
        assert self._fleet is not None
        return self._fleet

    def run(self) -> SoakResult:
        c = self.config
        self.say(f"[soak] seed {c.seed}, {c.seconds:.0f} s of faults; logs in {self.directory}")
        with LocalFleet(c.nodes, None, **c.node_settings(self.worker_log)) as fleet:
            self._fleet = fleet
            (self.directory / "nodes").symlink_to(fleet.dir)
            self._members = list(fleet.nodes)
            self._keys = make_keys(fleet.prefix)
            self.t0 = time.time()
            asyncio.run(self._main())
        self._analyse()
        return SoakResult(
            config=c,
            directory=self.directory,
            started=self.t0,
            seconds=time.time() - self.t0,
            faults=self.faults,
            violations=self.violations,
            figures=self._figures(),
        )

    async def _main(self) -> None:
        c = self.config
        self._http = httpx.AsyncClient(timeout=c.request_timeout)
        self._redis = aioredis.Redis.from_url(
            self.fleet.redis.url,
            decode_responses=True,
            socket_timeout=2,
            socket_connect_timeout=1,
        )
        stop_clients, stop_watch = asyncio.Event(), asyncio.Event()
        clients = [asyncio.create_task(self._client(i, stop_clients)) for i in range(c.clients)]
        watchers = [
            asyncio.create_task(self._observe_loop(stop_watch)),
            asyncio.create_task(self._limits_loop(stop_watch)),
        ]
        try:
            await self._nemesis(time.time() + c.seconds)
            stop_clients.set()
            await asyncio.wait_for(asyncio.gather(*clients), c.request_timeout * 3)
            await self._settle()
            self.copies, self.bad_lines = read_log(self.worker_log)
            for copy in self.copies:  # sessions the soak never saw, but a worker ran
                self._track(f"{copy.call}/{copy.sid}")
            await self._final()
        finally:
            stop_clients.set()
            stop_watch.set()
            for task in [*clients, *watchers]:
                task.cancel()
            await asyncio.gather(*clients, *watchers, return_exceptions=True)
            await self._http.aclose()
            await self._redis.aclose()

    # -- requests -------------------------------------------------------------------------
    async def _call(
        self, node: NodeProcess, method: str, path: str, route: str, **kw: Any
    ) -> httpx.Response | None:
        assert self._http is not None
        began = time.time()
        try:
            resp = await self._http.request(method, node.url + path, **kw)
        except httpx.HTTPError as exc:
            self.replies.append(
                Reply(began, time.time(), node.name, method, route, 0, type(exc).__name__)
            )
            return None
        code = ""
        if resp.status_code >= 400:
            with contextlib.suppress(ValueError, AttributeError):
                body = resp.json()
                code = str(body.get("code") or body.get("reason") or "")
        self.replies.append(
            Reply(began, time.time(), node.name, method, route, resp.status_code, code)
        )
        return resp

    def _live_refs(self) -> list[str]:
        return sorted(
            ref
            for ref, t in self.tracks.items()
            if t.record.get("state", "running") != "ended" and t.missing_since is None
        )

    async def _client(self, index: int, stop: asyncio.Event) -> None:
        c = self.config
        rng = random.Random(f"{c.seed}:client:{index}")
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            node = rng.choice(self._members)
            live = self._live_refs()
            roll = rng.random()
            if roll < 0.3 or not live:
                call = f"c{rng.randrange(c.calls)}"
                params: dict[str, Any] = {"interval": c.interval}
                if rng.random() < 0.2:
                    params["steps"] = rng.randint(30, 300)
                if rng.random() < c.stubborn:
                    params["stubborn"] = c.stubborn_seconds
                path = f"/calls/{call}/sessions"
                resp = await self._call(node, "POST", path, "start", json={"params": params})
                if resp is not None and resp.status_code == 201:
                    self._track(f"{call}/{resp.json()['session_id']}", node.name)
                continue
            ref = rng.choice(live)
            path = "/calls/{}/sessions/{}".format(*ref.split("/"))
            if roll < 0.36:
                wait = {"wait": 2} if rng.random() < 0.5 else {}
                await self._call(node, "DELETE", path, "close", params=wait)
            elif roll < 0.8:
                await self._call(node, "GET", path, "read")
            elif roll < 0.9:
                await self._call(node, "GET", path.rsplit("/", 1)[0], "list_call")
            else:
                await self._call(node, "GET", f"{path}/checkpoint", "checkpoint")

    # -- the observer ---------------------------------------------------------------------
    def _track(self, ref: str, started_by: str = "") -> Track:
        track = self.tracks.get(ref)
        if track is None:
            call, sid = ref.split("/", 1)
            track = self.tracks[ref] = Track(call, sid, started_by=started_by)
        return track

    async def _observe_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            began = time.time()
            with contextlib.suppress(RedisError, OSError):
                await self.observe()
            await asyncio.sleep(max(0.05, self.config.observe_every - (time.time() - began)))

    async def observe(self) -> None:
        """One look at Redis: the live index, then every session not yet seen ended."""
        assert self._redis is not None and self._keys is not None
        keys = self._keys
        for ref in cast(list[str], await self._redis.zrange(keys.live(), 0, -1)):
            self._track(ref)
        pending = [t for t in self.tracks.values() if not t.final]
        pipe = self._redis.pipeline(transaction=False)
        for t in pending:
            pipe.hgetall(keys.session(t.call, t.sid))
            pipe.lrange(keys.checkpoint(t.call, t.sid), 0, -1)
        out = await pipe.execute()
        now = time.time()
        for t, record, envelopes in zip(pending, out[::2], out[1::2], strict=True):
            self._seen_envelopes(t, cast(list[str], envelopes), now)
            self._seen_record(t, cast(dict[str, str], record), now)

    def _seen_envelopes(self, t: Track, raw: list[str], now: float) -> None:
        for text in raw:
            data = json.loads(text)
            state = data.get("state")
            n = state.get("n") if isinstance(state, dict) else None
            env = Envelope(int(data["version"]), int(data["epoch"]), n, float(data["saved_at"]))
            old = t.envelopes.get(env.version)
            if old is None:
                t.envelopes[env.version] = env
            elif (old.epoch, old.n) != (env.epoch, env.n) and len(t.conflicts) < 5:
                t.conflicts.append(
                    f"version {env.version} seen as epoch {old.epoch} n={old.n} "
                    f"(saved {self.rel(old.saved_at)}), then as epoch {env.epoch} n={env.n} "
                    f"(saved {self.rel(env.saved_at)}, read {self.rel(now)})"
                )
                t.envelopes[env.version] = env

    def _seen_record(self, t: Track, record: dict[str, str], now: float) -> None:
        c = self.config
        if not record:
            if t.record and t.record.get("state") != "ended" and t.missing_since is None:
                t.missing_since = now
            if t.missing_since is not None and now - t.missing_since > 60:
                t.final = True  # forgotten: the final check says so
            return
        t.missing_since = None
        state, node = record.get("state", "?"), record.get("node_id", "?")
        epoch = int(record.get("epoch", "0"))
        if not t.history or t.history[-1][1:] != (state, node, epoch):
            t.history.append((now, state, node, epoch))
        t.record, t.record_at = record, now
        if state == "ended":
            t.final = True  # its checkpoints were read in the same round trip
            return
        if state in ("starting", "closing"):
            if t.transitional is None or t.transitional[0] != state:
                t.transitional = (state, now)
            elif now - t.transitional[1] > c.transitional_limit:
                self.stalls.append((t, f"{state} since {self.rel(t.transitional[1])}"))
                t.transitional = (state, float("inf"))  # once
        else:
            t.transitional = None
        key = f"{node}:{epoch}:{record.get('checkpoint_version', '0')}"
        if state != "running" or key != t.progress[0]:
            t.progress = (key, now)
        elif now - t.progress[1] > c.stall_limit:
            self.stalls.append(
                (t, f"running on {node} at epoch {epoch} with no checkpoint after "
                 f"version {record.get('checkpoint_version')} since {self.rel(t.progress[1])}")
            )  # fmt: skip
            t.progress = (key, float("inf"))  # once per owner and version

    async def _limits_loop(self, stop: asyncio.Event) -> None:
        c = self.config
        while not stop.is_set():
            await asyncio.sleep(c.observe_every)
            members = [m for m in self._members if m.alive()]
            if not members:
                continue
            node = random.choice(members)
            resp = await self._call(
                node, "GET", "/sessions", "list_running", params={"state": "running", "limit": 1000}
            )
            if resp is None or resp.status_code != 200:
                continue
            per_call = Counter(s["call_id"] for s in resp.json()["sessions"])
            total = sum(per_call.values())
            self.limit_max["total"] = max(self.limit_max.get("total", 0), total)
            for call, count in per_call.items():
                self.limit_max[call] = max(self.limit_max.get(call, 0), count)
            over = {k: v for k, v in per_call.items() if v > c.max_sessions_per_call}
            if over or total > c.max_sessions:
                self.violation(
                    "limits",
                    f"at {self.rel(time.time())} /sessions?state=running via {node.name} lists "
                    f"{total} running (max {c.max_sessions}), per call {dict(per_call)} "
                    f"(max {c.max_sessions_per_call}); {self._faults_near(time.time())}",
                )

    # -- the nemesis ----------------------------------------------------------------------
    async def _nemesis(self, until: float) -> None:
        """Faults until ``until``, one at a time, each followed by the wait for the fleet to
        be back. Some kill, term and redis faults get a pause of another node on top, timed
        to land while the first one's sessions move (or, for redis, before the restart)."""
        c = self.config
        rng = random.Random(c.seed)
        kinds: list[str] = []
        while True:
            await asyncio.sleep(rng.uniform(*c.gap))
            if time.time() >= until:
                return
            if not kinds:
                kinds = list(KINDS)
                rng.shuffle(kinds)
            kind = kinds.pop()
            # Every draw is made every time, so the schedule depends on the seed alone.
            ordered = sorted(self._members, key=lambda n: n.name)
            victim = rng.choice(ordered)
            second = rng.choice([m for m in ordered if m is not victim] or ordered)
            overlap = rng.random() < c.overlap and kind != "pause" and second is not victim
            overlap = overlap and (kind != "redis" or c.pause_over_redis)
            jitter, down = rng.uniform(-1.0, 1.0), rng.uniform(0.3, c.node_ttl / 2)
            main = Fault(kind, "redis" if kind == "redis" else victim.name, time.time())
            faults, delays = [main], [0.0]
            if overlap:
                main.note = f"with pause {second.name}"
                faults.append(Fault("pause", second.name, 0.0, note=f"with {kind} {main.target}"))
                if kind == "redis":  # the restart lands before or after the pause's lease ends
                    delays = [2 + jitter, 0.0]
                else:  # the pause lands about when the sessions move
                    moves = {"kill": c.node_ttl, "migrate": 0.1}.get(kind, c.drain_timeout + 0.5)
                    delays.append(moves + jitter)
            nodes = [victim, second]
            acts = [
                self._act(f, n, d, down) for f, n, d in zip(faults, nodes, delays, strict=False)
            ]
            await asyncio.gather(*acts)
            await self._recover(main)
            for fault in faults:
                fault.recovered = main.recovered
                self.say(f"[soak {self.rel(time.time())}] {fault.describe(self.t0)}")

    async def _act(self, fault: Fault, node: NodeProcess, delay: float, down: float) -> None:
        """Inject ``fault`` after ``delay`` seconds; return once its disruption is over (the
        node dead and replaced, resumed, or Redis back)."""
        await asyncio.sleep(max(0.0, delay))
        fault.began = time.time()
        self.faults.append(fault)
        self.say(f"[soak {self.rel(fault.began)}] {fault.kind} {fault.target} {fault.note}")
        if fault.kind == "kill":
            node.signal(signal.SIGKILL)
            await asyncio.to_thread(node.wait, 10)
            self._members.remove(node)
            await self._replace(fault)
        elif fault.kind == "pause":
            node.signal(signal.SIGSTOP)
            await asyncio.sleep(2 * self.config.node_ttl)
            node.signal(signal.SIGCONT)
        elif fault.kind == "term":
            await self._term(node, fault)
        elif fault.kind == "migrate":
            await self._migrate(node, fault)
        else:
            fault.note += f"{', ' if fault.note else ''}down {down:.1f} s"
            await asyncio.to_thread(self.fleet.redis.stop)
            await asyncio.sleep(down)
            await asyncio.to_thread(self.fleet.redis.start)

    async def _migrate(self, victim: NodeProcess, fault: Fault) -> None:
        """Move up to three of the victim's running sessions away now, asked through
        another node: each stops, checkpoints and resumes elsewhere (or stays, 409
        no_target)."""
        on_victim = [
            ref
            for ref, t in self.tracks.items()
            if t.record.get("node_id") == victim.name and t.record.get("state") == "running"
        ]
        others = sorted((m for m in self._members if m is not victim), key=lambda m: m.name)
        via = others[0] if others else victim  # asked through another node: its channel
        moved = []
        for ref in sorted(on_victim)[:3]:
            path = "/calls/{}/sessions/{}/migrate".format(*ref.split("/"))
            resp = await self._call(via, "POST", path, "migrate")
            moved.append(f"{ref.split('/')[1][:8]} {resp.status_code if resp else 'no answer'}")
        fault.note += ", ".join(moved) or "no running session"

    async def _term(self, victim: NodeProcess, fault: Fault) -> None:
        c = self.config
        victim.signal(signal.SIGTERM)
        try:
            code: int | None = await asyncio.to_thread(victim.wait, c.drain_kill)
        except subprocess.TimeoutExpired:
            code = None
            await asyncio.to_thread(victim.stop)
        took = time.time() - fault.began
        fault.note += f"{', ' if fault.note else ''}exit {code} after {took:.1f} s"
        if code != 0 or took > c.drain_limit:
            what = "had not exited; killed" if code is None else f"exited {code}"
            self.violation(
                "drain",
                f"{victim.name} sent SIGTERM at {self.rel(fault.began)} {what} after {took:.1f} s "
                f"(bound {c.drain_limit:.0f} s: drain timeout, close grace, cancel grace, "
                "1 s, 3 s slack)"
                f"\n{self._node_tail(victim.name)}\n{self._ignored_on(victim.name, fault.began)}",
            )
        self._members.remove(victim)
        await self._replace(fault)

    def _ignored_on(self, node: str, since: float) -> str:
        """The worker log's lines, since ``since``, of copies on ``node`` that ignored a close
        or a cancellation."""
        if not self.worker_log.exists():
            return ""
        hits = [
            line
            for line in self.worker_log.read_text().splitlines()
            if '"ev":"ignored"' in line
            and f'"node":"{node}"' in line
            and json.loads(line)["t"] >= since
        ]
        return "\n".join(["worker lines 'ignored' on it:", *hits[-6:]]) if hits else ""

    async def _replace(self, fault: Fault) -> None:
        name = f"node-{self._next_node}"
        self._next_node += 1
        try:
            node = await asyncio.to_thread(self.fleet.add_node, name)
        except AssertionError as exc:
            node = self.fleet.node_named(name)
            self.violation("recovery", f"replacement {name} after {fault.kind}: {exc}")
        if node.alive():
            self._members.append(node)

    async def _recover(self, fault: Fault) -> None:
        deadline = fault.began + self.config.recovery_limit
        while True:
            problem = await self._unsettled()
            if problem is None:
                fault.recovered = time.time()
                return
            if time.time() > deadline:
                self.violation(
                    "recovery",
                    f"{fault.kind} {fault.target} at {self.rel(fault.began)}: not back after "
                    f"{self.config.recovery_limit:.0f} s: {problem}",
                )
                return
            await asyncio.sleep(0.25)

    async def _unsettled(self, strict: bool = False) -> str | None:
        """Why the fleet is not back yet, or None: every node ready, ``/nodes`` lists exactly
        the running nodes, no live session on any other node, none starting (a resume in
        flight) and, if ``strict``, none closing."""
        names = {m.name for m in self._members}
        for node in self._members:
            resp = await self._call(node, "GET", "/ready", "ready", timeout=2)
            if resp is None or resp.status_code != 200:
                why = "no answer" if resp is None else resp.text[:120]
                return f"{node.name} not ready ({why})"
        via = self._members[0]
        resp = await self._call(via, "GET", "/nodes", "nodes")
        if resp is None or resp.status_code != 200:
            return f"GET /nodes via {via.name} failed"
        listed = {n["node_id"] for n in resp.json()["nodes"]}
        if listed != names:
            return f"/nodes lists {sorted(listed)}, the running nodes are {sorted(names)}"
        for state in LIVE_STATES:
            params = {"state": state, "limit": 1000}
            resp = await self._call(via, "GET", "/sessions", "settle", params=params)
            if resp is None or resp.status_code != 200:
                return f"GET /sessions?state={state} via {via.name} failed"
            for s in resp.json()["sessions"]:
                if s["node_id"] not in names:
                    return f"{s['call_id']}/{s['session_id']} is {state} on {s['node_id']}, gone"
                if state == "starting" or (strict and state == "closing"):
                    return f"{s['call_id']}/{s['session_id']} is still {state}"
        return None

    async def _settle(self) -> None:
        deadline = time.time() + self.config.settle_limit
        while (problem := await self._unsettled(strict=True)) is not None:
            if time.time() > deadline:
                self.violation(
                    "recovery",
                    f"not settled {self.config.settle_limit:.0f} s after the last fault: {problem}",
                )
                return
            await asyncio.sleep(0.5)

    # -- the end --------------------------------------------------------------------------
    async def _final(self) -> None:
        """Every session, through the API: ended with a reason, or running on a live node
        and checkpointing (its version moves within two seconds)."""
        await self.observe()
        before = {ref: t.record.get("checkpoint_version") for ref, t in self.tracks.items()}
        await asyncio.sleep(2.0)
        await self.observe()
        via = self._members[0]
        resp = await self._call(via, "GET", "/nodes", "nodes")
        live_nodes = {n["node_id"] for n in resp.json()["nodes"]} if resp is not None else set()
        for ref, t in sorted(self.tracks.items()):
            path = "/calls/{}/sessions/{}".format(*ref.split("/"))
            resp = await self._call(via, "GET", path, "final")
            if resp is None:
                self.violation("no_silent_stop", f"{ref}: final read via {via.name} failed")
            elif resp.status_code == 404:
                self._forgotten(t)
            elif resp.status_code != 200:
                self.violation("no_silent_stop", f"{ref}: final read {resp.status_code}")
            else:
                self._final_one(t, resp.json(), live_nodes, before.get(ref))

    def _final_one(
        self, t: Track, info: dict[str, Any], live_nodes: set[str], before: str | None
    ) -> None:
        state, node = info["state"], info["node_id"]
        t.record["state"] = state
        if state == "ended":
            t.record["end_reason"] = info.get("end_reason") or ""
            t.record["ended_at"] = str(info.get("ended_at") or 0)
            if not info.get("end_reason"):
                self.violation("no_silent_stop", f"{t.ref}: ended without a reason: {info}")
            return
        problem = ""
        if state != "running":
            problem = f"still {state} after the fleet settled"
        elif node not in live_nodes:
            problem = f"running on {node}, which is not a live node ({sorted(live_nodes)})"
        elif before is not None and str(info["checkpoint_version"]) == before:
            problem = (
                f"running on live {node} at epoch {info['epoch']} but no checkpoint in 2 s "
                f"(version {before}): no node runs it"
            )
        if problem:
            self.violation("no_silent_stop", f"{t.ref}: {problem}\n{self._evidence(t)}")

    def _forgotten(self, t: Track) -> None:
        last = next((c for c in reversed(self.copies) if c.sid == t.sid), None)
        if t.record.get("state") == "ended" or (
            last is not None
            and last.ended_itself
            and any(f.kind == "redis" and f.began > (last.ended_at or 0) - 1 for f in self.faults)
        ):
            # It ended, then its tombstone went with a Redis restart.
            self.tombstones_lost += 1
            if last is not None and t.record.get("state") != "ended":
                why = last.end.removeprefix("exit:").removeprefix("closing:")
                t.record.update(state="ended", end_reason=why, ended_at=str(last.ended_at))
            return
        wipes = [f for f in self.faults if f.kind == "redis" and f.began > t.record_at]
        seen = (
            f"last seen {t.record.get('state')} on {t.record.get('node_id')} at epoch "
            f"{t.record.get('epoch')} at {self.rel(t.record_at)}"
            if t.record
            else "never seen in Redis"
        )
        after = ", ".join(self.rel(f.began) for f in wipes) or "none"
        self.violation(
            "no_silent_stop",
            f"{t.ref}: forgotten (404), {seen}; Redis restarts since: {after}\n{self._evidence(t)}",
        )

    # -- analysis -------------------------------------------------------------------------
    def _analyse(self) -> None:
        by_sid: dict[str, list[Copy]] = defaultdict(list)
        for copy in self.copies:
            by_sid[copy.sid].append(copy)
        for t in self.tracks.values():
            self._check_checkpoints(t)
            self._check_copies(t, by_sid.get(t.sid, []))
            reason, error = t.record.get("end_reason"), t.record.get("error", "")
            # A start that failed half-way (Redis went away) ends "failed" with error
            # "start", and its client got an error, not a session: nothing was promised.
            start_failed = reason == "failed" and error == "start" and not t.started_by
            # A forwarded start the chosen node did not answer in time is given up for good
            # (its client got 503 start_failed): it must never have run anywhere.
            forgone = reason == "failed" and error == "not_started" and not t.started_by
            if forgone and by_sid.get(t.sid):
                self.violation(
                    "forgone_never_runs",
                    f"{t.ref}: given up (not_started), yet a worker ran it\n{self._evidence(t)}",
                )
            # A stubborn worker swallows its cancellation: fleet records its end without it
            # (fleet.runtime.session.STUCK) rather than wait for it, and hands nothing off.
            stuck = error == STUCK and "stubborn" in json.loads(t.record.get("params", "{}"))
            if (
                t.record.get("state") == "ended"
                and reason not in EXPECTED_ENDS
                and not start_failed
                and not forgone
                and not stuck
            ):
                self.violation(
                    "expected_end",
                    f"{t.ref}: ended {reason}{f' ({error})' if error else ''} at "
                    f"{self.rel(float(t.record.get('ended_at', 0)))}; "
                    f"{self._faults_near(float(t.record.get('ended_at', 0)))}\n{self._evidence(t)}",
                )
        for t, what in self.stalls:
            invariant = "no_silent_stop" if what.startswith("running") else "transitional"
            self.violation(invariant, f"{t.ref}: {what}\n{self._evidence(t)}")
        self._check_replies()
        self._check_node_logs()

    def _check_checkpoints(self, t: Track) -> None:
        for conflict in t.conflicts:
            self.violation("checkpoint_unique", f"{t.ref}: {conflict}\n{self._evidence(t)}")
        stream = [t.envelopes[v] for v in sorted(t.envelopes)]
        for a, b in pairwise(stream):
            if b.epoch < a.epoch:
                self.violation(
                    "checkpoint_epoch",
                    f"{t.ref}: version {b.version} at epoch {b.epoch} after version {a.version} "
                    f"at epoch {a.epoch} (saved {self.rel(b.saved_at)})\n{self._evidence(t)}",
                )
                break
        for i, env in enumerate(stream):
            if env.n == env.version:
                continue
            prev = stream[i - 1] if i > 0 else None
            if prev is not None and prev.version == env.version - 1:
                if prev.epoch == env.epoch and env.n is not None and prev.n is not None:
                    what = (
                        f"n={env.n} accepted at version {env.version} after n={prev.n} at "
                        f"version {prev.version}, same epoch {env.epoch}"
                    )
                else:
                    what = (
                        f"epoch {prev.epoch} -> {env.epoch} at version {env.version}: the new "
                        f"owner wrote n={env.n} after the last accepted n={prev.n}"
                    )
            else:
                what = f"version {env.version} (epoch {env.epoch}) holds n={env.n}"
            self.violation(
                "checkpoint_sequence",
                f"{t.ref}: {what} (saved {self.rel(env.saved_at)}); "
                f"{self._faults_near(env.saved_at)}\n{self._evidence(t)}",
            )
            break  # the first break in the sequence; the rest follow from it

    def _check_copies(self, t: Track, copies: list[Copy]) -> None:
        told: dict[int, Copy] = {}
        for copy in copies:
            for _, n in copy.oks:
                other = told.setdefault(n, copy)
                if other is not copy:
                    self.violation(
                        "checkpoint_unique",
                        f"{t.ref}: n={n} acknowledged to copy {other.copy} on {other.node} and to "
                        f"copy {copy.copy} on {copy.node}\n{self._evidence(t)}",
                    )
                    break
        for i, copy in enumerate(copies):
            if i > 0 and not copy.resumed:
                self.violation(
                    "resume_from_last",
                    f"{t.ref}: copy {copy.copy} on {copy.node} at {self.rel(copy.started)} "
                    f"started fresh (not resumed) after {i} earlier copies\n{self._evidence(t)}",
                )
            if not copy.resumed:
                continue
            n0 = copy.state_n or 0
            acked = [n for c in copies[:i] for tt, n in c.oks if tt < copy.started]
            accepted = [e for e in t.envelopes.values() if e.saved_at < copy.started]
            last = max(accepted, key=lambda e: e.version) if accepted else None
            problem = ""
            if acked and n0 < max(acked):
                problem = f"n={max(acked)} had been acknowledged before it started"
            elif last is not None and last.n is not None and n0 < last.n:
                problem = f"version {last.version} n={last.n} was accepted before it started"
            elif last is not None and n0 > (last.n or 0) and last.version + 1 in t.envelopes:
                problem = f"the last accepted before it started was n={last.n}"
            if problem:
                self.violation(
                    "resume_from_last",
                    f"{t.ref}: copy {copy.copy} on {copy.node} resumed at {self.rel(copy.started)} "
                    f"from n={copy.state_n}, but {problem}; "
                    f"{self._faults_near(copy.started)}\n{self._evidence(t)}",
                )

    def excused(self, reply: Reply) -> bool:
        return any(f.covers(reply, self.config) for f in self.faults)

    def _check_replies(self) -> None:
        outside = [
            r
            for r in self.replies
            if r.status >= 500 and r.route != "ready" and not self.excused(r)
        ]
        if outside:
            kinds = Counter(f"{r.status} {r.code} ({r.route})" for r in outside)
            first = "; ".join(
                f"{self.rel(r.began)} {r.node} {r.method} {r.route} {r.status} {r.code}"
                for r in outside[:8]
            )
            self.violation(
                "no_5xx",
                f"{len(outside)} 5xx outside outage windows: {dict(kinds)}; first: {first}; "
                f"windows: {self._windows()}",
            )

    def _check_node_logs(self) -> None:
        for node in self.fleet.nodes:
            lines = node.log().splitlines()
            hits = [i for i, line in enumerate(lines) if "Traceback" in line]
            if hits:
                i = hits[0]
                excerpt = "\n".join(lines[max(0, i - 2) : i + 25])
                self.violation(
                    "no_traceback",
                    f"{node.name}: {len(hits)} traceback(s) in {node.log_path}; the first:\n"
                    f"{excerpt}",
                )

    # -- evidence -------------------------------------------------------------------------
    def _windows(self) -> str:
        return ", ".join(
            f"{f.kind} {self.rel(lo)}..{self.rel(hi)}"
            for f in self.faults
            for lo, hi in [f.window(self.config)]
        )

    def _faults_near(self, t: float) -> str:
        near = [f for f in self.faults if f.began - 5 <= t <= f.window(self.config)[1] + 10]
        if not near:
            return "no fault near"
        return "faults near: " + ", ".join(
            f"{f.kind} {f.target} at {self.rel(f.began)}"
            + ("" if f.recovered is None else f" (back {self.rel(f.recovered)})")
            for f in near
        )

    def _node_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.fleet.node_named(name).log().splitlines()[-lines:])
        except StopIteration:
            return ""

    def _evidence(self, t: Track, lines: int = 14) -> str:
        out = [f"  started via {t.started_by or '?'}; record history (time state node epoch):"]
        out += [f"    {self.rel(w)} {s} {n} {e}" for w, s, n, e in t.history[-8:]]
        copies = [c for c in self.copies if c.sid == t.sid]
        for c in copies[-5:]:
            oks = f"n={c.oks[0][1]}..{c.oks[-1][1]}" if c.oks else "no checkpoint"
            out.append(
                f"  copy {c.copy} on {c.node} (pid {c.pid}) from {self.rel(c.started)}: "
                f"resumed={c.resumed} state n={c.state_n}, {oks}, "
                f"end={c.end or '(none: killed?)'}"
            )
        stream = [t.envelopes[v] for v in sorted(t.envelopes)]
        shifts = [b for a, b in pairwise(stream) if a.epoch != b.epoch or b.n != b.version]
        for e in shifts[:4]:
            out.append(f"  checkpoint v{e.version} epoch {e.epoch} n={e.n} {self.rel(e.saved_at)}")
        found: list[str] = []
        for node in self.fleet.nodes if self._fleet is not None else []:
            found += [f"    {node.name}: {x}" for x in node.log().splitlines() if t.sid in x]
        if found:
            out.append("  node log lines about it:")
            out += found[-lines:]
        return "\n".join(out)

    def _figures(self) -> dict[str, Any]:
        c = self.config
        recover: dict[str, list[float]] = defaultdict(list)
        for f in self.faults:
            if f.recovered is not None:
                recover[f.kind].append(f.recovered - f.began)
        ends = Counter(
            t.record.get("end_reason", "?")
            for t in self.tracks.values()
            if t.record.get("state") == "ended"
        )
        statuses = Counter(
            f"{r.status // 100}xx" if r.status else "no answer" for r in self.replies
        )
        fives = [r for r in self.replies if r.status >= 500 and r.route != "ready"]
        inside = sum(1 for r in fives if self.excused(r))
        errors = [r for r in self.replies if r.status == 0]
        return {
            "faults": dict(Counter(f.kind for f in self.faults)),
            "recovery s (median/max)": {
                k: f"{statistics.median(v):.1f}/{max(v):.1f}" for k, v in sorted(recover.items())
            },
            "faults not recovered in bound": sum(1 for f in self.faults if f.recovered is None),
            "sessions seen": len(self.tracks),
            "sessions started (201)": sum(
                1 for r in self.replies if r.route == "start" and r.status == 201
            ),
            "refused starts": dict(
                Counter(
                    f"{r.status} {r.code}"
                    for r in self.replies
                    if r.route == "start" and r.status != 201
                )
            ),
            "worker copies resumed": sum(1 for x in self.copies if x.resumed),
            "ended by reason": dict(ends),
            "tombstones lost to Redis restarts": self.tombstones_lost,
            "still running": sum(
                1 for t in self.tracks.values() if t.record.get("state") == "running"
            ),
            "checkpoints accepted (max version summed)": sum(
                max(t.envelopes, default=0) for t in self.tracks.values()
            ),
            "checkpoints acknowledged to workers": sum(len(x.oks) for x in self.copies),
            "lease_lost in workers": sum(1 for x in self.copies if x.end == "lease_lost"),
            "requests": dict(statuses),
            "5xx inside / outside windows": f"{inside} / {len(fives) - inside}",
            "5xx by code": dict(Counter(f"{r.status} {r.code} ({r.route})" for r in fives)),
            "no answer inside / outside windows": (
                f"{sum(1 for r in errors if self.excused(r))} / "
                f"{sum(1 for r in errors if not self.excused(r))}"
            ),
            "max running (total, per call)": (
                f"{self.limit_max.get('total', 0)} (limit {c.max_sessions}), "
                f"{max((v for k, v in self.limit_max.items() if k != 'total'), default=0)} "
                f"(limit {c.max_sessions_per_call})"
            ),
            "worker log lines unreadable": self.bad_lines,
            "violations": dict(Counter(v.invariant for v in self.violations)),
        }
