"""Per-partition pool statistics: counters and a checkout-wait histogram.

The counters are plain integers and floats updated by the pool while it holds
its own lock, so keeping statistics on costs a few attribute increments per
checkout and nothing else.  :meth:`PoolStats.snapshot` copies them into an
immutable, JSON-serialisable :class:`StatsSnapshot`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["WAIT_BUCKETS", "PoolStats", "StatsSnapshot"]

# Upper bounds (seconds) of the checkout-wait histogram buckets: "no wait" and
# then powers of two from ~1 microsecond to ~2 minutes.  Log-spaced buckets give
# percentiles within a factor of two at any scale for a fixed, small cost.
WAIT_BUCKETS: tuple[float, ...] = (0.0, *(2.0**e for e in range(-20, 8)))
_MIN_EXP = -20


def _bucket_index(seconds: float) -> int:
    if seconds <= 0.0:
        return 0
    # frexp(x) = (m, e) with x = m * 2**e and 0.5 <= m < 1, so x <= 2**e;
    # an exact power of two belongs to the bucket it bounds (le, as Prometheus).
    mantissa, exp = math.frexp(seconds)
    if mantissa == 0.5:
        exp -= 1
    index = exp - _MIN_EXP + 1
    if index < 1:
        return 1
    return min(index, len(WAIT_BUCKETS) - 1)


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent copy of one partition pool's figures at one moment.

    Gauges describe the pool now; counters count since the pool was created.
    Times are in seconds.
    """

    partition: str
    #: connections open or being opened (idle + checked out + connecting)
    open: int
    idle: int
    checked_out: int
    #: connections being opened right now
    connecting: int
    #: callers waiting for a connection right now
    waiting: int
    min_connections: int
    max_connections: int
    checkouts: int
    checkins: int
    connections_opened: int
    connections_closed: int
    connect_errors: int
    #: connections found broken (invalidated, or dead when returned)
    connections_lost: int
    timeouts: int
    exhausted: int
    #: connections reported as suspected leaks (held past leak_threshold)
    leaks: int
    wait_time_total: float
    use_time_total: float
    wait_p50: float
    wait_p99: float
    wait_max: float
    #: checkouts per wait bucket; bucket i holds waits up to ``WAIT_BUCKETS[i]``
    #: seconds (bucket 0: no wait), the last one everything longer too
    wait_histogram: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict (JSON-serialisable)."""
        return asdict(self)


class PoolStats:
    """Mutable counters of one partition's pool.

    Updated by :class:`.PartitionPool` under its lock; read with :meth:`snapshot`.
    The object outlives pool re-creation (``engine.dispose()``), so counters
    keep counting for the partition.
    """

    __slots__ = (
        "checkins",
        "checkouts",
        "connect_errors",
        "connections_closed",
        "connections_lost",
        "connections_opened",
        "exhausted",
        "leaks",
        "partition",
        "timeouts",
        "use_time_total",
        "wait_hist",
        "wait_max",
        "wait_time_total",
    )

    def __init__(self, partition: str) -> None:
        self.partition = partition
        self.checkouts = 0
        self.checkins = 0
        self.connections_opened = 0
        self.connections_closed = 0
        self.connect_errors = 0
        self.connections_lost = 0
        self.timeouts = 0
        self.exhausted = 0
        self.leaks = 0
        self.wait_time_total = 0.0
        self.use_time_total = 0.0
        self.wait_max = 0.0
        self.wait_hist = [0] * len(WAIT_BUCKETS)

    def record_wait(self, seconds: float) -> None:
        """Count one checkout that waited *seconds* (0 for none)."""
        self.wait_hist[_bucket_index(seconds)] += 1
        if seconds > 0.0:
            self.wait_time_total += seconds
            self.wait_max = max(self.wait_max, seconds)

    def wait_percentile(self, q: float) -> float:
        """Checkout wait at quantile *q* (0..1), to within a factor of two.

        Interpolates linearly inside the histogram bucket that holds the
        quantile, capped at the largest wait seen; 0.0 when nothing has been
        counted or the quantile falls among checkouts that did not wait.
        """
        hist = list(self.wait_hist)
        total = sum(hist)
        if total == 0:
            return 0.0
        rank = q * total
        seen = 0
        lower = 0.0
        for upper, count in zip(WAIT_BUCKETS, hist):
            if count and seen + count >= rank:
                fraction = (rank - seen) / count
                return min(lower + (upper - lower) * fraction, self.wait_max)
            seen += count
            lower = upper
        return self.wait_max

    def snapshot(
        self,
        *,
        open: int,
        idle: int,
        checked_out: int,
        waiting: int,
        min_connections: int,
        max_connections: int,
    ) -> StatsSnapshot:
        """Freeze the counters, together with the pool's gauges, into a snapshot."""
        return StatsSnapshot(
            partition=self.partition,
            open=open,
            idle=idle,
            checked_out=checked_out,
            connecting=open - idle - checked_out,
            waiting=waiting,
            min_connections=min_connections,
            max_connections=max_connections,
            checkouts=self.checkouts,
            checkins=self.checkins,
            connections_opened=self.connections_opened,
            connections_closed=self.connections_closed,
            connect_errors=self.connect_errors,
            connections_lost=self.connections_lost,
            timeouts=self.timeouts,
            exhausted=self.exhausted,
            leaks=self.leaks,
            wait_time_total=self.wait_time_total,
            use_time_total=self.use_time_total,
            wait_p50=self.wait_percentile(0.5),
            wait_p99=self.wait_percentile(0.99),
            wait_max=self.wait_max,
            wait_histogram=tuple(self.wait_hist),
        )
