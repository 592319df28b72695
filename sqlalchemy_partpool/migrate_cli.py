"""``partpool migrate``: the command line of the migration commands.

Subcommands ``upgrade``, ``downgrade``, ``stamp``, ``current``, ``history``,
``status``, ``revision`` and ``init``; each runs the alembic command through the
environment's ``env.py`` (see :mod:`.migrate_commands`), its options turned into
``-x`` arguments.  The partitions come from ``--config FILE``, ``PARTPOOL_CONFIG``
or ``PARTPOOL_PARTITIONS``, as for ``partpool status``.

Exit status: 0 done (``status``: no drift); 1 a partition failed (``status``:
drift); 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from ._argtypes import positive_int, seconds_or_zero
from .migrate_commands import (
    COMMANDS,
    DEFAULT_ALEMBIC_CONFIG,
    call,
    collect_status,
    make_alembic_config,
    x_options,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``migrate`` subcommands and their options to *parser*."""
    alembic_options = argparse.ArgumentParser(add_help=False)
    alembic_options.add_argument(
        "-c",
        "--alembic-config",
        metavar="FILE",
        default=os.environ.get("ALEMBIC_CONFIG") or DEFAULT_ALEMBIC_CONFIG,
        help="alembic configuration file (default: $ALEMBIC_CONFIG or alembic.ini)",
    )
    common = argparse.ArgumentParser(add_help=False, parents=[alembic_options])
    common.add_argument(
        "--config",
        metavar="FILE",
        help="partitions' TOML configuration (default: $PARTPOOL_CONFIG or $PARTPOOL_PARTITIONS)",
    )
    common.add_argument("-n", "--name", default="alembic", help="ini section (default: alembic)")
    common.add_argument(
        "-x",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra argument for env.py (repeatable), as for alembic",
    )
    common.add_argument("--partitions", metavar="A,B", help="only these partitions")
    migrating = argparse.ArgumentParser(add_help=False, parents=[common])
    migrating.add_argument(
        "--jobs",
        type=positive_int,
        metavar="N",
        help="partitions migrated at once, each in a process of its own "
        "(default: CPUs, at most 4; 1 = one after another)",
    )
    migrating.add_argument(
        "--continue-on-error",
        action="store_true",
        help="after a failure, go on with the other partitions (default: start no more)",
    )
    migrating.add_argument(
        "--lock-timeout",
        type=seconds_or_zero,
        metavar="SECONDS",
        help="wait this long for another run's lock on a partition (default: fail at once)",
    )
    migrating.add_argument(
        "--sql", action="store_true", help="offline: print one SQL script per partition"
    )
    migrating.add_argument(
        "--sql-dir", metavar="DIR", help="offline: write <partition>.sql files into DIR"
    )
    migrating.add_argument("--tag", help="tag for env.py (alembic's --tag)")

    sub = parser.add_subparsers(dest="migrate_command", metavar="SUBCOMMAND")
    parser.set_defaults(migrate_parser=parser)
    for name, help_text in (
        ("upgrade", "upgrade every partition to REVISION (e.g. head)"),
        ("downgrade", "downgrade every partition to REVISION (e.g. -1, base)"),
    ):
        command = sub.add_parser(name, parents=[migrating], help=help_text, description=help_text)
        command.add_argument("revision", metavar="REVISION")
    stamp_parser = sub.add_parser(
        "stamp", parents=[migrating], help="write REVISION into the version tables, run nothing"
    )
    stamp_parser.add_argument("revisions", metavar="REVISION", nargs="+")
    stamp_parser.add_argument("--purge", action="store_true", help="empty the version tables first")
    current = sub.add_parser("current", parents=[common], help="each partition's revision")
    current.add_argument("-v", "--verbose", action="store_true")
    history = sub.add_parser("history", parents=[common], help="the revision history")
    history.add_argument("-r", "--rev-range", metavar="[START]:[END]")
    history.add_argument("-v", "--verbose", action="store_true")
    history.add_argument(
        "-i", "--indicate-current", action="store_true", help="mark each partition's revision"
    )
    status_parser = sub.add_parser(
        "status",
        parents=[common],
        help="each partition's revision, and drift between partitions",
        description="Show each partition's revision and flag drift: partitions at different "
        "revisions, or with a schema that differs from the reference partition's. Exit "
        "status: 0 without drift, 1 with drift or an unreadable partition, 2 for a usage "
        "or configuration error.",
    )
    status_parser.add_argument("--json", action="store_true", help="print one JSON document")
    status_parser.add_argument(
        "--reference", metavar="NAME", help="compare schemas with this partition (default: first)"
    )
    status_parser.add_argument(
        "--no-schema", action="store_true", help="compare revisions only, not schemas"
    )
    revision = sub.add_parser(
        "revision",
        parents=[common],
        help="create a revision script (autogenerate: vs one partition)",
    )
    revision.add_argument("-m", "--message", required=True)
    revision.add_argument(
        "--autogenerate",
        action="store_true",
        help="compare the models with the reference partition",
    )
    revision.add_argument(
        "--reference", metavar="NAME", help="autogenerate against this partition (default: first)"
    )
    revision.add_argument("--rev-id", help="the new revision's id (default: generated)")
    revision.add_argument("--head", default="head", help="the revision to build on (head)")
    init = sub.add_parser(
        "init",
        parents=[alembic_options],
        help="write an alembic environment for partitions into DIR",
        description="Write an alembic environment into DIR (env.py calling "
        "sqlalchemy_partpool.migrations.run_migrations, script.py.mako, versions/) and "
        "its configuration file (-c, default alembic.ini).",
    )
    init.add_argument("directory", metavar="DIR")


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``partpool migrate SUBCOMMAND``; returns the exit status.

    0: done (``status``: no drift); 1: a partition failed (``status``: drift);
    2: a usage or configuration error.
    """
    from alembic.util import CommandError

    from .errors import ConfigurationError, PartpoolError, UnknownPartition
    from .migrate_run import MigrationFailed

    command = args.migrate_command
    if command is None:
        args.migrate_parser.print_help(out)
        return 2
    try:
        if command == "init":
            return _init(args, out)
        if command == "status":
            return _status(args, out)
        _run_alembic(command, args, out)
        return 0
    except MigrationFailed as exc:
        _error(str(exc))
        return 1
    except (ConfigurationError, UnknownPartition) as exc:
        _error(str(exc))
        return 2
    except (PartpoolError, CommandError) as exc:
        _error(str(exc))
        return 1


def _error(message: str) -> None:
    print(f"partpool migrate: error: {message}", file=sys.stderr)


def _x_from_args(args: argparse.Namespace) -> list[str]:
    """The ``-x`` arguments: the user's, then ours (which win: last one counts)."""
    x = list(args.x)
    if args.config:
        x.append(f"config={os.path.abspath(args.config)}")
    x += x_options(
        args.partitions.split(",") if args.partitions else None,
        getattr(args, "jobs", None),
        getattr(args, "continue_on_error", False),
        getattr(args, "lock_timeout", None),
    )
    if getattr(args, "sql_dir", None):
        x.append(f"sql_dir={os.path.abspath(args.sql_dir)}")
    if getattr(args, "reference", None):
        x.append(f"reference={args.reference}")
    return x


