"""``fleet sessions ls|show|close|send|migrate`` and ``fleet invoke``: a fleet seen from
outside (``fleet threads``: see ``fleet.cli.threads``; ``fleet nodes`` and ``fleet
workers``: see ``fleet.cli.nodes``).

These commands talk to a node (or to the load balancer in front of the fleet) through
``fleet.client``, at ``--url`` or ``FLEET_URL``, with the token in ``FLEET_TOKEN``. The
token has no flag on purpose: a command line is visible to every user of the machine.

Output is an aligned table for people, or the API's JSON with ``--json`` for programs.
Any failure is one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from fleet.client import (
    FleetAPIError,
    FleetClient,
    FleetConnectionError,
    MessageReply,
    SessionMetrics,
)
from fleet.client.base import INVOKE_WAIT
from fleet.errors import FleetError
from fleet.models import CloseAccepted, EndReason, SessionInfo, State

EXIT_OK, EXIT_FAILED = 0, 1

Command = Callable[[FleetClient, argparse.Namespace], int]


# ---- formatting -------------------------------------------------------------------------


def age(seconds: float) -> str:
    """A short duration: ``45s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def number(value: int | float) -> str:
    """An integer as it is; a float in at most 6 significant digits."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def timestamp(unix: float | None) -> str:
    if unix is None:
        return "-"
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int]) -> str:
    """Columns padded to their widest cell; the columns in ``right`` (numbers) align
    right. Two spaces between columns, nothing trailing."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join(line(r) for r in [headers, *rows])


def dump(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def as_json(model: BaseModel) -> dict[str, Any]:
    data: dict[str, Any] = model.model_dump(mode="json")
    return data


def session_rows(sessions: Sequence[SessionInfo], now: float) -> str:
    headers = ["CALL", "SESSION", "STATE", "NODE", "AGE", "EPOCH", "RESUMED", "CKPT", "END"]
    rows = [
        [
            s.call_id,
            s.session_id,
            str(s.state),
            s.node_id or "-",
            age(now - s.session_started_at),
            str(s.epoch),
            str(s.resumed_count),
            str(s.checkpoint_version),
            str(s.end_reason) if s.end_reason else "-",
        ]
        for s in sessions
    ]
    return table(headers, rows, right=frozenset({4, 5, 6, 7}))


def session_details(info: SessionInfo, metrics: SessionMetrics | None, now: float) -> str:
    started = f"{timestamp(info.session_started_at)} ({age(now - info.session_started_at)} ago)"
    fields = [
        ("call", info.call_id),
        ("session", info.session_id),
        ("type", info.call_type),
        ("worker", info.worker or "-"),
        ("state", str(info.state)),
        ("node", info.node_id or "-"),
        ("started", started),
        ("ended", timestamp(info.ended_at)),
        ("end reason", str(info.end_reason) if info.end_reason else "-"),
        ("epoch", str(info.epoch)),
        ("resumed", str(info.resumed_count)),
        ("checkpoint", f"version {info.checkpoint_version}" if info.checkpoint_version else "-"),
    ]
    if metrics is not None:
        fields.append(("duration", f"{metrics.duration_seconds:.1f}s"))
        shown = " ".join(f"{k}={number(v)}" for k, v in sorted(metrics.metrics.items()))
        if metrics.reported_at is not None:
            shown = f"{shown or '-'} (as of {age(now - metrics.reported_at)} ago)"
        fields.append(("metrics", shown or "-"))
    width = max(len(k) for k, _ in fields)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in fields)


# ---- commands ---------------------------------------------------------------------------


def _matches(info: SessionInfo, args: argparse.Namespace) -> bool:
    return (args.state is None or info.state == args.state) and (
        args.node is None or info.node_id == args.node
    )


def cmd_ls(client: FleetClient, args: argparse.Namespace) -> int:
    next_cursor: str | None = None
    if args.call is not None:
        # One call's sessions come from its own index; the filters apply here.
        found = [s for s in client.list_call_sessions(args.call) if _matches(s, args)]
        sessions = found if args.all else found[: args.limit]
        next_cursor = None
    elif args.all:
        sessions = list(client.iter_sessions(state=args.state, node_id=args.node))
    else:
        page = client.list_sessions(state=args.state, node_id=args.node, limit=args.limit)
        sessions, next_cursor = page.sessions, page.next_cursor
    if args.json:
        dump({"sessions": [as_json(s) for s in sessions], "next_cursor": next_cursor})
        return EXIT_OK
    if sessions:
        print(session_rows(sessions, time.time()))
    else:
        print("no sessions", file=sys.stderr)
    if next_cursor is not None:
        print(f"(first {len(sessions)} shown; --all lists them all)", file=sys.stderr)
    return EXIT_OK


