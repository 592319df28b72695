"""The :class:`Router` base class, and validation shared by the routers."""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Iterable
from typing import Any, TypeVar

from ..errors import ConfigurationError
from .keys import _short_repr

K = TypeVar("K")


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
