"""Routers: decide which partition holds a shard key.

A :class:`Router` maps a *shard key* (the value that decides where a row lives)
to a *partition* name.  Every strategy here is deterministic across processes,
machines and Python versions: none uses the built-in :func:`hash` (salted per
process by ``PYTHONHASHSEED``), and none depends on the iteration order of a
set.  A release must never silently send a key somewhere else, so the outputs
are pinned by golden vectors in the test suite.

Strategies:

* :class:`HashRouter` -- a stable 64-bit hash of the key picks one of a fixed
  number of buckets; an assignment table maps buckets to partitions, so
  partitions can be added or removed by moving whole buckets
  (:meth:`HashRouter.rebalance`).
* :class:`PgHashRouter` -- the same answer as PostgreSQL's own
  ``PARTITION BY HASH`` (modulus/remainder), computed client-side.
* :class:`RangeRouter` -- ordered boundaries, as ``PARTITION BY RANGE``.
* :class:`LookupRouter` -- an explicit key -> partition table.
* :class:`CallableRouter` -- any function you supply.

:func:`make_router` builds one from configuration (a string, or a table as
loaded from TOML).

The canonical key encoding
--------------------------
:class:`HashRouter` and :class:`LookupRouter` do not hash Python objects; they
hash the bytes of :func:`encode_key`, whose format is a compatibility promise
(changing it would re-route data).  Each value is ``tag (1 byte) + length
(4 bytes, unsigned big-endian) + payload``:

=========================== ====== ===============================================
type                        tag    payload
=========================== ====== ===============================================
``int`` (``__index__``)     ``i``  two's complement, big-endian, in
                                   ``abs(n).bit_length() // 8 + 1`` bytes
``str``                     ``s``  UTF-8 (strict: lone surrogates are rejected)
bytes-like                  ``b``  the bytes as they are (``bytes``,
                                   ``bytearray``, ``memoryview``)
``uuid.UUID``               ``u``  the 16 bytes of ``UUID.bytes`` (RFC 4122 order)
``tuple`` (composite key)   ``t``  the length field holds the number of items,
                                   followed by each item's own encoding
=========================== ====== ===============================================

So ``1``, ``"1"`` and ``b"1"`` differ (different tags), ``(1, 23)`` and
``(12, 3)`` differ (each item carries its length), and ``1 == True`` is not a
trap because ``bool`` is rejected outright.
"""

from __future__ import annotations

import abc
import bisect
import functools
import hashlib
import itertools
import logging
import operator
import struct
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from .errors import (
    ConfigurationError,
    NoPartitionForKey,
    RoutingError,
    ShardKeyMissing,
    UnknownPartition,
)

__all__ = [
    "HASH_PARTITION_SEED",
    "BucketMove",
    "CallableRouter",
    "HashRouter",
    "LookupRouter",
    "PgHashRouter",
    "RangeRouter",
    "RouteFunction",
    "Router",
    "encode_key",
    "make_router",
    "pg_hash",
    "stable_hash",
]

log = logging.getLogger("sqlalchemy_partpool.routing")

K = TypeVar("K")

_SUPPORTED_KEYS: Final = (
    "int, str, bytes (or bytearray, memoryview), uuid.UUID, and tuples of these for composite keys"
)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unsupported(key: Any, supported: str = _SUPPORTED_KEYS) -> RoutingError:
    hint = " (use a tuple for a composite key)" if isinstance(key, list) else ""
    if isinstance(key, bool):
        hint = " (bool is refused because True == 1 would share a partition with 1)"
    return RoutingError(
        f"shard key {_short_repr(key)} has unsupported type {type(key).__name__}{hint}; "
        f"supported shard key types are {supported}"
    )


# ---------------------------------------------------------------------------
# Canonical encoding and the stable hash
# ---------------------------------------------------------------------------

_U32: Final = struct.Struct(">I").pack
_MAX_LEN: Final = 0xFFFFFFFF
# Headers of the ints that fit in 32 bytes, i.e. every int a caller is likely to
# use; route() indexes this instead of packing a length each call.
_INT_HEADERS: Final = tuple(b"i" + _U32(n) for n in range(33))
_blake2b: Final = hashlib.blake2b


def _encode_into(key: Any, out: list[bytes], whole: Any) -> None:
    if key is None:
        if key is whole:
            raise ShardKeyMissing()
        raise ShardKeyMissing(
            f"composite shard key {_short_repr(whole)} has a None part; every part of a "
            "composite key must be set"
        )
    if isinstance(key, str):
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RoutingError(
                f"shard key {_short_repr(key)} is not valid Unicode ({exc.reason}); "
                "it cannot be encoded as UTF-8"
            ) from None
        tag = b"s"
    elif isinstance(key, (bytes, bytearray)):
        raw, tag = bytes(key), b"b"
    elif isinstance(key, memoryview):
        raw, tag = key.tobytes(), b"b"
    elif isinstance(key, uuid.UUID):
        raw, tag = key.bytes, b"u"
    elif isinstance(key, tuple):
        if not key:
            raise RoutingError("an empty tuple is not a shard key; a composite key needs parts")
        out.append(b"t" + _U32(len(key)))
        for part in key:
            _encode_into(part, out, whole)
        return
    elif isinstance(key, bool):
        raise _unsupported(key)
    else:
        try:
            number = operator.index(key)
        except TypeError:
            raise _unsupported(key) from None
        raw = number.to_bytes((number.bit_length() + 8) >> 3, "big", signed=True)
        tag = b"i"
    if len(raw) > _MAX_LEN:
        raise RoutingError(f"shard key of {len(raw)} bytes is too long (limit {_MAX_LEN})")
    out.append(tag + _U32(len(raw)) + raw)


def encode_key(key: Any) -> bytes:
    """Return the canonical byte encoding of a shard key.

    The format (described in this module's docstring and in ``docs/routing.md``)
    is a compatibility promise: it will not change, because a different
    encoding would send existing keys to other partitions.

    :param key: an ``int``, ``str``, ``bytes``/``bytearray``/``memoryview``,
        :class:`uuid.UUID`, or a non-empty tuple of these.
    :raises ShardKeyMissing: the key, or a part of a composite key, is ``None``.
    :raises RoutingError: the key has an unsupported type (``bool``, ``float``,
        ``list``...), or a ``str`` that is not valid Unicode.
    """
    out: list[bytes] = []
    _encode_into(key, out, key)
    return out[0] if len(out) == 1 else b"".join(out)


