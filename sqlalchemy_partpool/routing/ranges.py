"""RangeRouter: ordered boundaries, as ``PARTITION BY RANGE``."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConfigurationError, NoPartitionForKey, RoutingError, ShardKeyMissing
from .base import Router, _check_names
from .keys import _short_repr


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
