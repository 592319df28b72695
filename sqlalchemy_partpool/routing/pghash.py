"""PostgreSQL's hash partitioning, ported: :func:`pg_hash` and :class:`PgHashRouter`."""

from __future__ import annotations

import functools
import itertools
import operator
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from ..errors import ConfigurationError, NoPartitionForKey, RoutingError, ShardKeyMissing
from .base import Router, _check_int, _check_names
from .keys import _short_repr, _unsupported

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
