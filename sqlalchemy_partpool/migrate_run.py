"""A migrating run (``upgrade``, ``downgrade``, ``stamp``) over the selected partitions.

The *coordinator* (:func:`run_migrating`, in the process that runs ``env.py``):

1. reads every selected partition's revision (in parallel threads); if one
   cannot be reached, nothing starts (unless ``continue_on_error``);
2. migrates the partitions: in worker processes, at most ``jobs`` at a time
   (:mod:`.migrate_parallel`), or one after another in-process when ``jobs``
   is 1, one partition is selected, or the command cannot be replayed;
3. after a failure starts no further partition (unless ``continue_on_error``);
4. reads every partition's revision again and prints a
   :class:`.MigrationReport`; raises :class:`MigrationFailed` if any partition
   failed.

Each partition (:func:`migrate_partition`) runs in one transaction: take the
partition's advisory lock, read its revision, run every revision script, commit.
A failure rolls the whole partition back to where it was.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from alembic.runtime.environment import EnvironmentContext
from alembic.util import CommandError

from .config import ShardedConfig
from .engine import ShardedEngine
from .errors import PartpoolError
from .migrate_parallel import CONFIG_ATTRIBUTE, command_spec, run_workers, write_outcome
from .migrate_partitions import (
    MigrationLocked,
    acquire_lock,
    describe_error,
    find_partition,
    lock_key,
    partition_engine,
    read_revisions,
)
from .migrate_report import (
    DONE,
    FAILED,
    SKIPPED,
    MigrationReport,
    PartitionOutcome,
    Progress,
    format_report,
)

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "REPORT_ATTRIBUTE",
    "MigrateOptions",
    "MigrationFailed",
    "MigrationRun",
    "default_jobs",
    "migrate_partition",
    "run_migrating",
]

log = logging.getLogger("sqlalchemy_partpool.migrations")

#: ``config.attributes`` key where the coordinator leaves the :class:`.MigrationReport`.
REPORT_ATTRIBUTE = "partpool.report"

_TRUE = frozenset({"", "1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NOT_STARTED = "(--continue-on-error / -x continue_on_error=1 goes on after failures)"


class MigrationFailed(PartpoolError, CommandError):
    """A migration command failed on at least one partition.

    (It lives here rather than in :mod:`.errors` because it is also alembic's
    ``CommandError``, and the package must not import alembic until migrations run.)

    Also an alembic ``CommandError``, so ``alembic upgrade`` prints the
    summary and exits non-zero.  Each partition's run is one transaction: a
    failed partition is left at its previous revision, the others at theirs
    (see :attr:`report`); fix the cause and run the command again.

    :ivar report: the run's :class:`.MigrationReport`.
    """

    def __init__(self, report: MigrationReport) -> None:
        failed = report.names(FAILED)
        super().__init__(report.summary(), partition=failed[0] if len(failed) == 1 else None)
        self.report = report


def default_jobs() -> int:
    """How many partitions migrate at once by default: the CPU count, at most 4.

    Each worker is a Python process that spends about half a second of CPU
    starting up, so more workers than CPUs only help when migrations wait on
    the server (large tables, index builds, remote servers).
    """
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class MigrateOptions:
    """How a run selects and schedules partitions (``-x`` arguments override them).

    :param partitions: the partitions to run on, in configuration order;
      ``None`` for all (``-x partitions=a,b``).
    :param jobs: partitions migrated at once, each in a worker process
      (``-x jobs=N``); default :func:`default_jobs`.  1 runs them one after
      another in-process.
    :param continue_on_error: start the remaining partitions after a failure
      (``-x continue_on_error=1``); by default they are left alone.
    :param lock_timeout: seconds to wait for another run's lock on a
      partition (``-x lock_timeout=SECONDS``); 0 fails at once, naming the partition.
    :param sql_dir: offline mode: write ``<partition>.sql`` files there
      (``-x sql_dir=DIR``) instead of to standard output.
    :param reference: the partition autogenerate and drift checks compare
      with (``-x reference=NAME``); default the first selected.
    """

    partitions: tuple[str, ...] | None = None
    jobs: int = field(default_factory=default_jobs)
    continue_on_error: bool = False
    lock_timeout: float = 0.0
    sql_dir: str | None = None
    reference: str | None = None

    def with_x_arguments(self, x: Mapping[str, str]) -> MigrateOptions:
        """These options overridden by ``-x`` arguments; other keys are left to ``env.py``.

        :raises CommandError: if a value is malformed (names the key and the value).
        """
        changes: dict[str, Any] = {}
        if "partitions" in x:
            names = tuple(n.strip() for n in x["partitions"].split(",") if n.strip())
            changes["partitions"] = names or None
        if "jobs" in x:
            changes["jobs"] = _x_number(x, "jobs", int, minimum=1)
        if "continue_on_error" in x:
            value = x["continue_on_error"].strip().lower()
            if value not in _TRUE | _FALSE:
                raise CommandError(f"-x continue_on_error={value!r}: use 1 or 0")
            changes["continue_on_error"] = value in _TRUE
        if "lock_timeout" in x:
            changes["lock_timeout"] = _x_number(x, "lock_timeout", float, minimum=0)
        if x.get("sql_dir"):
            changes["sql_dir"] = x["sql_dir"]
        if x.get("reference"):
            changes["reference"] = x["reference"]
        return MigrateOptions(**{**self.__dict__, **changes})


def _x_number(x: Mapping[str, str], key: str, kind: Callable[[str], Any], minimum: float) -> Any:
    try:
        value = kind(x[key])
    except ValueError:
        value = None
    if value is None or not (minimum <= value < math.inf):
        raise CommandError(f"-x {key}={x[key]!r}: expected a number of at least {minimum:g}")
    return value


@dataclass
class MigrationRun:
    """Everything one invocation of :func:`.run_migrations` works with.

    :param env: alembic's EnvironmentContext of the running command.
    :param partitions: the partitions' configuration.
    :param names: the selected partitions, in configuration order.
    :param options: selection and scheduling.
    :param target_metadata: the models' MetaData (autogenerate).
    :param configure_options: more ``EnvironmentContext.configure`` options.
    :param original_fn: the command's migration function, before any wrapping.
    """

    env: EnvironmentContext
    partitions: ShardedConfig
    names: list[str]
    options: MigrateOptions
    target_metadata: Any
    configure_options: dict[str, Any]
    original_fn: Any

    @property
    def config(self) -> Config:
        """The alembic configuration."""
        return self.env.config

    @property
    def version_table(self) -> tuple[str, str | None]:
        """The version table's name and schema."""
        return (
            self.configure_options.get("version_table", "alembic_version"),
            self.configure_options.get("version_table_schema"),
        )

    def describe(self, name: str, exc: BaseException) -> str:
        """A one-line, password-free description of *exc* raised on partition *name*."""
        return describe_error(self.partitions, name, exc)

    def reference(self) -> str:
        """The partition autogenerate and drift checks compare with.

        :raises UnknownPartition: if ``reference`` names no configured partition.
        """
        name = self.options.reference or self.names[0]
        find_partition(self.partitions, name)
        return name


