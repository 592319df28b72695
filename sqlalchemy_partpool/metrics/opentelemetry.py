"""OpenTelemetry metrics of a :class:`.ShardedEngine`, named after the semantic conventions.

::

    from sqlalchemy_partpool.metrics import opentelemetry as partpool_otel

    handle = partpool_otel.instrument(sharded)  # the global MeterProvider by default
    ...
    handle.uninstrument()

Instruments follow the OpenTelemetry semantic conventions for database client
connection pools (``db.client.connection.*``); each partition is one pool,
named by the ``db.client.connection.pool.name`` attribute.

* Pool figures (``count``, ``idle.min``, ``max``, ``pending_requests``,
  ``timeouts``) are observable instruments read from
  :meth:`.ShardedEngine.stats` when the SDK collects: nothing on the checkout path.
* The ``wait_time``, ``use_time`` and ``create_time`` histograms are recorded
  from the engine's ``checkout``, ``checkin`` and ``connect`` events.  While
  instrumented, every checkout and checkin therefore costs an event dispatch
  and a statistics snapshot (a few microseconds).

Only ``opentelemetry-api`` is needed at run time
(``pip install 'sqlalchemy-partpool[opentelemetry]'``); the application
configures the SDK and exporters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

try:
    from opentelemetry.metrics import (
        CallbackOptions,
        Meter,
        MeterProvider,
        Observation,
        get_meter,
    )
except ImportError as exc:
    raise ImportError(
        "sqlalchemy_partpool.metrics.opentelemetry needs opentelemetry-api; "
        "install it with: pip install 'sqlalchemy-partpool[opentelemetry]'"
    ) from exc

from sqlalchemy import event

from .. import __version__
from ..engine import ShardedEngine
from ..events import PartitionEvent
from ..stats import StatsSnapshot

__all__ = [
    "CONNECTION_POOL_NAME",
    "CONNECTION_STATE",
    "Instrumentation",
    "instrument",
]

#: attribute naming the pool (here: the partition) of a data point
CONNECTION_POOL_NAME = "db.client.connection.pool.name"
#: attribute of ``db.client.connection.count``: ``idle`` or ``used``
CONNECTION_STATE = "db.client.connection.state"

# Explicit bucket boundaries, in seconds: the SDK's default boundaries are
# meant for milliseconds and would put nearly every pool timing in one bucket.
# 0.0 is a boundary of its own for wait time: most checkouts find an idle
# connection and do not wait at all.
WAIT_TIME_BUCKETS: tuple[float, ...] = (
    0.0,
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
)
USE_TIME_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    60.0,
    300.0,
)
CREATE_TIME_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    5.0,
    10.0,
)

_Callback = Callable[[CallbackOptions], Iterable[Observation]]


class Instrumentation:
    """The instruments of one :class:`.ShardedEngine`; returned by :func:`instrument`.

    :param sharded: the engine to report on.
    :param meter: the meter to create the instruments with.
    :param pool_name_prefix: prepended to each partition name to make
      ``db.client.connection.pool.name``; see :func:`instrument`.
    """

    def __init__(self, sharded: ShardedEngine, meter: Meter, pool_name_prefix: str = "") -> None:
        self.sharded = sharded
        self._attributes = {
            name: {CONNECTION_POOL_NAME: f"{pool_name_prefix}{name}"} for name in sharded.partitions
        }
        self._lock = threading.Lock()
        self._active = True

        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._observe_count],
            unit="{connection}",
            description="The number of connections that are currently in the state "
            "described by the db.client.connection.state attribute.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.min",
            callbacks=[self._observer(lambda s: s.min_connections)],
            unit="{connection}",
            description="The minimum number of open connections the pool keeps (min_connections).",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[self._observer(lambda s: s.max_connections)],
            unit="{connection}",
            description="The maximum number of open connections allowed (max_connections).",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._observer(lambda s: s.waiting)],
            unit="{request}",
            description="The number of current pending requests for an open connection.",
        )
        meter.create_observable_counter(
            "db.client.connection.timeouts",
            callbacks=[self._observer(lambda s: s.timeouts)],
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )
        self._wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool.",
            explicit_bucket_boundaries_advisory=WAIT_TIME_BUCKETS,
        )
        self._use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it to the pool.",
            explicit_bucket_boundaries_advisory=USE_TIME_BUCKETS,
        )
        self._create_time = meter.create_histogram(
            "db.client.connection.create_time",
            unit="s",
            description="The time it took to create a new connection.",
            explicit_bucket_boundaries_advisory=CREATE_TIME_BUCKETS,
        )
        self._listeners: tuple[tuple[str, Callable[[PartitionEvent], None]], ...] = (
            ("checkout", self._on_checkout),
            ("checkin", self._on_checkin),
            ("connect", self._on_connect),
        )
        for name, listener in self._listeners:
            event.listen(sharded, name, listener)

    @property
    def active(self) -> bool:
        """True until :meth:`uninstrument` is called."""
        return self._active

    def uninstrument(self) -> None:
        """Stop reporting: remove the event listeners and silence the observable instruments.

        OpenTelemetry has no way to delete an instrument, so the observable
        ones stay registered with the meter but report nothing from now on.
        Safe to call twice.
        """
        with self._lock:
            if not self._active:
                return
            self._active = False
        for name, listener in self._listeners:
            if event.contains(self.sharded, name, listener):
                event.remove(self.sharded, name, listener)

    # -- observable instruments: read at collection time ------------------------------

    def _snapshots(self) -> Iterable[tuple[dict[str, str], StatsSnapshot]]:
        if not self._active:
            return ()
        return [(self._attributes[name], s) for name, s in self.sharded.stats().items()]

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for attributes, s in self._snapshots():
            # connections being opened are neither idle nor used: not counted
            observations.append(Observation(s.idle, {**attributes, CONNECTION_STATE: "idle"}))
            observations.append(
                Observation(s.checked_out, {**attributes, CONNECTION_STATE: "used"})
            )
        return observations

    def _observer(self, read: Callable[[StatsSnapshot], int]) -> _Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read(s), attributes) for attributes, s in self._snapshots()]

        return observe

    # -- histograms: recorded from the engine's events ------------------------------------

    def _on_checkout(self, ev: PartitionEvent) -> None:
        self._wait_time.record(ev.detail["waited"], self._attributes[ev.partition])

    def _on_checkin(self, ev: PartitionEvent) -> None:
        self._use_time.record(ev.detail["used"], self._attributes[ev.partition])

    def _on_connect(self, ev: PartitionEvent) -> None:
        self._create_time.record(ev.detail["connect_time"], self._attributes[ev.partition])

    def __repr__(self) -> str:
        state = "active" if self._active else "uninstrumented"
        return f"<Instrumentation {state} {self.sharded!r}>"


def instrument(
    sharded: ShardedEngine,
    meter_provider: MeterProvider | None = None,
    *,
    pool_name_prefix: str = "",
) -> Instrumentation:
    """Create OpenTelemetry instruments reporting on every partition of *sharded*.

    Creates the observable ``db.client.connection.count`` (by
    ``db.client.connection.state``: ``idle``/``used``), ``.idle.min``,
    ``.max``, ``.pending_requests`` and ``.timeouts``, and the histograms
    ``.wait_time``, ``.use_time`` and ``.create_time`` (seconds), every data
    point with ``db.client.connection.pool.name`` set to the partition.

    :param sharded: the engine to report on.
    :param meter_provider: where to create the meter; default the global
      provider (``opentelemetry.metrics.set_meter_provider``), as
      OpenTelemetry instrumentations do.
    :param pool_name_prefix: prepended to partition names in
      ``db.client.connection.pool.name``, e.g. ``"orders/"``; the convention
      wants pool names unique within the application, which partition names
      alone are not when it has several engines.  Default none.
    :returns: the handle; call :meth:`Instrumentation.uninstrument` to stop.
    """
    meter = get_meter("sqlalchemy_partpool", __version__, meter_provider=meter_provider)
    return Instrumentation(sharded, meter, pool_name_prefix)
