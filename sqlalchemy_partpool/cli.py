"""The ``partpool`` command (also ``python -m sqlalchemy_partpool``): parsing and dispatch.

``partpool status`` checks every configured partition and prints what its
server says (see :mod:`sqlalchemy_partpool.status` and ``docs/status.md``).

``partpool migrate`` runs alembic migrations on every partition: ``upgrade``,
``downgrade``, ``stamp``, ``current``, ``history``, ``status`` (revisions and
drift), ``revision``, ``init`` (see :mod:`sqlalchemy_partpool.migrate_cli`
and ``docs/migrations.md``).

``partpool demo`` shows the library working end to end.  Where its partitions
come from, in order:

1. ``--config FILE`` or the ``PARTPOOL_CONFIG`` / ``PARTPOOL_PARTITIONS``
   environment variables: your own partitions (the demo creates, fills and
   drops a table named ``partpool_demo`` in each);
2. ``--url URL`` (or ``PARTPOOL_URL``): the admin URL of a PostgreSQL server on
   which the demo creates ``--partitions`` databases, and drops them afterwards;
3. otherwise an embedded default: a throwaway PostgreSQL server started from
   the local PostgreSQL binaries (or the ``pgserver`` pip package), removed at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

from sqlalchemy import text

from . import migrate_cli, status
from ._argtypes import positive_int, seconds
from .config import ENV_CONFIG, ENV_PARTITIONS, ShardedConfig
from .engine import ShardedEngine, create_sharded_engine
from .errors import ConfigurationError, PartpoolError
from .stats import StatsSnapshot

__all__ = ["main"]

log = logging.getLogger("sqlalchemy_partpool.cli")

ENV_URL = "PARTPOOL_URL"  # same as sqlalchemy_partpool.testing.URL_ENV


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML configuration file (default: ${ENV_CONFIG}, or ${ENV_PARTITIONS})",
    )


def load_config(path: str | None) -> ShardedConfig | None:
    """The configuration named by *path* or the environment, or ``None`` if there is none."""
    if path:
        return ShardedConfig.from_toml(path)
    if os.environ.get(ENV_CONFIG) or os.environ.get(ENV_PARTITIONS):
        return ShardedConfig.from_env()
    return None


def format_table(snapshots: dict[str, StatsSnapshot]) -> str:
    """Per-partition pool figures as a fixed-width text table."""
    header = (
        "partition", "open", "idle", "in use", "waiting", "min", "max",
        "checkouts", "opened", "timeouts", "wait p50", "wait p99",
    )  # fmt: skip
    rows = [header]
    for name, s in snapshots.items():
        rows.append(
            (
                name,
                str(s.open),
                str(s.idle),
                str(s.checked_out),
                str(s.waiting),
                str(s.min_connections),
                str(s.max_connections),
                str(s.checkouts),
                str(s.connections_opened),
                str(s.timeouts),
                f"{s.wait_p50 * 1000:.2f}ms",
                f"{s.wait_p99 * 1000:.2f}ms",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@contextlib.contextmanager
def _demo_partitions(args: argparse.Namespace, out: TextIO) -> Iterator[ShardedConfig]:
    config = load_config(args.config)
    if config is not None:
        print(f"Using the {len(config.partitions)} configured partitions.", file=out)
        yield config
        return
    from .testing.databases import scratch_partitions

    if not (args.url or os.environ.get(ENV_URL)):
        print("No PostgreSQL URL given: starting an embedded throwaway server.", file=out)
    with scratch_partitions(
        args.partitions, url=args.url, prefix="partpool_demo", announce=True
    ) as partitions:
        yield ShardedConfig.build(
            partitions, min_connections=1, max_connections=args.max_connections
        )


def run_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Route rows by key over a few partitions and print the pools' figures."""
    with _demo_partitions(args, out) as config:
        started = time.perf_counter()
        sharded = create_sharded_engine(config)
        print(
            f"Created {sharded!r}\n  warm-up of {len(config.partitions)} partitions took "
            f"{(time.perf_counter() - started) * 1000:.0f} ms",
            file=out,
        )
        try:
            _demo_workload(sharded, args, out)
        finally:
            sharded.dispose()
    print("\nDone: every connection was returned and closed.", file=out)
    return 0