def stable_hash(key: Any) -> int:
    """Return the stable unsigned 64-bit hash that :class:`HashRouter` uses.

    It is BLAKE2b with an 8-byte digest over :func:`encode_key`, read as a
    big-endian integer: the same on every machine, process and Python version.

    :param key: a shard key; see :func:`encode_key`.
    :raises ShardKeyMissing: the key is ``None``.
    :raises RoutingError: the key has an unsupported type.
    """
    return int.from_bytes(_blake2b(encode_key(key), digest_size=8).digest(), "big")


# ---------------------------------------------------------------------------
# Router base class and shared validation
# ---------------------------------------------------------------------------


class Router(abc.ABC):
    """Maps a shard key to the name of the partition that holds it.

    Subclasses must be deterministic across processes and machines, and
    :meth:`route` must be cheap: it runs for every routed statement.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def partitions(self) -> tuple[str, ...]:
        """Every partition this router can return, in a stable order."""

    @abc.abstractmethod
    def route(self, key: Any) -> str:
        """Return the partition that holds ``key``.

        :param key: the shard key.
        :raises ShardKeyMissing: ``key`` is ``None``.
        :raises RoutingError: ``key`` has a type this router cannot route.
        :raises NoPartitionForKey: no partition covers ``key``.
        """

    def route_many(self, keys: Iterable[K]) -> dict[str, list[K]]:
        """Group keys by the partition that holds them.

        Partitions appear in the order their first key appeared; within a
        group the keys keep their input order, so a caller can pair results up
        with its inputs again.

        :param keys: shard keys, in any iterable.
        :raises ShardKeyMissing: one of the keys is ``None``.
        :raises RoutingError: one of the keys cannot be routed.
        """
        groups: dict[str, list[K]] = {}
        route = self.route
        for key in keys:
            partition = route(key)
            group = groups.get(partition)
            if group is None:
                groups[partition] = [key]
            else:
                group.append(key)
        return groups

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Return a JSON-serialisable description of the strategy and its parameters.

        Where the strategy can be configured from a table, the result is such
        a table: ``make_router(router.describe(), router.partitions)`` rebuilds
        an equivalent router.
        """

    def __repr__(self) -> str:
        parts = []
        for name, value in self.describe().items():
            if name == "strategy":
                continue
            if isinstance(value, (list, dict)) and len(value) > 8:
                shown = f"<{len(value)} items>"
            else:
                shown = _short_repr(value, 200)
            parts.append(f"{name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _check_names(names: Any, option: str = "partitions") -> tuple[str, ...]:
    """Validate a sequence of distinct, non-empty partition names."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise ConfigurationError(
            f"{option} must be a sequence of partition names, not {_short_repr(names)}",
            option=option,
        )
    result = tuple(names)
    if not result:
        raise ConfigurationError(f"{option} is empty; name at least one partition", option=option)
    for name in result:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"{option} must hold non-empty strings, found {_short_repr(name)}", option=option
            )
    dupes = sorted(name for name, count in Counter(result).items() if count > 1)
    if dupes:
        raise ConfigurationError(
            f"{option} names {', '.join(map(repr, dupes))} more than once; "
            "each partition must be listed once",
            option=option,
        )
    return result


def _check_int(value: Any, option: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(
            f"{option} must be an integer, not {_short_repr(value)}", option=option
        )
    if value < minimum:
        raise ConfigurationError(f"{option} must be at least {minimum}, got {value}", option=option)
    return value


# ---------------------------------------------------------------------------
# HashRouter: stable hash -> bucket -> partition
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# PostgreSQL's hash partitioning, ported
# ---------------------------------------------------------------------------
#
# What follows reproduces, bit for bit, what PostgreSQL computes for a row of
# a PARTITION BY HASH table (src/backend/partitioning/partbounds.c,
# compute_partition_hash_value): each non-null key column is hashed with its
# type's "extended" hash support function seeded with HASH_PARTITION_SEED,
# the 64-bit results are folded together with hash_combine64, and the row
# goes to the partition whose (modulus, remainder) has
# row_hash % modulus == remainder.  The hash functions are Bob Jenkins'
# lookup3 as adapted in src/common/hashfn.c, little-endian path.

HASH_PARTITION_SEED: Final = 0x7A5B22367996DCFD
"""The seed PostgreSQL passes to every column hash of a hash-partitioned row
(``src/include/catalog/partition.h``)."""

_M32: Final = 0xFFFFFFFF
_M64: Final = 0xFFFFFFFFFFFFFFFF
_COMBINE: Final = 0x49A0F4DD15E5A8E3
_GOLDEN: Final = 0x9E3779B9 + 3923095  # lookup3's initial value, before adding the length
_LE3: Final = struct.Struct("<3I")


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    # lookup3 mix(); inputs are 32-bit, and masking once per line is enough
    # because only the low 32 bits of (x - y) matter to the xor that follows.
    a = ((a - c) ^ ((c << 4) | (c >> 28))) & _M32
    c = (c + b) & _M32
    b = ((b - a) ^ ((a << 6) | (a >> 26))) & _M32
    a = (a + c) & _M32
    c = ((c - b) ^ ((b << 8) | (b >> 24))) & _M32
    b = (b + a) & _M32
    a = ((a - c) ^ ((c << 16) | (c >> 16))) & _M32
    c = (c + b) & _M32
    b = ((b - a) ^ ((a << 19) | (a >> 13))) & _M32
    a = (a + c) & _M32
    c = ((c - b) ^ ((b << 4) | (b >> 28))) & _M32
    b = (b + a) & _M32
    return a, b, c


def _final64(a: int, b: int, c: int) -> int:
    # lookup3 final(), returning ((uint64) b << 32) | c as the *_extended
    # variants do.
    c = ((c ^ b) - ((b << 14) | (b >> 18))) & _M32
    a = ((a ^ c) - ((c << 11) | (c >> 21))) & _M32
    b = ((b ^ a) - ((a << 25) | (a >> 7))) & _M32
    c = ((c ^ b) - ((b << 16) | (b >> 16))) & _M32
    a = ((a ^ c) - ((c << 4) | (c >> 28))) & _M32
    b = ((b ^ a) - ((a << 14) | (a >> 18))) & _M32
    c = ((c ^ b) - ((b << 24) | (b >> 8))) & _M32
    return (b << 32) | c


@functools.lru_cache(maxsize=512)
def _seeded_state(length: int, seed: int) -> tuple[int, int, int]:
    # The seed is mixed in before any data, so the state after it depends
    # only on (length, seed): worth caching, since the seed is a constant.
    a = b = c = (_GOLDEN + length) & _M32
    if seed:
        a = (a + (seed >> 32)) & _M32
        b = (b + (seed & _M32)) & _M32
        a, b, c = _mix(a, b, c)
    return a, b, c


def _hash_bytes_extended(data: bytes, seed: int) -> int:
    """PostgreSQL's ``hash_bytes_extended`` (``hash_any_extended``) on a little-endian host."""
    length = len(data)
    a, b, c = _seeded_state(length & _M32, seed)
    whole = length - length % 12
    for x, y, z in _LE3.iter_unpack(data[:whole]) if whole else ():
        a, b, c = _mix((a + x) & _M32, (b + y) & _M32, (c + z) & _M32)
    if whole != length:
        # The last 1-11 bytes are read as three little-endian words, zero
        # padded, except that the third word is shifted up one byte: "the
        # lowest byte of c is reserved for the length" (a remnant; the length
        # went into the initial state instead).  The aligned and unaligned
        # C paths agree on a little-endian host; big-endian ones differ, and
        # PostgreSQL's hash partitioning is not portable across them.
        x, y, z = _LE3.unpack(data[whole:].ljust(12, b"\0"))
        a = (a + x) & _M32
        b = (b + y) & _M32
        c = (c + (z << 8)) & _M32
    return _final64(a, b, c)


def _hash_uint32_extended(value: int, seed: int) -> int:
    """PostgreSQL's ``hash_bytes_uint32_extended``: one 32-bit word."""
    a, b, c = _seeded_state(4, seed)
    return _final64((a + value) & _M32, b, c)


def _fold_int8(value: int) -> int:
    # hashint8extended xors the high half into the low half (complemented
    # when negative) so that int2/int4/int8 of equal value hash alike; for
    # any value in int32 range the result is just the low 32 bits.
    low = value & _M32
    high = (value >> 32) & _M32
    return low ^ (high if value >= 0 else high ^ _M32)


# lookup3's state once HASH_PARTITION_SEED is mixed in, for a 4-byte input:
# the starting point of every integer column's hash.
_INT_COLUMN_STATE: Final = _seeded_state(4, HASH_PARTITION_SEED)

_INT_RANGES: Final = {
    "int2": (-(1 << 15), (1 << 15) - 1),
    "int4": (-(1 << 31), (1 << 31) - 1),
    "int8": (-(1 << 63), (1 << 63) - 1),
}
_PG_TYPE_ALIASES: Final = {
    "int": "int8",
    "bigint": "int8",
    "int8": "int8",
    "integer": "int4",
    "int4": "int4",
    "smallint": "int2",
    "int2": "int2",
    "text": "text",
    "varchar": "text",
    "character varying": "text",
    "bytea": "bytea",
    "uuid": "uuid",
}
_PG_SUPPORTED_KEYS: Final = (
    "int (smallint/integer/bigint columns), str (text/varchar), bytes (bytea), "
    "uuid.UUID (uuid), and tuples of these for multi-column keys"
)


def _pg_column_hash(value: Any, kind: str | None, whole: Any) -> int:
    """Hash one non-null column value as its type's extended hash function would."""
    if kind is None:
        if type(value) is int:
            kind = "int8"
        elif isinstance(value, str):
            kind = "text"
        elif isinstance(value, (bytes, bytearray, memoryview)):
            kind = "bytea"
        elif isinstance(value, uuid.UUID):
            kind = "uuid"
        elif isinstance(value, bool) or not hasattr(value, "__index__"):
            raise _unsupported(value, _PG_SUPPORTED_KEYS)
        else:
            kind = "int8"
    if kind == "text":
        if not isinstance(value, str):
            raise RoutingError(
                f"shard key part {_short_repr(value)} is not a str but its column is text"
            )
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RoutingError(
                f"shard key {_short_repr(value)} is not valid Unicode ({exc.reason})"
            ) from None
        if b"\0" in raw:
            raise RoutingError("PostgreSQL text cannot contain NUL characters")
        return _hash_bytes_extended(raw, HASH_PARTITION_SEED)
    if kind == "bytea":
        if isinstance(value, memoryview):
            value = value.tobytes()
        if not isinstance(value, (bytes, bytearray)):
            raise RoutingError(
                f"shard key part {_short_repr(value)} is not bytes but its column is bytea"
            )
        return _hash_bytes_extended(bytes(value), HASH_PARTITION_SEED)
    if kind == "uuid":
        try:
            if isinstance(value, str):
                value = uuid.UUID(value)
            elif isinstance(value, (bytes, bytearray)):
                value = uuid.UUID(bytes=bytes(value))
        except ValueError:
            raise RoutingError(f"shard key part {_short_repr(value)} is not a UUID") from None
        if not isinstance(value, uuid.UUID):
            raise RoutingError(
                f"shard key part {_short_repr(value)} is not a uuid.UUID but its column is uuid"
            )
        return _hash_bytes_extended(value.bytes, HASH_PARTITION_SEED)
    # An integer column of some width.
    if isinstance(value, (bool, str)):
        raise RoutingError(
            f"shard key part {_short_repr(value)} is a {type(value).__name__} but its column "
            f"is {kind}"
        )
    try:
        number = operator.index(value)
    except TypeError:
        raise _unsupported(value, _PG_SUPPORTED_KEYS) from None
    low, high = _INT_RANGES[kind]
    if not low <= number <= high:
        raise RoutingError(
            f"shard key {_short_repr(whole)}: {number} is out of range for a PostgreSQL "
            f"{kind} column ({low} to {high})"
        )
    return _hash_uint32_extended(_fold_int8(number), HASH_PARTITION_SEED)


def _normalise_key_types(key_types: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if key_types is None:
        return None
    listed = [key_types] if isinstance(key_types, str) else list(key_types)
    if not listed:
        raise ConfigurationError("key_types is empty; give one type per key column")
    result = []
    for name in listed:
        kind = _PG_TYPE_ALIASES.get(name.lower().strip()) if isinstance(name, str) else None
        if kind is None:
            raise ConfigurationError(
                f"unknown key type {name!r}; valid key types are "
                f"{', '.join(map(repr, _PG_TYPE_ALIASES))}",
                option="key_types",
            )
        result.append(kind)
    return tuple(result)


def _row_hash(key: Any, kinds: tuple[str, ...] | None) -> int:
    if key is None:
        raise ShardKeyMissing()
    columns = key if isinstance(key, tuple) else (key,)
    if not columns:
        raise RoutingError("an empty tuple is not a shard key; a composite key needs parts")
    if kinds is not None and len(kinds) != len(columns):
        raise RoutingError(
            f"shard key {_short_repr(key)} has {len(columns)} part(s) but the partition key "
            f"has {len(kinds)} column(s) ({', '.join(kinds)})"
        )
    row = 0
    for i, value in enumerate(columns):
        # PostgreSQL skips NULL columns: they leave the row hash unchanged.
        if value is None:
            continue
        if isinstance(value, tuple):
            raise _unsupported(value, _PG_SUPPORTED_KEYS)
        h = _pg_column_hash(value, None if kinds is None else kinds[i], key)
        row ^= (h + _COMBINE + (row << 54) + (row >> 7)) & _M64
    return row


def pg_hash(key: Any, key_types: str | Sequence[str] | None = None) -> int:
    """Return the unsigned 64-bit row hash PostgreSQL computes for a hash-partitioned row.

    A row of a ``PARTITION BY HASH`` table lives in the partition whose
    ``(modulus, remainder)`` satisfies ``pg_hash(key) % modulus == remainder``.
    ``None`` parts of a composite key are skipped, as PostgreSQL skips NULLs.

    :param key: a scalar for a one-column partition key, or a tuple with one
        value per column: ``int``, ``str``, ``bytes``, :class:`uuid.UUID`.
    :param key_types: the column types, one per column (or one string for a
        scalar key): ``"int"``/``"bigint"``, ``"integer"``, ``"smallint"``,
        ``"text"``/``"varchar"``, ``"bytea"``, ``"uuid"``.  Default: inferred
        from the Python values (``int`` -> bigint, ``str`` -> text, ``bytes``
        -> bytea, ``UUID`` -> uuid).  Give it to hash a ``str`` as a uuid, or
        to check that an int fits a narrower column.
    :raises ShardKeyMissing: ``key`` is ``None``.
    :raises RoutingError: a value has an unsupported type, does not fit its
        column, or the number of parts differs from ``key_types``.
    :raises ConfigurationError: ``key_types`` names an unknown type.
    """
    return _row_hash(key, _normalise_key_types(key_types))


class PgHashRouter(Router):
    """Routes exactly as PostgreSQL's ``PARTITION BY HASH`` places rows.

    Use it when each partition is (or mirrors) a hash partition of a
    PostgreSQL table, so that the client and the server agree on where a key
    lives.  Verified against the server for ``smallint``, ``integer``,
    ``bigint``, ``text``/``varchar`` (deterministic collations), ``bytea`` and
    ``uuid`` columns, and multi-column keys of these.

    :param partitions: one of

        * a sequence of names: partition ``i`` has remainder ``i`` and the
          modulus is ``len(partitions)``;
        * a mapping remainder -> name, with ``modulus`` given;
        * a sequence of ``(modulus, remainder, name)`` triples, for a table
          whose partitions use different moduli (each modulus must divide the
          next larger one, as PostgreSQL requires).

        Remainders nobody covers are allowed, as in PostgreSQL: keys that
        hash there raise :class:`NoPartitionForKey`.
    :param modulus: the modulus for the mapping form; for the plain sequence
        form it may be given but must equal ``len(partitions)``.
    :param key_types: column types, as for :func:`pg_hash`.
    :raises ConfigurationError: the partitions are empty or malformed, a
        remainder is out of range, two bounds overlap, the moduli do not
        divide each other, or ``key_types`` names an unknown type.
    """

    __slots__ = ("_bounds", "_direct", "_kinds", "_levels", "_partitions")

    def __init__(
        self,
        partitions: Sequence[str] | Mapping[int, str] | Sequence[Sequence[Any]],
        *,
        modulus: int | None = None,
        key_types: str | Sequence[str] | None = None,
    ) -> None:
        self._kinds = _normalise_key_types(key_types)
        bounds = self._parse_bounds(partitions, modulus)
        self._bounds = tuple(sorted(bounds))
        self._partitions = tuple(dict.fromkeys(name for _, _, name in self._bounds))
        levels: dict[int, dict[int, str]] = {}
        for mod, rem, name in self._bounds:
            levels.setdefault(mod, {})[rem] = name
        moduli = sorted(levels)
        for smaller, larger in itertools.pairwise(moduli):
            if larger % smaller:
                raise ConfigurationError(
                    f"modulus {smaller} does not divide modulus {larger}; PostgreSQL requires "
                    "every modulus to be a factor of the next larger one",
                    option="partitions",
                )
        for mod, rem, name in self._bounds:
            for smaller in moduli:
                if smaller >= mod:
                    break
                other = levels[smaller].get(rem % smaller)
                if other is not None:
                    raise ConfigurationError(
                        f"(modulus {mod}, remainder {rem}) of {name!r} overlaps "
                        f"(modulus {smaller}, remainder {rem % smaller}) of {other!r}",
                        option="partitions",
                    )
        self._levels = tuple((mod, levels[mod]) for mod in moduli)
        # The common case, one modulus and every remainder covered, routes by
        # indexing a tuple.
        self._direct: tuple[int, tuple[str, ...]] | None = None
        if len(moduli) == 1 and len(levels[moduli[0]]) == moduli[0]:
            table = levels[moduli[0]]
            self._direct = (moduli[0], tuple(table[r] for r in range(moduli[0])))

    @staticmethod
    def _parse_bounds(partitions: Any, modulus: int | None) -> list[tuple[int, int, str]]:
        if isinstance(partitions, Mapping):
            if modulus is None:
                raise ConfigurationError(
                    "partitions given as remainder -> name need modulus=", option="modulus"
                )
            mod = _check_int(modulus, "modulus", 1)
            bounds = []
            for given, name in partitions.items():
                rem = _check_int(given, "remainder", 0)
                if rem >= mod:
                    raise ConfigurationError(
                        f"remainder {rem} is not below modulus {mod}", option="partitions"
                    )
                bounds.append((mod, rem, name))
            if not bounds:
                raise ConfigurationError("partitions is empty", option="partitions")
            _check_names([name for _, _, name in bounds])
            return bounds
        if isinstance(partitions, (str, bytes)) or not isinstance(partitions, Iterable):
            raise ConfigurationError(
                "partitions must be a sequence of names, a mapping remainder -> name, or a "
                f"sequence of (modulus, remainder, name), not {_short_repr(partitions)}",
                option="partitions",
            )
        items = list(partitions)
        if items and any(isinstance(item, str) for item in items):
            names = _check_names(items)
            if modulus is not None and modulus != len(names):
                raise ConfigurationError(
                    f"modulus={modulus} but {len(names)} partitions were listed; with a plain "
                    "list the modulus is the number of partitions",
                    option="modulus",
                )
            return [(len(names), rem, name) for rem, name in enumerate(names)]
        if modulus is not None:
            raise ConfigurationError(
                "modulus= applies to the list or mapping forms, not to (modulus, remainder, "
                "name) triples",
                option="modulus",
            )
        bounds = []
        seen: set[tuple[int, int]] = set()
        for item in items:
            if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 3:
                raise ConfigurationError(
                    f"expected a (modulus, remainder, name) triple, found {_short_repr(item)}",
                    option="partitions",
                )
            mod = _check_int(item[0], "modulus", 1)
            rem = _check_int(item[1], "remainder", 0)
            name = item[2]
            if rem >= mod:
                raise ConfigurationError(
                    f"remainder {rem} is not below modulus {mod}", option="partitions"
                )
            if (mod, rem) in seen:
                raise ConfigurationError(
                    f"(modulus {mod}, remainder {rem}) is listed twice", option="partitions"
                )
            seen.add((mod, rem))
            bounds.append((mod, rem, name))
        if not bounds:
            raise ConfigurationError("partitions is empty", option="partitions")
        # Names may repeat here (two bounds routed to one database), but each
        # must be a valid name.
        _check_names(dict.fromkeys(name for _, _, name in bounds))
        return bounds

    @property
    def partitions(self) -> tuple[str, ...]:
        """The partition names, ordered by (modulus, remainder)."""
        return self._partitions

    @property
    def key_types(self) -> tuple[str, ...] | None:
        """The declared column types (normalised: int2/int4/int8/text/bytea/uuid), or None."""
        return self._kinds

    def route(self, key: Any) -> str:
        """Return the partition PostgreSQL would put a row with this key in.

        :param key: a scalar, or a tuple with one value per partition key column.
        :raises ShardKeyMissing: ``key`` is ``None``.
        :raises RoutingError: a value has an unsupported type or does not fit its column.
        :raises NoPartitionForKey: no partition covers the key's remainder.
        """
        kinds = self._kinds
        if kinds is None and type(key) is int and -(1 << 63) <= key < (1 << 63):
            # One bigint column: hash_combine64(0, h) is h + constant.
            lo = key & _M32
            hi = (key >> 32) & _M32
            a, b, c = _INT_COLUMN_STATE
            row = _final64((a + (lo ^ (hi if key >= 0 else hi ^ _M32))) & _M32, b, c) + _COMBINE
            row &= _M64
        else:
            row = _row_hash(key, kinds)
        direct = self._direct
        if direct is not None:
            return direct[1][row % direct[0]]
        for mod, table in self._levels:
            name = table.get(row % mod)
            if name is not None:
                return name
        raise NoPartitionForKey(
            key,
            "PgHashRouter",
            f"its hash leaves no remainder covered by a partition (hash {row}); add the "
            "missing (modulus, remainder) partitions",
        )

    def remainder_for(self, key: Any, modulus: int) -> int:
        """Return ``pg_hash(key) % modulus``, the remainder PostgreSQL would check.

        :param key: the shard key.
        :param modulus: a hash partition modulus.
        :raises ShardKeyMissing: ``key`` is ``None``.
        :raises RoutingError: ``key`` cannot be hashed.
        """
        return _row_hash(key, self._kinds) % modulus

    def describe(self) -> dict[str, Any]:
        """Describe the router as a ``pg_hash`` strategy table (see :class:`Router`)."""
        result: dict[str, Any] = {"strategy": "pg_hash"}
        if self._direct is not None:
            result["partitions"] = list(self._direct[1])
            result["modulus"] = self._direct[0]
        else:
            result["partitions"] = [list(bound) for bound in self._bounds]
        if self._kinds is not None:
            result["key_types"] = list(self._kinds)
        return result


# ---------------------------------------------------------------------------
# RangeRouter
# ---------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    iso = getattr(value, "isoformat", None)
    return iso() if callable(iso) else str(value)


class RangeRouter(Router):
    """Routes ordered keys by boundaries, as ``PARTITION BY RANGE`` does.

    ``key < bounds[0]`` goes to ``partitions[0]``, ``bounds[i-1] <= key <
    bounds[i]`` to ``partitions[i]``, and ``key >= bounds[-1]`` to the last
    partition: every key has a partition.  Use :meth:`from_ranges` for
    explicit per-partition ranges that may leave gaps.

    Keys must be comparable with the bounds (ints, strs, dates, tuples of
    these...); a name may appear more than once in ``partitions``.

    :param bounds: strictly increasing boundaries, all of one comparable type.
    :param partitions: ``len(bounds) + 1`` partition names.
    :raises ConfigurationError: the lengths do not match, the bounds are not
        strictly increasing or not comparable, or a name is empty.
    """

    __slots__ = ("_bounds", "_form", "_partitions", "_targets")

    def __init__(self, bounds: Sequence[Any], partitions: Sequence[str]) -> None:
        if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence):
            raise ConfigurationError(
                f"bounds must be a sequence, not {_short_repr(bounds)}", option="bounds"
            )
        if isinstance(partitions, (str, bytes)) or not isinstance(partitions, Sequence):
            raise ConfigurationError(
                f"partitions must be a sequence of names, not {_short_repr(partitions)}",
                option="partitions",
            )
        if len(partitions) != len(bounds) + 1:
            raise ConfigurationError(
                f"{len(bounds)} bounds need {len(bounds) + 1} partitions, got {len(partitions)}",
                option="partitions",
            )
        _check_names(dict.fromkeys(partitions))
        self._setup(list(bounds), list(partitions), None)

    @classmethod
    def from_ranges(
        cls, ranges: Mapping[str, Sequence[Any]] | Iterable[Sequence[Any]]
    ) -> RangeRouter:
        """Build a router from an explicit ``[lower, upper)`` range per partition.

        ``None`` as a lower bound means unbounded below, as an upper bound
        unbounded above.  Keys outside every range raise
        :class:`NoPartitionForKey`.

        :param ranges: a mapping name -> ``(lower, upper)``, or a sequence of
            ``(name, lower, upper)``.  Order does not matter.
        :raises ConfigurationError: ranges overlap, a range is empty
            (``lower >= upper``), the bounds are not comparable, or a name is
            empty.
        """
        try:
            if isinstance(ranges, Mapping):
                items = [(name, *span) for name, span in ranges.items()]
            else:
                items = [tuple(item) for item in ranges]
        except TypeError:
            raise ConfigurationError(
                "ranges must map each partition to (lower, upper), or list "
                f"(name, lower, upper) triples; got {_short_repr(ranges)}",
                option="ranges",
            ) from None
        if not items:
            raise ConfigurationError("ranges is empty; give at least one range", option="ranges")
        spans: list[tuple[str, Any, Any]] = []
        for item in items:
            if len(item) != 3:
                raise ConfigurationError(
                    f"expected (name, lower, upper), found {_short_repr(item)}", option="ranges"
                )
            spans.append((item[0], item[1], item[2]))
        _check_names(dict.fromkeys(name for name, _, _ in spans), "ranges")

        def lower_first(span: tuple[str, Any, Any]) -> tuple[bool, Any]:
            return (span[1] is not None, span[1])

        try:
            spans.sort(key=lower_first)
            for name, lower, upper in spans:
                if lower is not None and upper is not None and not lower < upper:
                    raise ConfigurationError(
                        f"range of {name!r} is empty: lower {lower!r} is not below upper {upper!r}",
                        option="ranges",
                    )
        except TypeError:
            raise ConfigurationError(
                "range bounds must all be of one comparable type", option="ranges"
            ) from None

        bounds: list[Any] = []
        targets: list[str | None] = []
        first = spans[0]
        if first[1] is None:
            targets.append(first[0])
        else:
            targets += [None, first[0]]
            bounds.append(first[1])
        for prev, cur in itertools.pairwise(spans):
            if cur[1] is None or prev[2] is None or prev[2] > cur[1]:
                raise ConfigurationError(
                    f"ranges of {prev[0]!r} and {cur[0]!r} overlap", option="ranges"
                )
            if prev[2] < cur[1]:
                bounds.append(prev[2])
                targets.append(None)
            bounds.append(cur[1])
            targets.append(cur[0])
        if spans[-1][2] is not None:
            bounds.append(spans[-1][2])
            targets.append(None)
        router = cls.__new__(cls)
        router._setup(bounds, targets, spans)
        return router

    def _setup(
        self,
        bounds: list[Any],
        targets: list[str | None],
        form: list[tuple[str, Any, Any]] | None,
    ) -> None:
        for bound in bounds:
            if bound is None:
                raise ConfigurationError("a bound cannot be None", option="bounds")
        try:
            for lower, upper in itertools.pairwise(bounds):
                if not lower < upper:
                    raise ConfigurationError(
                        f"bounds must be strictly increasing: {lower!r} is followed by {upper!r}",
                        option="bounds",
                    )
        except TypeError:
            raise ConfigurationError(
                "bounds must all be of one comparable type", option="bounds"
            ) from None
        self._bounds = bounds
        self._targets = tuple(targets)
        self._form = form
        self._partitions = tuple(dict.fromkeys(t for t in targets if t is not None))

    @property
    def partitions(self) -> tuple[str, ...]:
        """The partition names, in key order, each once."""
        return self._partitions

    def route(self, key: Any) -> str:
        """Return the partition whose range holds ``key``.

        :param key: a value comparable with the bounds.
        :raises ShardKeyMissing: ``key`` is ``None``.
        :raises RoutingError: ``key`` cannot be compared with the bounds, or is NaN.
        :raises NoPartitionForKey: ``key`` falls outside every range
            (:meth:`from_ranges` only).
        """
        if key is None:
            raise ShardKeyMissing()
        try:
            index = bisect.bisect_right(self._bounds, key)
        except TypeError:
            raise RoutingError(
                f"shard key {_short_repr(key)} of type {type(key).__name__} cannot be compared "
                f"with this RangeRouter's bounds of type {type(self._bounds[0]).__name__}"
            ) from None
        if key != key:  # noqa: PLR0124 -- NaN compares unequal to itself
            raise RoutingError("shard key NaN has no place in an ordering; it cannot be routed")
        target = self._targets[index]
        if target is None:
            raise NoPartitionForKey(key, "RangeRouter", self._gap_hint(index))
        return target

    def _gap_hint(self, index: int) -> str:
        if index == 0:
            return f"it is below the lowest bound {self._bounds[0]!r}; add a range covering it"
        if index == len(self._bounds):
            return f"it is at or above the highest bound {self._bounds[-1]!r}; add a range"
        return (
            f"it falls in the gap [{self._bounds[index - 1]!r}, {self._bounds[index]!r}) "
            "between ranges; add a range covering it"
        )

    def describe(self) -> dict[str, Any]:
        """Describe the router as a ``range`` strategy table (see :class:`Router`).

        Bounds that are not JSON types (dates...) are rendered with
        ``isoformat()`` or ``str()``.
        """
        if self._form is not None:
            return {
                "strategy": "range",
                "ranges": [[n, _json_value(lo), _json_value(hi)] for n, lo, hi in self._form],
            }
        return {
            "strategy": "range",
            "bounds": [_json_value(b) for b in self._bounds],
            "partitions": list(self._targets),
        }


# ---------------------------------------------------------------------------
# LookupRouter and CallableRouter
# ---------------------------------------------------------------------------


class LookupRouter(Router):
    """Routes by an explicit key -> partition table.

    Use it for a handful of known keys (tenants pinned to a partition), often
    with a ``default`` for everyone else.  Keys are compared by
    :func:`encode_key`, so ``1`` and ``"1"`` are different keys, while
    ``b"x"`` and ``bytearray(b"x")`` are the same one.

    :param mapping: key -> partition name.
    :param default: the partition for keys not in ``mapping``; ``None`` (the
        default) makes such keys raise :class:`NoPartitionForKey`.
    :raises ConfigurationError: the mapping is empty and there is no default,
        a key is unsupported, two keys are the same key with different
        partitions, or a name is empty.
    """

    __slots__ = ("_default", "_partitions", "_table")

    def __init__(self, mapping: Mapping[Any, str], *, default: str | None = None) -> None:
        if not isinstance(mapping, Mapping):
            raise ConfigurationError(
                f"mapping must be a mapping key -> partition, not {_short_repr(mapping)}",
                option="mapping",
            )
        if not mapping and default is None:
            raise ConfigurationError(
                "mapping is empty and there is no default; no key could be routed",
                option="mapping",
            )
        table: dict[bytes, str] = {}
        originals: dict[bytes, Any] = {}
        for key, name in mapping.items():
            try:
                encoded = encode_key(key)
            except (RoutingError, ShardKeyMissing) as exc:
                raise ConfigurationError(str(exc), option="mapping") from None
            if encoded in table and table[encoded] != name:
                raise ConfigurationError(
                    f"keys {originals[encoded]!r} and {key!r} are the same shard key but map to "
                    f"{table[encoded]!r} and {name!r}",
                    option="mapping",
                )
            table[encoded] = name
            originals[encoded] = key
        names = set(table.values())
        if default is not None:
            names.add(default)
        self._partitions = tuple(sorted(_check_names(sorted(names, key=str), "mapping")))
        self._table = table
        self._default = default

    @property
    def partitions(self) -> tuple[str, ...]:
        """The partition names, sorted."""
        return self._partitions

    def route(self, key: Any) -> str:
        """Return the partition listed for ``key``, or the default.

        :param key: a shard key (see :func:`encode_key`).
        :raises ShardKeyMissing: ``key`` is ``None``.
        :raises RoutingError: ``key`` has an unsupported type.
        :raises NoPartitionForKey: ``key`` is not listed and there is no default.
        """
        name = self._table.get(encode_key(key), self._default)
        if name is None:
            raise NoPartitionForKey(
                key,
                "LookupRouter",
                "it is not in the lookup table and there is no default; add it, or set default=",
            )
        return name

    def __len__(self) -> int:
        return len(self._table)

    def describe(self) -> dict[str, Any]:
        """Describe the router: strategy, partitions, how many keys, the default.

        The table itself is left out (it can be large), so this description
        cannot rebuild the router.
        """
        return {
            "strategy": "lookup",
            "partitions": list(self._partitions),
            "keys": len(self._table),
            "default": self._default,
        }


class RouteFunction(Protocol):
    """A function that chooses the partition for a shard key."""

    def __call__(self, key: Any) -> str:
        """Return the name of the partition that holds ``key``."""
        ...


class CallableRouter(Router):
    """Routes with a function you supply, checking that its answer is a known partition.

    The function must itself be deterministic across processes: never base it
    on :func:`hash` of a ``str`` or ``bytes`` key.

    :param fn: called as ``fn(key)``; returns a partition name.
    :param partitions: every name ``fn`` may return.
    :raises ConfigurationError: ``fn`` is not callable, or ``partitions`` is
        empty or has duplicates.
    """

    __slots__ = ("_fn", "_known", "_partitions")

    def __init__(self, fn: RouteFunction | Callable[[Any], str], partitions: Sequence[str]) -> None:
        if not callable(fn):
            raise ConfigurationError(f"router function {fn!r} is not callable")
        self._fn = fn
        self._partitions = _check_names(partitions)
        self._known = frozenset(self._partitions)

    @property
    def partitions(self) -> tuple[str, ...]:
        """The partition names, in the order given."""
        return self._partitions

    def route(self, key: Any) -> str:
        """Return ``fn(key)``, once checked.

        :param key: the shard key, passed to ``fn`` as it is.
        :raises ShardKeyMissing: ``key`` is ``None``.
        :raises UnknownPartition: ``fn`` returned a name not in :attr:`partitions`.
        :raises RoutingError: ``fn`` returned something other than a ``str``.
        """
        if key is None:
            raise ShardKeyMissing()
        name = self._fn(key)
        if not isinstance(name, str):
            raise RoutingError(
                f"router function {_function_name(self._fn)} returned {_short_repr(name)} for "
                f"shard key {_short_repr(key)}; it must return a partition name (str)"
            )
        if name not in self._known:
            raise UnknownPartition(name, self._partitions)
        return name

    def describe(self) -> dict[str, Any]:
        """Describe the router: strategy, function name, partitions."""
        return {
            "strategy": "callable",
            "function": _function_name(self._fn),
            "partitions": list(self._partitions),
        }


def _function_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else str(name)


# ---------------------------------------------------------------------------
# make_router: configuration -> Router
# ---------------------------------------------------------------------------

_STRATEGY_OPTIONS: Final = {
    "hash": ("partitions", "buckets", "assignment"),
    "pg_hash": ("partitions", "modulus", "key_types"),
    "range": ("bounds", "partitions", "ranges"),
    "lookup": ("mapping", "default", "key_type"),
}
_LOOKUP_KEY_TYPES: Final[dict[str, Callable[[str], Any]]] = {
    "str": str,
    "int": int,
    "uuid": uuid.UUID,
}


def _int_keys(table: Mapping[Any, Any], option: str) -> dict[int, Any]:
    # TOML (and JSON) table keys are always strings; accept "3" for 3.
    result = {}
    for key, value in table.items():
        if isinstance(key, str) and key.strip().lstrip("+-").isdigit():
            result[int(key)] = value
        elif isinstance(key, int) and not isinstance(key, bool):
            result[key] = value
        else:
            raise ConfigurationError(
                f"{option} keys must be integers, found {_short_repr(key)}", option=option
            )
    return result


def _from_table(spec: Mapping[str, Any], partitions: tuple[str, ...]) -> Router:
    strategy = spec.get("strategy")
    if strategy not in _STRATEGY_OPTIONS:
        raise ConfigurationError(
            f"unknown routing strategy {strategy!r}; valid strategies are "
            f"{', '.join(map(repr, _STRATEGY_OPTIONS))}",
            option="strategy",
        )
    valid = _STRATEGY_OPTIONS[strategy]
    for option in spec:
        if option != "strategy" and option not in valid:
            raise ConfigurationError(
                f"unknown option {option!r} for routing strategy {strategy!r}; valid options "
                f"are {', '.join(map(repr, valid))}",
                option=option,
            )
    if strategy == "hash":
        assignment = spec.get("assignment")
        if isinstance(assignment, Mapping):
            assignment = _int_keys(assignment, "assignment")
        return HashRouter(
            spec.get("partitions", partitions),
            buckets=spec.get("buckets", 1024),
            assignment=assignment,
        )
    if strategy == "pg_hash":
        chosen = spec.get("partitions", partitions)
        if isinstance(chosen, Mapping):
            chosen = _int_keys(chosen, "partitions")
        return PgHashRouter(chosen, modulus=spec.get("modulus"), key_types=spec.get("key_types"))
    if strategy == "range":
        if "ranges" in spec:
            if "bounds" in spec or "partitions" in spec:
                raise ConfigurationError(
                    "give either ranges, or bounds with partitions, not both", option="ranges"
                )
            return RangeRouter.from_ranges(spec["ranges"])
        if "bounds" not in spec:
            raise ConfigurationError(
                "the range strategy needs bounds (with partitions) or ranges", option="bounds"
            )
        return RangeRouter(spec["bounds"], spec.get("partitions", partitions))
    # lookup
    mapping = spec.get("mapping", {})
    if not isinstance(mapping, Mapping):
        raise ConfigurationError("mapping must be a table key -> partition", option="mapping")
    key_type = spec.get("key_type")
    if key_type is not None:
        convert = _LOOKUP_KEY_TYPES.get(key_type)
        if convert is None:
            raise ConfigurationError(
                f"unknown key_type {key_type!r}; valid key types are "
                f"{', '.join(map(repr, _LOOKUP_KEY_TYPES))}",
                option="key_type",
            )
        try:
            mapping = {convert(key): name for key, name in mapping.items()}
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"a mapping key is not a valid {key_type}", option="mapping"
            ) from None
    return LookupRouter(mapping, default=spec.get("default"))


