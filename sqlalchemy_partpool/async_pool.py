"""The partition pool for asyncio drivers (asyncpg, psycopg 3), and its upkeep on the event loop.

:class:`AsyncPartitionPool` is a :class:`.PartitionPool` (same bookkeeping, so
the same hard maximum, minimum, FIFO hand-off, :class:`.PoolTimeout`,
:class:`.PoolExhausted`, statistics and health fail-fast) made for
:func:`~sqlalchemy.ext.asyncio.create_async_engine`.  SQLAlchemy runs the pool
of an async engine on the event loop, inside a greenlet (its asyncio bridge),
so nothing here may block the loop:

* A caller that must wait for a connection awaits, through
  :func:`sqlalchemy.util.await_only`, a future that the pool resolves when it
  hands the caller a connection or a slot (like SQLAlchemy's own
  ``AsyncAdaptedQueue``), never ``threading.Event.wait``.  A caller cancelled
  while waiting gives back whatever it was handed meanwhile.
* The pre-ping and keepalive pings are the dialect's own (async) ping, bounded
  by ``ping_timeout`` with an asyncio timeout on the loop.  (The threaded
  pools' watchdog shuts sockets down from another thread; that is not safe
  for asyncio connections.)  A ping past its deadline is cancelled, and the
  connection is invalidated and closed (asyncpg stops at once; psycopg first
  has the server cancel the query, within its own 5 s bounds).
* Used outside SQLAlchemy's greenlet bridge, the pool raises
  :class:`~sqlalchemy.exc.MissingGreenlet` before touching anything, rather
  than counting the failed awaits against the partition's health.
* Connections are always closed with the dialect's ``terminate``: asyncpg gets
  two seconds to say goodbye to the server and then drops the socket,
  psycopg closes locally.  So no close waits on an unresponsive server.

Background work cannot open or close asyncio connections from a thread, so it
runs as asyncio tasks on the loop that uses the engine:

* :class:`AsyncMaintenance` -- one task, ``partpool-maintenance``, started at
  the first checkout (or by :meth:`.AsyncShardedEngine.warm_up`), stopped by
  :meth:`.AsyncShardedEngine.dispose`.  Each tick it closes expired and idle
  connections above the minimum, reports leaks, and starts one short-lived
  task per partition for keepalive pings and refilling to ``min_connections``.
* :class:`AsyncPartitionHealth` -- the partition's prober, a task
  ``partpool-prober-<partition>`` that runs only while the partition is not up.

The pool can also be used on its own::

    engine = create_async_engine(url, poolclass=AsyncPartitionPool,
                                 min_connections=2, max_connections=20)

(without an :class:`AsyncMaintenance`, nothing reaps idle connections or
refills the minimum: ``await pool.fill_async()`` yourself.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from functools import partial
from time import monotonic
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool.base import _AsyncConnDialect, _ConnDialect, _CreatorFnType, _CreatorWRecFnType
from sqlalchemy.util import await_only, greenlet_spawn
from sqlalchemy.util.concurrency import in_greenlet

from .errors import PoolError
from .health import PartitionHealth, PartitionState, StackFrames
from .maintenance import Maintenance, ping_idle
from .pool import PartitionPool, _PartitionRecord, _Waiter

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect
    from sqlalchemy.pool import ConnectionPoolEntry

__all__ = ["AsyncMaintenance", "AsyncPartitionHealth", "AsyncPartitionPool"]

log = logging.getLogger("sqlalchemy_partpool.async_pool")

_T = TypeVar("_T")

# Refill attempts after a failure back off from this delay up to the maximum
# (as the threaded maintenance does).
_BACKOFF_START = 0.5
_BACKOFF_MAX = 30.0


if sys.version_info >= (3, 11):

    async def _within(seconds: float, awaitable: Awaitable[_T]) -> _T:
        """Await *awaitable*, cancelling it and raising ``TimeoutError`` after *seconds*."""
        # asyncio.timeout rather than wait_for: on 3.11, wait_for can swallow a
        # cancellation that arrives just as the inner call completes (gh-86296)
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - exercised on 3.10 only

    async def _within(seconds: float, awaitable: Awaitable[_T]) -> _T:
        """Await *awaitable*, cancelling it and raising ``TimeoutError`` after *seconds*."""
        return await asyncio.wait_for(awaitable, seconds)


class _LoopEvent(threading.Event):
    """A waiter's event that is awaited on an event loop instead of blocking a thread.

    The pool sets it from the loop (a connection returned by another task) or
    from any thread (a connection finalised by the garbage collector);
    :meth:`wait` awaits it through the greenlet bridge.

    :param loop: the loop the waiting caller runs on.
    :param abandon: called if the wait ends with an exception (a cancellation),
      to give back what the pool may have handed over meanwhile.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, abandon: Callable[[], None]) -> None:
        super().__init__()
        self._loop = loop
        self._future: asyncio.Future[None] = loop.create_future()
        self._abandon = abandon

    def set(self) -> None:
        super().set()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._resolve()
        else:
            # a closed loop has nobody left waiting on it
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to *timeout* seconds on the event loop; True if the event was set."""
        if self.is_set():
            return True
        try:
            # asyncio.wait, unlike wait_for, leaves the future alone on timeout
            await_only(asyncio.wait((self._future,), timeout=timeout))
        except BaseException:
            self._abandon()
            raise
        return self.is_set()


class AsyncPartitionPool(PartitionPool):
    """A :class:`.PartitionPool` for asyncio engines: waits await, pings have asyncio deadlines.

    Takes the same parameters as :class:`.PartitionPool`.

    :ivar maintenance: the :class:`AsyncMaintenance` started at the first
      checkout on an event loop (set by :class:`.AsyncShardedEngine`, kept
      across ``recreate()``); None for none.
    """

    # like AsyncAdaptedQueuePool: create_engine checks it against the dialect,
    # and SQLAlchemy then makes the pool's event mutexes greenlet-aware
    _is_asyncio = True
    _dialect: _ConnDialect | Dialect = _AsyncConnDialect()

    maintenance: AsyncMaintenance | None = None

    def __init__(self, creator: Any, **kw: Any) -> None:
        if kw.get("health") is None:
            # the default PartitionHealth probes from a thread, which cannot
            # open an asyncio connection
            kw["health"] = AsyncPartitionHealth(kw.get("partition_name", "default"))
        super().__init__(creator, **kw)

    def _require_greenlet(self, what: str) -> None:
        # Outside the bridge every await fails.  Caught here, such a misuse is
        # an error for the caller, not a failed connect or ping that would
        # count against the partition's health and discard its connections.
        if not in_greenlet():
            raise sa_exc.MissingGreenlet(
                f"partition {self.partition_name!r}: {what} on an asyncio pool must run inside "
                "SQLAlchemy's greenlet bridge (AsyncEngine, AsyncConnection, AsyncSession, "
                "run_sync); was I/O attempted in an unexpected place?"
            )

    def _should_wrap_creator(
        self, creator: _CreatorFnType | _CreatorWRecFnType
    ) -> _CreatorWRecFnType:
        invoke = super()._should_wrap_creator(creator)

        def checked(rec: ConnectionPoolEntry) -> DBAPIConnection:
            self._require_greenlet("opening a connection")
            return invoke(rec)

        return checked

    # -- waiting ---------------------------------------------------------------------

    def _new_waiter(self, stack: StackFrames | None) -> _Waiter:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise PoolError(
                f"partition {self.partition_name!r}: this asyncio pool was used outside an "
                "event loop; use it through AsyncEngine / AsyncSession",
                partition=self.partition_name,
            ) from None
        waiter = _Waiter(stack)
        waiter.event = _LoopEvent(loop, partial(self._abandon, waiter))
        return waiter

    def _abandon(self, waiter: _Waiter) -> None:
        """A caller stopped waiting (cancelled): undo whatever the pool did for it."""
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                return
            record, waiter.record = waiter.record, None
            if record is None:
                if waiter.slot:
                    waiter.slot = False
                    self._release_slot_locked()
                return
            # handed over just before the cancellation: not a checkout after all
            self._in_use -= 1
            self.stats.checkouts -= 1
        self.put_back(record)

    # -- checkout --------------------------------------------------------------------

    def _do_get(self) -> ConnectionPoolEntry:
        self._require_greenlet("a checkout")
        maintenance = self.maintenance
        if maintenance is not None:
            maintenance.ensure_running()
        return super()._do_get()

    def _checked_out(self, record: _PartitionRecord, now: float, stack: StackFrames | None) -> None:
        super()._checked_out(record, now, stack)
        if stack is not None:
            # every task shares the loop's thread: the task says more about a leak
            task = _current_task()
            if task is not None:
                record.checkout_thread = f"{record.checkout_thread} / task {task.get_name()}"

    # -- pinging and closing -----------------------------------------------------------

    def ping(self, dbapi_connection: DBAPIConnection) -> BaseException | None:
        """Ping within ``ping_timeout`` on the event loop; the error, or None if alive.

        Must run in SQLAlchemy's greenlet context (any checkout does).  Past the
        deadline the ping is cancelled and a ``TimeoutError`` returned: asyncpg
        stops at once (and its connection is aborted, so closing it does not
        wait either); psycopg first asks the server to cancel the query and
        waits for that, within its own bounds (up to 5 s each).
        """
        self._require_greenlet("a ping")
        dialect: Any = self._dialect
        try:
            await_only(
                _within(self._ping_timeout, greenlet_spawn(dialect.do_ping, dbapi_connection))
            )
        except asyncio.TimeoutError:
            _abort(dbapi_connection)
            return TimeoutError(f"no answer to a ping within ping_timeout={self._ping_timeout:g}s")
        except Exception as exc:
            return exc
        return None

    def _close_connection(self, connection: DBAPIConnection, *, terminate: bool = False) -> None:
        # terminate is close with a bound: a graceful close could wait forever
        # on a server that stopped answering
        super()._close_connection(connection, terminate=True)

    # -- filling -------------------------------------------------------------------

    async def fill_async(self, count: int | None = None) -> list[Exception]:
        """Open connections until ``min_connections`` are open (or *count* more), all at once.

        The asyncio counterpart of :meth:`~.PartitionPool.fill`: the slots are
        reserved before anything is awaited (so concurrent fills never overshoot),
        then each connection is opened in its own greenlet on the running loop.
        Does nothing while the partition is down.

        :param count: open at most this many; default: whatever reaches the minimum.
        :returns: the connect errors (empty if every connection opened).
        """
        if self.health.is_down:
            return []
        with self._lock:
            wanted = self._min - self._open if count is None else count
            wanted = 0 if self._closed else max(0, min(wanted, self._max - self._open))
            self._open += wanted
        if not wanted:
            return []
        started = 0

        def open_one() -> None:
            nonlocal started
            started += 1
            try:
                record = self._create_connection()
            except BaseException:
                with self._lock:
                    self._release_slot_locked()
                raise
            self.put_back(record)

        try:
            results = await asyncio.gather(
                *(greenlet_spawn(open_one) for _ in range(wanted)), return_exceptions=True
            )
        finally:
            # a cancellation can end tasks before they ever ran: free their slots too
            with self._lock:
                for _ in range(wanted - started):
                    self._release_slot_locked()
        errors: list[Exception] = []
        for result in results:
            if isinstance(result, Exception):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
        return errors

    def recreate(self) -> AsyncPartitionPool:
        """Return a new pool with the same settings (used by ``AsyncEngine.dispose()``)."""
        pool = super().recreate()
        assert isinstance(pool, AsyncPartitionPool)
        pool.maintenance = self.maintenance
        return pool


def _start_task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], name: str
) -> asyncio.Task[None]:
    """Start a background task that inherits none of the caller's context variables.

    Background tasks are often started from an application's task (at its
    first checkout); a tenant pin, or anything else in its context, must not
    follow them.
    """
    return contextvars.Context().run(loop.create_task, coro, name=name)


def _abort(dbapi_connection: DBAPIConnection) -> None:
    """Drop a connection that stopped answering without a goodbye, if the driver can.

    asyncpg's ``terminate()`` aborts the transport at once.  psycopg has no
    such call, and closing its socket while psycopg may still wait on it is
    unsafe, so its connection is left to the normal close.
    """
    driver = getattr(dbapi_connection, "driver_connection", None)
    terminate = getattr(driver, "terminate", None)
    if callable(terminate):
        with contextlib.suppress(Exception):
            terminate()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    """Call *fn* on *loop*: now when already on it, else at its next turn."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn()
    else:
        with contextlib.suppress(RuntimeError):  # closed: its tasks are gone already
            loop.call_soon_threadsafe(fn)


