"""ShardedEngine: one pooled SQLAlchemy Engine per partition, and routing between them.

The data path reads top to bottom: a shard key goes to the router, which names
a partition; the partition's :class:`~sqlalchemy.engine.Engine` hands out a
connection from its :class:`.PartitionPool`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import PoolProxiedConnection

from .config import Partition, PartitionsSpec, PoolSettings, ShardedConfig
from .errors import (
    ConfigurationError,
    PoolClosed,
    RoutingError,
    ShardKeyMissing,
    UnknownPartition,
    WarmupError,
    redact,
)
from .fanout import AnyResult, Fanout, FanoutResult, MergeMode, OnError
from .health import PartitionHealth
from .ids import IdGenerator
from .maintenance import Maintenance
from .pinning import Pin, check_pin, pinned
from .pool import PartitionPool
from .recovery import RecoveryAction, recover_twophase
from .routing import Router, make_router
from .stats import PoolStats, StatsSnapshot
from .transactions import MultiPartitionTransaction
from .watchdog import install_statement_deadlines

if TYPE_CHECKING:
    from sqlalchemy.event.base import dispatcher

__all__ = ["ShardedEngine", "create_sharded_engine"]

log = logging.getLogger("sqlalchemy_partpool.engine")


class _Missing:
    def __repr__(self) -> str:
        return "<no key>"


#: Marks "no shard key given", since ``None`` is a key value (and an error).
NO_KEY: Final = _Missing()

# TCP settings given to psycopg2 connections unless the user sets them: a peer
# that vanishes without a FIN/RST (host down, cable cut, a firewall dropping the
# session) is found in ~60 s on an idle socket (keepalives) and in 30 s when
# sent data stays unacknowledged (tcp_user_timeout, libpq 12+).
_TCP_DEFAULTS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
_TCP_USER_TIMEOUT_MS = 30_000


class ShardedEngine(event.EventTarget):
    """A partitioned PostgreSQL database used as one: an Engine per partition plus a router.

    Build one with :func:`create_sharded_engine`.  Every partition's engine is
    an ordinary :class:`~sqlalchemy.engine.Engine` whose pool is a
    :class:`.PartitionPool` sized from that partition's settings.

    Engines are created when first needed (at once unless ``lazy``), so a
    thousand partitions cost nothing until used.  A background thread keeps
    each pool at its minimum and closes idle connections above it.

    Events (:class:`.ShardedEngineEvents`) are registered with
    ``event.listen(sharded, name, fn)``.

    Use it as a context manager, or call :meth:`dispose` when done.
    """

    dispatch: dispatcher[ShardedEngine]

    def __init__(self, config: ShardedConfig) -> None:
        """Build the engine from a validated configuration; opens no connection.

        :param config: the configuration.
        :raises ConfigurationError: if the router does not fit the partitions.
        """
        self.config = config
        self._partitions: Mapping[str, Partition] = MappingProxyType(
            {p.name: p for p in config.partitions}
        )
        self._settings: dict[str, PoolSettings] = {
            p.name: p.settings(config.pool) for p in config.partitions
        }
        self._stats = {name: PoolStats(name) for name in self._partitions}
        self._health = {
            p.name: PartitionHealth(
                p.name,
                down_after=self._settings[p.name].down_after,
                probe_max_interval=self._settings[p.name].probe_max_interval,
                secrets=[p.url.password] if p.url.password else [],
                dispatch=self.dispatch,
            )
            for p in config.partitions
        }
        self._router: Router = make_router(config.router, config.names)
        self._engines: dict[str, Engine] = {}
        self._engines_lock = threading.Lock()
        self._closed = False
        self._fanout = Fanout(self, config.workers)
        self._collations: dict[str, bool] = {}
        self._maintenance = Maintenance(
            self._live_pools,
            interval=_maintenance_interval(self._settings.values()),
            workers=min(4, len(self._partitions)),
        )

    # -- partitions and routing ------------------------------------------------------

    @property
    def partitions(self) -> Mapping[str, Partition]:
        """The partitions by name, in configuration order (read-only)."""
        return self._partitions

    @property
    def router(self) -> Router:
        """The router that maps shard keys to partition names."""
        return self._router

    def partition_for(self, key: Any) -> str:
        """The name of the partition that owns shard key *key*.

        :raises ShardKeyMissing: if *key* is ``None``.
        :raises RoutingError: if the router cannot place the key.
        """
        return self._router.route(key)

    def resolve(self, key: Any = NO_KEY, partition: str | None = None) -> str:
        """The partition to use for a call given a shard key and/or a partition name.

        With both, the key must route to that partition (a cheap guard against
        writing a row where it does not belong).

        :raises ShardKeyMissing: if neither is given, or the key is ``None``.
        :raises UnknownPartition: if the partition does not exist.
        :raises RoutingError: if the key routes to another partition.
        """
        if partition is not None:
            if partition not in self._partitions:
                raise UnknownPartition(partition, self._partitions)
            if key is not NO_KEY:
                routed = self._router.route(key)
                if routed != partition:
                    raise RoutingError(
                        f"shard key {key!r} belongs to partition {routed!r}, not {partition!r}; "
                        "pass only one of key= and partition=",
                        partition=partition,
                    )
            name = partition
        elif key is NO_KEY:
            raise ShardKeyMissing()
        else:
            name = self._router.route(key)
        check_pin(self, (name,), "this call")
        return name

    def pinned(self, key: Any) -> AbstractContextManager[Pin]:
        """Pin this thread / asyncio task to the partition of *key* for a ``with`` block.

        Inside it, every statement routed through this engine (Core calls and
        the ORM :class:`.ShardedSession`) must stay on that partition; one that
        would reach another raises :class:`.PinViolation` instead of running.
        Meant for multi-tenant request handlers::

            with sharded.pinned(request.tenant_id):
                ...

        :raises ShardKeyMissing: if *key* is ``None``.
        """
        return pinned(self, key)

    def id_generator(self, *, worker_id: int | None = None, worker_bits: int = 5) -> IdGenerator:
        """An :class:`.IdGenerator` whose ids carry this engine's hash buckets.

        :raises ConfigurationError: unless the router is a :class:`.HashRouter`.
        """
        return IdGenerator(self._router, worker_id=worker_id, worker_bits=worker_bits)  # type: ignore[arg-type]

    # -- engines -----------------------------------------------------------------------

    def engine(self, name: str) -> Engine:
        """The :class:`~sqlalchemy.engine.Engine` of partition *name*.

        :raises UnknownPartition: if there is no such partition.
        :raises PoolClosed: if this ShardedEngine was disposed.
        """
        engine = self._engines.get(name)
        if engine is not None:
            return engine
        if name not in self._partitions:
            raise UnknownPartition(name, self._partitions)
        with self._engines_lock:
            self._check_open()
            engine = self._engines.get(name)
            if engine is None:
                engine = self._create_engine(self._partitions[name])
                self._engines[name] = engine
        return engine

    def engines(self) -> Iterator[tuple[str, Engine]]:
        """``(name, engine)`` for every partition, creating engines as needed."""
        for name in self._partitions:
            yield name, self.engine(name)

    def _create_engine(self, partition: Partition) -> Engine:
        engine: Engine = self._build_engine(
            partition, create_engine, PartitionPool, _psycopg2_defaults
        )
        settings = self._settings[partition.name]
        if settings.query_timeout is not None:
            install_statement_deadlines(engine, partition.name, settings.query_timeout)
        return engine

    def _build_engine(
        self,
        partition: Partition,
        factory: Callable[..., Any],
        poolclass: type[PartitionPool],
        connect_defaults: Callable[[Partition, dict[str, Any], PoolSettings], None],
    ) -> Any:
        """Create a partition's engine with *factory* (``create_engine`` or its async twin).

        :raises ConfigurationError: for a keyword the engine does not accept.
        """
        settings = self._settings[partition.name]
        options: dict[str, Any] = {**self.config.engine_options, **partition.engine_options}
        connect_args = dict(options.pop("connect_args", {}) or {})
        connect_defaults(partition, connect_args, settings)
        try:
            return factory(
                partition.url,
                poolclass=poolclass,
                connect_args=connect_args,
                pool_timeout=settings.timeout,
                pool_pre_ping=settings.pre_ping,
                pool_use_lifo=settings.use_lifo,
                min_connections=settings.min_connections,
                max_connections=settings.max_connections,
                max_idle=settings.max_idle,
                max_lifetime=settings.max_lifetime,
                lifetime_jitter=settings.lifetime_jitter,
                ping_skip_window=settings.ping_skip_window,
                max_waiting=settings.max_waiting,
                ping_timeout=settings.ping_timeout,
                keepalive_time=settings.keepalive_time,
                leak_threshold=settings.leak_threshold,
                partition_name=partition.name,
                stats=self._stats[partition.name],
                health=self._health[partition.name],
                **options,
            )
        except (TypeError, ImportError) as exc:
            raise ConfigurationError(
                f"cannot create the engine for {partition.safe_url!r}: "
                f"{self.describe_error(partition.name, exc)}",
                partition=partition.name,
            ) from None

    def pool(self, name: str) -> PartitionPool:
        """The :class:`.PartitionPool` currently serving partition *name*."""
        pool = self.engine(name).pool
        assert isinstance(pool, PartitionPool)
        return pool

    def _live_pools(self) -> Iterator[tuple[str, PartitionPool]]:
        for name, engine in list(self._engines.items()):
            pool = engine.pool
            if isinstance(pool, PartitionPool):
                yield name, pool

    # -- connections -------------------------------------------------------------------

    def connect(self, key: Any = NO_KEY, *, partition: str | None = None) -> Connection:
        """A :class:`~sqlalchemy.engine.Connection` to the partition of *key* (or *partition*).

        Use it in a ``with`` block so it is always returned to the pool::

            with sharded.connect(key=customer_id) as conn:
                conn.execute(...)
                conn.commit()

        :param key: the shard key to route by.
        :param partition: the partition name, instead of (or to check) the key.
        :raises ShardKeyMissing: if neither is given.
        :raises UnknownPartition: for an unknown partition name.
        :raises PoolTimeout: if no connection frees up within the pool's timeout.
        """
        return self.engine(self.resolve(key, partition)).connect()

    def begin(
        self, key: Any = NO_KEY, *, partition: str | None = None
    ) -> AbstractContextManager[Connection]:
        """A connection with a transaction begun, committed at the end of the ``with`` block.

        Like :meth:`sqlalchemy.engine.Engine.begin`: rolled back if the block raises.
        The transaction stays on one partition.

        :raises ShardKeyMissing: if neither key nor partition is given.
        """
        return self.engine(self.resolve(key, partition)).begin()

    def raw_connection(
        self, key: Any = NO_KEY, *, partition: str | None = None
    ) -> PoolProxiedConnection:
        """A pooled DBAPI connection; ``close()`` returns it to the pool."""
        return self.engine(self.resolve(key, partition)).raw_connection()

    # -- statements -------------------------------------------------------------------

    def execute(
        self,
        statement: Any,
        params: Any = None,
        *,
        key: Any = NO_KEY,
        partition: str | None = None,
        timeout: float | None = None,
    ) -> AnyResult:
        """Run one statement on the partition of *key* (or *partition*) and return its result.

        The statement runs as its own transaction (autocommit, so a read costs
        one round trip, with no empty ``BEGIN``/``ROLLBACK``); with a list of
        several parameter sets (executemany) they all run in one transaction.
        Rows are read in full before the connection goes back to the pool.
        Use :meth:`begin` for several statements in one transaction.

        :param statement: a Core statement or ``text()``.
        :param params: bind parameters: a dict, or a list of dicts.
        :param key: the shard key to route by.
        :param partition: the partition name instead (or to check the key).
        :param timeout: seconds; the statement is cancelled by the server past
          it (``statement_timeout``) and abandoned by the client shortly after,
          raising :class:`.QueryTimeout`.
        :raises ShardKeyMissing: if neither key nor partition is given.
        """
        return self._fanout.execute(
            statement, self.resolve(key, partition), params, timeout=timeout
        )

    def execute_all(
        self,
        statement: Any,
        params: Any = None,
        *,
        partitions: list[str] | None = None,
        key: Any = None,
        merge: MergeMode = "auto",
        tag_partition: bool = False,
        on_error: OnError = "raise",
        timeout: float | None = None,
    ) -> FanoutResult:
        """Run *statement* on many partitions at once and return one merged result.

        A ``SELECT`` is merged correctly, not just concatenated (see
        :mod:`~sqlalchemy_partpool.merge`): ORDER BY by a k-way merge with
        LIMIT/OFFSET applied afterwards, ``count``/``sum``/``min``/``max``/``avg``
        and GROUP BY re-aggregated.  A statement that cannot be merged correctly
        raises :class:`.UnmergeableStatement` before anything runs.

        An ``INSERT`` with a list of rows is split by shard key: each partition
        gets its rows in one round trip (executemany), in one transaction per
        partition.  Other statements (UPDATE, DELETE, ``text()``) run on every
        chosen partition, in autocommit; ``result.rowcount`` adds them up.

        :param statement: a Core statement or ``text()``.
        :param params: bind parameters (a list of rows for a split INSERT).
        :param partitions: only these partitions; default all.
        :param key: for a split INSERT: the shard key column name, or a function
          of a row; default: the table's ``info["shard_key"]`` or the column
          marked ``info={"shard_key": True}``.
        :param merge: ``"auto"`` (analyse the statement) or ``"concat"`` (just
          concatenate, for statements you know need nothing more).
        :param tag_partition: add a ``partition`` column naming each row's partition.
        :param on_error: ``"raise"`` (fail fast: cancel the rest and raise
          :class:`.FanoutError` naming the first partition that failed) or
          ``"partial"`` (return the rows of the partitions that answered, with
          the failures in ``result.errors``).
        :param timeout: seconds for the whole call; each partition's statement
          gets ``statement_timeout`` and a client-side deadline, and partitions
          that have not answered by then are cancelled
          (:class:`.FanoutTimeout`, or reported in ``result.errors``).
        :raises UnmergeableStatement: if the result could not be merged correctly.
        :raises FanoutError: with ``on_error="raise"``, when a partition fails.
        """
        return self._fanout.execute_all(
            statement,
            params,
            partitions=partitions,
            key=key,
            merge=merge,
            tag_partition=tag_partition,
            on_error=on_error,
            timeout=timeout,
        )

    def begin_many(
        self,
        partitions: list[str] | None = None,
        *,
        twophase: bool = False,
        log_partition: str | None = None,
    ) -> MultiPartitionTransaction:
        """A transaction across partitions, for a ``with`` block.

        ::

            with sharded.begin_many(twophase=True) as tx:
                tx.execute(stmt1, params1, key=a)
                tx.execute(stmt2, params2, key=b)

        Each partition touched gets its own transaction; all commit when the
        block ends, or all roll back if it raises.  Without ``twophase`` they
        commit one after another and a failure part-way raises
        :class:`.PartialCommitError` naming what committed and what did not;
        with ``twophase=True`` PostgreSQL prepared transactions make it atomic
        (see :mod:`~sqlalchemy_partpool.transactions` and :meth:`recover_twophase`).

        :param partitions: the only partitions the block may touch (default any).
        :param twophase: use two-phase commit (needs ``max_prepared_transactions`` > 0).
        :param log_partition: where two-phase decisions are recorded (default:
          the first partition).
        """
        return MultiPartitionTransaction(
            self, partitions, twophase=twophase, log_partition=log_partition
        )

    def recover_twophase(
        self, *, older_than: float = 60.0, log_partition: str | None = None, dry_run: bool = False
    ) -> list[RecoveryAction]:
        """Finish or undo in-doubt two-phase transactions; see :func:`.recover_twophase`."""
        return recover_twophase(
            self, older_than=older_than, log_partition=log_partition, dry_run=dry_run
        )

    def sorts_like_python(self, name: str) -> bool:
        """Whether partition *name* sorts text the way Python compares strings.

        True when the database's default collation orders by code point: libc
        ``C``, ``POSIX`` or ``C.UTF-8``, or PostgreSQL 17's builtin provider.
        ICU and language collations are not.  Asked once per partition and
        remembered.
        """
        known = self._collations.get(name)
        if known is None:
            with self.engine(name).connect() as conn:
                # to_jsonb of the row copes with the columns of every version
                # (datlocprovider is PostgreSQL 15+)
                row = conn.exec_driver_sql(
                    "SELECT to_jsonb(d) FROM pg_database d WHERE datname = current_database()"
                ).scalar_one()
            provider = row.get("datlocprovider", "c")
            collate = str(row.get("datcollate", "")).upper().replace("-", "")
            known = provider == "b" or (provider == "c" and collate in ("C", "POSIX", "C.UTF8"))
            self._collations[name] = known
        return known

    # -- sizing, warm-up and figures ---------------------------------------------------

    def warm_up(self, partitions: list[str] | None = None) -> dict[str, BaseException]:
        """Open ``min_connections`` on every partition, all partitions in parallel.

        :param partitions: only these; default all.
        :returns: partition name -> the error of partitions that failed (empty if none).
        """
        names = list(self._partitions) if partitions is None else partitions
        jobs: list[tuple[str, PartitionPool]] = []
        for name in names:
            pool = self.pool(name)
            missing = max(0, pool.min_connections - pool.snapshot().open)
            jobs.extend((name, pool) for _ in range(missing))
        errors: dict[str, BaseException] = {}
        if not jobs:
            return errors
        with ThreadPoolExecutor(
            max_workers=min(32, len(jobs)), thread_name_prefix="partpool-warmup"
        ) as executor:
            futures = [(name, executor.submit(pool.fill, 1)) for name, pool in jobs]
            for name, future in futures:
                exc = future.exception()
                if exc is not None and name not in errors:
                    errors[name] = exc
        for name, exc in errors.items():
            log.warning("partition %r: warm-up failed: %s", name, self.describe_error(name, exc))
        return errors

    def resize(
        self,
        min_connections: int | None = None,
        max_connections: int | None = None,
        *,
        partition: str | None = None,
    ) -> None:
        """Change pool sizes at run time, for one partition or all of them.

        :raises ConfigurationError: if the new sizes are invalid (nothing changes then).
        :raises UnknownPartition: for an unknown partition name.
        """
        names = (
            [self.resolve(partition=partition)] if partition is not None else list(self._partitions)
        )
        new: dict[str, PoolSettings] = {}
        for name in names:
            changes: dict[str, int] = {}
            if min_connections is not None:
                changes["min_connections"] = min_connections
            if max_connections is not None:
                changes["max_connections"] = max_connections
            try:
                new[name] = self._settings[name].replace(**changes)
            except ConfigurationError as exc:
                raise ConfigurationError(str(exc), partition=name, option=exc.option) from None
        for name, settings in new.items():
            self._settings[name] = settings
            engine = self._engines.get(name)
            if engine is not None and isinstance(engine.pool, PartitionPool):
                engine.pool.resize(settings.min_connections, settings.max_connections)
        self._maintenance.wake()

    def stats(self) -> dict[str, StatsSnapshot]:
        """A snapshot of every partition's pool figures, by partition name.

        Partitions whose engine has not been created yet (``lazy``) report zeros.
        """
        result: dict[str, StatsSnapshot] = {}
        for name in self._partitions:
            engine = self._engines.get(name)
            if engine is not None and isinstance(engine.pool, PartitionPool):
                result[name] = engine.pool.snapshot()
            else:
                settings = self._settings[name]
                result[name] = self._stats[name].snapshot(
                    open=0,
                    idle=0,
                    checked_out=0,
                    waiting=0,
                    min_connections=settings.min_connections,
                    max_connections=settings.max_connections,
                )
        return result

    def health(self) -> dict[str, Any]:
        """Every partition's health state and pool figures, as one JSON-serialisable dict.

        ::

            {"time": 1764000000.0,
             "partitions": {"p0": {"state": "up", "since": ..., "consecutive_failures": 0,
                                   "last_error": None, "last_check": None,
                                   "stats": {"open": 2, "idle": 2, ...}}, ...}}

        Cheap enough to serve from a health endpoint: no I/O.
        """
        stats = self.stats()
        return {
            "time": time.time(),
            "partitions": {
                name: {**self._health[name].snapshot(), "stats": stats[name].as_dict()}
                for name in self._partitions
            },
        }

    def partition_state(self, name: str) -> str:
        """The health state of partition *name*: ``up``, ``suspect``, ``down`` or ``recovering``."""
        if name not in self._health:
            raise UnknownPartition(name, self._partitions)
        return self._health[name].state.value

    def check_health(self, partitions: list[str] | None = None) -> dict[str, bool]:
        """Actively check partitions (connect, ping, disconnect), all in parallel.

        Emits a ``health_check`` event per partition; a failure counts towards
        marking the partition down, like any failed connection attempt.

        :param partitions: only these; default all.
        :returns: partition name -> whether it answered.
        """
        names = list(self._partitions) if partitions is None else partitions
        for name in names:
            self.engine(name)  # the check needs the partition's pool
        with ThreadPoolExecutor(
            max_workers=max(1, min(16, len(names))), thread_name_prefix="partpool-check"
        ) as executor:
            results = executor.map(lambda n: self._health[n].check(source="check"), names)
            return dict(zip(names, results))

    def describe_error(self, partition: str, exc: BaseException) -> str:
        """A one-line, password-free description of *exc* raised for *partition*."""
        p = self._partitions.get(partition)
        secrets = [p.url.password] if p is not None and p.url.password else []
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return redact(f"{type(exc).__name__}: {text}".rstrip(": "), map(str, secrets))

    # -- lifetime ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed("this ShardedEngine was disposed; create a new one to connect again")

    @property
    def closed(self) -> bool:
        """True once :meth:`dispose` was called."""
        return self._closed

    def dispose(self) -> None:
        """Close every pooled connection and stop the background threads.

        Unlike :meth:`sqlalchemy.engine.Engine.dispose`, this is final:
        connections checked out now are closed when returned, and later calls
        raise :class:`.PoolClosed`.  Safe to call twice.
        """
        with self._engines_lock:
            if self._closed:
                return
            self._closed = True
            engines = list(self._engines.items())
        self._maintenance.stop()
        self._fanout.shutdown()
        for health in self._health.values():
            health.stop()
        for _, engine in engines:
            pool = engine.pool
            if isinstance(pool, PartitionPool):
                pool.close()
            else:  # pragma: no cover - a user replaced the pool
                engine.dispose()
        log.info("sharded engine disposed (%d partitions)", len(self._partitions))

    def __enter__(self) -> ShardedEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    def __repr__(self) -> str:
        names = list(self._partitions)
        shown = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
        state = " disposed" if self._closed else ""
        return f"<ShardedEngine{state} partitions=[{shown}] ({len(names)}) router={self._router!r}>"


def _psycopg2_defaults(
    partition: Partition, connect_args: dict[str, Any], settings: PoolSettings
) -> None:
    """Fill in psycopg2 connect arguments the user did not set themselves."""
    if partition.url.get_driver_name() != "psycopg2":
        return
    import psycopg2

    name = partition.name

    if settings.connect_timeout is not None:
        # libpq takes whole seconds; round up so the bound is never shorter
        connect_args.setdefault("connect_timeout", max(1, math.ceil(settings.connect_timeout)))
    connect_args.setdefault("application_name", f"partpool/{name}")
    for key, value in _TCP_DEFAULTS.items():
        connect_args.setdefault(key, value)
    if psycopg2.__libpq_version__ >= 120000:
        connect_args.setdefault("tcp_user_timeout", _TCP_USER_TIMEOUT_MS)
    if settings.statement_timeout is not None:
        ms = max(1, round(settings.statement_timeout * 1000))
        existing = connect_args.get("options", "")
        connect_args["options"] = f"{existing} -c statement_timeout={ms}".strip()


def _maintenance_interval(settings: Any) -> float:
    # Tick often enough that idle connections close, keepalives go out and
    # leaks are reported within ~25% of their settings, but never busier than
    # 20 Hz nor lazier than once a second.
    periods = [
        value
        for s in settings
        for value in (s.max_idle, s.keepalive_time, s.leak_threshold)
        if value is not None
    ]
    return max(0.05, min(1.0, min(periods, default=4.0) / 4))


def create_sharded_engine(
    partitions: PartitionsSpec | ShardedConfig,
    *,
    router: Any = None,
    lazy: bool = False,
    engine_options: Mapping[str, Any] | None = None,
    require_all_partitions: bool = True,
    fanout_workers: int | None = None,
    **pool_options: Any,
) -> ShardedEngine:
    """Create a :class:`ShardedEngine`: a pooled engine per partition and a router.

    ::

        sharded = create_sharded_engine(
            {"p0": "postgresql+psycopg2://app@db0/app",
             "p1": "postgresql+psycopg2://app@db1/app"},
            min_connections=1, max_connections=10,
        )
        with sharded.connect(key=42) as conn:
            ...

    :param partitions: ``{name: url}``, ``{name: {"url": ..., <pool options>}}``,
      a list of :class:`.Partition`, or a :class:`.ShardedConfig` (then the other
      arguments must be left at their defaults).
    :param router: how keys map to partitions: ``None``/``"hash"`` (virtual
      buckets), ``"pg_hash"`` (PostgreSQL's hash partitioning), a dict with
      ``strategy``, a :class:`.Router`, or any callable ``key -> name``.
    :param lazy: open no connection now; by default ``min_connections`` are
      opened on every partition, all in parallel, before this returns.
    :param engine_options: extra :func:`~sqlalchemy.create_engine` keywords for
      every partition (per-partition ones go in the partition's entry).
    :param fanout_workers: threads for :meth:`ShardedEngine.execute_all`
      (default: twice the partitions, between 4 and 32).
    :param require_all_partitions: when not lazy, raise :class:`.WarmupError`
      if any partition cannot open its minimum; with False, log a warning and
      let the background maintenance keep trying.
    :param pool_options: default :class:`.PoolSettings` for every partition:
      ``min_connections``, ``max_connections``, ``timeout``, ``max_idle``,
      ``max_lifetime``, ``lifetime_jitter``, ``pre_ping``, ``ping_skip_window``,
      ``use_lifo``, ``max_waiting``.
    :raises ConfigurationError: on any invalid setting, before connecting.
    :raises WarmupError: see ``require_all_partitions``.
    """
    config = ShardedConfig.build(
        partitions,
        router=router,
        engine_options=engine_options,
        lazy=lazy,
        fanout_workers=fanout_workers,
        **pool_options,
    )
    sharded = ShardedEngine(config)
    if not config.lazy:
        errors = sharded.warm_up()
        if errors and require_all_partitions:
            described = {name: sharded.describe_error(name, exc) for name, exc in errors.items()}
            sharded.dispose()
            raise WarmupError(errors, described)
    return sharded


# Importing the events module attaches ShardedEngine.dispatch (SQLAlchemy's
# event system sets it on the target class when the Events class is created).
