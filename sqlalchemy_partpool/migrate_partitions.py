"""The partitions a migration runs on: finding them, connecting, reading revisions, locking.

* :func:`resolve_config` finds the partitions' configuration the way every
  migration command does (see :mod:`sqlalchemy_partpool.migrations`), and
  :func:`select_partitions` narrows it to ``-x partitions=a,b``;
* :func:`partition_engine` connects to one partition without the pool;
* :func:`read_revisions` reads a partition's version table;
* :func:`acquire_lock` takes the per-partition advisory lock (key
  :func:`lock_key`) that keeps two deploys from migrating a partition at once.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import column, create_engine, inspect, select, table, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from .config import ENV_CONFIG, ENV_PARTITIONS, Partition, ShardedConfig
from .engine import ShardedEngine
from .errors import ConfigurationError, MigrationLocked, UnknownPartition, redact
from .migrate_parallel import CONFIG_ATTRIBUTE

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "MIGRATE_APPLICATION_NAME",
    "MigrationLocked",
    "acquire_lock",
    "describe_error",
    "find_partition",
    "lock_key",
    "partition_engine",
    "read_revisions",
    "resolve_config",
    "select_partitions",
    "x_arguments",
]

#: ``application_name`` prefix of migration connections (``partpool-migrate/p3``).
MIGRATE_APPLICATION_NAME = "partpool-migrate"

#: Seconds between attempts to take a partition's lock while waiting for it.
_LOCK_POLL = 0.1


def x_arguments(config: Config) -> dict[str, str]:
    """The ``-x key=value`` arguments of the running command, as a dict (last one wins)."""
    values = getattr(config.cmd_opts, "x", None) or []
    return {key: value for key, _, value in (item.partition("=") for item in values)}


def resolve_config(
    config: Config, sharded: ShardedEngine | ShardedConfig | None = None
) -> ShardedConfig:
    """The partitions a migration command runs on.

    In order: *sharded*; a ShardedConfig or ShardedEngine in
    ``config.attributes["partpool.config"]``; ``-x config=FILE``; the
    ``partpool_config`` option of the alembic ini section; the
    ``PARTPOOL_CONFIG`` / ``PARTPOOL_PARTITIONS`` environment variables.

    :param config: the alembic configuration.
    :param sharded: what ``env.py`` passed to :func:`.run_migrations`, if anything.
    :raises ConfigurationError: if no source describes any partition, or one is invalid.
    """
    for given in (sharded, config.attributes.get(CONFIG_ATTRIBUTE)):
        if isinstance(given, ShardedEngine):
            return given.config
        if isinstance(given, ShardedConfig):
            return given
    path = x_arguments(config).get("config") or config.get_main_option("partpool_config")
    if path:
        return ShardedConfig.from_toml(path)
    if os.environ.get(ENV_CONFIG) or os.environ.get(ENV_PARTITIONS):
        return ShardedConfig.from_env()
    raise ConfigurationError(
        "no partitions to migrate: pass them to run_migrations() in env.py, or set "
        f"-x config=FILE, 'partpool_config = FILE' in the alembic ini file, {ENV_CONFIG}=FILE "
        f"or {ENV_PARTITIONS}='p0=URL p1=URL ...'"
    )


def select_partitions(config: ShardedConfig, wanted: Sequence[str] | None) -> list[str]:
    """The names in *wanted* (all when ``None``), in configuration order.

    :raises UnknownPartition: if a name is not configured.
    """
    if not wanted:
        return list(config.names)
    for name in wanted:
        if name not in config.names:
            raise UnknownPartition(name, config.names)
    chosen = set(wanted)
    return [n for n in config.names if n in chosen]


def find_partition(config: ShardedConfig, name: str) -> Partition:
    """The partition called *name*.

    :raises UnknownPartition: if there is none.
    """
    for partition in config.partitions:
        if partition.name == name:
            return partition
    raise UnknownPartition(name, config.names)


def describe_error(config: ShardedConfig, name: str, exc: BaseException) -> str:
    """A one-line, password-free description of *exc* raised on partition *name*."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    described = f"{type(exc).__name__}: {message}".rstrip(": ")
    password = next((p.url.password for p in config.partitions if p.name == name), None)
    return redact(described, [password])


