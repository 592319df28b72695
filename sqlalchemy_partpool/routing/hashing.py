"""HashRouter: stable hash -> bucket -> partition, and minimal-move rebalancing."""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, UnknownPartition
from .base import Router, _check_int, _check_names
from .keys import _INT_HEADERS, _blake2b, _short_repr, encode_key, stable_hash

# The logger keeps the name it had before routing became a package, so logging
# configuration that names "sqlalchemy_partpool.routing" still applies.
log = logging.getLogger("sqlalchemy_partpool.routing")


@dataclass(frozen=True)
class BucketMove:
    """One bucket changing partition during :meth:`HashRouter.rebalance`.

    The rows whose shard keys fall in ``bucket`` must be moved from
    ``source`` to ``target`` before the new router goes live.

    :ivar bucket: the bucket number.
    :ivar source: the partition that holds the bucket now.
    :ivar target: the partition that holds it after the rebalance.
    """

    bucket: int
    source: str
    target: str


class HashRouter(Router):
    """Routes by a stable hash of the key into buckets, and buckets to partitions.

    ``bucket = stable_hash(key) % buckets``; the assignment table says which
    partition owns each bucket.  Keeping many more buckets than partitions lets
    :meth:`rebalance` add or remove partitions by moving whole buckets, so
    only the keys of moved buckets change partition.

    :param partitions: the partition names, in a stable order.
    :param buckets: the number of buckets.  The default, 1024, allows up to
        1024 partitions, and partitions' shares differ by at most one bucket
        (0.1% of the keys).  It can never change without re-routing nearly
        every key.
    :param assignment: who owns each bucket: a sequence of ``buckets``
        partition names (index = bucket), or a mapping bucket -> name that
        covers every bucket.  Default: bucket ``i`` belongs to
        ``partitions[i % len(partitions)]``.  A partition that owns no bucket
        is allowed (it is being filled or drained).
    :raises ConfigurationError: ``partitions`` is empty or has duplicates,
        ``buckets`` is below 1 or below the number of partitions, or the
        assignment names an unknown partition, misses buckets, or names a
        bucket that does not exist.
    """

    __slots__ = ("_buckets", "_custom", "_partitions", "_table")

    def __init__(
        self,
        partitions: Sequence[str],
        *,
        buckets: int = 1024,
        assignment: Sequence[str] | Mapping[int, str] | None = None,
    ) -> None:
        self._partitions = _check_names(partitions)
        self._buckets = _check_int(buckets, "buckets", 1)
        if self._buckets < len(self._partitions):
            raise ConfigurationError(
                f"buckets={self._buckets} is less than the {len(self._partitions)} partitions; "
                "raise buckets so that every partition can own at least one",
                option="buckets",
            )
        if assignment is None:
            n = len(self._partitions)
            self._table = tuple(self._partitions[i % n] for i in range(self._buckets))
            self._custom = False
        else:
            self._table = self._check_assignment(assignment)
            self._custom = self._table != tuple(
                self._partitions[i % len(self._partitions)] for i in range(self._buckets)
            )

    def _check_assignment(self, assignment: Sequence[str] | Mapping[int, str]) -> tuple[str, ...]:
        known = set(self._partitions)
        if isinstance(assignment, Mapping):
            table: list[str | None] = [None] * self._buckets
            for bucket, name in assignment.items():
                if isinstance(bucket, bool) or not isinstance(bucket, int):
                    raise ConfigurationError(
                        f"assignment keys must be bucket numbers, found {_short_repr(bucket)}",
                        option="assignment",
                    )
                if not 0 <= bucket < self._buckets:
                    raise ConfigurationError(
                        f"assignment names bucket {bucket}, but buckets run from 0 to "
                        f"{self._buckets - 1}",
                        option="assignment",
                    )
                table[bucket] = name
            missing = [i for i, name in enumerate(table) if name is None]
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
                raise ConfigurationError(
                    f"assignment leaves {len(missing)} of {self._buckets} buckets without a "
                    f"partition ({shown}); assign every bucket",
                    option="assignment",
                )
            names: Sequence[Any] = table
        elif isinstance(assignment, (str, bytes)) or not isinstance(assignment, Sequence):
            raise ConfigurationError(
                "assignment must be a sequence of partition names or a mapping "
                f"bucket -> partition, not {_short_repr(assignment)}",
                option="assignment",
            )
        else:
            names = assignment
            if len(names) != self._buckets:
                raise ConfigurationError(
                    f"assignment has {len(names)} entries but there are {self._buckets} "
                    "buckets; give one partition name per bucket",
                    option="assignment",
                )
        for bucket, name in enumerate(names):
            if name not in known:
                raise ConfigurationError(
                    f"assignment gives bucket {bucket} to unknown partition {name!r}; "
                    f"partitions are {', '.join(map(repr, self._partitions))}",
                    option="assignment",
                )
        return tuple(names)

    @property
    def partitions(self) -> tuple[str, ...]:
        """The partition names, in the order given."""
        return self._partitions

    @property
    def buckets(self) -> int:
        """The number of buckets."""
        return self._buckets

    @property
    def assignment(self) -> tuple[str, ...]:
        """The owner of each bucket (index = bucket number); persist it after a rebalance."""
        return self._table

    def route(self, key: Any) -> str:
        """Return the partition that owns the key's bucket.

        :param key: a shard key (see :func:`encode_key`).
        :raises ShardKeyMissing: ``key`` is ``None``.
        :raises RoutingError: ``key`` has an unsupported type.
        """
        # Inlined encode_key for the two common key types: this runs for
        # every statement, and the general path costs about twice as much.
        kind = type(key)
        try:
            if kind is int:
                size = (key.bit_length() + 8) >> 3
                data = _INT_HEADERS[size] + key.to_bytes(size, "big", signed=True)
            elif kind is str:
                raw = key.encode()
                data = b"s" + len(raw).to_bytes(4, "big") + raw
            else:
                data = encode_key(key)
        except (IndexError, OverflowError, UnicodeEncodeError):
            data = encode_key(key)
        digest = _blake2b(data, digest_size=8).digest()
        return self._table[int.from_bytes(digest, "big") % self._buckets]

    def bucket_for(self, key: Any) -> int:
        """Return the bucket that ``key`` falls in.

        :param key: a shard key (see :func:`encode_key`).
        :raises ShardKeyMissing: ``key`` is ``None``.
        :raises RoutingError: ``key`` has an unsupported type.
        """
        return stable_hash(key) % self._buckets

    def buckets_of(self, partition: str) -> list[int]:
        """Return the buckets that ``partition`` owns, in increasing order.

        :param partition: a partition name.
        :raises UnknownPartition: ``partition`` is not one of :attr:`partitions`.
        """
        if partition not in self._partitions:
            raise UnknownPartition(partition, self._partitions)
        return [bucket for bucket, owner in enumerate(self._table) if owner == partition]

    def rebalance(self, new_partitions: Sequence[str]) -> tuple[HashRouter, list[BucketMove]]:
        """Plan a move to ``new_partitions``, moving as few whole buckets as possible.

        Every partition ends up with ``buckets // n`` or ``buckets // n + 1``
        buckets.  Buckets of removed partitions always move; beyond that a
        partition gives up buckets only if it has more than its share, and the
        +1 shares go first to the partitions that already hold the most, so
        the number of moves is the minimum possible.  Adding partitions moves
        buckets only from old to new partitions; removing partitions (from a
        balanced assignment) moves only the removed partitions' buckets.  A
        donor gives up its highest-numbered buckets, and receivers are filled
        in the order of ``new_partitions`` from the lowest released bucket up,
        so the plan is deterministic.

        :param new_partitions: the partitions after the change, in order.
        :returns: the new router (same number of buckets) and the moves,
            sorted by bucket.  This router is not modified.
        :raises ConfigurationError: ``new_partitions`` is empty, has
            duplicates, or has more entries than there are buckets.
        """
        new = _check_names(new_partitions, "new_partitions")
        total = self._buckets
        if total < len(new):
            raise ConfigurationError(
                f"cannot spread {total} buckets over {len(new)} partitions; a HashRouter's "
                "bucket count is fixed, so build it with more buckets up front",
                option="new_partitions",
            )
        owned: dict[str, list[int]] = {name: [] for name in new}
        released: list[int] = []
        for bucket, owner in enumerate(self._table):
            mine = owned.get(owner)
            if mine is None:
                released.append(bucket)
            else:
                mine.append(bucket)

        share, extra = divmod(total, len(new))
        position = {name: i for i, name in enumerate(new)}

        def priority(name: str) -> tuple[int, int, int]:
            count = len(owned[name])
            # Those above the base share keep a +1 slot first (each such slot
            # saves a move); among the rest the slot goes to the emptiest, so
            # that adding partitions never moves a bucket into an old one.
            if count > share:
                return (0, -count, position[name])
            return (1, count, position[name])

        target = {
            name: share + (rank < extra) for rank, name in enumerate(sorted(new, key=priority))
        }
        for name in new:
            excess = len(owned[name]) - target[name]
            if excess > 0:
                released.extend(owned[name][-excess:])
                del owned[name][-excess:]
        released.sort()

        table = list(self._table)
        moves: list[BucketMove] = []
        free = iter(released)
        for name in new:
            for _ in range(target[name] - len(owned[name])):
                bucket = next(free)
                moves.append(BucketMove(bucket, table[bucket], name))
                table[bucket] = name
        moves.sort(key=operator.attrgetter("bucket"))
        log.info(
            "rebalance %d buckets from %d to %d partitions: %d buckets move",
            total,
            len(self._partitions),
            len(new),
            len(moves),
        )
        return HashRouter(new, buckets=total, assignment=table), moves

    def describe(self) -> dict[str, Any]:
        """Describe the router as a ``hash`` strategy table (see :class:`Router`)."""
        result: dict[str, Any] = {
            "strategy": "hash",
            "partitions": list(self._partitions),
            "buckets": self._buckets,
        }
        if self._custom:
            result["assignment"] = list(self._table)
        return result
