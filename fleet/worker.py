"""The worker interface: what user code implements, and what it is given."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast, runtime_checkable

from fleet.errors import WorkerLoadError

InboxPolicy = Literal["queue", "reject", "interrupt"]
INBOX_POLICIES: tuple[InboxPolicy, ...] = ("queue", "reject", "interrupt")


@dataclass(frozen=True)
class Message:
    """Input sent to the session from any node (``POST …/messages``), in the order sent.
    It counts as consumed once the worker's next ``ctx.checkpoint`` is written."""

    id: str
    type: str
    data: Any
    sent_at: float
    replier: Callable[[Message, Any], Awaitable[None]] = field(repr=False, compare=False)

    async def reply(self, data: Any) -> None:
        """Answer this message: a ``reply`` event for followers, and the answer of a send
        that waits for it (``?wait=``), wherever it was sent from."""
        await self.replier(self, data)


class SessionHooks(Protocol):
    """What the runtime does for a context (``fleet.runtime.session.LocalSession``)."""

    async def emit(self, type: str, data: Any) -> None: ...
    async def checkpoint(self, state: Any) -> None: ...
    def touch(self) -> None: ...
    async def receive(self, timeout: float | None) -> Message | None: ...


class SessionContext:
    """Everything a worker is given for one session.

    ``closing`` is set when the session is asked to stop (``close_reason`` says why): the
    worker should wrap up and return within ``FLEET_CLOSE_GRACE`` seconds, after which its
    task is cancelled.
    """

    def __init__(
        self,
        *,
        session_id: str,
        call_id: str,
        call_type: str,
        params: dict[str, Any],
        node_id: str,
        state: Any,
        resumed: bool,
        hooks: SessionHooks,
        thread_id: str | None = None,
    ) -> None:
        self.session_id = session_id
        self.call_id = call_id
        self.call_type = call_type
        self.params = params
        self.node_id = node_id
        self.state = state
        self.resumed = resumed
        #: The thread this session runs on (``state`` is then the thread's latest state).
        self.thread_id = thread_id
        self.closing = asyncio.Event()
        self.close_reason: str | None = None
        # Numbers the owner reports at ``…/metrics`` (``fleet/runtime/reports.py``): at most
        # every ``FLEET_METRICS_REPORT_INTERVAL`` seconds, and once at the end.
        self.metrics: dict[str, int | float] = {}
        #: Set when a message arrives, for workers whose ``inbox`` policy is "interrupt":
        #: stop talking and listen. The worker clears it.
        self.interrupt = asyncio.Event()
        self._hooks = hooks

    async def emit(self, type: str, data: Any = None) -> None:
        """Send an event to the session's streaming clients. Counts as activity."""
        await self._hooks.emit(type, data)

    async def checkpoint(self, state: Any) -> None:
        """Save a JSON state; the latest is handed back if the session resumes elsewhere.
        Raises ``fleet.errors.LeaseLost`` if this node no longer owns the session."""
        await self._hooks.checkpoint(state)

    def touch(self) -> None:
        """Record activity, for ``FLEET_IDLE_TIMEOUT``."""
        self._hooks.touch()

    async def receive(self, timeout: float | None = None) -> Message | None:
        """The next message sent to the session, or ``None`` on timeout or once the
        session is closing. Each message comes once per run; it is consumed (not given
        again after a failover) once the next ``checkpoint`` is written."""
        return await self._hooks.receive(timeout)

    @property
    def messages(self) -> AsyncIterator[Message]:
        """``async for message in ctx.messages``: every message, in the order sent, until
        the session is closing."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while (message := await self.receive()) is not None:
            yield message


@runtime_checkable
class Worker(Protocol):
    """User code: ``run`` returns to complete the session, raises to fail it. What it
    returns (JSON, at most ``FLEET_MAX_RESULT_BYTES``) is the session's ``result``."""

    async def run(self, ctx: SessionContext) -> Any: ...


WorkerFactory = Callable[[], Worker]


class WorkerSpec:
    """A loaded ``module:attr``: makes one worker per session and knows its options."""

    def __init__(self, import_string: str, factory: WorkerFactory, template: Any) -> None:
        self.import_string = import_string
        self._factory = factory
        self._template = template
        if self.inbox not in INBOX_POLICIES:
            raise WorkerLoadError(
                f"worker {import_string!r}: inbox = {self.inbox!r}; it must be one of "
                + ", ".join(INBOX_POLICIES)
            )

    def create(self) -> Worker:
        return self._factory()

    @property
    def resumable(self) -> bool:
        return bool(getattr(self._template, "resumable", True))

    @property
    def inbox(self) -> InboxPolicy:
        """What a message that arrives while an earlier one is unconsumed does: ``queue``
        (wait its turn), ``reject`` (409 ``busy``) or ``interrupt`` (queue, and set
        ``ctx.interrupt``)."""
        policy = getattr(self._template, "inbox", "queue")
        return cast(InboxPolicy, policy)

    def validate_params(self, params: dict[str, Any]) -> None:
        """Raise ``ValueError`` with a clear message when the worker refuses ``params``."""
        validate = getattr(self._template, "validate_params", None)
        if validate is not None:
            validate(params)


class _FunctionWorker:
    def __init__(self, fn: Callable[[SessionContext], Any]) -> None:
        self._fn = fn

    async def run(self, ctx: SessionContext) -> Any:
        return await self._fn(ctx)


def _build_once(import_string: str, cls: type[Any]) -> None:
    """Make (and drop) one instance now, so that a class that cannot be built stops the
    node at start-up instead of failing every start later."""
    try:
        cls()
    except Exception as exc:
        raise WorkerLoadError(
            f"worker {import_string!r}: class {cls.__name__} cannot be built without "
            f"arguments ({type(exc).__name__}: {exc}); fleet makes one instance per session "
            "with no arguments"
        ) from exc


def load_worker(import_string: str) -> WorkerSpec:
    """Load ``module:attr``: a class with ``async def run(self, ctx)`` (one instance per
    session, built with no arguments: one is built here to check that it can be), an
    instance of one, or an ``async def`` taking the context."""
    module_name, sep, attr_path = import_string.partition(":")
    if not sep or not module_name or not attr_path:
        raise WorkerLoadError(f"worker {import_string!r} must be 'module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WorkerLoadError(
            f"worker {import_string!r}: cannot import module {module_name!r} ({exc})"
        ) from exc
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise WorkerLoadError(
                f"worker {import_string!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None

    if inspect.isclass(target):
        if not inspect.iscoroutinefunction(getattr(target, "run", None)):
            raise WorkerLoadError(
                f"worker {import_string!r}: class {target.__name__} "
                "has no 'async def run(self, ctx)'"
            )
        cls = target
        _build_once(import_string, cls)
        return WorkerSpec(import_string, lambda: cast(Worker, cls()), cls)
    if inspect.iscoroutinefunction(target):
        fn = target
        return WorkerSpec(import_string, lambda: _FunctionWorker(fn), fn)
    if inspect.iscoroutinefunction(getattr(target, "run", None)):
        instance = target
        return WorkerSpec(import_string, lambda: instance, instance)
    raise WorkerLoadError(
        f"worker {import_string!r} is a {type(target).__name__}, not a worker: expected a class "
        "or object with 'async def run(self, ctx)', or an 'async def' function"
    )
