"""Logging: one line per event, text or JSON (``FLEET_LOG_FORMAT``). Lines about a session
carry ``node_id``, ``session_id`` and ``call_id``; request lines carry the request id.
Credentials in URLs are masked before anything is written."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import TextIO

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_CONTEXT_FIELDS = ("node_id", "session_id", "call_id")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z+]+://)[^/@\s]*@", re.IGNORECASE)
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"']+")


def redact(text: str) -> str:
    """Mask ``user:password@`` in URLs and bearer tokens."""
    return _BEARER.sub(r"\1***", _URL_CREDENTIALS.sub(r"\g<scheme>***@", text))


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage())
        fields = {k: getattr(record, k) for k in _CONTEXT_FIELDS if getattr(record, k, None)}
        request_id = request_id_var.get()
        if request_id:
            fields["request_id"] = request_id
        if record.exc_info:
            fields["exc"] = redact(self.formatException(record.exc_info))
        if self.as_json:
            line = {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": message,
                **fields,
            }
            return json.dumps(line, ensure_ascii=False)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if k != "exc")
        text = f"{stamp} {record.levelname:<7} {record.name}: {message}"
        if extra:
            text += f" [{extra}]"
        if "exc" in fields:
            text += "\n" + fields["exc"]
        return text


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send fleet's and uvicorn's logs to stderr (or ``stream``) in one format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(as_json=fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel("WARNING")
