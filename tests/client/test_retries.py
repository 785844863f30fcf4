"""``start_session`` sends an ``Idempotency-Key`` and retries safely: against a node (on
fakeredis and on a real redis-server) whose answer is lost on the way back, and against
scripted answers for the retry policy itself."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import httpx
import pytest
from redis.asyncio import Redis

from fleet.api import create_app
from fleet.client import (
    AsyncFleetClient,
    FleetAPIError,
    FleetClient,
    FleetConnectionError,
    aio,
    sync,
)
from fleet.client.retries import retry_delay
from fleet.models import SessionInfo, State
from fleet.runtime.node import Node
from tests.conftest import SettingsFactory, uvicorn_node, wait_ready

STARTED = SessionInfo(
    session_id="s1",
    call_id="c",
    call_type="default",
    node_id="n1",
    state=State.RUNNING,
    session_started_at=1.0,
    epoch=1,
    resumed_count=0,
    checkpoint_version=0,
)


def is_start(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.endswith("/sessions")


class LoseFirstAnswer(httpx.AsyncBaseTransport):
    """The first request that ``matches`` (a start, by default) reaches the node and is
    carried out there; its answer never comes back. ``hits``: every matching request."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        matches: Callable[[httpx.Request], bool] = is_start,
    ) -> None:
        self.inner = inner
        self.matches = matches
        self.hits: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.matches(request):
            self.hits.append(request)
            if len(self.hits) == 1:
                await response.aread()
                raise httpx.ReadError("connection reset by peer")
        return response


