"""Globally unique 64-bit ids that carry their hash bucket, so an id alone routes.

With a :class:`.HashRouter`, a shard key hashes to one of ``buckets``
buckets, and buckets are assigned to partitions.  :class:`IdGenerator` makes
ids in the bucket of a shard key::

    ids = IdGenerator(sharded.router)
    order_id = ids.new_id(key=tenant_id)      # lives on tenant_id's partition
    ids.partition_of(order_id)                # == sharded.partition_for(tenant_id)

so ``session.get(Order, order_id)`` goes straight to one partition, even if
buckets later move between partitions (the bucket, not the partition, is in
the id).

Layout, most significant bit first (63 bits, always positive)::

    | milliseconds since 2025-01-01 (41 bits, ~69 years) | bucket | worker | sequence |

``bucket`` takes as many bits as the router's buckets need (10 for 1024);
``worker`` (default 5 bits) separates processes; ``sequence`` fills the rest
(8 bits with the defaults: 256 ids per millisecond per worker and bucket; the
generator waits for the next millisecond when they run out).  Ids from one
generator increase over time.  Give every process a distinct ``worker_id``
(e.g. from the pod ordinal); without one, a random worker id is picked, and
two processes colliding on it *and* on the same millisecond, bucket and
sequence would produce the same id.
"""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, RoutingError

if TYPE_CHECKING:
    from .routing import HashRouter

__all__ = ["EPOCH_MS", "ID_GENERATOR_INFO", "IdGenerator"]

#: Key of ``Column.info`` under which a column's :class:`IdGenerator` is kept.
ID_GENERATOR_INFO = "partpool_ids"
#: 2025-01-01T00:00:00Z in Unix milliseconds.
EPOCH_MS = 1_735_689_600_000
_TIME_BITS = 41
_TOTAL_BITS = 63


class IdGenerator:
    """Make 64-bit ids that encode the hash bucket of a shard key.

    :param router: the :class:`.HashRouter` whose buckets the ids carry.
    :param worker_id: this process's number, ``0 <= worker_id < 2**worker_bits``;
      default random.
    :param worker_bits: bits for the worker id (default 5: 32 workers).
    :raises ConfigurationError: if the layout does not fit in 63 bits.
    """

    def __init__(
        self, router: HashRouter, *, worker_id: int | None = None, worker_bits: int = 5
    ) -> None:
        from .routing import HashRouter

        if not isinstance(router, HashRouter):
            raise ConfigurationError(
                "IdGenerator needs a HashRouter (ids carry its hash bucket); got "
                f"{type(router).__name__}"
            )
        self.router = router
        self.bucket_bits = max(1, (router.buckets - 1).bit_length())
        self.worker_bits = worker_bits
        self.sequence_bits = _TOTAL_BITS - _TIME_BITS - self.bucket_bits - worker_bits
        if self.sequence_bits < 4:
            raise ConfigurationError(
                f"{router.buckets} buckets and {worker_bits} worker bits leave "
                f"{self.sequence_bits} sequence bits; use fewer buckets or worker bits"
            )
        limit = 1 << worker_bits
        if worker_id is None:
            worker_id = random.randrange(limit)
        if not 0 <= worker_id < limit:
            raise ConfigurationError(f"worker_id must be in [0, {limit}), got {worker_id}")
        self.worker_id = worker_id
        self._lock = threading.Lock()
        self._last_ms = -1
        self._sequences: dict[int, int] = {}

    def bucket_of(self, id_: int) -> int:
        """The bucket encoded in *id_*."""
        return (id_ >> (self.worker_bits + self.sequence_bits)) & ((1 << self.bucket_bits) - 1)

    def partition_of(self, id_: int) -> str:
        """The partition that holds ids of *id_*'s bucket now."""
        bucket = self.bucket_of(id_)
        if bucket >= self.router.buckets:
            raise RoutingError(f"id {id_} does not carry a bucket of this router")
        return self.router.assignment[bucket]

    def timestamp_of(self, id_: int) -> float:
        """When *id_* was made (Unix seconds)."""
        return ((id_ >> (_TOTAL_BITS - _TIME_BITS)) + EPOCH_MS) / 1000.0

    def new_id(self, *, key: Any = None, bucket: int | None = None) -> int:
        """A new id in the bucket of shard key *key* (or the given *bucket*)."""
        if bucket is None:
            if key is None:
                raise RoutingError("new_id() needs the shard key (key=...) or a bucket")
            bucket = self.router.bucket_for(key)
        with self._lock:
            now = int(time.time() * 1000) - EPOCH_MS
            now = max(now, self._last_ms)  # the clock went back: stay monotonic
            if now != self._last_ms:
                self._sequences.clear()
                self._last_ms = now
            sequence = self._sequences.get(bucket, 0)
            if sequence >= 1 << self.sequence_bits:
                # this millisecond is used up for the bucket: wait for the next
                while now <= self._last_ms:
                    time.sleep(0.0002)
                    now = int(time.time() * 1000) - EPOCH_MS
                self._sequences.clear()
                self._last_ms = now
                sequence = 0
            self._sequences[bucket] = sequence + 1
        return (
            (now << (_TOTAL_BITS - _TIME_BITS))
            | (bucket << (self.worker_bits + self.sequence_bits))
            | (self.worker_id << self.sequence_bits)
            | sequence
        )

    def column_default(self, key_attribute: str) -> Any:
        """A SQLAlchemy column default making an id in the bucket of the row's *key_attribute*."""

        def default(context: Any) -> int:
            params = context.get_current_parameters()
            key = params.get(key_attribute)
            if key is None:
                raise RoutingError(
                    f"cannot make an id: the row has no {key_attribute!r} (its shard key)"
                )
            return self.new_id(key=key)

        return default

    def mapped_column(self, key_attribute: str, **kw: Any) -> Any:
        """A ``BigInteger`` primary key column whose ids carry the bucket of *key_attribute*.

        ::

            class Order(Base):
                __tablename__ = "orders"
                __shard_key__ = "tenant_id"
                id: Mapped[int] = ids.mapped_column("tenant_id")
                tenant_id: Mapped[int]

        The :class:`.ShardedSession` then sends ``session.get(Order, id)`` to the
        one partition holding the id's bucket.  Extra keywords go to
        :func:`sqlalchemy.orm.mapped_column`.
        """
        from sqlalchemy import BigInteger
        from sqlalchemy.orm import mapped_column

        info = dict(kw.pop("info", {}) or {})
        info[ID_GENERATOR_INFO] = self
        kw.setdefault("primary_key", True)
        kw.setdefault("default", self.column_default(key_attribute))
        return mapped_column(BigInteger, info=info, **kw)
