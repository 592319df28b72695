"""The per-partition pool: a QueuePool with a minimum, a hard maximum and idle reaping.

:class:`PartitionPool` subclasses SQLAlchemy's :class:`~sqlalchemy.pool.QueuePool`
(so ``isinstance`` checks, pool events, ``engine.dispose()`` and the
``_ConnectionFairy`` machinery all work as usual) but replaces its queue with
its own bookkeeping, because QueuePool cannot express the seed's two numbers:

* ``max_connections`` is a hard ceiling on connections, idle plus checked out
  plus being opened (QueuePool: ``pool_size=max, max_overflow=0``).  A caller
  that finds them all busy waits, in FIFO order, up to ``timeout`` and then
  gets :class:`.PoolTimeout` naming the partition.  A returned connection is
  handed straight to the longest waiter, so no newcomer can barge ahead.
* ``min_connections`` are opened up front (:meth:`PartitionPool.fill`) and never
  closed for being idle; connections above the minimum that sit idle longer
  than ``max_idle`` are closed by :meth:`PartitionPool.maintain`, which the
  :class:`.ShardedEngine` runs from a background thread, never in a caller's path.
* ``max_lifetime`` replaces connections after a jittered lifetime, checked when
  a connection is idle, never while it is checked out.
* ``pre_ping`` skips the ping for a connection returned less than
  ``ping_skip_window`` seconds ago, so a busy pool stays at one round trip per
  checkout.

The pool can also be used on its own with plain :func:`sqlalchemy.create_engine`::

    engine = create_engine(url, poolclass=PartitionPool, min_connections=2,
                           max_connections=20, max_idle=300)
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING, Any

from sqlalchemy.pool import ConnectionPoolEntry, Pool, QueuePool
from sqlalchemy.pool.base import _ConnectionRecord, _CreatorFnType, _CreatorWRecFnType

from .config import PoolSettings
from .errors import ConfigurationError, PoolClosed, PoolExhausted, PoolTimeout
from .stats import PoolStats, StatsSnapshot

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection

__all__ = ["PartitionPool"]

log = logging.getLogger("sqlalchemy_partpool.pool")


class _PartitionRecord(_ConnectionRecord):
    """A connection record that remembers when it was returned, taken and must expire.

    Times are ``time.monotonic()`` values.
    """

    __slots__ = ("checked_out_at", "expires_at", "partpool", "returned_at")

    checked_out_at: float
    expires_at: float
    returned_at: float
    partpool: PartitionPool

    def __init__(self, pool: PartitionPool, connect: bool = True) -> None:
        self.partpool = pool
        self.returned_at = 0.0
        self.checked_out_at = 0.0
        self.expires_at = float("inf")
        super().__init__(pool, connect)

    def invalidate(self, e: BaseException | None = None, soft: bool = False) -> None:
        if not soft and self.dbapi_connection is not None:
            self.partpool._count_lost()
        super().invalidate(e, soft)


class _Waiter:
    """A caller waiting for a connection; the pool hands it a record or a slot."""

    __slots__ = ("event", "record", "slot")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.record: _PartitionRecord | None = None
        # True when the pool reserved a slot for this waiter to open a new connection in.
        self.slot = False


class PartitionPool(QueuePool):
    """A :class:`~sqlalchemy.pool.QueuePool` with min/max sizing, idle reaping and statistics.

    Positional-or-keyword parameters (rather than keyword-only) let
    :func:`sqlalchemy.create_engine` pass them through, e.g.
    ``create_engine(url, poolclass=PartitionPool, max_connections=20)``.

    :param creator: the DBAPI connection factory (supplied by ``create_engine``).
    :param min_connections: connections kept open; see :class:`.PoolSettings`.
    :param max_connections: hard ceiling on open connections.
    :param max_idle: seconds before an idle connection above the minimum is closed;
      ``None`` never.
    :param max_lifetime: seconds before a connection is replaced; ``None`` never.
    :param lifetime_jitter: fraction of ``max_lifetime`` removed at random per connection.
    :param ping_skip_window: seconds within which a returned connection is
      handed out again without a pre-ping.
    :param max_waiting: maximum number of waiting callers; 0 for no limit.
    :param partition_name: the partition this pool serves, used in messages and statistics.
    :param stats: a :class:`.PoolStats` to count into (kept across ``recreate()``).
    :param timeout: seconds to wait for a connection (``create_engine``'s ``pool_timeout``).
    :param use_lifo: LIFO reuse (``create_engine``'s ``pool_use_lifo``); default True here.
    :param kw: other :class:`~sqlalchemy.pool.Pool` arguments (``pre_ping``,
      ``reset_on_return``, ``echo``, ``events``, ``dialect``...).  ``pool_size``,
      ``max_overflow`` and ``recycle`` are rejected: use the settings above.
    :raises ConfigurationError: for invalid settings.
    """

    def __init__(
        self,
        creator: _CreatorFnType | _CreatorWRecFnType,
        min_connections: int = 1,
        max_connections: int = 10,
        max_idle: float | None = 600.0,
        max_lifetime: float | None = 3600.0,
        lifetime_jitter: float = 0.1,
        ping_skip_window: float = 0.5,
        max_waiting: int = 0,
        partition_name: str = "default",
        stats: PoolStats | None = None,
        timeout: float = 30.0,
        use_lifo: bool = True,
        **kw: Any,
    ) -> None:
        for legacy, instead in (
            ("pool_size", "max_connections"),
            ("max_overflow", "max_connections"),
            ("recycle", "max_lifetime"),
        ):
            if kw.pop(legacy, None) not in (None, -1):
                raise ConfigurationError(
                    f"{legacy} is not used by PartitionPool; set {instead} instead",
                    partition=partition_name,
                    option=legacy,
                )
        # Validate through the same rules as the configuration layer.
        PoolSettings(
            min_connections=min_connections,
            max_connections=max_connections,
            timeout=timeout,
            max_idle=max_idle,
            max_lifetime=max_lifetime,
            lifetime_jitter=lifetime_jitter,
            ping_skip_window=ping_skip_window,
            use_lifo=use_lifo,
            max_waiting=max_waiting,
            pre_ping=bool(kw.get("pre_ping", False)),
        ).validate(partition_name)
        # QueuePool.__init__ is skipped on purpose: its queue and overflow counter
        # are replaced by the bookkeeping below.
        Pool.__init__(self, creator, **kw)
        # Re-entrant, like SQLAlchemy's own queue: the garbage collector may
        # return a leaked connection (the fairy's finalizer) from inside any
        # allocation, including one made while this thread holds the lock.
        self._lock = threading.RLock()
        self._idle: deque[_PartitionRecord] = deque()
        self._waiters: deque[_Waiter] = deque()
        # connections that exist or are being opened; never above _max
        self._open = 0
        self._in_use = 0
        self._min = min_connections
        self._max = max_connections
        self._timeout = timeout
        self._max_idle = max_idle
        self._max_lifetime = max_lifetime
        self._lifetime_jitter = lifetime_jitter
        self._ping_skip_window = ping_skip_window
        self._max_waiting = max_waiting
        self._lifo = use_lifo
        self._closed = False
        # set by recreate(): connections returned to a replaced pool are closed
        self._retired = False
        self.partition_name = partition_name
        self.stats = stats if stats is not None else PoolStats(partition_name)

    # -- creating and closing DBAPI connections ---------------------------------

    def _should_wrap_creator(
        self, creator: _CreatorFnType | _CreatorWRecFnType
    ) -> _CreatorWRecFnType:
        inner = super()._should_wrap_creator(creator)

        # Every connection attempt (first open, recycle, reconnect after an
        # invalidation) goes through here, so opens and failures are counted once.
        def invoke(rec: ConnectionPoolEntry) -> DBAPIConnection:
            try:
                connection = inner(rec)
            except BaseException:
                with self._lock:
                    self.stats.connect_errors += 1
                raise
            with self._lock:
                self.stats.connections_opened += 1
            if isinstance(rec, _PartitionRecord):
                rec.expires_at = self._lifetime_deadline()
            return connection

        return invoke

    def _lifetime_deadline(self) -> float:
        if self._max_lifetime is None:
            return float("inf")
        jitter = self._lifetime_jitter * random.random()
        return monotonic() + self._max_lifetime * (1.0 - jitter)

    def _close_connection(self, connection: DBAPIConnection, *, terminate: bool = False) -> None:
        with self._lock:
            self.stats.connections_closed += 1
        super()._close_connection(connection, terminate=terminate)

    def _count_lost(self) -> None:
        with self._lock:
            self.stats.connections_lost += 1

    def _create_connection(self) -> _PartitionRecord:
        return _PartitionRecord(self)

    @staticmethod
    def _close_records(records: list[_PartitionRecord]) -> None:
        for record in records:
            record.close()

    # -- checkout ----------------------------------------------------------------

    def _do_get(self) -> ConnectionPoolEntry:
        expired: list[_PartitionRecord] = []
        waiter: _Waiter | None = None
        with self._lock:
            idle = self._idle
            now = monotonic()
            while idle:
                record = idle.pop() if self._lifo else idle.popleft()
                if record.expires_at <= now:
                    self._open -= 1
                    expired.append(record)
                    continue
                self._in_use += 1
                stats = self.stats
                stats.checkouts += 1
                stats.wait_hist[0] += 1
                break
            else:
                record = None
                if self._closed:
                    raise self._closed_error()
                if self._open < self._max:
                    self._open += 1
                elif self._max_waiting and len(self._waiters) >= self._max_waiting:
                    self.stats.exhausted += 1
                    raise PoolExhausted(
                        self.partition_name,
                        waiting=len(self._waiters),
                        max_waiting=self._max_waiting,
                    )
                else:
                    waiter = _Waiter()
                    self._waiters.append(waiter)
        if expired:
            self._close_records(expired)
        if record is not None:
            record.checked_out_at = now
            if now - record.returned_at < self._ping_skip_window:
                record.fresh = True
            return record
        if waiter is None:
            return self._open_for_caller(0.0)
        return self._wait(waiter, now)

    def _wait(self, waiter: _Waiter, started: float) -> _PartitionRecord:
        waiter.event.wait(self._timeout)
        with self._lock:
            waited = monotonic() - started
            if waiter.record is None and not waiter.slot:
                if self._closed:
                    raise self._closed_error()
                self._waiters.remove(waiter)
                self.stats.timeouts += 1
                in_use = self._in_use
                raise PoolTimeout(
                    self.partition_name,
                    timeout=self._timeout,
                    waited=waited,
                    max_connections=self._max,
                    in_use=in_use,
                )
            if waiter.record is not None:
                self.stats.record_wait(waited)
                return waiter.record
        return self._open_for_caller(waited)

    def _open_for_caller(self, waited: float) -> _PartitionRecord:
        """Open a new connection in a slot already reserved for the caller."""
        try:
            record = self._create_connection()
        except BaseException:
            with self._lock:
                self._release_slot_locked()
            raise
        with self._lock:
            self._in_use += 1
            self.stats.checkouts += 1
            self.stats.record_wait(waited)
        record.checked_out_at = monotonic()
        return record

    def _release_slot_locked(self) -> None:
        """Give up one slot; if a caller waits and the ceiling allows, the slot is theirs."""
        self._open -= 1
        if self._waiters and self._open < self._max and not self._closed:
            waiter = self._waiters.popleft()
            self._open += 1
            waiter.slot = True
            waiter.event.set()

    # -- checkin -----------------------------------------------------------------

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        assert isinstance(record, _PartitionRecord)
        now = monotonic()
        close = False
        with self._lock:
            self._in_use -= 1
            stats = self.stats
            stats.checkins += 1
            stats.use_time_total += now - record.checked_out_at
            if record.dbapi_connection is None:
                # invalidated or detached: the slot is free again
                self._release_slot_locked()
                return
            if self._closed or self._retired or self._open > self._max or record.expires_at <= now:
                close = True
                self._release_slot_locked()
            elif self._waiters:
                waiter = self._waiters.popleft()
                self._in_use += 1
                stats.checkouts += 1
                record.checked_out_at = now
                # it was in use a moment ago: no need to ping it
                record.fresh = True
                waiter.record = record
                waiter.event.set()
            else:
                record.returned_at = now
                self._idle.append(record)
        if close:
            record.close()

    # -- sizing and maintenance ----------------------------------------------------

    def fill(self, count: int | None = None) -> int:
        """Open connections until ``min_connections`` are open (or *count* more).

        Runs in the calling thread; the :class:`.ShardedEngine` calls it from its
        warm-up and maintenance workers.

        :param count: open at most this many; default: whatever reaches the minimum.
        :returns: the number of connections opened.
        :raises Exception: the connect error, if the first attempt fails.
        """
        with self._lock:
            wanted = self._min - self._open if count is None else count
            wanted = max(0, min(wanted, self._max - self._open))
            if self._closed:
                wanted = 0
            self._open += wanted
        opened = 0
        try:
            while opened < wanted:
                record = self._create_connection()
                opened += 1
                self._add_new_idle(record)
        finally:
            if opened < wanted:
                with self._lock:
                    for _ in range(wanted - opened):
                        self._release_slot_locked()
        return opened

    def _add_new_idle(self, record: _PartitionRecord) -> None:
        with self._lock:
            if self._closed:
                # the pool was closed while this connection was being opened
                self._release_slot_locked()
                close = True
            elif self._waiters:
                close = False
                waiter = self._waiters.popleft()
                self._in_use += 1
                self.stats.checkouts += 1
                record.checked_out_at = monotonic()
                waiter.record = record
                waiter.event.set()
            else:
                close = False
                record.returned_at = monotonic()
                self._idle.append(record)
        if close:
            record.close()

    def maintain(self) -> int:
        """Close idle connections past ``max_idle`` (above the minimum) or past their lifetime.

        Also closes idle connections opened before a pool-wide invalidation
        (a disconnect detected on another connection).  Does no I/O under the
        pool lock.

        :returns: how many connections are missing to reach ``min_connections``,
          for the caller to :meth:`fill` in the background.
        """
        to_close: list[_PartitionRecord] = []
        with self._lock:
            if self._closed:
                return 0
            now = monotonic()
            idle = self._idle
            invalid_before = self._invalidate_time
            if idle and (self._max_lifetime is not None or invalid_before):
                # removed in place: a re-entrant return (see _lock) may append meanwhile
                for record in list(idle):
                    if record.expires_at <= now or record.starttime < invalid_before:
                        idle.remove(record)
                        to_close.append(record)
            if self._max_idle is not None:
                # oldest returned are on the left in both LIFO and FIFO order
                floor = self._min
                while (
                    idle
                    and self._open - len(to_close) > floor
                    and now - idle[0].returned_at >= self._max_idle
                ):
                    to_close.append(idle.popleft())
            self._open -= len(to_close)
            missing = max(0, self._min - self._open)
        if to_close:
            log.debug(
                "partition %r: closing %d idle or expired connections",
                self.partition_name,
                len(to_close),
            )
            self._close_records(to_close)
        return missing

    def resize(
        self, min_connections: int | None = None, max_connections: int | None = None
    ) -> None:
        """Change the pool's minimum and/or maximum while it is in use.

        A larger maximum lets waiting callers open connections at once; a smaller
        one closes idle connections above it now and checked-out ones as they
        are returned.  A larger minimum is filled by the background maintenance
        (or call :meth:`fill`).

        :raises ConfigurationError: if the new sizes are invalid.
        """
        to_close: list[_PartitionRecord] = []
        with self._lock:
            new_min = self._min if min_connections is None else min_connections
            new_max = self._max if max_connections is None else max_connections
            PoolSettings(min_connections=new_min, max_connections=new_max).validate(
                self.partition_name
            )
            self._min, self._max = new_min, new_max
            while self._waiters and self._open < self._max:
                waiter = self._waiters.popleft()
                self._open += 1
                waiter.slot = True
                waiter.event.set()
            while self._open > self._max and self._idle:
                to_close.append(self._idle.popleft())
                self._open -= 1
        self._close_records(to_close)
        log.info(
            "partition %r: pool resized to min=%d max=%d",
            self.partition_name,
            new_min,
            new_max,
        )

    # -- disposal --------------------------------------------------------------------

    def _closed_error(self) -> PoolClosed:
        return PoolClosed(
            f"partition {self.partition_name!r}: the pool is closed (the ShardedEngine was "
            "disposed); create a new engine to connect again",
            partition=self.partition_name,
        )

    def dispose(self) -> None:
        """Close every idle connection; checked-out ones are closed when returned.

        As with QueuePool, the pool stays usable afterwards.
        """
        with self._lock:
            to_close = list(self._idle)
            self._idle.clear()
            self._open -= len(to_close)
        self._close_records(to_close)
        log.info("partition %r: pool disposed. %s", self.partition_name, self.status())

    def close(self) -> None:
        """Close the pool for good: idle connections now, the rest on return.

        Waiting callers and later checkouts get :class:`.PoolClosed`.
        """
        with self._lock:
            self._closed = True
            waiters = list(self._waiters)
            self._waiters.clear()
        for waiter in waiters:
            waiter.event.set()
        self.dispose()

    def recreate(self) -> PartitionPool:
        """Return a new pool with the same settings (used by ``Engine.dispose()``).

        This pool is retired: connections still checked out from it are closed
        when returned instead of being pooled again.
        """
        self._retired = True
        log.info("partition %r: pool recreating", self.partition_name)
        return self.__class__(
            self._creator,
            min_connections=self._min,
            max_connections=self._max,
            max_idle=self._max_idle,
            max_lifetime=self._max_lifetime,
            lifetime_jitter=self._lifetime_jitter,
            ping_skip_window=self._ping_skip_window,
            max_waiting=self._max_waiting,
            partition_name=self.partition_name,
            stats=self.stats,
            timeout=self._timeout,
            use_lifo=self._lifo,
            pre_ping=self._pre_ping,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    # -- figures -----------------------------------------------------------------------

    @property
    def min_connections(self) -> int:
        """The current minimum."""
        return self._min

    @property
    def max_connections(self) -> int:
        """The current ceiling."""
        return self._max

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def snapshot(self) -> StatsSnapshot:
        """A consistent copy of this pool's gauges and counters."""
        with self._lock:
            return self.stats.snapshot(
                open=self._open,
                idle=len(self._idle),
                checked_out=self._in_use,
                waiting=len(self._waiters),
                min_connections=self._min,
                max_connections=self._max,
            )

    def status(self) -> str:
        return (
            f"Partition {self.partition_name!r}: open {self._open}/{self._max} "
            f"(min {self._min}), idle {len(self._idle)}, checked out {self._in_use}, "
            f"waiting {len(self._waiters)}"
        )

    def size(self) -> int:
        """The ceiling, ``max_connections`` (QueuePool's ``pool_size``)."""
        return self._max

    def checkedin(self) -> int:
        """Idle connections in the pool."""
        return len(self._idle)

    def checkedout(self) -> int:
        """Connections checked out now."""
        return self._in_use

    def overflow(self) -> int:
        """Connections open above ``min_connections``."""
        return max(0, self._open - self._min)

    def timeout(self) -> float:
        return self._timeout