class TimeOutFirstAnswer(httpx.BaseTransport):
    """The same for the blocking client, over a real socket: the first answer times out."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.starts: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if is_start(request):
            self.starts.append(request)
            if len(self.starts) == 1:
                response.read()
                raise httpx.ReadTimeout("timed out")
        return response

    def close(self) -> None:
        self.inner.close()


async def test_async_start_whose_answer_was_lost_starts_one_session(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings()
    node = Node(settings, redis=redis)
    app = create_app(settings, node)
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = LoseFirstAnswer(httpx.ASGITransport(app=app))
        async with AsyncFleetClient("http://fleet", transport=transport) as client:
            info = await client.start_session("room", {"interval": 5})
            listed = await client.list_call_sessions("room")
    assert [s.session_id for s in listed] == [info.session_id]
    keys = [r.headers["idempotency-key"] for r in transport.hits]
    assert len(keys) == 2 and keys[0] == keys[1]


async def test_sync_start_that_timed_out_starts_one_session(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    node = Node(make_settings(), redis=redis)
    async with uvicorn_node(node) as url:
        transport = TimeOutFirstAnswer()

        def run() -> tuple[SessionInfo, list[SessionInfo]]:
            with FleetClient(url, transport=transport) as client:
                info = client.start_session("room", {"interval": 5})
                return info, client.list_call_sessions("room")

        info, listed = await asyncio.to_thread(run)
    assert [s.session_id for s in listed] == [info.session_id]
    assert len(transport.starts) == 2
    assert (
        transport.starts[0].headers["idempotency-key"]
        == (transport.starts[1].headers["idempotency-key"])
    )


# ---- the policy, against scripted answers ---------------------------------------------------


Answer = httpx.Response | Exception


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """No pause between attempts (``retry_delay`` is tested on its own): the attempt
    numbers each client would have paused after."""
    asked: list[int] = []

    def no_pause(attempt: int, resp: httpx.Response | None) -> float:
        asked.append(attempt)
        return 0.0

    monkeypatch.setattr(sync, "retry_delay", no_pause)
    monkeypatch.setattr(aio, "retry_delay", no_pause)
    return asked


def test_retry_delay_backs_off_honours_retry_after_and_is_capped() -> None:
    for attempt, low, high in [(0, 0.1, 0.3), (1, 0.2, 0.6), (2, 0.4, 1.2)]:
        assert low <= retry_delay(attempt, None) <= high
    asked = httpx.Response(503, headers={"Retry-After": "2"})
    assert retry_delay(0, asked) == 2.0
    assert retry_delay(0, httpx.Response(503, headers={"Retry-After": "3600"})) == 5.0
    assert retry_delay(10, None) == 5.0
    assert retry_delay(0, httpx.Response(503, headers={"Retry-After": "soon"})) <= 0.3


def scripted(answers: list[Answer], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0) if answers else httpx.Response(201, json=STARTED.model_dump())
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handle)


async def start_async(transport: httpx.MockTransport) -> SessionInfo:
    async with AsyncFleetClient("http://fleet", transport=transport) as client:
        return await client.start_session("c")


def start_sync(transport: httpx.MockTransport) -> SessionInfo:
    with FleetClient("http://fleet", transport=transport) as client:
        return client.start_session("c")


def both(answers: Callable[[], list[Answer]]) -> list[tuple[str, list[httpx.Request], object]]:
    """Run a start with each client against the same script: (kind, requests, outcome)."""
    runs: list[tuple[str, list[httpx.Request], object]] = []
    for kind in ("sync", "async"):
        seen: list[httpx.Request] = []
        transport = scripted(answers(), seen)
        outcome: object
        try:
            if kind == "sync":
                outcome = start_sync(transport)
            else:
                outcome = asyncio.run(start_async(transport))
        except Exception as exc:
            outcome = exc
        runs.append((kind, seen, outcome))
    return runs


def keys(seen: list[httpx.Request]) -> set[str]:
    return {r.headers["idempotency-key"] for r in seen}


def test_each_start_has_a_key_of_its_own_unless_one_is_given() -> None:
    seen: list[httpx.Request] = []
    with FleetClient("http://fleet", transport=scripted([], seen)) as client:
        client.start_session("c")
        client.start_session("c")
        client.start_session("c", idempotency_key="order-42")
        client.start_session("c", idempotency_key="order-42")
    sent = [r.headers["idempotency-key"] for r in seen]
    assert sent[0] != sent[1] and sent[2:] == ["order-42", "order-42"]
    assert all(str(uuid.UUID(k)) == k for k in sent[:2])


def test_starts_are_retried_on_no_answer_gateways_and_in_progress(pauses: list[int]) -> None:
    def script() -> list[Answer]:
        return [
            httpx.ConnectError("refused"),
            httpx.Response(502, text="bad gateway"),
            httpx.Response(409, json={"detail": "busy", "code": "idempotency_in_progress"}),
        ]

    for kind, seen, outcome in both(script):
        assert outcome == STARTED, kind
        assert len(seen) == 4 and len(keys(seen)) == 1, kind
    assert pauses == [0, 1, 2] * 2


def test_retries_are_bounded_and_keep_the_last_answer(pauses: list[int]) -> None:
    def unavailable() -> list[Answer]:
        return [httpx.Response(503, json={"detail": "draining", "code": "draining"})] * 5

    for kind, seen, outcome in both(unavailable):
        assert isinstance(outcome, FleetAPIError) and outcome.code == "draining", kind
        assert len(seen) == 4 and len(keys(seen)) == 1, kind  # the first and three more

    def unreachable() -> list[Answer]:
        return [httpx.ReadTimeout("slow")] * 5

    for kind, seen, outcome in both(unreachable):
        assert isinstance(outcome, FleetConnectionError), kind
        assert len(seen) == 4, kind


def test_a_start_the_chosen_node_failed_to_start_is_retried_with_its_key(
    pauses: list[int],
) -> None:
    """503 ``start_failed``: nothing was started and the key was given back, so the same
    start, with the same key, starts the session once."""

    def failed_once() -> list[Answer]:
        detail = "the node chosen for this session (n2) did not start it in time"
        return [httpx.Response(503, json={"detail": detail, "code": "start_failed"})]

    for kind, seen, outcome in both(failed_once):
        assert outcome == STARTED, kind
        assert len(seen) == 2 and len(keys(seen)) == 1, kind


def test_refusals_are_not_retried(pauses: list[int]) -> None:
    for status, code in [
        (429, "max_sessions"),
        (429, "no_capacity"),  # the whole fleet is full for that worker
        (409, "thread_busy"),
        (422, "invalid_params"),
        (422, "unknown_worker"),
    ]:

        def refused(status: int = status, code: str = code) -> list[Answer]:
            return [httpx.Response(status, json={"detail": "no", "code": code})]

        for kind, seen, outcome in both(refused):
            assert isinstance(outcome, FleetAPIError) and outcome.code == code, kind
            assert len(seen) == 1, (kind, code)


def test_only_starts_are_retried_and_retries_can_be_turned_off(pauses: list[int]) -> None:
    seen: list[httpx.Request] = []
    unavailable = httpx.Response(503, json={"detail": "draining", "code": "draining"})
    with FleetClient("http://fleet", transport=scripted([unavailable] * 2, seen)) as client:
        with pytest.raises(FleetAPIError):
            client.get_session("c", "s")
    assert len(seen) == 1
    with FleetClient("http://fleet", retries=0, transport=scripted([unavailable], seen)) as client:
        with pytest.raises(FleetAPIError):
            client.start_session("c")
    assert len(seen) == 2
    with FleetClient("http://fleet", transport=scripted([unavailable] * 2, seen)) as client:
        with pytest.raises(FleetAPIError):
            client.migrate("c", "s")  # an operator's act: sent once, whatever the answer
    assert len(seen) == 3 and seen[-1].url.path == "/calls/c/sessions/s/migrate"
