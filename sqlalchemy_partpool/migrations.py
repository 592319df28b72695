"""Alembic migrations per partition: one revision history, applied to every partition.

An alembic environment's ``env.py`` hands its work to :func:`run_migrations`::

    from alembic import context
    from sqlalchemy_partpool.migrations import run_migrations

    run_migrations(context, target_metadata=Base.metadata)

and every alembic command then applies to every partition, each with its own
``alembic_version`` table:

* ``upgrade``, ``downgrade``, ``stamp`` (*migrating* commands) run on each
  partition in one transaction of its own (PostgreSQL DDL is transactional),
  under a per-partition advisory lock so that two deploys never migrate the
  same partition at once; several partitions at once in worker processes.
  A failure stops the scheduling of further partitions (unless
  ``continue_on_error``); the run ends with a :class:`.MigrationReport` naming
  every partition's revision before and after, and raises
  :class:`.MigrationFailed` (an alembic ``CommandError``: non-zero exit) if
  any partition failed.  See :mod:`.migrate_run` and :mod:`.migrate_parallel`.
* ``--sql`` (offline) writes one script per partition, each headed
  ``-- partition: <name>``, to standard output or to ``-x sql_dir=DIR``.
* ``current`` and ``history -i`` print each partition's lines prefixed with its name.
* ``revision --autogenerate`` and ``check`` compare the models with one
  *reference* partition (the first selected, or ``-x reference=NAME``).

The partitions come from (see :func:`.resolve_config`): the ``sharded``
argument; a ShardedConfig or ShardedEngine in
``config.attributes["partpool.config"]``; ``-x config=FILE``; the
``partpool_config`` option of the alembic ini section; the ``PARTPOOL_CONFIG``
/ ``PARTPOOL_PARTITIONS`` environment variables.  ``-x`` arguments select and
tune: ``partitions=a,b``, ``jobs=N``, ``continue_on_error=1``,
``lock_timeout=SECONDS``, ``sql_dir=DIR``, ``reference=NAME``.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO

from alembic.runtime.environment import EnvironmentContext
from alembic.util import CommandError

from .config import ShardedConfig
from .engine import ShardedEngine
from .errors import ConfigurationError
from .migrate_parallel import COMMAND_ATTRIBUTE, CONFIG_ATTRIBUTE, WORKER_ATTRIBUTE
from .migrate_partitions import (
    MIGRATE_APPLICATION_NAME,
    MigrationLocked,
    find_partition,
    lock_key,
    partition_engine,
    read_revisions,
    resolve_config,
    select_partitions,
    x_arguments,
)
from .migrate_report import MigrationReport, PartitionOutcome, format_report
from .migrate_run import (
    REPORT_ATTRIBUTE,
    MigrateOptions,
    MigrationFailed,
    MigrationRun,
    default_jobs,
    handed_config,
    run_migrating,
    run_worker,
)

if TYPE_CHECKING:
    from sqlalchemy import MetaData

__all__ = [
    "COMMAND_ATTRIBUTE",
    "CONFIG_ATTRIBUTE",
    "MIGRATE_APPLICATION_NAME",
    "REPORT_ATTRIBUTE",
    "STATUS_ATTRIBUTE",
    "MigrateOptions",
    "MigrationFailed",
    "MigrationLocked",
    "MigrationReport",
    "PartitionOutcome",
    "current_partition",
    "default_jobs",
    "format_report",
    "lock_key",
    "partition_engine",
    "read_revisions",
    "resolve_config",
    "run_migrations",
    "select_partitions",
]

log = logging.getLogger("sqlalchemy_partpool.migrations")

#: ``config.attributes`` key: set to a :class:`.StatusRequest` to ask ``env.py``
#: for ``partpool migrate status`` instead of running the command; ``env.py``
#: replaces it with the :class:`.MigrationStatus`.
STATUS_ATTRIBUTE = "partpool.status"

#: ``configure()`` options that :func:`run_migrations` sets per partition itself.
_OWNED_OPTIONS = frozenset(
    {"connection", "url", "dialect_name", "output_buffer", "transaction_per_migration", "fn"}
)
#: alembic.command's migration functions of commands that only read.
_READ_ONLY_FUNCTIONS = frozenset({"display_version", "_display_current_history", "edit_current"})


def run_migrations(
    context: EnvironmentContext | ModuleType,
    sharded: ShardedEngine | ShardedConfig | None = None,
    *,
    target_metadata: MetaData | Sequence[MetaData] | None = None,
    partitions: Sequence[str] | None = None,
    jobs: int | None = None,
    continue_on_error: bool = False,
    lock_timeout: float = 0.0,
    **configure_options: Any,
) -> MigrationReport | None:
    """Run the current alembic command on every selected partition; call it from ``env.py``.

    :param context: ``alembic.context`` (the module) or an EnvironmentContext.
    :param sharded: the partitions; ``None`` finds them as :func:`.resolve_config`
      says.  Only the configuration is used: migrations connect without the pool.
    :param target_metadata: the models' MetaData, for autogenerate.
    :param partitions: the partitions to run on (default all); ``-x
      partitions=a,b`` overrides it.
    :param jobs: partitions migrated at once (default :func:`.default_jobs`);
      ``-x jobs=N`` overrides it.
    :param continue_on_error: go on with the other partitions after a
      failure; ``-x continue_on_error=1`` overrides it.
    :param lock_timeout: seconds to wait for another run's lock on a
      partition; 0 (the default) fails at once.  ``-x lock_timeout=S`` overrides it.
    :param configure_options: more :meth:`EnvironmentContext.configure`
      options (``version_table``, ``include_object``, ``compare_type``, ...).
    :returns: the :class:`.MigrationReport` of a migrating command (also left in
      ``config.attributes["partpool.report"]``), else ``None``.
    :raises MigrationFailed: if any partition failed (after printing the report).
    :raises ConfigurationError: if no partitions are configured, or
      *configure_options* holds one that is set per partition.
    :raises UnknownPartition: if a selected partition is not configured.
    :raises CommandError: if an ``-x`` argument is malformed.
    """
    env = _environment(context)
    owned = _OWNED_OPTIONS & set(configure_options)
    if owned:
        raise ConfigurationError(
            f"run_migrations() sets {', '.join(sorted(owned))} itself, per partition; "
            "remove it from the call"
        )
    defaults = MigrateOptions(
        partitions=tuple(partitions) if partitions else None,
        jobs=jobs if jobs is not None else default_jobs(),
        continue_on_error=continue_on_error,
        lock_timeout=lock_timeout,
    )
    options = defaults.with_x_arguments(x_arguments(env.config))
    partition_config = resolve_config(env.config, sharded)
    run = MigrationRun(
        env=env,
        partitions=partition_config,
        names=select_partitions(partition_config, options.partitions),
        options=options,
        target_metadata=target_metadata,
        configure_options=configure_options,
        original_fn=env.context_opts.get("fn"),
    )
    attributes = env.config.attributes
    worker = attributes.get(WORKER_ATTRIBUTE)
    if worker is not None:
        run_worker(run, worker["partition"], worker["result"])
        return None
    if attributes.get(STATUS_ATTRIBUTE) is not None:
        from .migrate_status import collect_migration_status

        attributes[STATUS_ATTRIBUTE] = collect_migration_status(run, attributes[STATUS_ATTRIBUTE])
        return None
    if "revision_context" in env.context_opts:
        _run_on_reference(run)
        return None
    if env.is_offline_mode():
        _run_offline(run)
        return None
    if env.context_opts.get("dont_mutate") or (
        getattr(run.original_fn, "__name__", "") in _READ_ONLY_FUNCTIONS
    ):
        _run_read_only(run)
        return None
    return run_migrating(run, handed_config=handed_config(env.config, sharded is not None))


def _environment(context: EnvironmentContext | ModuleType) -> EnvironmentContext:
    if isinstance(context, EnvironmentContext):
        return context
    env = getattr(context, "_proxy", None)
    if not isinstance(env, EnvironmentContext):
        raise CommandError(
            "run_migrations() needs a running alembic command: call it from env.py "
            "with alembic's context (from alembic import context)"
        )
    return env


def current_partition() -> str | None:
    """The partition a revision's ``upgrade()`` / ``downgrade()`` is running on.

    For migrations whose data steps differ by partition.  ``None`` outside a
    migration run by :func:`run_migrations`.
    """
    from alembic import op

    try:
        context = op.get_context()
    except NameError:  # the op proxy is not installed: no migration is running
        return None
    name = context.opts.get("partpool_partition")
    return None if name is None else str(name)


# -- offline, read-only and autogenerate commands ---------------------------------------


def _run_offline(run: MigrationRun) -> None:
    """``--sql``: one script per partition, to standard output or ``sql_dir``."""
    table, schema = run.version_table
    directory = Path(run.options.sql_dir) if run.options.sql_dir else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    for name in run.names:
        partition = find_partition(run.partitions, name)
        path = directory / f"{name}.sql" if directory is not None else None
        out: TextIO = (
            path.open("w", encoding="utf-8")
            if path is not None
            else (run.config.output_buffer or sys.stdout)
        )
        try:
            out.write(f"-- partition: {name} ({partition.safe_url})\n")
            run.env.configure(
                url=partition.url,
                output_buffer=out,
                literal_binds=True,
                target_metadata=run.target_metadata,
                transaction_per_migration=False,
                partpool_partition=name,
                **run.configure_options,
            )
            with run.env.begin_transaction():
                # psql waits here while another deploy migrates this partition
                run.env.execute(f"SELECT pg_advisory_xact_lock({lock_key(table, schema)})")
                run.env.run_migrations()
            out.write("\n")
        finally:
            if path is not None:
                out.close()
        if path is not None:
            run.config.print_stdout("partition %s: wrote %s", name, path)


def _run_read_only(run: MigrationRun) -> None:
    """``current``, ``history -i``: each partition's output, prefixed with its name."""
    config = run.config
    failures: list[str] = []
    for name in run.names:
        captured = io.StringIO()
        saved, config.stdout = config.stdout, captured
        error: str | None = None
        engine = partition_engine(run.partitions, name)
        try:
            with engine.connect() as connection:
                run.env.configure(
                    connection=connection,
                    target_metadata=run.target_metadata,
                    partpool_partition=name,
                    **run.configure_options,
                )
                with run.env.begin_transaction():
                    run.env.run_migrations()
        except Exception as exc:
            error = run.describe(name, exc)
            failures.append(f"{name}: {error}")
        finally:
            config.stdout = saved
            engine.dispose()
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        if error is not None:
            lines.append(f"error: {error}")
        for line in lines or ["(base)"]:
            config.print_stdout("%s: %s", name, line)
    if failures:
        raise CommandError("failed on " + "; ".join(failures))


def _run_on_reference(run: MigrationRun) -> None:
    """``revision --autogenerate`` and ``check``: compare the models with one partition."""
    name = run.reference()
    engine = partition_engine(run.partitions, name)
    log.info("comparing with the reference partition %s", name)
    try:
        with engine.connect() as connection:
            run.env.configure(
                connection=connection,
                target_metadata=run.target_metadata,
                partpool_partition=name,
                **run.configure_options,
            )
            with run.env.begin_transaction():
                run.env.run_migrations()
    finally:
        engine.dispose()
