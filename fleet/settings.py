"""Settings: one pydantic-settings class, read from ``FLEET_*`` variables and flags.

Settings are always passed in (``create_app(settings)``, ``Node(settings)``); nothing in
fleet reads a module-level global.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import uuid
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet.errors import ConfigError

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)

PositiveSeconds = Annotated[float, Field(gt=0)]
OptionalLimit = Annotated[int | None, Field(default=None, ge=0)]


def default_node_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:80] or "node"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Settings(BaseSettings):
    """Everything a node can be told. Environment prefix ``FLEET_``."""

    # hide_input_in_errors: a refused FLEET_API_KEYS must not echo its tokens, even in the
    # ValidationError of a Settings(...) built by hand (load_settings shows messages only).
    model_config = SettingsConfigDict(
        env_prefix="FLEET_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    redis_url: SecretStr | None = None
    node_id: str = Field(default_factory=default_node_id)
    #: ``module:attr``, or several named ones: ``name=module:attr,name=module:attr`` (the
    #: first is the default; a bare ``module:attr`` is named after its attr).
    worker: str = "counter=fleet.workers.counter:Counter"
    #: The worker of a start that names none: one name for the whole fleet, for pools
    #: whose nodes run different worker sets ("": the first of this node's FLEET_WORKER).
    default_worker: Annotated[str, Field(pattern=r"^([A-Za-z0-9._-]{1,64})?$")] = ""
    #: Where a start goes when the node asked can take it: ``local`` (there; elsewhere
    #: only when it cannot) or ``spread`` (the node with the most room, the asked one on a
    #: tie).
    placement: Literal["local", "spread"] = "local"
    key_prefix: str = "fleet"
    api_keys: SecretStr | None = None
    allow_unauthenticated: bool = False
    api_docs: Literal["auth", "public", "off"] = "auth"

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)

    node_ttl: PositiveSeconds = 10.0
    maintenance_interval: PositiveSeconds = 5.0
    metrics_report_interval: PositiveSeconds = 5.0
    max_sessions_per_call: OptionalLimit = None
    max_sessions: OptionalLimit = None
    max_sessions_per_node: OptionalLimit = None
    max_session_duration: PositiveSeconds | None = None
    idle_timeout: PositiveSeconds | None = None
    close_grace: PositiveSeconds = 5.0
    drain_timeout: Annotated[float, Field(ge=0)] = 30.0
    tombstone_ttl: Annotated[int, Field(ge=1)] = 3600
    idempotency_ttl: Annotated[int, Field(ge=1)] = 24 * 3600

    max_checkpoint_bytes: Annotated[int, Field(ge=64)] = 1024 * 1024
    checkpoint_history: Annotated[int, Field(ge=1, le=100)] = 1
    events_maxlen: Annotated[int, Field(ge=10)] = 1000
    max_body_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    max_params_bytes: Annotated[int, Field(ge=2)] = 16 * 1024
    max_params_depth: Annotated[int, Field(ge=1, le=100)] = 16
    max_event_bytes: Annotated[int, Field(ge=64)] = 64 * 1024
    max_message_bytes: Annotated[int, Field(ge=64)] = 64 * 1024
    inbox_maxlen: Annotated[int, Field(ge=1)] = 1000
    max_result_bytes: Annotated[int, Field(ge=64)] = 64 * 1024
    thread_ttl: Annotated[int, Field(ge=1)] = 30 * 24 * 3600
    cors_origins: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("node_id")
    @classmethod
    def _node_id_is_an_id(cls, value: str) -> str:
        if not _ID_RE.match(value):
            raise ValueError(f"must match {ID_PATTERN}")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix_is_plain(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
            raise ValueError("must be 1-64 characters of A-Z a-z 0-9 . _ -")
        return value

    @field_validator("worker")
    @classmethod
    def _worker_is_import_string(cls, value: str) -> str:
        parse_workers(value)
        return value

    @field_validator("api_keys")
    @classmethod
    def _api_keys_parse(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip():
            parse_api_keys(value.get_secret_value())
            return value
        return None

    @model_validator(mode="after")
    def _lease_outlives_renewals(self) -> Settings:
        if self.node_ttl < 1.0:
            raise ValueError("node_ttl must be at least 1 second")
        return self

    @property
    def heartbeat_interval(self) -> float:
        return self.node_ttl / 3

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def principals(self) -> list[tuple[str, str]]:
        """(principal, token) pairs from ``FLEET_API_KEYS``."""
        if self.api_keys is None:
            return []
        return parse_api_keys(self.api_keys.get_secret_value())

    def binds_publicly(self) -> bool:
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"


WORKER_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
_WORKER_NAME_RE = re.compile(WORKER_NAME_PATTERN)


def parse_workers(raw: str) -> list[tuple[str, str]]:
    """(name, import string) pairs of ``FLEET_WORKER``, the default first. A bare
    ``module:attr`` is named after its attr (the last part of a dotted one)."""
    pairs: list[tuple[str, str]] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, target = item.partition("=")
        if not sep:
            name, target = "", item
        name, target = name.strip(), target.strip()
        module, colon, attr = target.partition(":")
        if not colon or not module or not attr:
            raise ValueError(
                f"each worker must be 'module:attr' or 'name=module:attr', got {item!r}"
            )
        name = name or attr.rpartition(".")[2]
        if not _WORKER_NAME_RE.match(name):
            raise ValueError(f"worker name {name!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if any(name == seen for seen, _ in pairs):
            raise ValueError(f"worker name {name!r} is given twice")
        pairs.append((name, target))
    if not pairs:
        raise ValueError("name at least one worker")
    return pairs


def parse_api_keys(raw: str) -> list[tuple[str, str]]:
    """(principal, token) pairs. A principal may hold several tokens (rotation); a token
    held by two principals is refused, since a request bearing it would be either of them.
    Errors name principals, never tokens."""
    pairs: list[tuple[str, str]] = []
    holders: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        principal, sep, token = item.partition(":")
        if not sep or not _ID_RE.match(principal) or len(token) < 16:
            # Never echo the item: it holds a token.
            raise ValueError(
                "each entry must be 'principal:token' with a token of at least 16 characters"
            )
        holder = holders.setdefault(token, principal)
        if holder != principal:
            raise ValueError(
                f"principals {holder!r} and {principal!r} share one token; "
                "give each principal its own"
            )
        pairs.append((principal, token))
    return pairs


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus overrides, or raise ConfigError naming the
    variable that is wrong."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            name = f"FLEET_{field.upper()}" if err["loc"] else "settings"
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
