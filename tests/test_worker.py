from __future__ import annotations

import pytest

from fleet.errors import InvalidParams, WorkerLoadError
from fleet.worker import SessionContext, Worker, load_worker, load_workers

COUNTER = load_worker("fleet.workers.counter:Counter")


class NeedsArgs:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    async def run(self, ctx: SessionContext) -> None:
        pass


class BreaksOnBuild:
    def __init__(self) -> None:
        raise RuntimeError("no model file")

    async def run(self, ctx: SessionContext) -> None:
        pass


def test_counter_is_the_default_and_a_worker() -> None:
    spec = load_worker("fleet.workers.counter:Counter")
    assert isinstance(spec.create(), Worker) and spec.resumable


def test_a_class_gives_one_instance_per_session() -> None:
    spec = load_worker("tests.workers:Quiet")
    assert spec.create() is not spec.create()


@pytest.mark.parametrize(
    ("target", "words"),
    [
        (
            "tests.test_worker:NeedsArgs",
            "worker 'tests.test_worker:NeedsArgs': class NeedsArgs cannot be built without "
            "arguments (TypeError: NeedsArgs.__init__() missing 1 required positional argument: "
            "'api_key')",
        ),
        (
            "tests.test_worker:BreaksOnBuild",
            "class BreaksOnBuild cannot be built without arguments (RuntimeError: no model file)",
        ),
    ],
)
def test_a_class_that_cannot_be_built_fails_at_load(target: str, words: str) -> None:
    """Caught when the node starts, rather than as a 500 on every start later."""
    with pytest.raises(WorkerLoadError) as err:
        load_worker(target)
    assert words in str(err.value)


def test_an_async_function_is_a_worker() -> None:
    assert isinstance(load_worker("tests.workers:function_worker").create(), Worker)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("nope_module:Thing", "cannot import module 'nope_module'"),
        ("tests.workers:Missing", "has no attribute 'Missing'"),
        ("tests.workers:not_a_worker", "is a int, not a worker"),
        ("fleet.settings:Settings", "has no 'async def run(self, ctx)'"),
        ("nocolon", "must be 'module:attr'"),
    ],
)
def test_bad_import_strings_say_what_is_wrong(target: str, words: str) -> None:
    with pytest.raises(WorkerLoadError) as err:
        load_worker(target)
    assert words in str(err.value)


@pytest.mark.parametrize(
    "params",
    [
        {"interval": 0},
        {"interval": "1"},
        {"interval": True},
        {"limit": -1},
        {"limit": 1.5},
        {"interval": float("inf")},
        {"other": 1},
    ],
)
def test_counter_refuses_bad_params(params: dict[str, object]) -> None:
    with pytest.raises(InvalidParams) as err:
        COUNTER.validate_params(params)
    assert err.value.errors and err.value.errors[0]["loc"][0] == "params"
    assert err.value.detail.startswith("params.")


def test_counter_accepts_good_params_and_fills_in_defaults() -> None:
    assert COUNTER.validate_params({}) == {"interval": 1.0, "limit": None}
    assert COUNTER.validate_params({"interval": 1, "limit": 3}) == {"interval": 1.0, "limit": 3}


def test_params_schema_and_description_are_published() -> None:
    described = COUNTER.describe()
    assert described["name"] == "Counter" and described["inbox"] == "queue"
    assert described["description"].startswith("Ticks, emits and checkpoints")
    schema = described["params_schema"]
    assert set(schema["properties"]) == {"interval", "limit"}
    assert schema["additionalProperties"] is False


class BadParams:
    Params = dict

    async def run(self, ctx: SessionContext) -> None:
        pass


def test_params_must_be_a_pydantic_model() -> None:
    with pytest.raises(WorkerLoadError, match="Params must be a pydantic model"):
        load_worker("tests.test_worker:BadParams")


def test_named_workers_load_in_order_with_the_first_as_default() -> None:
    workers = load_workers(
        "tick=fleet.workers.counter:Counter, chat=fleet.workers.chat:Chat,tests.workers:Answer"
    )
    assert workers.names == ["tick", "chat", "Answer"]
    assert workers.default.name == "tick" and workers.get(None) is workers.default
    assert workers.get("") is workers.default  # records of older nodes name none
    assert workers.get("chat") is not None and workers.get("nope") is None
    spec = workers.get("Answer")
    assert spec is not None and spec.import_string == "tests.workers:Answer"


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("a=fleet.workers.counter:Counter,a=fleet.workers.chat:Chat", "given twice"),
        ("bad name=fleet.workers.counter:Counter", "worker name"),
        ("x=fleet.workers.counter", "module:attr"),
        (" , ", "at least one"),
    ],
)
def test_bad_worker_settings_are_refused_clearly(setting: str, words: str) -> None:
    with pytest.raises(WorkerLoadError, match=words):
        load_workers(setting)
