"""Migration commands from Python: :func:`upgrade`, :func:`downgrade`, :func:`stamp`,
:func:`status`.

They run the alembic command itself, through the environment's ``env.py``
(which calls :func:`.run_migrations`), so they behave exactly like ``alembic
upgrade head``; options become ``-x`` arguments, which worker processes see too.
The partitions can be given as a ShardedConfig or ShardedEngine (or left to
``env.py``).  ``partpool migrate`` (:mod:`.migrate_cli`) runs its commands
through the same functions.

This module imports alembic only when a command runs, so ``partpool status``
starts as fast as before.
"""

from __future__ import annotations

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

__all__ = [
    "COMMANDS",
    "DEFAULT_ALEMBIC_CONFIG",
    "call",
    "collect_status",
    "downgrade",
    "make_alembic_config",
    "stamp",
    "status",
    "upgrade",
    "x_options",
]

#: The alembic configuration file used when none is named (alembic's own default).
DEFAULT_ALEMBIC_CONFIG = "alembic.ini"

#: alembic.command functions: the names of their positional and keyword
#: arguments in ``cmd_opts``, as alembic's own command line lays them out.
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
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
        x_options(partitions, jobs, continue_on_error, lock_timeout),
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
        x_options(partitions, jobs, continue_on_error, lock_timeout),
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
        x_options(partitions, jobs, False, lock_timeout),
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
    x = x_options(partitions, None, False, None)
    if reference:
        x.append(f"reference={reference}")
    config = make_alembic_config(alembic_config, x=x, sharded=sharded, stdout=sys.stdout)
    return collect_status(config, compare_schema)


def x_options(
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


def make_alembic_config(
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
    """An alembic Config that worker processes can replay (``cmd_opts.cmd`` is set).

    :raises ConfigurationError: if *path* is not a file.
    """
    from alembic import command as alembic_command
    from alembic.config import Config

    from .errors import ConfigurationError
    from .migrate_parallel import CONFIG_ATTRIBUTE

    if not Path(path).is_file():
        raise ConfigurationError(
            f"no alembic configuration file {os.fspath(path)!r}: pass -c FILE "
            "(alembic_config=...), or write one with `partpool migrate init DIR`"
        )

    cmd = None
    if command is not None:
        positional, keywords = COMMANDS[command]
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

    config = make_alembic_config(
        alembic_config,
        x=x,
        sharded=sharded,
        stdout=stdout or sys.stdout,
        command=command,
        fields=fields,
    )
    call(config, command, fields)
    report: MigrationReport | None = config.attributes.get(REPORT_ATTRIBUTE)
    if report is None:
        raise CommandError(
            f"{alembic_config}: env.py did not call sqlalchemy_partpool.migrations.run_migrations()"
        )
    return report


def call(config: Config, command: str, fields: dict[str, Any]) -> None:
    from alembic import command as alembic_command

    positional, keywords = COMMANDS[command]
    fn: Callable[..., Any] = getattr(alembic_command, command)
    fn(config, *[fields[k] for k in positional], **{k: fields[k] for k in keywords})


def collect_status(config: Config, compare_schema: bool) -> MigrationStatus:
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
