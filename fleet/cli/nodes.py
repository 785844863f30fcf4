"""``fleet nodes`` and ``fleet workers``: the members of a fleet, and the named workers
they run.

Like ``fleet sessions`` (``fleet.cli.ops``): through ``fleet.client``, at ``--url`` or
``FLEET_URL`` with the token in ``FLEET_TOKEN``; a table for people or the API's JSON
with ``--json`` (for ``workers``, with each worker's params schema); any failure one line
on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from fleet.cli.ops import EXIT_OK, age, as_json, common_options, dump, run, table
from fleet.client import FleetClient, WorkerInfo
from fleet.models import NodeInfo


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def node_rows(nodes: Sequence[NodeInfo], now: float) -> str:
    headers = [
        "NODE", "HOST", "STATE", "SESSIONS", "CAPACITY", "UP", "HEARTBEAT", "VERSION", "WORKERS",
    ]  # fmt: skip
    rows = [
        [
            n.node_id,
            n.host,
            "draining" if n.draining else "up",
            str(n.sessions),
            "-" if n.capacity is None else str(n.capacity),
            age(now - n.started_at),
            f"{age(now - n.last_heartbeat)} ago",
            n.version,
            ",".join(n.workers) or "-",  # "-": a node too old to say
        ]
        for n in nodes
    ]
    return table(headers, rows, right=frozenset({3, 4, 5, 6}))


def worker_rows(workers: Sequence[WorkerInfo]) -> str:
    """One row per worker; ``NODES`` counts the live nodes that run it (``--json`` and
    ``fleet nodes`` name them)."""
    headers = ["NAME", "NODES", "RESUMABLE", "MIGRATABLE", "INBOX", "DESCRIPTION"]
    rows = [
        [
            w.name,
            str(len(w.nodes)),
            yes_no(w.resumable),
            yes_no(w.migratable),
            w.inbox,
            w.description or "-",
        ]
        for w in workers
    ]
    return table(headers, rows, right=frozenset({1}))


def cmd_nodes(client: FleetClient, args: argparse.Namespace) -> int:
    nodes = client.nodes()
    if args.json:
        dump({"nodes": [as_json(n) for n in nodes]})
    elif nodes:
        print(node_rows(nodes, time.time()))
    else:
        print("no live nodes", file=sys.stderr)
    return EXIT_OK


def cmd_workers(client: FleetClient, args: argparse.Namespace) -> int:
    workers = client.workers()
    if args.json:
        dump({"workers": [as_json(w) for w in workers]})
    elif workers:
        print(worker_rows(workers))
    else:
        print("no workers: no live nodes", file=sys.stderr)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``nodes`` and ``workers`` to the ``fleet`` command."""
    common = common_options()
    nodes = sub.add_parser("nodes", parents=[common], help="the live nodes of a fleet")
    nodes.set_defaults(func=run, client_command=cmd_nodes)

    workers = sub.add_parser(
        "workers",
        parents=[common],
        help="the named workers the live nodes run (--json: with their params schemas)",
    )
    workers.set_defaults(func=run, client_command=cmd_workers)
