"""LookupRouter (an explicit key -> partition table) and CallableRouter (your function)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ..errors import (
    ConfigurationError,
    NoPartitionForKey,
    RoutingError,
    ShardKeyMissing,
    UnknownPartition,
)
from .base import Router, _check_names
from .keys import _short_repr, encode_key


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
