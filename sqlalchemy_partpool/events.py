"""Events of a :class:`.ShardedEngine`, registered the SQLAlchemy way.

::

    from sqlalchemy import event

    @event.listens_for(sharded, "partition_down")
    def page_someone(ev):
        alert(f"{ev.partition} is down: {ev.error}")

    event.listen(sharded, "checkout_timeout", lambda ev: log.warning("%s", ev.detail))

Every listener receives one :class:`PartitionEvent`, which names the
partition, carries a statistics snapshot of its pool and, where there is one,
a password-free description of the error.  Listeners run in the thread where
the event happened (a caller's, or a background thread's for ``partition_down``
found by the prober, ``leak_suspected`` and ``health_check``): keep them quick.

SQLAlchemy's own pool events (``connect``, ``checkout``, ``checkin``,
``invalidate``...) keep working on each partition's engine as usual
(``event.listen(sharded.engine("p0"), "checkout", fn)``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event

from .engine import ShardedEngine
from .stats import StatsSnapshot

__all__ = ["PartitionEvent", "ShardedEngineEvents"]


@dataclass(frozen=True)
class PartitionEvent:
    """What a listener receives.

    :ivar name: the event name, e.g. ``"checkout_timeout"``.
    :ivar partition: the partition it concerns.
    :ivar stats: the partition pool's figures when the event happened.
    :ivar error: a one-line, password-free description of the error, if any.
    :ivar state: the partition's health state (``up``, ``suspect``, ``down``,
      ``recovering``) when the event happened.
    :ivar detail: event-specific figures (see each event).
    :ivar time: ``time.time()`` of the event.
    """

    name: str
    partition: str
    stats: StatsSnapshot | None
    error: str | None = None
    state: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        """The event as a JSON-serialisable dict."""
        return {
            "name": self.name,
            "partition": self.partition,
            "stats": self.stats.as_dict() if self.stats is not None else None,
            "error": self.error,
            "state": self.state,
            "detail": dict(self.detail),
            "time": self.time,
        }


class ShardedEngineEvents(event.Events[ShardedEngine]):
    """Events a :class:`.ShardedEngine` emits.

    Register with ``event.listen(sharded, "<name>", fn)`` or
    ``@event.listens_for(sharded, "<name>")``; ``fn(ev)`` gets a :class:`PartitionEvent`.
    """

    _target_class_doc = "SomeShardedEngine"
    _dispatch_target = ShardedEngine

    def connect(self, ev: PartitionEvent) -> None:
        """A new DBAPI connection was opened for a partition.

        ``detail``: ``connect_time`` (seconds).
        """

    def checkout(self, ev: PartitionEvent) -> None:
        """A connection was checked out of a partition's pool.

        ``detail``: ``waited`` (seconds spent waiting for it, 0 if none).
        Emitted on the hot path: the statistics snapshot is only built when a
        listener is registered, and costs a few microseconds then.
        """

    def checkin(self, ev: PartitionEvent) -> None:
        """A connection was returned to a partition's pool.

        ``detail``: ``used`` (seconds it was checked out).
        """

    def checkout_timeout(self, ev: PartitionEvent) -> None:
        """A checkout gave up after ``timeout`` and raised :class:`.PoolTimeout`.

        ``detail``: ``timeout``, ``waited`` (seconds), ``max_connections``, ``in_use``.
        """

    def pool_exhausted(self, ev: PartitionEvent) -> None:
        """A checkout was rejected at once because ``max_waiting`` callers were waiting.

        Raised to the caller as :class:`.PoolExhausted`.  ``detail``:
        ``waiting``, ``max_waiting``.
        """

    def invalidate(self, ev: PartitionEvent) -> None:
        """A connection was found broken and closed (a disconnect, a failed ping).

        ``error`` describes why.
        """

    def partition_down(self, ev: PartitionEvent) -> None:
        """A partition was marked down after repeated connect failures.

        From now on its checkouts fail at once with :class:`.PartitionUnavailable`
        while a background prober retries.  ``detail``: ``failures``.
        """

    def partition_up(self, ev: PartitionEvent) -> None:
        """A partition that was down answers again and is back in service.

        Connections opened before the outage have been discarded.
        ``detail``: ``downtime`` (seconds).
        """

    def leak_suspected(self, ev: PartitionEvent) -> None:
        """A connection has been checked out longer than ``leak_threshold``.

        ``detail``: ``held`` (seconds so far), ``stack`` (where it was checked
        out, formatted), ``thread`` (name of the thread that took it).
        Reported once per checkout.
        """

    def health_check(self, ev: PartitionEvent) -> None:
        """The result of a health check (the prober's, or :meth:`.ShardedEngine.check_health`).

        ``detail``: ``ok`` (bool), ``latency`` (seconds), ``source``
        (``"prober"`` or ``"check"``).
        """
