"""Run the registered benchmarks: ``python -m benchmarks.run [--quick] [--only NAME] ...``.

Every ``benchmarks/bench_*.py`` module registers its workloads (see
:mod:`benchmarks.harness`); this command runs them all, or those named by
``--only``, on one PostgreSQL server: ``--url`` or ``$PARTPOOL_URL`` (an admin
URL; scratch databases are created and dropped on it), else a throwaway server
started from the local PostgreSQL binaries.

The table goes to stdout, progress to stderr, and the full report (machine
facts, settings, every sample) to ``--json`` or ``benchmarks/results/<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .harness import (
    BenchmarkError,
    Settings,
    discover,
    format_table,
    machine_facts,
    now,
    open_server,
    report,
    run_workloads,
    write_json,
)

__all__ = ["main"]

URL_ENV = "PARTPOOL_URL"  # as sqlalchemy_partpool.testing.URL_ENV


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Measure variants of each workload side by side on a real PostgreSQL.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small data, 3 rounds: proves the benchmarks work in seconds (numbers mean nothing)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this workload (repeat, or separate names with commas); see --list",
    )
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="where to write the JSON report (default: benchmarks/results/<timestamp>.json)",
    )
    parser.add_argument(
        "--url",
        help=f"admin URL of the PostgreSQL server to use (default: ${URL_ENV}; "
        "without either, a throwaway server is started)",
    )
    parser.add_argument("--rounds", type=int, help="measured rounds per case (default 30; quick 3)")
    parser.add_argument(
        "--warmup", type=int, help="discarded rounds before measuring (default 2; quick 1)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="time budget per case for its rounds (default 60; quick 10)",
    )
    parser.add_argument(
        "--round-seconds",
        type=float,
        help="target length of one variant's share of a round (default 0.2; quick 0.01)",
    )
    parser.add_argument("--seed", type=int, help="seed of the per-round shuffling (default random)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.defaults(quick=args.quick, seed=args.seed)
    overrides = {
        name: getattr(args, name)
        for name in ("rounds", "warmup", "seconds", "round_seconds")
        if getattr(args, name) is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    settings.validate()
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 a benchmark failed, 2 bad usage).

    :param argv: the arguments (default ``sys.argv[1:]``).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    registered = discover()
    if args.list:
        for name, workload in registered.items():
            print(f"{name:<12} {workload.description}")
        return 0
    try:
        settings = _settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    names = [n.strip() for item in args.only or [] for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in registered]
    if unknown:
        parser.error(
            f"unknown workload {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(registered) or 'none'}"
        )
    selected = [registered[n] for n in names] if names else list(registered.values())

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    clock = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - clock:6.1f}s] {line}", file=sys.stderr, flush=True)

    started = now()
    try:
        with open_server(args.url or os.environ.get(URL_ENV) or None) as (admin_url, kind):
            progress(f"server: {kind}; mode: {'quick' if settings.quick else 'full'}")
            machine = machine_facts(admin_url, kind)
            results = run_workloads(selected, settings, admin_url, progress=progress)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    duration = time.perf_counter() - clock
    data = report(results, settings, machine, started=started, duration=duration)
    print(format_table(results), end="")
    cpus = machine["cpus_usable"]
    print(
        f"\n{machine['postgresql'].split(',')[0]} ({machine['server']['kind']} server), "
        f"{cpus} CPU{'s' if cpus != 1 else ''}, Python {machine['python']}, "
        f"SQLAlchemy {machine['sqlalchemy']}, psycopg2 {machine['psycopg2']}; "
        f"{'quick' if settings.quick else 'full'} mode, seed {settings.seed}, {duration:.1f} s"
    )
    path = write_json(data, args.json, started)
    print(f"Results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