def run_migrating(run: MigrationRun, *, handed_config: Any = None) -> MigrationReport:
    """Coordinate ``upgrade`` / ``downgrade`` / ``stamp`` over the selected partitions.

    :param run: the run.
    :param handed_config: the partitions' configuration to hand to worker
      processes pickled, when ``env.py`` cannot find it by itself (it came as
      an object through ``config.attributes``); ``None`` otherwise.
    :returns: the report, also left in ``config.attributes["partpool.report"]``.
    :raises MigrationFailed: if any partition failed (after printing the report).
    """
    config = run.config
    started = time.monotonic()
    spec = command_spec(config)
    label = spec.label if spec is not None else _label(run.env)
    jobs = min(run.options.jobs, len(run.names))
    parallel = spec is not None and jobs > 1
    if jobs > 1 and spec is None:
        log.info("the command cannot be replayed in worker processes; running one by one")
    quiet = bool(getattr(config.cmd_opts, "quiet", False))
    stream: TextIO = config.stdout
    progress = Progress(stream, len(run.names), label, enabled=not quiet)
    before = _read_all(run, run.names)
    unreachable = [n for n, (heads, _) in before.items() if heads is None]
    outcomes: dict[str, PartitionOutcome] = {}
    progress.begin(jobs if parallel else 1)
    if unreachable and not run.options.continue_on_error:
        for name in run.names:
            error = before[name][1] or (
                f"not started because {', '.join(unreachable)} could not be reached"
            )
            status = FAILED if name in unreachable else SKIPPED
            outcomes[name] = PartitionOutcome(name, status, before[name][0], error=error)
            progress.finished(outcomes[name])
    else:
        for name in unreachable:
            outcomes[name] = PartitionOutcome(name, FAILED, error=before[name][1])
            progress.finished(outcomes[name])
        reachable = [n for n in run.names if n not in unreachable]
        if parallel and spec is not None:
            outcomes.update(
                run_workers(
                    config,
                    spec,
                    reachable,
                    jobs=jobs,
                    continue_on_error=run.options.continue_on_error,
                    progress=progress,
                    sharded_config=_as_config(handed_config),
                )
            )
        else:
            outcomes.update(_run_sequentially(run, reachable, progress))
    after = _read_all(run, run.names)
    report = MigrationReport(
        command=label,
        partitions=tuple(
            PartitionOutcome(
                name,
                outcomes[name].status,
                # the partition's own reading, under its lock, is the exact one
                before=_first(outcomes[name].before, before[name][0]),
                after=after[name][0],
                error=outcomes[name].error,
                duration=outcomes[name].duration,
            )
            for name in run.names
        ),
        jobs=jobs if parallel else 1,
        duration=time.monotonic() - started,
    )
    progress.close()
    config.attributes[REPORT_ATTRIBUTE] = report
    if not quiet:
        stream.write(format_report(report) + "\n")
        stream.flush()
    if not report.ok:
        raise MigrationFailed(report)
    return report