def _run_alembic(command: str, args: argparse.Namespace, out: TextIO) -> None:
    positional, keywords = COMMANDS[command]
    fields = {name: getattr(args, name, None) for name in (*positional, *keywords)}
    if "sql" in fields:
        fields["sql"] = bool(args.sql or args.sql_dir)
    if command == "stamp":
        fields["purge"] = bool(args.purge)
    if command in ("current", "history"):
        fields["verbose"] = bool(args.verbose)
    if command == "history":
        fields["indicate_current"] = bool(args.indicate_current)
    if command == "revision":
        fields["autogenerate"] = bool(args.autogenerate)
    config = make_alembic_config(
        args.alembic_config,
        x=_x_from_args(args),
        stdout=out,
        section=args.name,
        command=command,
        fields=fields,
        configure_logger=True,
    )
    call(config, command, fields)


def _status(args: argparse.Namespace, out: TextIO) -> int:
    from .migrate_status import format_migration_status

    config = make_alembic_config(
        args.alembic_config,
        x=_x_from_args(args),
        stdout=out,
        section=args.name,
        configure_logger=True,
    )
    result = collect_status(config, compare_schema=not args.no_schema)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2), file=out)
    else:
        print(format_migration_status(result), file=out)
    return result.exit_status


def _init(args: argparse.Namespace, out: TextIO) -> int:
    from .migrate_init import write_environment

    for path in write_environment(args.directory, args.alembic_config):
        print(f"  wrote {path}", file=out)
    print(
        f"Edit {args.alembic_config} (partpool_config) and "
        f"{Path(args.directory) / 'env.py'} (target_metadata), then run "
        "`partpool migrate revision --autogenerate -m MESSAGE` and "
        "`partpool migrate upgrade head`.",
        file=out,
    )
    return 0
