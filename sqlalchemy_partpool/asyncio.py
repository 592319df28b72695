"""asyncio: an AsyncShardedEngine over asyncpg / psycopg 3, and the ORM through AsyncSession.

::

    from sqlalchemy.ext.asyncio import async_sessionmaker
    from sqlalchemy_partpool import ShardedSession
    from sqlalchemy_partpool.asyncio import create_async_sharded_engine

    sharded = create_async_sharded_engine(
        {"p0": "postgresql+asyncpg://app@db0/app",
         "p1": "postgresql+psycopg://app@db1/app"},
        min_connections=2, max_connections=10,
    )
    Session = async_sessionmaker(sync_session_class=ShardedSession,
                                 sharded=sharded.sync_engine)

    async def main():
        await sharded.warm_up()
        async with sharded.connect(key=42) as conn:
            await conn.execute(...)
        async with Session() as session:
            customer = await session.get(Customer, 42)
        await sharded.dispose()

Each partition gets an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` whose pool
is an :class:`.AsyncPartitionPool`: the sync pool's min/max semantics, with
waits, pings and background upkeep on the event loop (see
:mod:`~sqlalchemy_partpool.async_pool` for what runs where).

:attr:`AsyncShardedEngine.sync_engine` is a :class:`.ShardedEngine` over the
partitions' ``AsyncEngine.sync_engine`` objects, as
:attr:`AsyncEngine.sync_engine <sqlalchemy.ext.asyncio.AsyncEngine.sync_engine>`
is for one engine: it is what :class:`.ShardedSession` routes with under
:class:`~sqlalchemy.ext.asyncio.AsyncSession`, and where events are listened for.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

from .async_pool import AsyncMaintenance, AsyncPartitionHealth, AsyncPartitionPool
from .config import Partition, PartitionsSpec, PoolSettings, ShardedConfig
from .engine import (
    _TCP_DEFAULTS,
    _TCP_USER_TIMEOUT_MS,
    NO_KEY,
    ShardedEngine,
    _maintenance_interval,
)
from .errors import ConfigurationError, PartpoolError, WarmupError
from .fanout import FanoutResult
from .pinning import Pin
from .routing import Router
from .stats import StatsSnapshot

__all__ = [
    "AsyncShardedEngine",
    "create_async_sharded_engine",
]

log = logging.getLogger("sqlalchemy_partpool.asyncio")

#: URL drivers that work with :func:`create_async_sharded_engine`.
ASYNC_DRIVERS = ("asyncpg", "psycopg", "psycopg_async")


class _AsyncBackedShardedEngine(ShardedEngine):
    """The :class:`.ShardedEngine` behind an :class:`AsyncShardedEngine`.

    Its partition engines are the ``sync_engine`` of each partition's
    :class:`~sqlalchemy.ext.asyncio.AsyncEngine`, usable only inside
    SQLAlchemy's greenlet context (``AsyncSession``, ``run_sync``), as any
    ``AsyncEngine.sync_engine`` is.  Routing, pinning, statistics, health and
    events are the base class's; the thread-based parts are replaced.
    """

    def __init__(self, config: ShardedConfig) -> None:
        super().__init__(config)
        # The maintenance thread cannot open or close asyncio connections: it
        # is stopped before it did anything, and a task on the loop replaces it.
        self._maintenance.stop()
        self.maintenance = AsyncMaintenance(
            self._live_pools, interval=_maintenance_interval(self._settings.values())
        )
        # Likewise the probers: tasks instead of threads.  No pool exists yet,
        # so nothing refers to the health objects being replaced.
        self._health = {
            p.name: AsyncPartitionHealth(
                p.name,
                down_after=self._settings[p.name].down_after,
                probe_max_interval=self._settings[p.name].probe_max_interval,
                secrets=[p.url.password] if p.url.password else [],
                dispatch=self.dispatch,
            )
            for p in config.partitions
        }
        self._async_engines: dict[str, AsyncEngine] = {}

    def async_engine(self, name: str) -> AsyncEngine:
        """The :class:`~sqlalchemy.ext.asyncio.AsyncEngine` of partition *name*."""
        self.engine(name)
        return self._async_engines[name]

    def _create_engine(self, partition: Partition) -> Engine:
        engine: AsyncEngine = self._build_engine(
            partition, create_async_engine, AsyncPartitionPool, _connect_defaults
        )
        pool = engine.sync_engine.pool
        assert isinstance(pool, AsyncPartitionPool)
        pool.maintenance = self.maintenance
        self._async_engines[partition.name] = engine
        return engine.sync_engine

    # -- the thread-based parts, which cannot drive asyncio connections ------------

    def _not_here(self, what: str, instead: str) -> PartpoolError:
        return PartpoolError(
            f"{what} runs on threads, which cannot use asyncio connections; "
            f"use {instead} of the AsyncShardedEngine"
        )

    def warm_up(self, partitions: list[str] | None = None) -> dict[str, BaseException]:
        """Not available here: use ``await`` :meth:`AsyncShardedEngine.warm_up`."""
        raise self._not_here("warm_up()", "await warm_up()")

    def check_health(self, partitions: list[str] | None = None) -> dict[str, bool]:
        """Not available here: use ``await`` :meth:`AsyncShardedEngine.check_health`."""
        raise self._not_here("check_health()", "await check_health()")

    def execute_all(self, statement: Any, params: Any = None, **kw: Any) -> FanoutResult:
        """Not available here: run one statement per partition with ``AsyncSession``."""
        raise self._not_here(
            "execute_all()", "AsyncSession(sync_session_class=ShardedSession) or connect()"
        )


def _connect_defaults(
    partition: Partition, connect_args: dict[str, Any], settings: PoolSettings
) -> None:
    """Fill in driver connect arguments from the pool settings, unless the user set them."""
    name = partition.name
    driver = partition.url.get_driver_name()
    if driver == "asyncpg":
        if settings.connect_timeout is not None:
            connect_args.setdefault("timeout", settings.connect_timeout)
        if settings.query_timeout is not None:
            # asyncpg's own client-side deadline for each statement
            connect_args.setdefault("command_timeout", settings.query_timeout)
        server_settings = dict(connect_args.get("server_settings") or {})
        server_settings.setdefault("application_name", f"partpool/{name}")
        if settings.statement_timeout is not None:
            ms = max(1, round(settings.statement_timeout * 1000))
            server_settings.setdefault("statement_timeout", str(ms))
        connect_args["server_settings"] = server_settings
        return
    # psycopg 3 takes libpq parameters, as psycopg2 does
    import psycopg

    if settings.connect_timeout is not None:
        connect_args.setdefault("connect_timeout", max(1, math.ceil(settings.connect_timeout)))
    connect_args.setdefault("application_name", f"partpool/{name}")
    for key, value in _TCP_DEFAULTS.items():
        connect_args.setdefault(key, value)
    if psycopg.pq.version() >= 120000:
        connect_args.setdefault("tcp_user_timeout", _TCP_USER_TIMEOUT_MS)
    if settings.statement_timeout is not None:
        ms = max(1, round(settings.statement_timeout * 1000))
        existing = connect_args.get("options", "")
        connect_args["options"] = f"{existing} -c statement_timeout={ms}".strip()


def _check_drivers(config: ShardedConfig) -> None:
    for partition in config.partitions:
        driver = partition.url.get_driver_name()
        if driver not in ASYNC_DRIVERS:
            raise ConfigurationError(
                f"url {partition.safe_url!r} uses the {driver!r} driver, which is not an asyncio "
                "driver; use postgresql+asyncpg:// or postgresql+psycopg:// URLs with "
                "create_async_sharded_engine (or create_sharded_engine for this URL)",
                partition=partition.name,
                option="url",
            )
        if driver != "asyncpg" and partition.settings(config.pool).query_timeout is not None:
            raise ConfigurationError(
                "query_timeout is not available with psycopg's asyncio connections (they have "
                "no client-side statement deadline); use statement_timeout, wrap calls in "
                "asyncio.timeout(), or use postgresql+asyncpg",
                partition=partition.name,
                option="query_timeout",
            )


class AsyncShardedEngine:
    """A partitioned PostgreSQL database used as one, from asyncio.

    Build one with :func:`create_async_sharded_engine`.  Every partition's
    engine is an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` whose pool is an
    :class:`.AsyncPartitionPool`.  Creating it opens nothing and needs no event
    loop (like :func:`~sqlalchemy.ext.asyncio.create_async_engine`, it can be
    made at import time); ``await`` :meth:`warm_up` opens the minimum, and
    ``await`` :meth:`dispose` closes everything.  Use it on one event loop.

    Events (:class:`.ShardedEngineEvents`) are listened for on
    :attr:`sync_engine`: ``event.listen(sharded.sync_engine, "partition_down", fn)``.
    Listeners run on the event loop: keep them quick and do not block.
    """

    def __init__(self, config: ShardedConfig, *, require_all_partitions: bool = True) -> None:
        """Build the engine from a validated configuration; opens no connection.

        :param config: the configuration; every URL must use an asyncio driver.
        :param require_all_partitions: whether :meth:`warm_up` raises
          :class:`.WarmupError` when a partition cannot open its minimum.
        :raises ConfigurationError: for a non-asyncio driver, or a router that
          does not fit the partitions.
        """
        _check_drivers(config)
        self._sync = _AsyncBackedShardedEngine(config)
        self.require_all_partitions = require_all_partitions
        if not config.lazy:
            # creating engines opens nothing; the maintenance fills every one of
            # them to min_connections once it runs
            for name in self._sync.partitions:
                self._sync.engine(name)

    # -- partitions and routing ------------------------------------------------------

    @property
    def sync_engine(self) -> ShardedEngine:
        """The :class:`.ShardedEngine` to give :class:`.ShardedSession` under ``AsyncSession``.

        ::

            Session = async_sessionmaker(sync_session_class=ShardedSession,
                                         sharded=sharded.sync_engine)

        Its ``engine(name)`` is the partition ``AsyncEngine``'s ``sync_engine``;
        like that, it does I/O only inside SQLAlchemy's greenlet context.  Its
        thread-based ``warm_up``, ``check_health`` and ``execute_all`` raise;
        use this object's.
        """
        return self._sync

    @property
    def config(self) -> ShardedConfig:
        """The configuration this engine was built from."""
        return self._sync.config

    @property
    def partitions(self) -> Mapping[str, Partition]:
        """The partitions by name, in configuration order (read-only)."""
        return self._sync.partitions

    @property
    def router(self) -> Router:
        """The router that maps shard keys to partition names."""
        return self._sync.router

    def partition_for(self, key: Any) -> str:
        """The name of the partition that owns shard key *key*.

        :raises ShardKeyMissing: if *key* is ``None``.
        :raises RoutingError: if the router cannot place the key.
        """
        return self._sync.partition_for(key)

    def resolve(self, key: Any = NO_KEY, partition: str | None = None) -> str:
        """The partition for a shard key and/or a partition name.

        See :meth:`.ShardedEngine.resolve`.
        """
        return self._sync.resolve(key, partition)

    def pinned(self, key: Any) -> AbstractContextManager[Pin]:
        """Pin the current asyncio task to the partition of *key* for a ``with`` block.

        As :meth:`.ShardedEngine.pinned`: every statement routed through this
        engine, or through a :class:`.ShardedSession` on :attr:`sync_engine`,
        must stay on that partition.  The pin is a context variable, so it
        holds for this task and for the tasks it starts inside the block.
        """
        return self._sync.pinned(key)

    # -- engines -----------------------------------------------------------------------

    def engine(self, name: str) -> AsyncEngine:
        """The :class:`~sqlalchemy.ext.asyncio.AsyncEngine` of partition *name*.

        :raises UnknownPartition: if there is no such partition.
        :raises PoolClosed: if this engine was disposed.
        """
        return self._sync.async_engine(name)

    def engines(self) -> Iterator[tuple[str, AsyncEngine]]:
        """``(name, engine)`` for every partition, creating engines as needed."""
        for name in self._sync.partitions:
            yield name, self.engine(name)

    def pool(self, name: str) -> AsyncPartitionPool:
        """The :class:`.AsyncPartitionPool` currently serving partition *name*."""
        pool = self._sync.pool(name)
        assert isinstance(pool, AsyncPartitionPool)
        return pool

    # -- connections -------------------------------------------------------------------

    def connect(self, key: Any = NO_KEY, *, partition: str | None = None) -> AsyncConnection:
        """An :class:`~sqlalchemy.ext.asyncio.AsyncConnection` to the partition of *key*.

        Use it in an ``async with`` block so it is always returned to the pool::

            async with sharded.connect(key=customer_id) as conn:
                await conn.execute(...)
                await conn.commit()

        :param key: the shard key to route by.
        :param partition: the partition name, instead of (or to check) the key.
        :raises ShardKeyMissing: if neither is given.
        :raises UnknownPartition: for an unknown partition name.
        :raises PoolTimeout: (on entering the block) if no connection frees up
          within the pool's timeout.
        """
        return self.engine(self.resolve(key, partition)).connect()

    def begin(
        self, key: Any = NO_KEY, *, partition: str | None = None
    ) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection with a transaction begun, committed at the end of the ``async with``.

        Like :meth:`sqlalchemy.ext.asyncio.AsyncEngine.begin`: rolled back if the
        block raises.  The transaction stays on one partition.

        :raises ShardKeyMissing: if neither key nor partition is given.
        """
        return self.engine(self.resolve(key, partition)).begin()

    # -- sizing, warm-up and figures ---------------------------------------------------

    async def warm_up(self, partitions: list[str] | None = None) -> dict[str, BaseException]:
        """Open ``min_connections`` on every partition, all connects at once on the loop.

        Also starts the background maintenance on this loop.

        :param partitions: only these; default all.
        :returns: partition name -> the error of partitions that failed (empty if none).
        :raises WarmupError: if a partition failed and ``require_all_partitions``
          was set (the default).  The engine stays usable, and the maintenance
          keeps trying to reach the minimum.
        """
        sync = self._sync
        sync._check_open()
        maintenance = sync.maintenance
        maintenance.ensure_running()
        names = list(sync.partitions) if partitions is None else partitions
        pools = [(name, self.pool(name)) for name in names]

        async def warm(name: str, pool: AsyncPartitionPool) -> list[Exception]:
            errors = await pool.fill_async()
            # the maintenance may have been opening some of them already
            await maintenance.settled(name)
            if not errors and pool.missing():
                errors = await pool.fill_async()
            return errors

        outcomes = await asyncio.gather(*(warm(name, pool) for name, pool in pools))
        errors: dict[str, BaseException] = {
            name: failed[0] for (name, _), failed in zip(pools, outcomes) if failed
        }
        for name, exc in errors.items():
            log.warning("partition %r: warm-up failed: %s", name, sync.describe_error(name, exc))
        if errors and self.require_all_partitions:
            described = {name: sync.describe_error(name, exc) for name, exc in errors.items()}
            raise WarmupError(errors, described)
        return errors

    async def check_health(self, partitions: list[str] | None = None) -> dict[str, bool]:
        """Actively check partitions (connect, ping, disconnect), all at once on the loop.

        As :meth:`.ShardedEngine.check_health`: emits ``health_check`` per
        partition, and a failure counts towards marking the partition down.

        :param partitions: only these; default all.
        :returns: partition name -> whether it answered.
        """
        names = list(self.partitions) if partitions is None else partitions
        for name in names:
            self.engine(name)  # the check needs the partition's pool
        health = self._sync._health
        results = await asyncio.gather(
            *(greenlet_spawn(health[name].check, "check") for name in names)
        )
        return dict(zip(names, results))

    async def resize(
        self,
        min_connections: int | None = None,
        max_connections: int | None = None,
        *,
        partition: str | None = None,
    ) -> None:
        """Change pool sizes at run time; see :meth:`.ShardedEngine.resize`.

        A lower maximum closes idle connections above it now, which is I/O on the
        loop, hence ``await``.  A higher minimum is filled by the maintenance.
        """
        await greenlet_spawn(
            self._sync.resize, min_connections, max_connections, partition=partition
        )
        self._sync.maintenance.wake()

    def stats(self) -> dict[str, StatsSnapshot]:
        """A snapshot of every partition's pool figures, by partition name (no I/O)."""
        return self._sync.stats()

    def health(self) -> dict[str, Any]:
        """Every partition's health state and pool figures, JSON-serialisable (no I/O).

        See :meth:`.ShardedEngine.health`.
        """
        return self._sync.health()

    def partition_state(self, name: str) -> str:
        """The health state of partition *name*: ``up``, ``suspect``, ``down`` or ``recovering``."""
        return self._sync.partition_state(name)

    def describe_error(self, partition: str, exc: BaseException) -> str:
        """A one-line, password-free description of *exc* raised for *partition*."""
        return self._sync.describe_error(partition, exc)

    # -- lifetime ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`dispose` was called."""
        return self._sync.closed

    async def dispose(self) -> None:
        """Stop the background tasks and close every pooled connection.

        Final, as :meth:`.ShardedEngine.dispose`: connections checked out now
        are closed when returned, and later calls raise :class:`.PoolClosed`.
        Call it on the loop that used the engine.  Safe to call twice.
        """
        sync = self._sync
        if sync.closed:
            return
        await sync.maintenance.stop()
        for health in sync._health.values():
            if isinstance(health, AsyncPartitionHealth):
                await health.stop_async()
        await greenlet_spawn(sync.dispose)

    async def __aenter__(self) -> AsyncShardedEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.dispose()

    def __repr__(self) -> str:
        return "<Async" + repr(self._sync)[1:]


def create_async_sharded_engine(
    partitions: PartitionsSpec | ShardedConfig,
    *,
    router: Any = None,
    lazy: bool = False,
    engine_options: Mapping[str, Any] | None = None,
    require_all_partitions: bool = True,
    fanout_workers: int | None = None,
    **pool_options: Any,
) -> AsyncShardedEngine:
    """Create an :class:`AsyncShardedEngine`: a pooled ``AsyncEngine`` per partition.

    Takes the arguments of :func:`.create_sharded_engine`; the URLs must name
    an asyncio driver (``postgresql+asyncpg://`` or ``postgresql+psycopg://``).
    Opens no connection and needs no running event loop::

        sharded = create_async_sharded_engine(
            {"p0": "postgresql+asyncpg://app@db0/app",
             "p1": "postgresql+asyncpg://app@db1/app"},
            min_connections=1, max_connections=10,
        )

        async def startup():
            await sharded.warm_up()

    :param partitions: as for :func:`.create_sharded_engine`.
    :param router: as for :func:`.create_sharded_engine`.
    :param lazy: create each partition's engine at its first use, and keep
      only used partitions at ``min_connections``.  By default every engine is
      created now, and the maintenance fills every partition to its minimum
      once it starts (at the first checkout, or by :meth:`~AsyncShardedEngine.warm_up`).
    :param engine_options: extra :func:`~sqlalchemy.ext.asyncio.create_async_engine`
      keywords for every partition.
    :param require_all_partitions: whether :meth:`~AsyncShardedEngine.warm_up`
      raises :class:`.WarmupError` when a partition cannot open its minimum
      (with False it logs a warning, and the maintenance keeps trying).
    :param fanout_workers: accepted for compatibility; unused (nothing here
      runs on threads).
    :param pool_options: default :class:`.PoolSettings` for every partition.
      ``connect_timeout`` becomes asyncpg's ``timeout`` / libpq's
      ``connect_timeout``; ``statement_timeout`` is set on every connection;
      ``query_timeout`` becomes asyncpg's ``command_timeout`` and is refused
      for psycopg.
    :raises ConfigurationError: on any invalid setting or a non-asyncio driver.
    """
    config = ShardedConfig.build(
        partitions,
        router=router,
        engine_options=engine_options,
        lazy=lazy,
        fanout_workers=fanout_workers,
        **pool_options,
    )
    return AsyncShardedEngine(config, require_all_partitions=require_all_partitions)
