from __future__ import annotations

import pytest

from fleet.errors import WorkerLoadError
from fleet.worker import SessionContext, Worker, load_worker
from fleet.workers.counter import Counter


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
    with pytest.raises(ValueError):
        Counter.validate_params(params)


def test_counter_accepts_good_params() -> None:
    Counter.validate_params({})
    Counter.validate_params({"interval": 0.5, "limit": 3})
