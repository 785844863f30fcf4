"""``fleet threads show|rm|send``: conversations that outlive sessions, seen from outside.

Like ``fleet sessions`` (``fleet.cli.ops``): through ``fleet.client``, at ``--url`` or
``FLEET_URL`` with the token in ``FLEET_TOKEN``; a table for people or the API's JSON
with ``--json``; any failure one line on stderr and exit code 1. A thread belongs to the
principal of the token: another principal's thread of the same name is another thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from fleet.cli.ops import (
    EXIT_FAILED,
    EXIT_OK,
    age,
    as_json,
    common_options,
    dump,
    json_object,
    json_value,
    run,
    seconds,
    table,
    timestamp,
    worker_option,
)
from fleet.client import FleetClient, ThreadInfo, ThreadMessageReply
from fleet.models import ThreadSession

PAGE = 100  # sessions per request with --all


def thread_details(info: ThreadInfo, now: float) -> str:
    live = info.live_session
    fields = [
        ("thread", info.thread_id),
        ("state", "-" if info.state is None else json.dumps(info.state, ensure_ascii=False)),
        ("checkpoint", f"version {info.checkpoint_version}" if info.checkpoint_version else "-"),
        ("created", f"{timestamp(info.created_at)} ({age(now - info.created_at)} ago)"),
        ("updated", f"{timestamp(info.updated_at)} ({age(now - info.updated_at)} ago)"),
        ("live", f"{live.call_id}/{live.session_id}" if live else "-"),
    ]
    width = max(len(k) for k, _ in fields)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in fields)


def thread_session_rows(sessions: Sequence[ThreadSession], now: float) -> str:
    headers = ["CALL", "SESSION", "STATE", "AGE", "END"]
    rows = [
        [
            s.call_id,
            s.session_id,
            str(s.state) if s.state else "-",  # "-": its tombstone has expired
            age(now - s.started_at),
            str(s.end_reason) if s.end_reason else "-",
        ]
        for s in sessions
    ]
    return table(headers, rows, right=frozenset({3}))


def cmd_show(client: FleetClient, args: argparse.Namespace) -> int:
    info = client.thread(args.thread_id, limit=PAGE if args.all else args.limit)
    while args.all and info.next_cursor is not None:
        page = client.thread(args.thread_id, limit=PAGE, cursor=info.next_cursor)
        info.sessions += page.sessions
        info.next_cursor = page.next_cursor
    if args.json:
        dump(as_json(info))
        return EXIT_OK
    now = time.time()
    print(thread_details(info, now))
    if info.sessions:
        print()
        print(thread_session_rows(info.sessions, now))
    if info.next_cursor is not None:
        shown = len(info.sessions)
        print(f"(the newest {shown} sessions shown; --all lists them all)", file=sys.stderr)
    return EXIT_OK


def cmd_rm(client: FleetClient, args: argparse.Namespace) -> int:
    client.delete_thread(args.thread_id)
    if args.json:
        dump({"thread_id": args.thread_id, "deleted": True})
    else:
        print(f"thread {args.thread_id} deleted")
    return EXIT_OK


def cmd_send(client: FleetClient, args: argparse.Namespace) -> int:
    answer = client.send_to_thread(
        args.thread_id,
        args.data,
        type=args.type,
        id=args.id,
        call_id=args.call,
        params=args.params,
        wait=args.wait,
        worker=args.worker,
    )
    if args.json:
        dump(as_json(answer))
    elif isinstance(answer, ThreadMessageReply):
        print(json.dumps(answer.reply, ensure_ascii=False))
    else:
        print(answer.message_id)
    if args.wait is not None and not isinstance(answer, ThreadMessageReply):
        where = f"{answer.call_id}/{answer.session_id}"
        print(
            f"fleet: no reply to {answer.message_id} from {where} after {args.wait:g}s",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def thread_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError("must be between 1 and 100")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``threads`` to the ``fleet`` command."""
    common = common_options()
    threads = sub.add_parser("threads", help="show, delete and send to threads (conversations)")
    verbs = threads.add_subparsers(dest="verb", required=True)

    show = verbs.add_parser(
        "show", parents=[common], help="a thread's state, live session and sessions"
    )
    show.add_argument("thread_id", metavar="THREAD")
    show.add_argument(
        "--limit", type=thread_count, default=20, help="the newest N sessions (default 20)"
    )
    show.add_argument("--all", action="store_true", help="every session, not just the newest")
    show.set_defaults(func=run, client_command=cmd_show)

    rm = verbs.add_parser(
        "rm", parents=[common], help="forget a thread (not while a session runs on it)"
    )
    rm.add_argument("thread_id", metavar="THREAD")
    rm.set_defaults(func=run, client_command=cmd_rm)

    send = verbs.add_parser(
        "send",
        parents=[common],
        help="send a message to a thread's session, starting one if none runs",
    )
    send.add_argument("thread_id", metavar="THREAD")
    send.add_argument(
        "--data", type=json_value, required=True, metavar="JSON", help="the message: any JSON"
    )
    send.add_argument("--type", default="message", help="the message's type (default message)")
    send.add_argument("--id", help="your id for it: a repeat with the same id is not sent twice")
    send.add_argument(
        "--call", help="the call of a session started for it (default: the thread's id)"
    )
    send.add_argument(
        "--params", type=json_object, metavar="JSON", help="the params of a session started for it"
    )
    worker_option(send, "a session started for it")
    send.add_argument(
        "--wait",
        type=seconds,
        metavar="S",
        help="wait up to S seconds for the worker's reply and print it (exit 1 if none)",
    )
    send.set_defaults(func=run, client_command=cmd_send)
