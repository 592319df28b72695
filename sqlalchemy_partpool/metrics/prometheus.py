"""Prometheus metrics of a :class:`.ShardedEngine`, read at scrape time.

::

    from prometheus_client import start_http_server
    from sqlalchemy_partpool.metrics import prometheus

    prometheus.register(sharded)  # into prometheus_client's default REGISTRY
    start_http_server(9100)

:class:`PartpoolCollector` is a custom ``prometheus_client`` collector: it
keeps no state of its own and reads :meth:`.ShardedEngine.health` (a snapshot
of every partition, no I/O) when Prometheus scrapes, so checkouts pay nothing
for it.  Every series carries a ``partition`` label.

Needs ``prometheus_client`` (``pip install 'sqlalchemy-partpool[prometheus]'``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:
    raise ImportError(
        "sqlalchemy_partpool.metrics.prometheus needs prometheus_client; "
        "install it with: pip install 'sqlalchemy-partpool[prometheus]'"
    ) from exc

from ..engine import ShardedEngine
from ..health import PartitionState
from ..stats import WAIT_BUCKETS

__all__ = ["HISTOGRAM_BOUNDS", "PartpoolCollector", "register", "unregister"]

_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

#: Bounds the checkout-wait histogram can have: the pool's, less the last one,
#: which is no true ``le`` since that bucket also holds every longer wait (those
#: count in ``+Inf`` only).
HISTOGRAM_BOUNDS: tuple[float, ...] = WAIT_BUCKETS[:-1]

#: (StatsSnapshot field, metric name without namespace, unit, help) of the counters
_COUNTERS: tuple[tuple[str, str, str, str], ...] = (
    ("checkouts", "checkouts", "", "Connections handed out by the partition's pool."),
    ("checkins", "checkins", "", "Connections returned to the partition's pool."),
    ("connections_opened", "connections_opened", "", "Connections opened to the partition."),
    ("connections_closed", "connections_closed", "", "Connections to the partition closed."),
    ("connect_errors", "connect_errors", "", "Failed attempts to open a connection."),
    (
        "connections_lost",
        "connections_lost",
        "",
        "Connections found broken: invalidated, or dead when returned.",
    ),
    (
        "timeouts",
        "checkout_timeouts",
        "",
        "Checkouts that gave up after waiting `timeout` seconds (PoolTimeout).",
    ),
    (
        "exhausted",
        "pool_exhausted",
        "",
        "Checkouts rejected at once because max_waiting callers were waiting (PoolExhausted).",
    ),
    (
        "leaks",
        "suspected_leaks",
        "",
        "Checkouts held longer than leak_threshold (counted once per checkout).",
    ),
    (
        "use_time_total",
        "connection_use_seconds",
        "seconds",
        "Time connections spent checked out, summed over checkins.",
    ),
)

# A partition serves checkouts while up or suspect; while down or recovering
# they fail fast with PartitionUnavailable.
_SERVING = frozenset({PartitionState.UP.value, PartitionState.SUSPECT.value})


class PartpoolCollector(Collector):
    """A ``prometheus_client`` collector for one :class:`.ShardedEngine`.

    :meth:`collect` calls :meth:`.ShardedEngine.health` once per scrape and
    turns it into gauges, counters and the checkout-wait histogram, each with a
    ``partition`` label (see ``docs/metrics.md`` for the list).

    :param sharded: the engine to report on.  The collector keeps a reference
      to it; :func:`unregister` the collector when the engine is disposed for good.
    :param namespace: the prefix of every metric name, ``partpool`` by
      default.  Two engines in one registry need different namespaces (or
      registries), since a registry refuses two collectors of the same names.
    :param wait_buckets: the ``le`` bounds of ``<namespace>_checkout_wait_seconds``,
      a subset of :data:`HISTOGRAM_BOUNDS` (the pool counts waits in those
      buckets, so only they give exact counts).  Default all of them, one
      series each per partition, plus ``+Inf``; fewer keep a large
      deployment's series count down, e.g. ``[0.0, 2**-10, 2**-7, 2**-4, 0.5, 4.0, 32.0]``.
    :raises ValueError: if *namespace* is not a valid Prometheus metric name,
      or a bound is not one of :data:`HISTOGRAM_BOUNDS`.
    """

    def __init__(
        self,
        sharded: ShardedEngine,
        namespace: str = "partpool",
        *,
        wait_buckets: Iterable[float] | None = None,
    ) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(
                f"namespace {namespace!r} is not a valid Prometheus metric name prefix; "
                "use letters, digits and underscores, not starting with a digit"
            )
        bounds = HISTOGRAM_BOUNDS if wait_buckets is None else sorted(set(wait_buckets))
        unknown = [b for b in bounds if b not in HISTOGRAM_BOUNDS]
        if unknown:
            raise ValueError(
                f"wait_buckets {unknown} are not bounds of the pool's wait histogram; "
                "choose among sqlalchemy_partpool.metrics.prometheus.HISTOGRAM_BOUNDS "
                f"(0.0, then powers of two from {HISTOGRAM_BOUNDS[1]!r} "
                f"to {HISTOGRAM_BOUNDS[-1]!r})"
            )
        self.sharded = sharded
        self.namespace = namespace
        # (index into the pool's histogram, le label); the set never changes
        # between scrapes, as histogram_quantile() needs
        self._bounds = tuple((HISTOGRAM_BOUNDS.index(b), repr(float(b))) for b in bounds)

    def describe(self) -> list[Metric]:
        """The metric families without samples, so a registry can check names cheaply."""
        return self._families({})

    def collect(self) -> list[Metric]:
        """The metric families with one sample set per partition, read now."""
        partitions: Mapping[str, Mapping[str, Any]] = self.sharded.health()["partitions"]
        return self._families(partitions)

    def _families(self, partitions: Mapping[str, Mapping[str, Any]]) -> list[Metric]:
        ns = self.namespace
        part = ["partition"]
        connections = GaugeMetricFamily(
            f"{ns}_connections",
            "Connections to the partition by state: idle in the pool, in_use (checked out), "
            "connecting (being opened).",
            labels=["partition", "state"],
        )
        minimum = GaugeMetricFamily(
            f"{ns}_connections_min",
            "min_connections: connections the pool keeps open.",
            labels=part,
        )
        maximum = GaugeMetricFamily(
            f"{ns}_connections_max",
            "max_connections: the ceiling on open connections.",
            labels=part,
        )
        waiting = GaugeMetricFamily(
            f"{ns}_waiting_requests",
            "Callers waiting for a connection now.",
            labels=part,
        )
        up = GaugeMetricFamily(
            f"{ns}_partition_up",
            "1 while the partition serves checkouts (state up or suspect), "
            "0 while they fail fast (down or recovering).",
            labels=part,
        )
        state = GaugeMetricFamily(
            f"{ns}_partition_state",
            "The partition's health state: 1 for the current one, 0 for the others.",
            labels=["partition", "state"],
        )
        failures = GaugeMetricFamily(
            f"{ns}_consecutive_connect_failures",
            "Connection attempts failed in a row; down_after of them mark the partition down.",
            labels=part,
        )
        counters = [
            (field, CounterMetricFamily(f"{ns}_{name}", doc, labels=part, unit=unit))
            for field, name, unit, doc in _COUNTERS
        ]
        wait = HistogramMetricFamily(
            f"{ns}_checkout_wait_seconds",
            "Time checkouts waited for a connection (0 when one was idle).",
            labels=part,
            unit="seconds",
        )
        for name, entry in partitions.items():
            stats: Mapping[str, Any] = entry["stats"]
            current = entry["state"]
            connections.add_metric([name, "idle"], stats["idle"])
            connections.add_metric([name, "in_use"], stats["checked_out"])
            connections.add_metric([name, "connecting"], stats["connecting"])
            minimum.add_metric([name], stats["min_connections"])
            maximum.add_metric([name], stats["max_connections"])
            waiting.add_metric([name], stats["waiting"])
            up.add_metric([name], 1.0 if current in _SERVING else 0.0)
            for member in PartitionState:
                state.add_metric([name, member.value], 1.0 if member.value == current else 0.0)
            failures.add_metric([name], entry["consecutive_failures"])
            for field, family in counters:
                family.add_metric([name], stats[field])
            wait.add_metric(
                [name], self._buckets(stats["wait_histogram"]), stats["wait_time_total"]
            )
        return [
            connections,
            minimum,
            maximum,
            waiting,
            up,
            state,
            failures,
            *(family for _, family in counters),
            wait,
        ]

    def _buckets(self, histogram: Sequence[int]) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs from the pool's per-bucket counts, ``+Inf`` last."""
        cumulative = list(accumulate(histogram))
        total = cumulative[-1] if cumulative else 0
        buckets: list[tuple[str, float]] = [
            (le, cumulative[index] if index < len(cumulative) else total)
            for index, le in self._bounds
        ]
        buckets.append(("+Inf", total))
        return buckets

    def __repr__(self) -> str:
        return f"<PartpoolCollector namespace={self.namespace!r} {self.sharded!r}>"