def _demo_workload(sharded: ShardedEngine, args: argparse.Namespace, out: TextIO) -> None:
    for _, engine in sharded.engines():
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS partpool_demo"))
            conn.execute(
                text("CREATE TABLE partpool_demo (customer_id int PRIMARY KEY, note text)")
            )
    rows = args.rows
    threads = max(1, args.threads)
    errors: list[BaseException] = []

    def insert(offset: int) -> None:
        try:
            for customer_id in range(offset, rows, threads):
                with sharded.begin(key=customer_id) as conn:
                    conn.execute(
                        text("INSERT INTO partpool_demo VALUES (:c, :n)"),
                        {"c": customer_id, "n": f"customer {customer_id}"},
                    )
        except BaseException as exc:  # reported after the threads finish
            errors.append(exc)

    started = time.perf_counter()
    workers = [threading.Thread(target=insert, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    print(
        f"\nInserted {rows} rows routed by customer_id from {threads} threads "
        f"in {elapsed:.2f}s ({rows / elapsed:.0f} rows/s).",
        file=out,
    )
    print("\nRows per partition (read back from each partition):", file=out)
    for name, engine in sharded.engines():
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM partpool_demo")).scalar_one()
            database = conn.execute(text("SELECT current_database()")).scalar_one()
        print(f"  {name:<6} {database:<40} {count:>6} rows", file=out)
    key = rows // 2
    with sharded.connect(key=key) as conn:
        note = conn.execute(
            text("SELECT note FROM partpool_demo WHERE customer_id = :c"), {"c": key}
        ).scalar_one()
    print(f"\nLookup by key {key}: partition {sharded.partition_for(key)!r} -> {note!r}", file=out)
    print("\nPool figures per partition:", file=out)
    print(format_table(sharded.stats()), file=out)
    for _, engine in sharded.engines():
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE partpool_demo"))


_NO_CONFIG_MESSAGE = f"""\
partpool: error: no partitions configured; describe them in one of three ways:
  --config FILE                              a TOML configuration file
  {ENV_CONFIG}=FILE                       the same file, named by the environment
  {ENV_PARTITIONS}='p0=URL p1=URL ...'    name=URL pairs separated by spaces or ';'"""


def run_status(args: argparse.Namespace, out: TextIO) -> int:
    """Check every configured partition and print its state and its server's figures."""
    if args.count is not None and args.watch is None:
        print("partpool status: error: --count needs --watch SECONDS", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        if config is None:
            print(_NO_CONFIG_MESSAGE, file=sys.stderr)
            return 2
        return status.run_status(
            config,
            out,
            as_json=args.json,
            timeout=args.timeout,
            watch=args.watch,
            count=args.count,
        )
    except ConfigurationError as exc:
        # 1 means "a partition is down"; a configuration that cannot work is a usage error
        print(f"partpool: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``partpool`` command."""
    parser = argparse.ArgumentParser(
        prog="partpool",
        description="Pooled, routed access to a partitioned PostgreSQL database.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="route rows over a few partitions and show the pools")
    _add_config_arguments(demo)
    demo.add_argument("--url", help=f"admin URL of a PostgreSQL server (default: ${ENV_URL})")
    demo.add_argument("--partitions", type=int, default=4, help="partitions to create (4)")
    demo.add_argument("--rows", type=int, default=2000, help="rows to insert (2000)")
    demo.add_argument("--threads", type=int, default=8, help="inserting threads (8)")
    demo.add_argument("--max-connections", type=int, default=4, help="per partition (4)")
    status_parser = sub.add_parser(
        "status",
        help="check every partition and show its server's figures",
        description="Check every configured partition (all in parallel) and print its state, "
        "latency and server figures. Exit status: 0 if all are up, 1 if any is down, "
        "2 for a usage or configuration error.",
    )
    _add_config_arguments(status_parser)
    status_parser.add_argument("--json", action="store_true", help="print one JSON document")
    status_parser.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="bound on connecting, pinging and querying (default: the configured "
        "connect_timeout and ping_timeout)",
    )
    status_parser.add_argument(
        "--watch", type=seconds, metavar="SECONDS", help="repeat every SECONDS until Ctrl-C"
    )
    status_parser.add_argument(
        "--count", type=positive_int, metavar="N", help="with --watch: stop after N rounds"
    )
    migrate = sub.add_parser(
        "migrate",
        help="run alembic migrations on every partition",
        description="Run alembic migrations on every partition, each with its own "
        "alembic_version table, several partitions at once. Exit status: 0 if done, 1 if a "
        "partition failed (status: drift), 2 for a usage or configuration error.",
    )
    migrate_cli.add_arguments(migrate)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the ``partpool`` command; returns the exit status."""
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose > 1 else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    if args.command is None:
        parser.print_help(out)
        return 2
    try:
        if args.command == "demo":
            return run_demo(args, out)
        if args.command == "status":
            return run_status(args, out)
        if args.command == "migrate":
            return migrate_cli.run(args, out)
    except PartpoolError as exc:
        print(f"partpool: error: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
