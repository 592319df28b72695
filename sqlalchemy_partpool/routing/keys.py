"""The canonical key encoding, and the stable hash built on it.

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

import hashlib
import operator
import struct
import uuid
from typing import Any, Final

from ..errors import RoutingError, ShardKeyMissing

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
