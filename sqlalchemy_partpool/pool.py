"""The per-partition pool: a QueuePool with a minimum, a hard maximum and fail-fast.

:class:`PartitionPool` subclasses SQLAlchemy's :class:`~sqlalchemy.pool.QueuePool`
(so ``isinstance`` checks, pool events, ``engine.dispose()`` and the
``_ConnectionFairy`` machinery all work as usual) but replaces its queue with
its own bookkeeping, because QueuePool cannot express the seed's two numbers:

* ``max_connections`` is a hard ceiling on connections, idle plus checked out
  plus being opened (QueuePool: ``pool_size=max, max_overflow=0``).  A caller
  that finds them all busy waits, in FIFO order, up to ``timeout`` and then
  gets :class:`.PoolTimeout` naming the partition.  A returned connection is
  handed straight to the longest waiter, so no newcomer can barge ahead.
* ``min_connections`` are opened up front (:meth:`PartitionPool.fill`) and
  never closed for being idle.  Closing idle connections above the minimum,
  expiring lifetimes, keepalive pings and leak reports are the background
  :mod:`~sqlalchemy_partpool.maintenance`'s job, done through
  :meth:`PartitionPool.take_idle`, :meth:`PartitionPool.put_back` and
  :meth:`PartitionPool.discard`, never in a caller's path.
* While its :class:`.PartitionHealth` says the partition is down, checkouts
  fail at once with :class:`.PartitionUnavailable`.
* The pre-ping is done here rather than by SQLAlchemy: with a client-side
  deadline (``ping_timeout``), and skipped for a connection returned less than
  ``ping_skip_window`` seconds ago, so a busy pool stays at one round trip
  per checkout.

The pool can also be used on its own with plain :func:`sqlalchemy.create_engine`::

    engine = create_engine(url, poolclass=PartitionPool, min_connections=2,
                           max_connections=20, max_idle=300)
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any

from sqlalchemy.pool import ConnectionPoolEntry, Pool, QueuePool
from sqlalchemy.pool.base import _ConnectionRecord, _CreatorFnType, _CreatorWRecFnType

from .config import PoolSettings
from .errors import ConfigurationError, PoolClosed, PoolExhausted, PoolTimeout
from .health import PartitionHealth, StackFrames, capture_stack
from .stats import PoolStats, StatsSnapshot
from .watchdog import watchdog

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection

__all__ = ["PartitionPool"]

log = logging.getLogger("sqlalchemy_partpool.pool")


class _PartitionRecord(_ConnectionRecord):
    """A connection record that remembers when it was returned, taken and must expire.

    Times are ``time.monotonic()`` values.
    """

    __slots__ = (
        "checked_out_at",
        "checkout_stack",
        "checkout_thread",
        "expires_at",
        "leak_reported",
        "partpool",
        "returned_at",
    )

    checked_out_at: float
    expires_at: float
    returned_at: float
    partpool: PartitionPool
    checkout_stack: StackFrames | None
    checkout_thread: str | None
    leak_reported: bool

    def __init__(self, pool: PartitionPool, connect: bool = True) -> None:
        self.partpool = pool
        self.returned_at = 0.0
        self.checked_out_at = 0.0
        self.expires_at = float("inf")
        self.checkout_stack = None
        self.checkout_thread = None
        self.leak_reported = False
        super().__init__(pool, connect)

    def invalidate(self, e: BaseException | None = None, soft: bool = False) -> None:
        if not soft and self.dbapi_connection is not None:
            self.partpool._connection_lost(e)
        super().invalidate(e, soft)


class _Waiter:
    """A caller waiting for a connection; the pool hands it a record, a slot or an error."""

    __slots__ = ("error", "event", "record", "slot", "stack")

    def __init__(self, stack: StackFrames | None) -> None:
        self.event = threading.Event()
        self.record: _PartitionRecord | None = None
        # True when the pool reserved a slot for this waiter to open a new connection in.
        self.slot = False
        self.error: Callable[[], BaseException] | None = None
        self.stack = stack


class PartitionPool(QueuePool):
    """A :class:`~sqlalchemy.pool.QueuePool` with min/max sizing, fail-fast and statistics.

    Positional-or-keyword parameters (rather than keyword-only) let
    :func:`sqlalchemy.create_engine` pass them through, e.g.
    ``create_engine(url, poolclass=PartitionPool, max_connections=20)``.
    Each option is described in :class:`.PoolSettings`.

    :param creator: the DBAPI connection factory (supplied by ``create_engine``).
    :param min_connections: connections kept open.
    :param max_connections: hard ceiling on open connections.
    :param max_idle: seconds before an idle connection above the minimum is closed.
    :param max_lifetime: seconds before a connection is replaced.
    :param lifetime_jitter: fraction of ``max_lifetime`` removed at random per connection.
    :param ping_skip_window: seconds within which a returned connection is
      handed out again without a pre-ping.
    :param max_waiting: maximum number of waiting callers; 0 for no limit.
    :param ping_timeout: client-side deadline of a ping.
    :param keepalive_time: idle seconds after which the maintenance pings a connection.
    :param leak_threshold: seconds checked out before a connection is reported as leaked.
    :param partition_name: the partition this pool serves, used in messages and statistics.
    :param stats: a :class:`.PoolStats` to count into (kept across ``recreate()``).
    :param health: the partition's :class:`.PartitionHealth` (kept across
      ``recreate()``); a new one if not given.
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
        ping_timeout: float = 5.0,
        keepalive_time: float | None = 120.0,
        leak_threshold: float | None = None,
        partition_name: str = "default",
        stats: PoolStats | None = None,
        health: PartitionHealth | None = None,
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
        # The pre-ping is ours (with a deadline and a skip window); SQLAlchemy's
        # own is switched off so that nothing pings twice.
        pre_ping = bool(kw.pop("pre_ping", False))
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
            pre_ping=pre_ping,
            ping_timeout=ping_timeout,
            keepalive_time=keepalive_time,
            leak_threshold=leak_threshold,
        ).validate(partition_name)
        # QueuePool.__init__ is skipped on purpose: its queue and overflow counter
        # are replaced by the bookkeeping below.
        Pool.__init__(self, creator, pre_ping=False, **kw)
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
        self._ping = pre_ping
        self._ping_skip_window = ping_skip_window
        self._ping_timeout = ping_timeout
        self._keepalive_time = keepalive_time
        self._leak_threshold = leak_threshold
        self._max_waiting = max_waiting
        self._lifo = use_lifo
        self._closed = False
        # set by recreate(): connections returned to a replaced pool are closed
        self._retired = False
        # checked-out records, tracked only while leak detection is on
        self._out: dict[_PartitionRecord, None] = {}
        self.partition_name = partition_name
        self.stats = stats if stats is not None else PoolStats(partition_name)
        self.health = health if health is not None else PartitionHealth(partition_name)
        self.health.pool = self

    # -- creating, pinging and closing DBAPI connections -----------------------------

    def _should_wrap_creator(
        self, creator: _CreatorFnType | _CreatorWRecFnType
    ) -> _CreatorWRecFnType:
        inner = super()._should_wrap_creator(creator)

        # Every connection attempt (first open, recycle, reconnect after an
        # invalidation, the prober's) goes through here, so opens and failures
        # are counted, and fed to the health state machine, exactly once.
        def invoke(rec: ConnectionPoolEntry) -> DBAPIConnection:
            started = monotonic()
            try:
                connection = inner(rec)
            except BaseException as exc:
                with self._lock:
                    self.stats.connect_errors += 1
                self.health.connect_failed(exc)
                raise
            connect_time = monotonic() - started
            with self._lock:
                self.stats.connections_opened += 1
            if isinstance(rec, _PartitionRecord):
                rec.expires_at = self._lifetime_deadline()
            health = self.health
            health.connect_succeeded()
            if health.dispatch is not None and health.dispatch.connect:
                health.emit("connect", connect_time=connect_time)
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

    def _connection_lost(self, exc: BaseException | None) -> None:
        with self._lock:
            self.stats.connections_lost += 1
        if exc is not None:
            # an error rather than a deliberate invalidate(): check the partition
            health = self.health
            health.connection_lost(exc)
            if health.dispatch is not None and health.dispatch.invalidate:
                health.emit("invalidate", error=health.describe(exc))

    def _create_connection(self) -> _PartitionRecord:
        return _PartitionRecord(self)

    def ping(self, dbapi_connection: DBAPIConnection) -> BaseException | None:
        """Ping a DBAPI connection within ``ping_timeout``; the error, or None if alive."""
        try:
            with watchdog.guard(self._ping_timeout, dbapi_connection) as deadline:
                dialect: Any = self._dialect  # the engine's Dialect, set by create_engine
                dialect.do_ping(dbapi_connection)
        except Exception as exc:
            return exc
        if deadline is not None and deadline.fired:
            return TimeoutError(f"no answer to a ping within ping_timeout={self._ping_timeout:g}s")
        return None

    def probe(self) -> BaseException | None:
        """Open a connection outside the pool, ping it and close it.

        Used by the prober and health checks; counts towards the health state
        like any connection attempt.  Returns the error, or None if it worked.
        """
        try:
            connection = self._invoke_creator(None)  # type: ignore[arg-type]
        except Exception as exc:
            return exc
        try:
            error = self.ping(connection)
        finally:
            self._close_connection(connection, terminate=True)
        if error is not None:
            self.health.connect_failed(error)
        return error

    def _ping_before_checkout(self, record: _PartitionRecord) -> None:
        connection = record.dbapi_connection
        if connection is None:
            return
        error = self.ping(connection)
        if error is None:
            return
        log.info(
            "partition %r: pre-ping failed (%s); reconnecting",
            self.partition_name,
            self.health.describe(error),
        )
        # SQLAlchemy reconnects an invalidated record on checkout.  As its own
        # pre-ping does, distrust every connection opened before this moment.
        record.invalidate(error)
        self._invalidate_time = time.time()

    # -- checkout ----------------------------------------------------------------

    def _do_get(self) -> ConnectionPoolEntry:
        health = self.health
        if health.is_down:
            raise health.unavailable()
        stack = capture_stack() if self._leak_threshold is not None else None
        expired: list[_PartitionRecord] = []
        waiter: _Waiter | None = None
        record: _PartitionRecord | None = None
        exhausted: PoolExhausted | None = None
        with self._lock:
            idle = self._idle
            now = monotonic()
            while idle:
                candidate = idle.pop() if self._lifo else idle.popleft()
                if candidate.expires_at <= now:
                    self._open -= 1
                    expired.append(candidate)
                    continue
                record = candidate
                self._in_use += 1
                stats = self.stats
                stats.checkouts += 1
                stats.wait_hist[0] += 1
                break
            else:
                if self._closed:
                    raise self._closed_error()
                if self._open < self._max:
                    self._open += 1
                elif self._max_waiting and len(self._waiters) >= self._max_waiting:
                    self.stats.exhausted += 1
                    exhausted = PoolExhausted(
                        self.partition_name,
                        waiting=len(self._waiters),
                        max_waiting=self._max_waiting,
                    )
                else:
                    waiter = self._new_waiter(stack)
                    self._waiters.append(waiter)
        if expired:
            self._close_records(expired)
        if record is not None:
            self._checked_out(record, now, stack)
            if self._ping and now - record.returned_at >= self._ping_skip_window:
                self._ping_before_checkout(record)
            self._emit_checkout(0.0)
            return record
        if waiter is not None:
            return self._wait(waiter, now)
        if exhausted is not None:
            if health.dispatch is not None and health.dispatch.pool_exhausted:
                health.emit(
                    "pool_exhausted", waiting=exhausted.waiting, max_waiting=exhausted.max_waiting
                )
            raise exhausted
        return self._open_for_caller(0.0, stack)

    def _new_waiter(self, stack: StackFrames | None) -> _Waiter:
        """The waiter for a caller that must wait; called under the lock.

        A hook for :class:`.AsyncPartitionPool`, whose waiters wake an event loop.
        """
        return _Waiter(stack)

    def _checked_out(self, record: _PartitionRecord, now: float, stack: StackFrames | None) -> None:
        record.checked_out_at = now
        if stack is not None:
            record.checkout_stack = stack
            record.checkout_thread = threading.current_thread().name
            record.leak_reported = False
            with self._lock:
                self._out[record] = None

    def _emit_checkout(self, waited: float) -> None:
        dispatch = self.health.dispatch
        if dispatch is not None and dispatch.checkout:
            self.health.emit("checkout", waited=waited)

    def _wait(self, waiter: _Waiter, started: float) -> _PartitionRecord:
        waiter.event.wait(self._timeout)
        with self._lock:
            waited = monotonic() - started
            record = waiter.record
            if waiter.error is not None:
                raise waiter.error()
            if record is None and not waiter.slot:
                if self._closed:
                    raise self._closed_error()
                self._waiters.remove(waiter)
                self.stats.timeouts += 1
                timeout_error = PoolTimeout(
                    self.partition_name,
                    timeout=self._timeout,
                    waited=waited,
                    max_connections=self._max,
                    in_use=self._in_use,
                )
            else:
                timeout_error = None
                if record is not None:
                    self.stats.record_wait(waited)
        if timeout_error is not None:
            health = self.health
            if health.dispatch is not None and health.dispatch.checkout_timeout:
                health.emit(
                    "checkout_timeout",
                    error=str(timeout_error),
                    timeout=self._timeout,
                    waited=waited,
                    max_connections=timeout_error.max_connections,
                    in_use=self._in_use,
                )
            raise timeout_error
        if record is None:
            return self._open_for_caller(waited, waiter.stack)
        self._checked_out(record, record.checked_out_at, waiter.stack)
        self._emit_checkout(waited)
        return record

    def _open_for_caller(self, waited: float, stack: StackFrames | None) -> _PartitionRecord:
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
        self._checked_out(record, monotonic(), stack)
        self._emit_checkout(waited)
        return record

    def _release_slot_locked(self) -> None:
        """Give up one slot; if a caller waits and the ceiling allows, the slot is theirs."""
        self._open -= 1
        if self._waiters and self._open < self._max and not self._closed:
            waiter = self._waiters.popleft()
            self._open += 1
            waiter.slot = True
            waiter.event.set()

    def fail_waiters(self, error: Callable[[], BaseException]) -> None:
        """Wake every waiting caller with ``error()`` (used when the partition goes down)."""
        with self._lock:
            waiters = list(self._waiters)
            self._waiters.clear()
            for waiter in waiters:
                waiter.error = error
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
            used = now - record.checked_out_at
            stats.use_time_total += used
            if self._out:
                self._out.pop(record, None)
            if record.dbapi_connection is None:
                # invalidated or detached: the slot is free again
                self._release_slot_locked()
            elif (
                self._closed or self._retired or self._open > self._max or record.expires_at <= now
            ):
                close = True
                self._release_slot_locked()
            elif self._waiters:
                waiter = self._waiters.popleft()
                self._in_use += 1
                stats.checkouts += 1
                # it was in use a moment ago: the waiter gets it without a ping
                record.checked_out_at = now
                waiter.record = record
                waiter.event.set()
            else:
                record.returned_at = now
                self._idle.append(record)
        if close:
            record.close()
        dispatch = self.health.dispatch
        if dispatch is not None and dispatch.checkin:
            self.health.emit("checkin", used=used)

    # -- sizing, and the primitives the background maintenance works with ---------------

    def fill(self, count: int | None = None) -> int:
        """Open connections until ``min_connections`` are open (or *count* more).

        Runs in the calling thread; the :class:`.ShardedEngine` calls it from its
        warm-up and maintenance workers.  Does nothing while the partition is down.

        :param count: open at most this many; default: whatever reaches the minimum.
        :returns: the number of connections opened.
        :raises Exception: the connect error, if an attempt fails.
        """
        if self.health.is_down:
            return 0
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
                self.put_back(record)
        finally:
            if opened < wanted:
                with self._lock:
                    for _ in range(wanted - opened):
                        self._release_slot_locked()
        return opened

    def put_back(self, record: _PartitionRecord) -> None:
        """Make a connection that no caller holds idle again (or hand it to a waiter)."""
        close = False
        with self._lock:
            if self._closed or self._retired:
                self._release_slot_locked()
                close = True
            elif self._waiters:
                waiter = self._waiters.popleft()
                self._in_use += 1
                self.stats.checkouts += 1
                record.checked_out_at = monotonic()
                waiter.record = record
                waiter.event.set()
            else:
                record.returned_at = monotonic()
                self._idle.append(record)
        if close:
            record.close()

    def take_idle(
        self,
        select: Callable[[_PartitionRecord, float], bool],
        *,
        keep_min: bool = False,
    ) -> list[_PartitionRecord]:
        """Remove the idle connections *select* picks; they stay counted as open.

        The caller then either :meth:`put_back` or :meth:`discard` each one.
        Connections are examined least recently returned first.

        :param select: ``select(record, now)`` -> take it?
        :param keep_min: stop before fewer than ``min_connections`` would remain open.
        """
        taken: list[_PartitionRecord] = []
        with self._lock:
            if self._closed:
                return taken
            now = monotonic()
            limit = self._open - self._min if keep_min else len(self._idle)
            # removed in place: a re-entrant return (see _lock) may append meanwhile
            for record in list(self._idle):
                if len(taken) >= limit:
                    break
                if select(record, now):
                    self._idle.remove(record)
                    taken.append(record)
        return taken

    def discard(self, records: list[_PartitionRecord]) -> None:
        """Close connections taken with :meth:`take_idle` and free their slots."""
        if not records:
            return
        with self._lock:
            for _ in records:
                self._release_slot_locked()
        self._close_records(records)

    def discard_all(self) -> None:
        """Distrust every connection opened before now: close the idle ones, and
        make checked-out ones reconnect at their next checkout."""
        self._invalidate_time = time.time()
        self.discard(self.take_idle(lambda record, now: True))

    def checked_out_records(self) -> list[_PartitionRecord]:
        """Connections checked out now (only tracked while ``leak_threshold`` is set)."""
        with self._lock:
            return list(self._out)

    @property
    def keepalive_time(self) -> float | None:
        """Idle seconds after which the maintenance pings a connection."""
        return self._keepalive_time

    @property
    def max_idle(self) -> float | None:
        """Idle seconds after which connections above the minimum are closed."""
        return self._max_idle

    @property
    def leak_threshold(self) -> float | None:
        """Seconds checked out before a connection is reported as a suspected leak."""
        return self._leak_threshold

    def missing(self) -> int:
        """How many connections are needed to reach ``min_connections``."""
        with self._lock:
            return 0 if self._closed else max(0, self._min - self._open)

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

    @staticmethod
    def _close_records(records: list[_PartitionRecord]) -> None:
        for record in records:
            record.close()

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
            ping_timeout=self._ping_timeout,
            keepalive_time=self._keepalive_time,
            leak_threshold=self._leak_threshold,
            partition_name=self.partition_name,
            stats=self.stats,
            health=self.health,
            timeout=self._timeout,
            use_lifo=self._lifo,
            pre_ping=self._ping,
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
