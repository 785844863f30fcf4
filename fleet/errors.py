"""One error hierarchy. HTTP status codes appear only in the API's exception handlers."""

from __future__ import annotations

from typing import Any


class FleetError(Exception):
    """Root of every error fleet raises on purpose. ``code`` is the machine-readable name."""

    code = "error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConfigError(FleetError):
    code = "invalid_settings"


class WorkerLoadError(FleetError):
    code = "worker_load_error"


class CannotListen(FleetError):
    """``fleet serve`` could not bind its address (the port is taken, or not allowed)."""

    code = "cannot_listen"


class InvalidRequest(FleetError):
    """The request is malformed in a way the route's own validation does not see (an
    unknown query parameter)."""

    code = "invalid_request"


class UnsupportedMediaType(FleetError):
    """A body sent with a content type the route does not read."""

    code = "unsupported_media_type"


class InvalidParams(FleetError):
    """The worker refused the session's ``params``. ``errors``: one entry per field that
    is wrong (``loc``, ``msg``, ``type``), when the worker's ``Params`` model said which."""

    code = "invalid_params"

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []


class UnknownWorker(FleetError):
    """No live node runs the worker a start names."""

    code = "unknown_worker"


class SessionNotFound(FleetError):
    code = "not_found"


class AdmissionRejected(FleetError):
    """A limit refused a new session. ``code`` names the limit."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class NotAccepting(FleetError):
    """This node takes no new sessions now (draining, or not ready)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class IdempotencyMismatch(FleetError):
    """The ``Idempotency-Key`` was used for a start that asked something else."""

    code = "idempotency_mismatch"


class IdempotencyInProgress(FleetError):
    """Another request with the same ``Idempotency-Key`` is starting the session and has
    no answer yet: retry shortly to get it."""

    code = "idempotency_in_progress"


class LeaseLost(FleetError):
    """This node no longer owns the session: another took it over, or the lease lapsed."""

    code = "lease_lost"


class SessionEnded(FleetError):
    """The session has ended: it takes no more messages."""

    code = "session_ended"


class InboxBusy(FleetError):
    """The worker rejects messages while an earlier one is unconsumed (``inbox = "reject"``)."""

    code = "busy"


class InboxFull(FleetError):
    """The session holds ``FLEET_INBOX_MAXLEN`` unconsumed messages."""

    code = "inbox_full"


class MessageTooLarge(FleetError):
    code = "message_too_large"


class CheckpointTooLarge(FleetError):
    code = "checkpoint_too_large"


class EventTooLarge(FleetError):
    code = "event_too_large"


class CannotMigrate(FleetError):
    """A migration that cannot happen: ``not_resumable`` or ``no_target``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class ThreadBusy(FleetError):
    """A session runs on the thread already (at most one does); ``live`` names it."""

    code = "thread_busy"

    def __init__(self, detail: str, live: str = "") -> None:
        super().__init__(detail)
        self.live = live


class ThreadNotFound(FleetError):
    code = "not_found"


class InvalidResult(FleetError):
    """What ``run`` returned is over ``FLEET_MAX_RESULT_BYTES`` (or is not JSON): the session
    ends ``failed`` with this as its error."""

    code = "invalid_result"
