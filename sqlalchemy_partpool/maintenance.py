"""Background upkeep of the partition pools: idle reaping, lifetime, refilling to the minimum.

Like psycopg_pool's scheduler, one named daemon thread wakes at a short interval
and asks every partition pool what needs doing (:meth:`.PartitionPool.maintain`
does no I/O under the pool lock); connections to open are handed to a small
worker pool so that one slow or dead partition never delays the others.
Callers never wait on any of this.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from time import monotonic

from .pool import PartitionPool

__all__ = ["Maintenance"]

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
    :param workers: threads that open connections.
    :param redact: turns an exception into a password-free description for logs.
    """

    def __init__(
        self,
        pools: Callable[[], Iterable[tuple[str, PartitionPool]]],
        *,
        interval: float,
        workers: int,
        redact: Callable[[str, BaseException], str],
    ) -> None:
        self._pools = pools
        self.interval = interval
        self._redact = redact
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="partpool-filler"
        )
        self._filling: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="partpool-maintenance", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run a tick now rather than at the next interval."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and the workers; wait up to *timeout* seconds for them."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        # A worker may be blocked in a connect attempt; it finishes on its own
        # and the closed pool closes whatever it opens, so do not wait for it.
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
        now = monotonic()
        for name, pool in self._pools():
            missing = pool.maintain()
            if not missing:
                continue
            with self._lock:
                if name in self._filling or self._retry_at.get(name, 0.0) > now:
                    continue
                self._filling.add(name)
            self._executor.submit(self._fill, name, pool)

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
                self._redact(name, exc),
                delay,
            )
        else:
            with self._lock:
                self._backoff.pop(name, None)
                self._retry_at.pop(name, None)
        finally:
            with self._lock:
                self._filling.discard(name)