def make_router(spec: Any, partitions: Sequence[str]) -> Router:
    """Build a router from configuration.

    :param spec: one of

        * ``None`` or ``"hash"``: :class:`HashRouter` over ``partitions``;
        * ``"pg_hash"``: :class:`PgHashRouter`, remainder ``i`` ->
          ``partitions[i]``;
        * a table such as TOML yields, ``{"strategy": ..., **options}``:

          - ``hash``: ``partitions``, ``buckets``, ``assignment`` (a list, or a
            table whose keys are bucket numbers as strings);
          - ``pg_hash``: ``partitions`` (list of names, table remainder -> name
            with ``modulus``, or list of ``[modulus, remainder, name]``),
            ``modulus``, ``key_types``;
          - ``range``: ``bounds`` and ``partitions``, or ``ranges`` (a table
            name -> ``[lower, upper]`` or a list of ``[name, lower, upper]``);
          - ``lookup``: ``mapping``, ``default``, ``key_type`` (``"str"``,
            ``"int"`` or ``"uuid"``, applied to the mapping's keys, which
            TOML always gives as strings);

          ``partitions`` defaults to the ``partitions`` argument;
        * a :class:`Router`, used as it is;
        * any other callable: :class:`CallableRouter` over ``partitions``.
    :param partitions: the names of the configured partitions.  Every
        partition the router can return must be one of them.
    :raises ConfigurationError: the strategy or an option is unknown, an
        option is invalid, or the router can return a partition that is not
        configured.
    """
    known = _check_names(partitions)
    router: Router
    if spec is None or spec == "hash":
        router = HashRouter(known)
    elif spec == "pg_hash":
        router = PgHashRouter(known)
    elif isinstance(spec, str):
        hint = " (it needs options: use a table)" if spec in _STRATEGY_OPTIONS else ""
        raise ConfigurationError(
            f"unknown routing strategy {spec!r}{hint}; as a string the valid strategies are "
            "'hash' and 'pg_hash'; as a table, 'hash', 'pg_hash', 'range' and 'lookup'",
            option="strategy",
        )
    elif isinstance(spec, Mapping):
        router = _from_table(spec, known)
    elif isinstance(spec, Router):
        router = spec
    elif callable(spec):
        router = CallableRouter(spec, known)
    else:
        raise ConfigurationError(
            f"cannot build a router from {_short_repr(spec)}; give a strategy name, a table "
            "with a 'strategy' key, a Router, or a callable",
            option="strategy",
        )
    missing = [name for name in router.partitions if name not in known]
    if missing:
        raise ConfigurationError(
            f"the router can return partition(s) {', '.join(map(repr, missing))}, which are not "
            f"configured; configured partitions are {', '.join(map(repr, known))}",
            option="router",
        )
    return router