class AsyncPartitionHealth(PartitionHealth):
    """:class:`.PartitionHealth` whose prober is an asyncio task rather than a thread.

    The task (``partpool-prober-<partition>``) is started on the running loop
    when a connection attempt fails or a connection is lost, and ends once the
    partition is up again.  A failure noticed off the loop (a connection
    finalised by the garbage collector) starts it at the maintenance's next
    tick instead.  Takes the same parameters as :class:`.PartitionHealth`.
    """

    def __init__(self, partition: str, **kw: Any) -> None:
        super().__init__(partition, **kw)
        self._task: asyncio.Task[None] | None = None
        self._task_loop: asyncio.AbstractEventLoop | None = None

    def _ensure_prober(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        with self._lock:
            if self._stopping.is_set():
                return
            task = self._task
            if task is not None and not task.done() and self._task_loop is loop:
                return
            self._task_loop = loop
            self._task = _start_task(
                loop, self._probe_loop_async(), f"partpool-prober-{self.partition}"
            )

    def ensure_probing(self) -> None:
        """Start the prober if the partition is not up and none runs (called on the loop)."""
        if self.state is not PartitionState.UP:
            self._ensure_prober()

    @property
    def probing(self) -> bool:
        """True while the prober task runs."""
        task = self._task
        return task is not None and not task.done()

    async def _probe_loop_async(self) -> None:
        delay = self.probe_interval
        while not self._stopping.is_set():
            if self.state is PartitionState.UP:
                return
            try:
                if await greenlet_spawn(self.check, "prober"):
                    await greenlet_spawn(self._recovered)
                    return
            except Exception:  # pragma: no cover - a bug must not end probing
                log.exception("partition %r: probing failed", self.partition)
            # exponential backoff, never slower than probe_max_interval
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.probe_max_interval)

    def stop(self, timeout: float = 0.2) -> None:
        """Stop the prober; returns at once (the task is cancelled on its loop)."""
        self._stopping.set()
        task, loop = self._task, self._task_loop
        if task is not None and loop is not None and not task.done():
            _call_soon(loop, task.cancel)

    async def stop_async(self) -> None:
        """Stop the prober and wait for its task to end (on the loop it runs on)."""
        self.stop()
        task = self._task
        if task is not None and self._task_loop is asyncio.get_running_loop():
            await asyncio.gather(task, return_exceptions=True)