def _first(*values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return next((v for v in values if v is not None), None)


def _as_config(given: Any) -> ShardedConfig | None:
    if isinstance(given, ShardedEngine):
        return given.config
    return given if isinstance(given, ShardedConfig) else None


def handed_config(config: Config, sharded_was_given: bool) -> Any:
    """What to pickle for the workers: ``config.attributes``' configuration object, if used."""
    return None if sharded_was_given else config.attributes.get(CONFIG_ATTRIBUTE)


def _label(env: EnvironmentContext) -> str:
    """The command as typed, from what the EnvironmentContext knows of it."""
    fn = getattr(env.context_opts.get("fn"), "__name__", "migrate")
    name = {"do_stamp": "stamp"}.get(fn, fn)
    destination = env.context_opts.get("destination_rev")
    if isinstance(destination, (tuple, list)):
        destination = " ".join(destination)
    return f"{name} {destination}" if destination else name


_Revisions = tuple[tuple[str, ...] | None, str | None]


def _read_all(run: MigrationRun, names: Sequence[str]) -> dict[str, _Revisions]:
    """Each partition's revisions (or why they could not be read), read in parallel."""
    table, schema = run.version_table

    def read(name: str) -> _Revisions:
        engine = partition_engine(run.partitions, name)
        try:
            with engine.connect() as connection:
                return read_revisions(connection, table, schema), None
        except Exception as exc:
            return None, f"cannot read its revision: {run.describe(name, exc)}"
        finally:
            engine.dispose()

    if not names:
        return {}
    with ThreadPoolExecutor(
        max_workers=min(16, len(names)), thread_name_prefix="partpool-migrate-read"
    ) as executor:
        return dict(zip(names, executor.map(read, names)))


def _run_sequentially(
    run: MigrationRun, names: Sequence[str], progress: Progress
) -> dict[str, PartitionOutcome]:
    outcomes: dict[str, PartitionOutcome] = {}
    first_failure: str | None = None
    for name in names:
        if first_failure is not None:
            outcomes[name] = PartitionOutcome(
                name, SKIPPED, error=f"not started because {first_failure} failed {_NOT_STARTED}"
            )
        else:
            progress.started(name, logs_follow=True)
            outcomes[name] = migrate_partition(run, name)
            if outcomes[name].status == FAILED and not run.options.continue_on_error:
                first_failure = name
        progress.finished(outcomes[name])
    return outcomes


def run_worker(run: MigrationRun, name: str, result: str) -> None:
    """In a worker process: migrate partition *name* and write its outcome to *result*.

    :raises CommandError: if the partition failed (the worker exits non-zero).
    """
    outcome = migrate_partition(run, name)
    write_outcome(result, outcome)
    if outcome.status != DONE:
        raise CommandError(f"partition {name!r}: {outcome.error}")


class _StepTracker:
    """Wraps the command's migration function to remember the step being run."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.step: Any = None

    def __call__(self, rev: Any, context: Any) -> Iterator[Any]:
        for step in self.fn(rev, context):
            self.step = step
            yield step


def migrate_partition(run: MigrationRun, name: str) -> PartitionOutcome:
    """Run the command on partition *name* in-process: one transaction, under its lock.

    Never raises for a failure of the partition: the outcome carries the error
    (which names the revision step that failed); the traceback is logged.
    """
    started = time.monotonic()
    table, schema = run.version_table
    tracker = _StepTracker(run.original_fn)
    before: tuple[str, ...] | None = None
    engine = partition_engine(run.partitions, name)
    log.info("partition %s: %s", name, find_partition(run.partitions, name).safe_url)
    try:
        with engine.connect() as connection, connection.begin():
            acquire_lock(connection, name, lock_key(table, schema), run.options.lock_timeout)
            # The connection is already in a transaction, so alembic runs every
            # revision inside it and leaves the commit to us: all or nothing.
            run.env.configure(
                connection=connection,
                target_metadata=run.target_metadata,
                transaction_per_migration=False,
                fn=tracker,
                partpool_partition=name,
                **run.configure_options,
            )
            context = run.env.get_context()
            before = tuple(context.get_current_heads())
            run.env.run_migrations()
            after = tuple(context.get_current_heads())
        return PartitionOutcome(name, DONE, before, after, duration=time.monotonic() - started)
    except Exception as exc:
        error = run.describe(name, exc)
        if any(
            frame.name == "autocommit_block" for frame in traceback.extract_tb(exc.__traceback__)
        ):
            error = (
                "autocommit_block() cannot run here: each partition's run is one transaction "
                "(run such statements, e.g. CREATE INDEX CONCURRENTLY, outside the migration)"
            )
        if tracker.step is not None:
            error = f"at {getattr(tracker.step, 'short_log', tracker.step)}: {error}"
        log.error("partition %s: %s", name, error, exc_info=not isinstance(exc, MigrationLocked))
        return PartitionOutcome(
            name, FAILED, before, before, error=error, duration=time.monotonic() - started
        )
    finally:
        # configure() keeps its options in the EnvironmentContext: unwrap for the next one
        run.env.context_opts["fn"] = run.original_fn
        engine.dispose()