def cmd_show(client: FleetClient, args: argparse.Namespace) -> int:
    info = client.get_session(args.call_id, args.session_id)
    try:
        metrics: SessionMetrics | None = client.session_metrics(args.call_id, args.session_id)
    except FleetAPIError:
        metrics = None  # the tombstone expired in between, or metrics are not allowed
    if args.json:
        dump(
            {
                **as_json(info),
                "metrics": None if metrics is None else metrics.metrics,
                "metrics_reported_at": None if metrics is None else metrics.reported_at,
            }
        )
    else:
        print(session_details(info, metrics, time.time()))
    return EXIT_OK


def cmd_close(client: FleetClient, args: argparse.Namespace) -> int:
    answer = client.close_session(args.call_id, args.session_id, wait=args.wait)
    ref = f"{args.call_id}/{args.session_id}"
    if args.json:
        dump(as_json(answer))
    elif isinstance(answer, SessionInfo):
        print(f"{ref} {answer.state} ({answer.end_reason or '-'}) on {answer.node_id}")
    else:
        print(f"{ref} closing: its node has been told")
    if isinstance(answer, CloseAccepted) and args.wait is not None:
        print(f"fleet: {ref} is still closing after {args.wait:g}s", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_send(client: FleetClient, args: argparse.Namespace) -> int:
    answer = client.send(
        args.call_id, args.session_id, args.data, type=args.type, id=args.id, wait=args.wait
    )
    if args.json:
        dump(as_json(answer))
    elif isinstance(answer, MessageReply):
        print(json.dumps(answer.reply, ensure_ascii=False))
    else:
        print(answer.message_id)
    if args.wait is not None and not isinstance(answer, MessageReply):
        print(f"fleet: no reply to {answer.message_id} after {args.wait:g}s", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_migrate(client: FleetClient, args: argparse.Namespace) -> int:
    answer = client.migrate(args.call_id, args.session_id)
    if args.json:
        dump(as_json(answer))
    else:
        print(f"{args.call_id}/{args.session_id} migrating away from {answer.node_id}")
    return EXIT_OK


def cmd_invoke(client: FleetClient, args: argparse.Namespace) -> int:
    info = client.invoke(
        args.call_id,
        params=args.params,
        thread_id=args.thread,
        wait=args.wait,
        idempotency_key=args.key,
        worker=args.worker,
    )
    ref = f"{info.call_id}/{info.session_id}"
    completed = info.end_reason == EndReason.COMPLETED
    if args.json:
        dump(as_json(info))
    elif completed or info.result is not None:
        print(json.dumps(info.result, ensure_ascii=False))
    if info.state != State.ENDED:
        print(f"fleet: {ref} still runs after {args.wait:g}s", file=sys.stderr)
        return EXIT_FAILED
    if not completed:
        why = f" ({info.error})" if info.error else ""
        print(f"fleet: {ref} ended {info.end_reason}{why}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# ---- wiring -----------------------------------------------------------------------------


def make_client(args: argparse.Namespace) -> FleetClient:
    """The client a command uses (tests replace it to inject a transport)."""
    return FleetClient(url=args.url)


def describe(exc: FleetError) -> str:
    """One line that says what went wrong and what to do about it."""
    if isinstance(exc, FleetConnectionError):
        return f"{exc.detail} (is a node running there? set FLEET_URL or pass --url)"
    if isinstance(exc, FleetAPIError):
        hint = {
            401: " (set FLEET_TOKEN to a token from the nodes' FLEET_API_KEYS)",
            403: " (this token may not do that)",
        }.get(exc.status, "")
        if exc.code == "thread_busy":
            hint = " (close that session first, or wait for its end)"
        elif exc.code == "unknown_worker":
            hint = " (fleet workers lists the workers the fleet runs)"
        elif exc.code == "invalid_params" and exc.errors:
            hint = " (fleet workers --json shows each worker's params schema)"
        return f"{exc.detail} [{exc.status} {exc.code}]{hint}"
    return exc.detail


def run(args: argparse.Namespace) -> int:
    """Run one client command; every error becomes one line on stderr and exit 1."""
    command: Command = args.client_command
    try:
        with make_client(args) as client:
            return command(client, args)
    except FleetError as exc:
        print(f"fleet: {describe(exc)}", file=sys.stderr)
        return EXIT_FAILED


def common_options() -> argparse.ArgumentParser:
    """``--url`` and ``--json``, for every command that talks to a fleet."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help="a node or the fleet's load balancer (FLEET_URL, http://127.0.0.1:8000)"
    )
    common.add_argument("--json", action="store_true", help="print JSON for programs")
    return common


def count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be between 1 and 1000")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 300:
        raise argparse.ArgumentTypeError("must be between 0 and 300 seconds")
    return value


def json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); quote strings: '\"hi\"'") from exc


def json_object(text: str) -> dict[str, Any]:
    value = json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, like '{\"a\": 1}'")
    return value


def worker_option(parser: argparse.ArgumentParser, started: str) -> None:
    """``--worker NAME``, for a command that may start a session."""
    parser.add_argument(
        "--worker",
        metavar="NAME",
        help=f"the named worker of {started} ('fleet workers' lists them; default: the "
        "fleet's first)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sessions`` and ``invoke`` to the ``fleet`` command."""
    common = common_options()
    sessions = sub.add_parser(
        "sessions", help="list, show, close, send to and migrate sessions of a fleet"
    )
    verbs = sessions.add_subparsers(dest="verb", required=True)

    ls = verbs.add_parser("ls", parents=[common], help="list sessions, fleet-wide or of a call")
    ls.add_argument("--call", help="only this call's sessions")
    ls.add_argument("--state", choices=[s.value for s in State], help="only this state")
    ls.add_argument("--node", help="only sessions on this node id")
    ls.add_argument("--limit", type=count, default=100, help="at most N (default 100)")
    ls.add_argument("--all", action="store_true", help="every page, not just the first")
    ls.set_defaults(func=run, client_command=cmd_ls)

    show = verbs.add_parser("show", parents=[common], help="one session and its metrics")
    show.add_argument("call_id", metavar="CALL")
    show.add_argument("session_id", metavar="SESSION")
    show.set_defaults(func=run, client_command=cmd_show)

    close = verbs.add_parser("close", parents=[common], help="close a session, from any node")
    close.add_argument("call_id", metavar="CALL")
    close.add_argument("session_id", metavar="SESSION")
    close.add_argument(
        "--wait", type=seconds, metavar="S", help="wait up to S seconds for the end (exit 1 if not)"
    )
    close.set_defaults(func=run, client_command=cmd_close)

    send = verbs.add_parser(
        "send", parents=[common], help="send a message to a session, from any node"
    )
    send.add_argument("call_id", metavar="CALL")
    send.add_argument("session_id", metavar="SESSION")
    send.add_argument(
        "--data", type=json_value, required=True, metavar="JSON", help="the message: any JSON"
    )
    send.add_argument("--type", default="message", help="the message's type (default message)")
    send.add_argument("--id", help="your id for it: a repeat with the same id is not sent twice")
    send.add_argument(
        "--wait",
        type=seconds,
        metavar="S",
        help="wait up to S seconds for the worker's reply and print it (exit 1 if none)",
    )
    send.set_defaults(func=run, client_command=cmd_send)

    migrate = verbs.add_parser(
        "migrate",
        parents=[common],
        help="move a running session to another node now (the admin principal only)",
    )
    migrate.add_argument("call_id", metavar="CALL")
    migrate.add_argument("session_id", metavar="SESSION")
    migrate.set_defaults(func=run, client_command=cmd_migrate)

    invoke = sub.add_parser(
        "invoke", parents=[common], help="start a session, wait for its end, print its result"
    )
    invoke.add_argument("call_id", metavar="CALL")
    invoke.add_argument(
        "--params", type=json_object, metavar="JSON", help="the session's params, a JSON object"
    )
    invoke.add_argument("--thread", metavar="ID", help="run on this thread, from its state")
    worker_option(invoke, "the session")
    invoke.add_argument(
        "--wait",
        type=seconds,
        default=INVOKE_WAIT,
        metavar="S",
        help=f"wait up to S seconds for the end (default {INVOKE_WAIT:g}; exit 1 if it runs on)",
    )
    invoke.add_argument(
        "--key",
        metavar="KEY",
        help="an Idempotency-Key: run again with the same key to wait for the same session",
    )
    invoke.set_defaults(func=run, client_command=cmd_invoke)
