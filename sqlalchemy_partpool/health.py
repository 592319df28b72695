"""Per-partition health: a state machine, a background prober, and fail-fast.

Each partition is in one of four states:

``up``
    Normal service.
``suspect``
    A connect failed or a connection was lost.  Calls go on as usual while the
    prober checks the partition at once.
``down``
    ``down_after`` consecutive connect attempts failed (callers' and the
    prober's together).  Checkouts fail at once with
    :class:`.PartitionUnavailable` instead of each waiting out a connect
    timeout, and callers already waiting are woken with the same error.  The
    prober retries with exponential backoff, capped at ``probe_max_interval``.
``recovering``
    The prober reached the partition again; connections opened before the
    outage are being discarded.  Then the partition is ``up`` and
    ``partition_up`` is emitted.

One prober thread per partition (named ``partpool-prober-<partition>``) runs
only while the partition is not ``up``.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from time import monotonic
from typing import TYPE_CHECKING, Any

from .errors import PartitionUnavailable, redact

if TYPE_CHECKING:
    from sqlalchemy.event.base import _DispatchCommon

    from .pool import PartitionPool

__all__ = ["PartitionHealth", "PartitionState", "capture_stack", "format_stack"]

log = logging.getLogger("sqlalchemy_partpool.health")

# Frames from these packages are left out of a leak's checkout stack: the
# interesting frames are the application's.
_INTERNAL_PREFIXES = ("sqlalchemy", "sqlalchemy_partpool")
_STACK_LIMIT = 24

StackFrames = tuple[tuple[str, int, str], ...]


def capture_stack(skip: int = 2) -> StackFrames:
    """The caller's stack as ``(filename, line, function)`` tuples, innermost first.

    Cheaper than :func:`traceback.extract_stack` (no source lines are read), so
    it can run on every checkout when leak detection is on.
    """
    frame = sys._getframe(skip)
    frames: list[tuple[str, int, str]] = []
    while frame is not None and len(frames) < _STACK_LIMIT:
        code = frame.f_code
        frames.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back  # type: ignore[assignment]
    return tuple(frames)


def format_stack(frames: StackFrames) -> str:
    """Format a captured stack like a traceback, outermost call first.

    Frames inside SQLAlchemy and sqlalchemy-partpool are dropped when any
    application frame remains.
    """

    def internal(filename: str) -> bool:
        parts = filename.replace("\\", "/").split("/")
        return any(p in _INTERNAL_PREFIXES for p in parts[-3:-1])

    chosen = [f for f in frames if not internal(f[0])] or list(frames)
    summary = traceback.StackSummary.from_list(
        [(filename, line, name, None) for filename, line, name in reversed(chosen)]
    )
    return "".join(summary.format())


class PartitionState(str, enum.Enum):
    """Health state of a partition."""

    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"
    RECOVERING = "recovering"


class PartitionHealth:
    """Health of one partition: state machine, prober and event emission.

    Outlives pool re-creation: each new :class:`.PartitionPool` of the
    partition attaches itself as :attr:`pool`.

    :param partition: the partition name.
    :param down_after: consecutive connect failures that mark the partition down.
    :param probe_interval: the prober's first retry delay, in seconds.
    :param probe_max_interval: the longest delay between probes while down.
    :param secrets: strings (passwords) to scrub from error descriptions.
    :param dispatch: the event dispatcher of the owning :class:`.ShardedEngine`.
    """

    def __init__(
        self,
        partition: str,
        *,
        down_after: int = 3,
        probe_interval: float = 0.1,
        probe_max_interval: float = 1.0,
        secrets: Iterable[str] = (),
        dispatch: _DispatchCommon[Any] | None = None,
    ) -> None:
        self.partition = partition
        self.down_after = down_after
        self.probe_interval = probe_interval
        self.probe_max_interval = probe_max_interval
        self._secrets = tuple(s for s in secrets if s)
        self.dispatch = dispatch
        self.pool: PartitionPool | None = None
        self.state = PartitionState.UP
        # read without the lock on every checkout: a plain bool is the cheapest test
        self.is_down = False
        self.since = time.time()
        self.failures = 0
        self.last_error: str | None = None
        self.last_check: dict[str, Any] | None = None
        self._down_at = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._prober: threading.Thread | None = None

    # -- descriptions and events ---------------------------------------------------

    def describe(self, exc: BaseException) -> str:
        """A one-line, password-free description of *exc*."""
        text = str(exc).strip()
        first = text.splitlines()[0].strip() if text else ""
        described = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        return redact(described, self._secrets)

    def emit(self, name: str, *, error: str | None = None, **detail: Any) -> None:
        """Send event *name* to the listeners, if there are any."""
        dispatch = self.dispatch
        if dispatch is None:
            return
        listeners = getattr(dispatch, name)
        if not listeners:
            return
        from .events import PartitionEvent

        pool = self.pool
        listeners(
            PartitionEvent(
                name=name,
                partition=self.partition,
                stats=pool.snapshot() if pool is not None else None,
                error=error,
                state=self.state.value,
                detail=detail,
            )
        )

    def unavailable(self) -> PartitionUnavailable:
        """The error a checkout raises while the partition is down."""
        return PartitionUnavailable(self.partition, since=self.since, cause=self.last_error or "")

    # -- signals from the pool --------------------------------------------------------

    def connect_succeeded(self) -> None:
        """A connection attempt worked (called for every successful connect)."""
        if self.failures == 0 and self.state is PartitionState.UP:
            return
        with self._lock:
            self.failures = 0
            if self.state is PartitionState.SUSPECT:
                self._set_state(PartitionState.UP)

    def connect_failed(self, exc: BaseException) -> None:
        """A connection attempt failed; enough of them in a row mark the partition down."""
        description = self.describe(exc)
        went_down = False
        with self._lock:
            self.failures += 1
            self.last_error = description
            if self.state is PartitionState.UP:
                self._set_state(PartitionState.SUSPECT)
            if self.failures >= self.down_after and self.state is not PartitionState.DOWN:
                self._set_state(PartitionState.DOWN)
                self.is_down = True
                self._down_at = monotonic()
                went_down = True
            failures = self.failures
        if went_down:
            log.warning(
                "partition %r is down after %d failed connection attempts (%s); "
                "calls fail fast until it answers again",
                self.partition,
                failures,
                description,
            )
            pool = self.pool
            if pool is not None:
                pool.fail_waiters(self.unavailable)
            self.emit("partition_down", error=description, failures=failures)
        self._ensure_prober()

    def connection_lost(self, exc: BaseException) -> None:
        """A pooled connection broke (a disconnect, a failed ping): check the partition."""
        description = self.describe(exc)
        with self._lock:
            self.last_error = description
            if self.state is PartitionState.UP:
                self._set_state(PartitionState.SUSPECT)
        self._ensure_prober()

    def _set_state(self, state: PartitionState) -> None:
        if state is not self.state:
            log.info("partition %r: %s -> %s", self.partition, self.state.value, state.value)
            self.state = state
            self.since = time.time()

    # -- probing ------------------------------------------------------------------------

    def check(self, source: str = "check") -> bool:
        """Connect, ping and disconnect once; emit ``health_check``; return whether it worked.

        A failure counts towards ``down_after`` like any connect failure.
        """
        pool = self.pool
        if pool is None:
            return False
        started = monotonic()
        error = pool.probe()
        latency = monotonic() - started
        ok = error is None
        self.last_check = {
            "ok": ok,
            "latency": latency,
            "time": time.time(),
            "error": None if ok else self.describe(error),  # type: ignore[arg-type]
        }
        self.emit(
            "health_check",
            error=self.last_check["error"],
            ok=ok,
            latency=latency,
            source=source,
        )
        return ok

    def _ensure_prober(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            if self._prober is not None and self._prober.is_alive():
                return
            self._prober = threading.Thread(
                target=self._probe_loop,
                name=f"partpool-prober-{self.partition}",
                daemon=True,
            )
            self._prober.start()

    def _probe_loop(self) -> None:
        delay = self.probe_interval
        while not self._stopping.is_set():
            if self.state is PartitionState.UP:
                return
            if self.check(source="prober"):
                self._recovered()
                return
            # exponential backoff, but never slower than probe_max_interval, so a
            # partition is back in service soon after its server is
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, self.probe_max_interval)

    def _recovered(self) -> None:
        with self._lock:
            was_down = self.state is PartitionState.DOWN
            if was_down:
                self._set_state(PartitionState.RECOVERING)
        pool = self.pool
        if was_down and pool is not None:
            # Every connection from before the outage is suspect: drop the idle
            # ones now, and make the checked-out ones reconnect on next checkout.
            pool.discard_all()
        with self._lock:
            self.failures = 0
            self._set_state(PartitionState.UP)
            self.is_down = False
            downtime = monotonic() - self._down_at if was_down else 0.0
        if was_down:
            log.warning("partition %r is back up after %.1fs down", self.partition, downtime)
            self.emit("partition_up", downtime=downtime)

    def stop(self, timeout: float = 0.2) -> None:
        """Stop the prober, if running.

        Waits at most *timeout* seconds: a prober blocked in a connection
        attempt (bounded by ``connect_timeout``) finishes on its own and closes
        what it opened, so disposing an engine never waits for a dead server.
        """
        self._stopping.set()
        prober = self._prober
        if prober is not None:
            prober.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        """The health figures as a JSON-serialisable dict."""
        return {
            "state": self.state.value,
            "since": self.since,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
            "last_check": dict(self.last_check) if self.last_check else None,
        }
