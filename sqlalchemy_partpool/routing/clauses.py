"""Which partitions can a WHERE clause match?  Narrowing statements by their shard-key conditions.

:func:`partitions_for_criteria` reads a statement's WHERE criteria and
returns the set of partitions that can hold matching rows, or ``None`` when
it cannot tell (the statement must then go to every partition):

* ``key == v`` (either way round) and ``key IN (v1, v2, ...)`` name the
  partitions of those values;
* ``AND`` intersects what its parts name (parts that name nothing narrow nothing);
* ``OR`` unites them, and names nothing if any part names nothing;
* anything else names nothing.

Used by the ORM session's ``execute_chooser`` and available to Core code.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from sqlalchemy.sql import ClauseElement, elements, operators

__all__ = ["partitions_for_criteria"]

_UNKNOWN = object()


def _base_column(element: Any) -> Any:
    deannotate = getattr(element, "_deannotate", None)
    return deannotate() if deannotate is not None else element


def _value(element: Any, params: Mapping[str, Any]) -> Any:
    if isinstance(element, elements.BindParameter):
        if element.key in params:
            return params[element.key]
        if element.value is None and element.callable is None and element.required:
            return _UNKNOWN  # given at execution time, and not given here
        return element.effective_value
    if isinstance(element, elements.Null):
        return None
    if isinstance(element, elements.Grouping):
        return _value(element.element, params)
    return _UNKNOWN


def partitions_for_criteria(
    criteria: Iterable[ClauseElement] | ClauseElement | None,
    key_columns: Collection[Any],
    route: Callable[[Any], str],
    params: Mapping[str, Any] | None = None,
) -> frozenset[str] | None:
    """The partitions that rows matching *criteria* can live on, or None for "any".

    An empty set means no row can match (``key IN ()``, ``key = 1 AND key = 2``).

    :param criteria: a WHERE clause, or the sequence of criteria a statement
      keeps (``statement._where_criteria``, combined with AND).
    :param key_columns: the table columns that hold the shard key (plain,
      unannotated ``Column`` objects).
    :param route: shard key value -> partition name (``router.route``).
    :param params: values of bind parameters given at execution time, by key.
    """
    keys = {_base_column(c) for c in key_columns}
    if not keys or criteria is None:
        return None
    if isinstance(criteria, ClauseElement):
        parts: list[ClauseElement] = [criteria]
    else:
        parts = list(criteria)
    given = params or {}
    result: frozenset[str] | None = None
    for part in parts:
        found = _narrow(part, keys, route, given)
        if found is not None:
            result = found if result is None else result & found
    return result


def _narrow(
    clause: Any, keys: set[Any], route: Callable[[Any], str], params: Mapping[str, Any]
) -> frozenset[str] | None:
    if isinstance(clause, elements.Grouping):
        return _narrow(clause.element, keys, route, params)
    if isinstance(clause, elements.BooleanClauseList):
        found = [_narrow(c, keys, route, params) for c in clause.clauses]
        if clause.operator is operators.and_:
            narrowed = [f for f in found if f is not None]
            if not narrowed:
                return None
            result = narrowed[0]
            for f in narrowed[1:]:
                result = result & f
            return result
        if clause.operator is operators.or_:
            if any(f is None for f in found):
                return None
            return frozenset().union(*found)  # type: ignore[arg-type]
        return None
    if isinstance(clause, elements.BinaryExpression):
        left, right = clause.left, clause.right
        if clause.operator is operators.eq:
            if _base_column(left) in keys:
                value = _value(right, params)
            elif _base_column(right) in keys:
                value = _value(left, params)
            else:
                return None
            if value is _UNKNOWN or value is None:
                return None
            return frozenset([route(value)])
        if clause.operator is operators.in_op and _base_column(left) in keys:
            if isinstance(right, elements.BindParameter):
                values = _value(right, params)
                if values is _UNKNOWN:
                    return None
            elif isinstance(right, elements.Grouping) and isinstance(
                right.element, elements.ClauseList
            ):
                values = [_value(v, params) for v in right.element.clauses]
            else:
                return None
            if values is None or any(v is _UNKNOWN for v in values):
                return None
            # NULLs in an IN list match nothing
            return frozenset(route(v) for v in values if v is not None)
    return None
