"""Background upkeep of the partition pools.

Like psycopg_pool's scheduler, one named daemon thread (``partpool-maintenance``)
wakes at a short interval and, for every partition pool that exists:

* closes idle connections past their lifetime, or opened before a detected
  disconnect;
* closes connections above ``min_connections`` idle for ``max_idle`` seconds
  (the seed's "close connections idle for a long time");
* pings connections idle for ``keepalive_time`` seconds, so one that a
  firewall silently dropped is found and replaced before a caller gets it;
* reports connections checked out longer than ``leak_threshold`` (once each,
  with the stack that took them);
* refills the pool to ``min_connections``.

Pings and connects run on a few ``partpool-worker`` threads, so one slow or
dead partition never delays the others, and callers never wait on any of it.
No I/O happens under a pool lock.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from time import monotonic

from .health import format_stack
from .pool import PartitionPool, _PartitionRecord

__all__ = ["Maintenance", "ping_idle"]

log = logging.getLogger("sqlalchemy_partpool.maintenance")

# Refill attempts after a failure back off from this delay up to the maximum.
_BACKOFF_START = 0.5
_BACKOFF_MAX = 30.0


class Maintenance:
    """Runs pool upkeep for a set of partitions until :meth:`stop`.

    :param pools: called on every tick; returns ``(partition name, pool)`` pairs
      for the pools that currently exist (engines are created lazily, and
      ``engine.dispose()`` replaces a pool).
    :param interval: seconds between ticks.
    :param workers: threads that ping and open connections.
    """

    def __init__(
        self,
        pools: Callable[[], Iterable[tuple[str, PartitionPool]]],
        *,
        interval: float,
        workers: int,
    ) -> None:
        self._pools = pools
        self.interval = interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="partpool-worker"
        )
        self._busy: set[tuple[str, str]] = set()
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="partpool-maintenance", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run a tick now rather than at the next interval."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and the workers; wait up to *timeout* seconds for the thread."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        # A worker may be blocked in a connect or a ping (both bounded); it
        # finishes on its own, and a closed pool closes whatever it opens.
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.tick()
            except Exception:  # pragma: no cover - a bug must not kill upkeep
                log.exception("pool maintenance failed; will retry at the next interval")

    def tick(self) -> None:
        """One round of upkeep over every pool."""
        for name, pool in self._pools():
            self._close_stale(pool)
            self._report_leaks(pool)
            keepalive = pool.keepalive_time
            if keepalive is not None:
                self._submit(name, "keepalive", self._keepalive, pool, keepalive)
            if pool.missing() and self._retry_at.get(name, 0.0) <= monotonic():
                self._submit(name, "fill", self._fill, name, pool)

    def _submit(self, name: str, job: str, fn: Callable[..., None], *args: object) -> None:
        key = (name, job)
        with self._lock:
            if key in self._busy:
                return
            self._busy.add(key)

        def run() -> None:
            try:
                fn(*args)
            finally:
                with self._lock:
                    self._busy.discard(key)

        try:
            self._executor.submit(run)
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._busy.discard(key)

    @staticmethod
    def _close_stale(pool: PartitionPool) -> None:
        invalid_before = pool._invalidate_time
        expired = pool.take_idle(
            lambda record, now: record.expires_at <= now or record.starttime < invalid_before
        )
        max_idle = pool.max_idle
        reaped = (
            pool.take_idle(
                lambda record, now: now - record.returned_at >= max_idle,
                keep_min=True,
            )
            if max_idle is not None
            else []
        )
        if expired or reaped:
            log.debug(
                "partition %r: closing %d expired and %d idle connections",
                pool.partition_name,
                len(expired),
                len(reaped),
            )
            pool.discard(expired + reaped)

    @staticmethod
    def _keepalive(pool: PartitionPool, keepalive: float) -> None:
        ping_idle(pool, pool.take_idle(lambda record, now: now - record.returned_at >= keepalive))

    @staticmethod
    def _report_leaks(pool: PartitionPool) -> None:
        threshold = pool.leak_threshold
        if threshold is None:
            return
        now = monotonic()
        for record in pool.checked_out_records():
            held = now - record.checked_out_at
            if record.leak_reported or held < threshold:
                continue
            record.leak_reported = True
            stack = format_stack(record.checkout_stack or ())
            with pool._lock:
                pool.stats.leaks += 1
            log.warning(
                "partition %r: connection checked out for %.1fs (leak_threshold %gs) by "
                "thread %r; possible leak. Checked out at:\n%s",
                pool.partition_name,
                held,
                threshold,
                record.checkout_thread,
                stack,
            )
            pool.health.emit(
                "leak_suspected", held=held, stack=stack, thread=record.checkout_thread
            )

    def _fill(self, name: str, pool: PartitionPool) -> None:
        try:
            pool.fill()
        except Exception as exc:
            with self._lock:
                delay = min(self._backoff.get(name, _BACKOFF_START / 2) * 2, _BACKOFF_MAX)
                self._backoff[name] = delay
                self._retry_at[name] = monotonic() + delay
            log.warning(
                "partition %r: could not open connections up to min_connections (%s); "
                "retrying in %.1fs",
                name,
                pool.health.describe(exc),
                delay,
            )
        else:
            with self._lock:
                self._backoff.pop(name, None)
                self._retry_at.pop(name, None)


def ping_idle(pool: PartitionPool, records: list[_PartitionRecord]) -> None:
    """Ping idle connections taken from *pool*; put back the live ones, replace the rest.

    Used by the sync maintenance and, in a greenlet, by the asyncio one.
    Interruption-safe: connections not pinged yet go back to the pool, and the
    one whose ping was interrupted is closed.
    """
    pending = deque(records)
    lost: list[_PartitionRecord] = []
    try:
        while pending:
            record = pending[0]
            connection = record.dbapi_connection
            error = pool.ping(connection) if connection is not None else None
            pending.popleft()
            if error is None:
                pool.put_back(record)
            else:
                log.info(
                    "partition %r: an idle connection failed its keepalive ping (%s); replacing it",
                    pool.partition_name,
                    pool.health.describe(error),
                )
                record.invalidate(error)
                lost.append(record)
    finally:
        if pending:
            lost.append(pending.popleft())
            for record in pending:
                pool.put_back(record)
        pool.discard(lost)