def partition_engine(
    config: ShardedConfig, name: str, application_name: str = MIGRATE_APPLICATION_NAME
) -> Engine:
    """An unpooled Engine on partition *name*, for migrations and checks.

    Uses the partition's URL and ``engine_options`` (shared and its own) and its
    ``connect_timeout``, but not the pool, ``statement_timeout`` or
    ``query_timeout``: a schema change may rightly take longer than any query.
    An ``isolation_level`` option is dropped, because a migration must run in a
    transaction.  Connections name themselves ``partpool-migrate/<name>``.

    :raises UnknownPartition: if there is no such partition.
    """
    partition = find_partition(config, name)
    settings = partition.settings(config.pool)
    options: dict[str, Any] = {**config.engine_options, **partition.engine_options}
    options.pop("isolation_level", None)
    connect_args = {
        **(config.engine_options.get("connect_args") or {}),
        **(partition.engine_options.get("connect_args") or {}),
    }
    if partition.url.get_driver_name() in ("psycopg2", "psycopg"):
        connect_args.setdefault("application_name", f"{application_name}/{name}")
        if settings.connect_timeout is not None:
            connect_args.setdefault("connect_timeout", max(1, math.ceil(settings.connect_timeout)))
    options["connect_args"] = connect_args
    return create_engine(partition.url, poolclass=NullPool, **options)


def read_revisions(
    connection: Connection, version_table: str = "alembic_version", schema: str | None = None
) -> tuple[str, ...]:
    """The revisions in a partition's version table; ``()`` if it has none (base).

    Reads the table directly (what alembic's ``get_current_heads`` does, without
    configuring a migration context and its log lines).
    """
    if not inspect(connection).has_table(version_table, schema=schema):
        return ()
    versions = table(version_table, column("version_num"), schema=schema)
    rows = connection.execute(select(versions.c.version_num)).scalars()
    return tuple(sorted(str(r) for r in rows))


def lock_key(version_table: str = "alembic_version", schema: str | None = None) -> int:
    """The advisory lock key guarding the migrations of one database.

    PostgreSQL scopes advisory locks to a database, so one fixed key per
    version table guards each partition separately.  A signed 64-bit number
    derived from the version table's name, stable across releases.
    """
    name = f"sqlalchemy_partpool.migrations:{schema or ''}.{version_table}"
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_HOLDER_SQL = text(
    """
SELECT a.pid, a.application_name,
       extract(epoch FROM clock_timestamp() - a.xact_start) AS seconds
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::text::bigint = :high AND l.objid::text::bigint = :low
LIMIT 1
"""
)


def acquire_lock(connection: Connection, partition: str, key: int, timeout: float) -> None:
    """Take the transaction-scoped advisory lock *key*, waiting up to *timeout* seconds.

    Released by the transaction's commit or rollback, or by the server when
    the connection dies.  Polls ``pg_try_advisory_xact_lock`` rather than
    changing ``lock_timeout``, so the migration's own statements keep the
    server's setting.

    :param connection: a connection in the transaction that migrates the partition.
    :param partition: the partition's name, for the error.
    :param key: the lock key, see :func:`lock_key`.
    :param timeout: seconds to keep trying; 0 tries once.
    :raises MigrationLocked: naming the partition and the holder, if the lock stays taken.
    """
    deadline = time.monotonic() + timeout
    try_lock = text("SELECT pg_try_advisory_xact_lock(:key)")
    while not connection.execute(try_lock, {"key": key}).scalar_one():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # pg_locks shows a bigint key as its high and low 32 bits
            unsigned = key & 0xFFFFFFFFFFFFFFFF
            row = connection.execute(
                _HOLDER_SQL, {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF}
            ).first()
            holder = None
            if row is not None:
                age = "" if row.seconds is None else f", for {float(row.seconds):.1f} s"
                holder = f"pid {row.pid}, {row.application_name or 'no application_name'}{age}"
            raise MigrationLocked(partition, holder, timeout)
        time.sleep(min(_LOCK_POLL, remaining))