def register(
    sharded: ShardedEngine,
    registry: CollectorRegistry = REGISTRY,
    *,
    namespace: str = "partpool",
    wait_buckets: Iterable[float] | None = None,
) -> PartpoolCollector:
    """Create a :class:`PartpoolCollector` for *sharded* and register it.

    :param sharded: the engine to report on.
    :param registry: where to register; ``prometheus_client``'s default
      ``REGISTRY``, which ``start_http_server`` and ``generate_latest`` serve
      unless told otherwise.
    :param namespace: the prefix of every metric name (see :class:`PartpoolCollector`).
    :param wait_buckets: the checkout-wait histogram's bounds (see
      :class:`PartpoolCollector`); default all of :data:`HISTOGRAM_BOUNDS`.
    :returns: the collector, to pass to :func:`unregister`.
    :raises ValueError: if *registry* already has metrics of these names (a
      second engine needs another *namespace*), or an argument is invalid.
    """
    collector = PartpoolCollector(sharded, namespace, wait_buckets=wait_buckets)
    registry.register(collector)
    return collector


def unregister(collector: PartpoolCollector, registry: CollectorRegistry = REGISTRY) -> None:
    """Remove *collector* from *registry*; its metrics vanish from the next scrape.

    :param collector: what :func:`register` returned.
    :param registry: the registry it was registered with.
    :raises KeyError: if *collector* is not registered there.
    """
    registry.unregister(collector)
