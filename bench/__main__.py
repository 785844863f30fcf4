"""``python -m bench [NAME ...] [--runs N] [--quick] [--output PATH] [--seconds S] [--seed N]``

Runs the named benchmarks (all of them by default, except those in ``ON_REQUEST``, which
run only when named: ``python -m bench soak``), each starting what it needs (a
redis-server, ``fleet serve`` processes), shows progress on stderr, prints each result
section on stdout and writes it into ``docs/benchmarks.md`` between its markers, leaving
every other part of that file as it is. A benchmark is any module ``bench/<name>.py``
with ``NAME`` and ``run(opts)`` (see ``bench/common.py``).

``--quick`` is a smoke run (fewer runs, fewer sessions, shorter windows): its sections are
printed but not written to the results file unless ``--output`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import shlex
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

from bench import common

# The order of a full run; benchmarks found that are not listed here run after these.
ORDER = ("close_latency", "admission_race", "heartbeat_cost", "events_latency")
NOT_BENCHMARKS = {"common", "__main__", "workers"}
# Run only when named: the soak injects faults for ten minutes (``--seconds``, ``--seed``).
ON_REQUEST = ("soak", "peer_starts", "capacity")


def discover() -> dict[str, ModuleType]:
    """Every module of this package with ``NAME`` and ``run``, by name."""
    here = Path(__file__).resolve().parent
    found: dict[str, ModuleType] = {}
    names = [m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in NOT_BENCHMARKS]
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except Exception as exc:  # a broken benchmark must not stop the others
            common.progress(f"cannot import bench.{name}: {type(exc).__name__}: {exc}")
            continue
        if callable(getattr(module, "run", None)):
            found[str(getattr(module, "NAME", name))] = module
    ordered = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    return {n: found[n] for n in ordered}


def parse(argv: list[str], known: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run fleet's benchmarks and write their sections of docs/benchmarks.md.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {known})"
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 5)")
    parser.add_argument(
        "--quick", action="store_true", help="a fast smoke run; does not write the results file"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"results file (default {common.RESULTS.relative_to(common.ROOT)})",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="soak: seconds of faults (default 600; 60 with --quick); sets FLEET_SOAK_SECONDS",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="soak: the seed (sets FLEET_SOAK_SEED)"
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {known}")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be over 0")
    return args


def to_report(name: str, module: ModuleType, result: object, seconds: float) -> common.Report:
    """A benchmark may return a Report, or plain markdown for its section body."""
    if isinstance(result, common.Report):
        result.seconds = seconds
        return result
    title = str(getattr(module, "TITLE", name))
    return common.Report(name, title, "", str(result).splitlines(), seconds=seconds)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    benchmarks = discover()
    args = parse(argv, list(benchmarks))
    runs = args.runs if args.runs is not None else (2 if args.quick else 5)
    # The soak reads these, like the soak test does.
    if args.seconds is not None:
        os.environ["FLEET_SOAK_SECONDS"] = str(args.seconds)
    if args.seed is not None:
        os.environ["FLEET_SOAK_SEED"] = str(args.seed)
    command = " ".join(["python -m bench", *(shlex.quote(a) for a in argv)])
    opts = common.Options(runs=runs, quick=args.quick, command=command)
    output: Path | None = args.output or (None if args.quick else common.RESULTS)
    info = common.machine()
    common.progress(f"machine: {common.machine_line(info)}")
    failed = []
    for name in args.names or [n for n in benchmarks if n not in ON_REQUEST]:
        module = benchmarks[name]
        common.progress(f"== {name}: {runs} run(s){' (quick)' if args.quick else ''}")
        began = time.monotonic()
        try:
            result = module.run(opts)
        except Exception:
            traceback.print_exc()
            common.progress(f"== {name} FAILED; its section is left as it was")
            failed.append(name)
            continue
        report = to_report(name, module, result, time.monotonic() - began)
        section = common.render(report, info, command)
        print(section, flush=True)
        if output is not None:
            common.update_section(output, name, section)
            common.progress(f"== {name} done in {report.seconds:.0f}s; wrote {output}")
        else:
            common.progress(f"== {name} done in {report.seconds:.0f}s (not written: --quick)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
