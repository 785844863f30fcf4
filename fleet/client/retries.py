"""When both clients send a request again, and how long they wait in between.

Only requests that are safe to repeat are retried: a start (it carries an
``Idempotency-Key``: however many attempts reach a node, one session starts), a message
(it carries an id: the inbox keeps one per id) and a message to a thread (the same id
reaches the session its first attempt reached or started). Everything else is sent once.

Such a request is sent again when no answer came, or when the answer says that another
attempt may do better: a proxy's 502/503/504, a node's 503 (``not_ready``,
``redis_unavailable``, ``draining`` from older nodes, ``start_failed``), or the 409
``idempotency_in_progress`` of a start whose first attempt is still under way. A 503
``start_failed`` (the node chosen for the session did not start it in time) started
nothing and gave the key back, so the retry, with the same key, starts the session once.

A refusal is not retried: 429 (``no_capacity``: the whole fleet is full for that worker,
or a limit) and every 4xx are the caller's to act on (a 429 carries ``Retry-After``).
"""

from __future__ import annotations

import random

import httpx

from fleet.client.errors import api_error

RETRYABLE_STATUS = frozenset({502, 503, 504})  # a proxy, or a node that cannot for now
START_RETRIES = 3  # a start is sent again up to this many times (it carries a key)
# No answer, where another attempt may get one (not a malformed URL, say).
RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
MAX_RETRY_DELAY = 5.0


def worth_retrying(resp: httpx.Response) -> bool:
    """An answer that another attempt may improve on: a proxy's or a node's
    502/503/504, or the 409 of a start whose first attempt is still under way."""
    if resp.status_code in RETRYABLE_STATUS:
        return True
    return resp.status_code == 409 and api_error(resp).code == "idempotency_in_progress"


def retry_delay(attempt: int, resp: httpx.Response | None) -> float:
    """Seconds before attempt ``attempt + 1``: exponential backoff with jitter (0.2 s,
    0.4 s, 0.8 s... on average), at least what ``Retry-After`` asks, at most 5 s."""
    delay = 0.2 * 2.0**attempt * random.uniform(0.5, 1.5)
    asked = resp.headers.get("retry-after", "") if resp is not None else ""
    if asked.isdigit():
        delay = max(delay, float(asked))
    return min(delay, MAX_RETRY_DELAY)
