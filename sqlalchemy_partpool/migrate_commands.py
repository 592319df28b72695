"""Migration commands: from Python (:func:`upgrade`, :func:`downgrade`, :func:`stamp`,
:func:`status`) and from the command line (``partpool migrate ...``).

Both run the alembic command itself, through the environment's ``env.py``
(which calls :func:`.run_migrations`), so they behave exactly like ``alembic
upgrade head``; options become ``-x`` arguments, which worker processes see too.
From Python the partitions can be given as a ShardedConfig or ShardedEngine;
the command line reads them like ``partpool status`` does (``--config FILE``,
``PARTPOOL_CONFIG``, ``PARTPOOL_PARTITIONS``).

This module imports alembic only when a command runs, so ``partpool status``
starts as fast as before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from argparse import Namespace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from alembic.config import Config

    from .config import ShardedConfig
    from .engine import ShardedEngine
    from .migrate_report import MigrationReport
    from .migrate_status import MigrationStatus

__all__ = ["add_arguments", "downgrade", "run", "stamp", "status", "upgrade"]

#: The alembic configuration file used when none is named (alembic's own default).
DEFAULT_ALEMBIC_CONFIG = "alembic.ini"

# alembic.command functions: the names of their positional and keyword
# arguments in cmd_opts, as alembic's own command line lays them out
_COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "upgrade": (("revision",), ("sql", "tag")),
    "downgrade": (("revision",), ("sql", "tag")),
    "stamp": (("revisions",), ("sql", "tag", "purge")),
    "current": ((), ("verbose",)),
    "history": ((), ("rev_range", "verbose", "indicate_current")),
    "revision": ((), ("message", "autogenerate", "rev_id", "head")),
}


# -- from Python -----------------------------------------------------------------------


def upgrade(
    sharded: ShardedConfig | ShardedEngine | None,
    revision: str = "head",
    *,
    alembic_config: str | os.PathLike[str] = DEFAULT_ALEMBIC_CONFIG,
    partitions: Sequence[str] | None = None,
    jobs: int | None = None,
    continue_on_error: bool = False,
    lock_timeout: float | None = None,
    stdout: TextIO | None = None,
) -> MigrationReport:
    """Upgrade the partitions to *revision*, as ``alembic upgrade`` does.

    :param sharded: the partitions; ``None`` lets ``env.py`` find them.
    :param revision: the target (``head``, a revision id, ``+1``).
    :param alembic_config: the alembic configuration file.
    :param partitions: the partitions to upgrade; default all.
    :param jobs: partitions upgraded at once (default ``min(4, CPUs)``).
    :param continue_on_error: go on with other partitions after a failure.
    :param lock_timeout: seconds to wait for another run's lock (default: do not wait).
    :param stdout: where progress and the report go (default ``sys.stdout``).
    :returns: the report.
    :raises MigrationFailed: if any partition failed; its ``report`` says where each is.
    """
    return _migrate(
        "upgrade",
        {"revision": revision, "sql": False, "tag": None},
        sharded,
        alembic_config,
        _x_options(partitions, jobs, continue_on_error, lock_timeout),
        stdout,
    )


def downgrade(
    sharded: ShardedConfig | ShardedEngine | None,
    revision: str,
    *,
    alembic_config: str | os.PathLike[str] = DEFAULT_ALEMBIC_CONFIG,
    partitions: Sequence[str] | None = None,
    jobs: int | None = None,
    continue_on_error: bool = False,
    lock_timeout: float | None = None,
    stdout: TextIO | None = None,
) -> MigrationReport:
    """Downgrade the partitions to *revision*, as ``alembic downgrade`` does.

    Parameters as for :func:`upgrade`; *revision* is required (``base``, an id, ``-1``).

    :raises MigrationFailed: if any partition failed.
    """
    return _migrate(
        "downgrade",
        {"revision": revision, "sql": False, "tag": None},
        sharded,
        alembic_config,
        _x_options(partitions, jobs, continue_on_error, lock_timeout),
        stdout,
    )


def stamp(
    sharded: ShardedConfig | ShardedEngine | None,
    revision: str | Sequence[str],
    *,
    alembic_config: str | os.PathLike[str] = DEFAULT_ALEMBIC_CONFIG,
    partitions: Sequence[str] | None = None,
    purge: bool = False,
    jobs: int | None = None,
    lock_timeout: float | None = None,
    stdout: TextIO | None = None,
) -> MigrationReport:
    """Write *revision* into the partitions' version tables without running migrations.

    Parameters as for :func:`upgrade`; *purge* empties the version table first.

    :raises MigrationFailed: if any partition failed.
    """
    revisions = [revision] if isinstance(revision, str) else list(revision)
    return _migrate(
        "stamp",
        {"revisions": revisions, "sql": False, "tag": None, "purge": purge},
        sharded,
        alembic_config,
        _x_options(partitions, jobs, False, lock_timeout),
        stdout,
    )


def status(
    sharded: ShardedConfig | ShardedEngine | None,
    *,
    alembic_config: str | os.PathLike[str] = DEFAULT_ALEMBIC_CONFIG,
    partitions: Sequence[str] | None = None,
    reference: str | None = None,
    compare_schema: bool = True,
) -> MigrationStatus:
    """Each partition's revision, and drift between partitions (see :mod:`.migrate_status`).

    :param sharded: the partitions; ``None`` lets ``env.py`` find them.
    :param alembic_config: the alembic configuration file.
    :param partitions: the partitions to look at; default all.
    :param reference: the partition the others' schemas are compared with
      (default the first selected).
    :param compare_schema: False to compare revisions only.
    :raises CommandError: if ``env.py`` does not call :func:`.run_migrations`.
    """
    x = _x_options(partitions, None, False, None)
    if reference:
        x.append(f"reference={reference}")
    config = _alembic_config(alembic_config, x=x, sharded=sharded, stdout=sys.stdout)
    return _collect_status(config, compare_schema)


def _x_options(
    partitions: Sequence[str] | None,
    jobs: int | None,
    continue_on_error: bool,
    lock_timeout: float | None,
) -> list[str]:
    x = []
    if partitions:
        x.append("partitions=" + ",".join(partitions))
    if jobs is not None:
        x.append(f"jobs={jobs}")
    if continue_on_error:
        x.append("continue_on_error=1")
    if lock_timeout is not None:
        x.append(f"lock_timeout={lock_timeout:g}")
    return x


def _alembic_config(
    path: str | os.PathLike[str],
    *,
    x: Sequence[str],
    stdout: TextIO,
    sharded: ShardedConfig | ShardedEngine | None = None,
    section: str = "alembic",
    command: str | None = None,
    fields: dict[str, Any] | None = None,
    configure_logger: bool = False,
) -> Config:
    """An alembic Config that worker processes can replay (``cmd_opts.cmd`` is set)."""
    from alembic import command as alembic_command
    from alembic.config import Config

    from .migrate_parallel import CONFIG_ATTRIBUTE

    cmd = None
    if command is not None:
        positional, keywords = _COMMANDS[command]
        cmd = (getattr(alembic_command, command), list(positional), list(keywords))
    cmd_opts = Namespace(x=list(x), quiet=False, cmd=cmd, **(fields or {}))
    config = Config(file_=os.fspath(path), ini_section=section, stdout=stdout, cmd_opts=cmd_opts)
    # env.py written by `partpool migrate init` leaves logging alone when called from a program
    config.attributes["configure_logger"] = configure_logger
    if sharded is not None:
        config.attributes[CONFIG_ATTRIBUTE] = sharded
    return config


def _migrate(
    command: str,
    fields: dict[str, Any],
    sharded: ShardedConfig | ShardedEngine | None,
    alembic_config: str | os.PathLike[str],
    x: list[str],
    stdout: TextIO | None,
) -> MigrationReport:
    from alembic.util import CommandError

    from .migrate_run import REPORT_ATTRIBUTE

    config = _alembic_config(
        alembic_config,
        x=x,
        sharded=sharded,
        stdout=stdout or sys.stdout,
        command=command,
        fields=fields,
    )
    _call(config, command, fields)
    report: MigrationReport | None = config.attributes.get(REPORT_ATTRIBUTE)
    if report is None:
        raise CommandError(
            f"{alembic_config}: env.py did not call sqlalchemy_partpool.migrations.run_migrations()"
        )
    return report


def _call(config: Config, command: str, fields: dict[str, Any]) -> None:
    from alembic import command as alembic_command

    positional, keywords = _COMMANDS[command]
    fn: Callable[..., Any] = getattr(alembic_command, command)
    fn(config, *[fields[k] for k in positional], **{k: fields[k] for k in keywords})


def _collect_status(config: Config, compare_schema: bool) -> MigrationStatus:
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from .migrate_status import MigrationStatus, StatusRequest
    from .migrations import STATUS_ATTRIBUTE

    script = ScriptDirectory.from_config(config)
    config.attributes[STATUS_ATTRIBUTE] = StatusRequest(compare_schema=compare_schema)
    with EnvironmentContext(config, script, fn=lambda rev, context: [], dont_mutate=True):
        script.run_env()
    result = config.attributes.get(STATUS_ATTRIBUTE)
    if not isinstance(result, MigrationStatus):
        raise CommandError(
            "env.py did not call sqlalchemy_partpool.migrations.run_migrations(); "
            "partpool migrate status needs it"
        )
    return result


# -- the command line ------------------------------------------------------------------


def _jobs(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value!r}")
    return number


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not (0 <= seconds < float("inf")):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value!r}")
    return seconds


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
        type=_jobs,
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
        type=_seconds,
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
        if not Path(args.alembic_config).is_file():
            _error(
                f"no alembic configuration file {args.alembic_config!r}: pass -c FILE, "
                "or write one with `partpool migrate init DIR`"
            )
            return 2
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
    x += _x_options(
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
    positional, keywords = _COMMANDS[command]
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
    config = _alembic_config(
        args.alembic_config,
        x=_x_from_args(args),
        stdout=out,
        section=args.name,
        command=command,
        fields=fields,
        configure_logger=True,
    )
    _call(config, command, fields)


def _status(args: argparse.Namespace, out: TextIO) -> int:
    from .migrate_status import format_migration_status

    config = _alembic_config(
        args.alembic_config,
        x=_x_from_args(args),
        stdout=out,
        section=args.name,
        configure_logger=True,
    )
    result = _collect_status(config, compare_schema=not args.no_schema)
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
