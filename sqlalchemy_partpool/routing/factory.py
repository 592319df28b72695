"""make_router: configuration -> Router."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from ..errors import ConfigurationError
from .base import Router, _check_names
from .hashing import HashRouter
from .keys import _short_repr
from .lookup import CallableRouter, LookupRouter
from .pghash import PgHashRouter
from .ranges import RangeRouter

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
