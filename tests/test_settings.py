from __future__ import annotations

import pytest
from pydantic import SecretStr

from fleet.errors import ConfigError
from fleet.settings import Settings, load_settings


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.redis_url is None and s.embedded
    assert s.key_prefix == "fleet" and s.worker == "counter=fleet.workers.counter:Counter"
    assert (s.node_ttl, s.maintenance_interval, s.close_grace) == (10, 5, 5)
    assert (s.drain_timeout, s.tombstone_ttl) == (30, 3600)
    assert s.max_sessions is None and s.max_sessions_per_call is None
    assert s.api_docs == "auth"  # behind the token when keys are set
    assert s.heartbeat_interval == pytest.approx(10 / 3)


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_MAX_SESSIONS_PER_CALL", "2")
    monkeypatch.setenv("FLEET_NODE_TTL", "4.5")
    s = load_settings()
    assert s.max_sessions_per_call == 2 and s.node_ttl == 4.5


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_PORT", "9000")
    assert load_settings(port=9100).port == 9100


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FLEET_NODE_TTL", "soon"),
        ("FLEET_NODE_TTL", "-1"),
        ("FLEET_MAX_SESSIONS", "-3"),
        ("FLEET_WORKER", "no_colon"),
        ("FLEET_NODE_ID", "has space"),
        ("FLEET_KEY_PREFIX", "a{b}"),
        ("FLEET_API_KEYS", "alice"),
        ("FLEET_API_DOCS", "sometimes"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert variable in str(err.value)


def test_api_key_errors_never_echo_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_API_KEYS", "alice:short-secret")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "short-secret" not in str(err.value)


def test_secrets_are_not_in_repr() -> None:
    s = Settings(
        redis_url=SecretStr("redis://:pw-123@localhost/0"), api_keys=SecretStr("alice:" + "t" * 20)
    )
    assert "pw-123" not in repr(s) and "t" * 20 not in repr(s)