class AsyncMaintenance:
    """Upkeep of asyncio partition pools, as tasks on the event loop that uses them.

    :meth:`ensure_running` starts the ``partpool-maintenance`` task on the
    running loop (again on a new loop, if the engine moved to one).  Every
    *interval* seconds, for each pool that exists, it:

    * closes idle connections past their lifetime or opened before a detected
      disconnect, and those above ``min_connections`` idle for ``max_idle``;
    * reports connections checked out longer than ``leak_threshold``;
    * pings connections idle for ``keepalive_time`` (task ``partpool-keepalive-<p>``);
    * refills to ``min_connections``, all missing connections at once (task
      ``partpool-fill-<p>``), backing off after failures;
    * restarts the partition's prober if a failure was noticed off the loop.

    Pings and connects of different partitions run concurrently and never
    delay callers.

    :param pools: called on every tick; returns ``(partition name, pool)``
      pairs for the pools that currently exist.
    :param interval: seconds between ticks.
    """

    def __init__(
        self, pools: Callable[[], Iterable[tuple[str, PartitionPool]]], *, interval: float
    ) -> None:
        self._pools = pools
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._jobs: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._stopped = False

    @property
    def running(self) -> bool:
        """True while the maintenance task runs."""
        task = self._task
        return task is not None and not task.done()

    def ensure_running(self) -> None:
        """Start the task on the running loop unless it runs there already; cheap."""
        if self._stopped:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = self._task
        if task is not None and not task.done() and self._loop is loop:
            return
        if task is not None and not task.done():
            old = self._loop
            assert old is not None
            _call_soon(old, task.cancel)
        self._loop = loop
        self._jobs = {}
        self._task = _start_task(loop, self._run(), "partpool-maintenance")

    def wake(self) -> None:
        """Run a tick now rather than at the next interval."""
        wake, loop = self._wake, self._loop
        if wake is not None and loop is not None:
            _call_soon(loop, wake.set)

    async def stop(self) -> None:
        """Stop the task and its jobs; waits for them when called on their loop."""
        self._stopped = True
        tasks = [t for t in (self._task, *self._jobs.values()) if t is not None and not t.done()]
        loop = self._loop
        if not tasks or loop is None:
            return
        for task in tasks:
            _call_soon(loop, task.cancel)
        if loop is asyncio.get_running_loop():
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        wake = self._wake = asyncio.Event()
        while True:
            try:
                await greenlet_spawn(self.tick)
            except Exception:  # pragma: no cover - a bug must not kill upkeep
                log.exception("pool maintenance failed; will retry at the next interval")
            with contextlib.suppress(asyncio.TimeoutError):
                await _within(self.interval, wake.wait())
            wake.clear()

    def tick(self) -> None:
        """One round of upkeep over every pool.

        Runs in a greenlet on the loop.  Closing stale connections happens here,
        one pool after another (each close is bounded, see the module notes);
        keepalive pings and refills run as separate tasks per partition.
        """
        for name, pool in self._pools():
            if not isinstance(pool, AsyncPartitionPool) or pool.closed:
                continue
            Maintenance._report_leaks(pool)
            Maintenance._close_stale(pool)
            keepalive = pool.keepalive_time
            if keepalive is not None and not self._busy(name, "keepalive"):
                records = pool.take_idle(partial(_idle_for, keepalive))
                if records:
                    self._spawn(name, "keepalive", greenlet_spawn, ping_idle, pool, records)
            if pool.missing() and self._retry_at.get(name, 0.0) <= monotonic():
                self._spawn(name, "fill", self._fill, name, pool)
            health = pool.health
            if isinstance(health, AsyncPartitionHealth):
                health.ensure_probing()

    async def settled(self, name: str) -> None:
        """Wait for the refill of partition *name* in progress, if any, to end."""
        job = self._jobs.get((name, "fill"))
        if job is not None and not job.done():
            await asyncio.wait((job,))

    def _busy(self, name: str, job: str) -> bool:
        running = self._jobs.get((name, job))
        return running is not None and not running.done()

    def _spawn(self, name: str, job: str, fn: Callable[..., Awaitable[Any]], *args: object) -> None:
        if self._busy(name, job):
            return

        async def run() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("partition %r: %s failed", name, job)

        loop = self._loop
        assert loop is not None
        self._jobs[name, job] = loop.create_task(run(), name=f"partpool-{job}-{name}")

    async def _fill(self, name: str, pool: AsyncPartitionPool) -> None:
        errors = await pool.fill_async()
        if errors:
            delay = min(self._backoff.get(name, _BACKOFF_START / 2) * 2, _BACKOFF_MAX)
            self._backoff[name] = delay
            self._retry_at[name] = monotonic() + delay
            log.warning(
                "partition %r: could not open connections up to min_connections (%s); "
                "retrying in %.1fs",
                name,
                pool.health.describe(errors[0]),
                delay,
            )
        else:
            self._backoff.pop(name, None)
            self._retry_at.pop(name, None)


def _idle_for(seconds: float, record: _PartitionRecord, now: float) -> bool:
    return now - record.returned_at >= seconds
