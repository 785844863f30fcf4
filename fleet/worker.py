"""The worker interface: what user code implements, and what it is given."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast, runtime_checkable

import pydantic

from fleet.errors import InvalidParams, WorkerLoadError
from fleet.settings import parse_workers

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
    """A loaded ``module:attr`` under its name: makes one worker per session and knows its
    options (``resumable``, ``inbox``, ``migratable``, ``Params``)."""

    def __init__(
        self, import_string: str, factory: WorkerFactory, template: Any, name: str = ""
    ) -> None:
        self.import_string = import_string
        self.name = name or import_string.rpartition(":")[2].rpartition(".")[2]
        self._factory = factory
        self._template = template
        if self.inbox not in INBOX_POLICIES:
            raise WorkerLoadError(
                f"worker {import_string!r}: inbox = {self.inbox!r}; it must be one of "
                + ", ".join(INBOX_POLICIES)
            )
        params = getattr(template, "Params", None)
        if params is not None and not (
            isinstance(params, type) and issubclass(params, pydantic.BaseModel)
        ):
            raise WorkerLoadError(
                f"worker {import_string!r}: Params must be a pydantic model (a BaseModel "
                f"subclass), not {params!r}"
            )
        self.params_model: type[pydantic.BaseModel] | None = params

    def create(self) -> Worker:
        return self._factory()

    @property
    def resumable(self) -> bool:
        return bool(getattr(self._template, "resumable", True))

    @property
    def migratable(self) -> bool:
        """Whether a draining node hands these sessions off at once, rather than letting
        them run on for ``FLEET_DRAIN_TIMEOUT`` first (only resumable ones move)."""
        return bool(getattr(self._template, "migratable", False))

    @property
    def inbox(self) -> InboxPolicy:
        """What a message that arrives while an earlier one is unconsumed does: ``queue``
        (wait its turn), ``reject`` (409 ``busy``) or ``interrupt`` (queue, and set
        ``ctx.interrupt``)."""
        policy = getattr(self._template, "inbox", "queue")
        return cast(InboxPolicy, policy)

    @property
    def description(self) -> str:
        """The first line of the worker's docstring."""
        doc = inspect.getdoc(self._template) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def params_schema(self) -> dict[str, Any] | None:
        """The JSON schema of ``Params``, if the worker declares it."""
        return None if self.params_model is None else self.params_model.model_json_schema()

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params the worker gets: validated by its ``Params`` model (defaults filled
        in) or its ``validate_params``. Raises ``InvalidParams`` naming each field that is
        wrong."""
        if self.params_model is not None:
            try:
                model = self.params_model.model_validate(params, strict=True)
            except pydantic.ValidationError as exc:
                problems = [
                    {
                        "loc": ["params", *(str(p) for p in err["loc"])],
                        "msg": err["msg"],
                        "type": err["type"],
                    }
                    for err in exc.errors(include_url=False, include_input=False)
                ]
                detail = "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems[:5])
                raise InvalidParams(detail, errors=problems) from None
            return model.model_dump(mode="json")
        validate = getattr(self._template, "validate_params", None)
        if validate is not None:
            try:
                validate(params)
            except (ValueError, TypeError) as exc:
                raise InvalidParams(str(exc)) from None
        return params

    def describe(self) -> dict[str, Any]:
        """What ``GET /workers`` shows of it (kept in Redis for nodes that do not run it)."""
        return {
            "name": self.name,
            "description": self.description,
            "resumable": self.resumable,
            "migratable": self.migratable,
            "inbox": self.inbox,
            "params_schema": self.params_schema(),
        }


class WorkerSet:
    """The named workers a node runs (``FLEET_WORKER``); the first is the default."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        if not specs:
            raise WorkerLoadError("a node must run at least one worker")
        self._specs = {spec.name: spec for spec in specs}
        self.default = specs[0]

    def get(self, name: str | None) -> WorkerSpec | None:
        """The worker called ``name`` (the default for ``None`` or ``""``, which older
        records name), or ``None`` when this node does not run it."""
        return self.default if not name else self._specs.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def __iter__(self) -> Iterator[WorkerSpec]:
        return iter(self._specs.values())


def load_workers(setting: str) -> WorkerSet:
    """Load every worker that ``FLEET_WORKER`` names."""
    try:
        pairs = parse_workers(setting)
    except ValueError as exc:
        raise WorkerLoadError(f"FLEET_WORKER: {exc}") from None
    return WorkerSet([load_worker(target, name) for name, target in pairs])


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


def load_worker(import_string: str, name: str = "") -> WorkerSpec:
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
        return WorkerSpec(import_string, lambda: cast(Worker, cls()), cls, name)
    if inspect.iscoroutinefunction(target):
        fn = target
        return WorkerSpec(import_string, lambda: _FunctionWorker(fn), fn, name)
    if inspect.iscoroutinefunction(getattr(target, "run", None)):
        instance = target
        return WorkerSpec(import_string, lambda: instance, instance, name)
    raise WorkerLoadError(
        f"worker {import_string!r} is a {type(target).__name__}, not a worker: expected a class "
        "or object with 'async def run(self, ctx)', or an 'async def' function"
    )
