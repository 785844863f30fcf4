"""The ``fleet`` command: ``serve`` a node, ``run`` one session in the console, look at
and act on a running fleet (``sessions``, ``invoke``: see ``fleet.cli.ops``; ``threads``:
see ``fleet.cli.threads``; ``nodes``, ``workers``: see ``fleet.cli.nodes``), and start a
local one to play with (``demo``: see ``fleet.cli.demo``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from typing import Any

from fleet import __version__
from fleet.cli import nodes as cli_nodes
from fleet.cli import ops as cli_ops
from fleet.cli import threads as cli_threads
from fleet.errors import FleetError
from fleet.logs import configure
from fleet.settings import Settings, load_settings

#: ``fleet --help``: plain text, not the module docstring's reStructuredText.
HELP = (
    "Run long-lived worker sessions on a fleet of nodes. 'serve' runs a node, 'run' runs "
    "one session in this console, 'sessions', 'invoke', 'threads', 'nodes' and 'workers' look "
    "at and act on a running fleet (FLEET_URL, FLEET_TOKEN), and 'demo' starts a local fleet "
    "to try."
)


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "worker": getattr(args, "worker", None),
        "workers": getattr(args, "workers", None),
        **extra,
    }
    return load_settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure(settings.log_level, settings.log_format)
    multiproc = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if settings.workers > 1 and not multiproc:
        # Must be set before prometheus_client is imported: the workers share one view.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fleet-metrics-")
    elif multiproc:
        # prometheus_client opens files there as soon as fleet.metrics is imported.
        os.makedirs(multiproc, exist_ok=True)
    from fleet.serve.main import serve

    return serve(settings)


def cmd_run(args: argparse.Namespace) -> int:
    from fleet.cli.console import run_one

    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        raise FleetError(f"--params is not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise FleetError("--params must be a JSON object")
    settings = _settings(args, redis_url=None)
    configure("warning", settings.log_format)
    return asyncio.run(run_one(settings, args.call_id, params))


def cmd_demo(args: argparse.Namespace) -> int:
    from fleet.cli.demo import run_demo

    front = None if args.no_front else args.front
    return run_demo(nodes=args.nodes, port=args.port, front=front, worker=args.worker)


def _node_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError("must be between 1 and 16")
    return value


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="a local fleet: redis-server, N nodes and a round-robin nginx or haproxy front",
    )
    demo.add_argument("--nodes", type=_node_count, default=3, metavar="N",
                      help="fleet serve processes (1-16, default 3)")  # fmt: skip
    demo.add_argument("--port", type=int, default=8000, help="the front's port (default 8000)")
    demo.add_argument(
        "--front", choices=["auto", "nginx", "haproxy"], default="auto",
        help="the load balancer (default: nginx if installed, else haproxy)",
    )  # fmt: skip
    demo.add_argument("--no-front", action="store_true", help="no load balancer: nodes only")
    demo.add_argument(
        "--worker",
        help="the nodes' workers, module:attr or name=module:attr,... (default: "
        "FLEET_WORKER, or the counter)",
    )
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet", description=HELP)
    parser.add_argument("--version", action="version", version=f"fleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a node (settings from FLEET_* variables)")
    serve.add_argument("--host", help="address to bind (FLEET_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (FLEET_PORT, default 8000)")
    serve.add_argument(
        "--worker", help="workers: module:attr, or name=module:attr,... (FLEET_WORKER)"
    )
    serve.add_argument(
        "--workers", type=int, help="processes; more than 1 runs gunicorn (FLEET_WORKERS)"
    )
    serve.set_defaults(func=cmd_serve)

    run = sub.add_parser("run", help="run one session in this console, printing its events")
    run.add_argument("--worker", help="workers as for serve; the session runs the first")
    run.add_argument("--params", default="{}", help="the session's params, a JSON object")
    run.add_argument("--call-id", default="console", help="the call id (default: console)")
    run.set_defaults(func=cmd_run)

    cli_ops.register(sub)
    cli_threads.register(sub)
    cli_nodes.register(sub)
    _demo_parser(sub)
    return parser


def _import_from_cwd() -> None:
    """Let ``--worker mod:Cls`` (or ``FLEET_WORKER``) name a module in the working
    directory, as ``python -m fleet`` and uvicorn do: the ``fleet`` script's own
    ``sys.path`` starts at its bin directory instead. ``PYTHONSAFEPATH`` is honoured."""
    if sys.flags.safe_path:
        return
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was removed under us: nothing to import from
        return
    if not any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path):
        sys.path.insert(0, cwd)


def main(argv: list[str] | None = None) -> int:
    _import_from_cwd()
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except FleetError as exc:
        print(f"fleet: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fleet sessions ls | head`: the reader left, not an error
        _silence_stdout()
        return 1
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail
    again on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
