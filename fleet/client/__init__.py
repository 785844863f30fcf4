"""A typed client for fleet's HTTP API, sync (``FleetClient``) and async
(``AsyncFleetClient``), on httpx.

Both clients have the same methods and answer with the pydantic models the API serves
(``SessionInfo``, ``NodeInfo``, ``WorkerInfo``, ``Checkpoint``...). A node that answers
with an error raises ``FleetAPIError(status, code, detail)`` (``errors``: the fields at
fault of a 422 ``invalid_params``, as ``FieldError``\\ s); a node that cannot be reached
raises ``FleetConnectionError``. Both are ``FleetError``\\ s.

``start_session`` sends an ``Idempotency-Key`` with every start and sends the start again
when no answer comes or a proxy or a node cannot take it for now (``retries.py`` says which
answers): one session starts however many attempts reach a node (``retries=`` on either
client; docs/cli.md). ``send`` does the same with a message id: the session's inbox keeps
one message per id. ``ask`` sends
and returns the worker's reply, or raises ``NoReply`` when the wait runs out.

``invoke`` starts a session and answers with it once it has ended (``result`` is what the
worker's ``run`` returned), or as it runs if the wait runs out; it is a start, retried with
one key, so a retry after its node died waits for the same session. ``stream`` starts a
session and iterates its events, resuming a cut stream from ``…/events``. Threads:
``send_to_thread`` (starts a session on the thread if none runs), ``thread`` and
``delete_thread``. Every call that may start a session takes ``worker=``, a name from
``workers()`` (default: the fleet's first). ``migrate`` moves a session to another node
now (the ``admin`` principal only).

The base URL and token come from the arguments or from ``FLEET_URL`` (default
``http://127.0.0.1:8000``) and ``FLEET_TOKEN``. The token is sent as
``Authorization: Bearer``; it is never logged and never shown in a ``repr``.

Each request is described once, as a ``Request`` (``base.py``) (method, path, parameters, and how to
read the answer); the two clients only differ in how they send it.
"""

from fleet.client.aio import AsyncFleetClient
from fleet.client.base import Health, MessageAccepted, MessageReply, Readiness
from fleet.client.errors import FieldError, FleetAPIError, FleetConnectionError, NoReply
from fleet.client.sse import ServerSentEvent, SSEDecoder
from fleet.client.sync import FleetClient
from fleet.models import (
    MigrateAccepted,
    SessionMetrics,
    ThreadInfo,
    ThreadMessageAccepted,
    ThreadMessageReply,
    WorkerInfo,
)

__all__ = [
    "AsyncFleetClient",
    "FieldError",
    "FleetAPIError",
    "FleetClient",
    "FleetConnectionError",
    "Health",
    "MessageAccepted",
    "MessageReply",
    "MigrateAccepted",
    "NoReply",
    "Readiness",
    "SSEDecoder",
    "ServerSentEvent",
    "SessionMetrics",
    "ThreadInfo",
    "ThreadMessageAccepted",
    "ThreadMessageReply",
    "WorkerInfo",
]
