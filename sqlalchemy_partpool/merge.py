"""Merging the results of one SELECT run on many partitions into the one correct answer.

Concatenating per-partition rows is only right for the simplest queries.
:func:`plan` reads a Core :class:`~sqlalchemy.sql.expression.Select` and
returns a :class:`MergePlan`: the statement each partition should run (rewritten
where needed) and how to combine what comes back:

``concat``
    No ORDER BY, no aggregates: rows are concatenated.  ``DISTINCT``
    removes duplicates across partitions; ``LIMIT``/``OFFSET`` are applied
    after merging (each partition is asked for ``offset + limit`` rows).
``ordered``
    ORDER BY without aggregates: each partition returns its rows sorted, and a
    k-way merge (:func:`heapq.merge`) interleaves them; ``LIMIT``/``OFFSET``
    are applied after the merge.  Sort order follows PostgreSQL: ``NULLS
    LAST`` for ascending, ``NULLS FIRST`` for descending, unless said otherwise.
``aggregate``
    ``count``, ``sum``, ``min``, ``max`` and ``avg`` (with or without GROUP BY):
    each partition computes partial aggregates (``avg(x)`` becomes ``sum(x)``
    and ``count(x)``), which are combined per group; ORDER BY, LIMIT and
    OFFSET are then applied to the combined rows.

What cannot be merged correctly raises :class:`.UnmergeableStatement` instead
of returning a wrong answer: ``HAVING``, ``DISTINCT ON``, ``count(DISTINCT
...)``, window functions, aggregates inside larger expressions, other
aggregate functions, ORDER BY or GROUP BY expressions missing from the select
list, and sorting text whose collation Python cannot reproduce (see
:func:`text_sort_columns`).
"""

from __future__ import annotations

import functools
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import Enum as SAEnum
from sqlalchemy import String, func
from sqlalchemy.sql import ClauseElement, elements, functions, operators
from sqlalchemy.sql.selectable import Select

from .errors import UnmergeableStatement

__all__ = ["MergePlan", "SortKey", "plan", "text_sort_columns"]

_AGGREGATES = frozenset({"count", "sum", "min", "max", "avg"})
_ALL_AGGREGATE_NAMES = frozenset(
    {
        "count", "sum", "min", "max", "avg", "array_agg", "string_agg", "bool_and",
        "bool_or", "every", "stddev", "stddev_pop", "stddev_samp", "variance",
        "var_pop", "var_samp", "json_agg", "jsonb_agg", "json_object_agg",
        "jsonb_object_agg", "percentile_cont", "percentile_disc", "mode", "bit_and",
        "bit_or", "corr", "covar_pop", "covar_samp", "regr_slope", "xmlagg",
    }
)  # fmt: skip

Row = tuple[Any, ...]
Tagged = tuple[Row, str]


@dataclass(frozen=True)
class SortKey:
    """One ORDER BY term, resolved to a position in the output row."""

    index: int
    descending: bool = False
    nulls_first: bool = False


@dataclass(frozen=True)
class _Aggregate:
    kind: str
    # positions of this aggregate's partial results in a partition's row
    partials: tuple[int, ...]


@dataclass
class MergePlan:
    """How to run a statement on many partitions and merge the results.

    :ivar kind: ``"concat"``, ``"ordered"`` or ``"aggregate"``.
    :ivar statement: what each partition executes.
    :ivar keys: column names of the merged result (as SQLAlchemy names them
      for the original statement), or ``None`` to take the partitions' own.
    :ivar sort: ORDER BY terms, resolved to output positions.
    :ivar limit: ``LIMIT`` of the original statement.
    :ivar offset: ``OFFSET`` of the original statement.
    :ivar distinct: remove duplicate rows.
    :ivar sort_columns: the output columns that are sorted on, for collation checks.
    """

    kind: Literal["concat", "ordered", "aggregate"]
    statement: Any
    keys: list[str] | None = None
    sort: tuple[SortKey, ...] = ()
    limit: int | None = None
    offset: int = 0
    distinct: bool = False
    sort_columns: tuple[Any, ...] = ()
    _group: tuple[int, ...] = ()
    _aggregates: tuple[tuple[int, _Aggregate], ...] = ()
    _width: int = 0
    _group_partials: tuple[int, ...] = field(default=())

    def merge(self, results: Sequence[tuple[str, Sequence[Row]]]) -> list[Tagged]:
        """Combine ``(partition, rows)`` pairs into the final rows.

        Each output row comes with the partition it came from (for
        ``aggregate`` plans, the first partition that contributed to it).
        """
        if self.kind == "aggregate":
            rows: Iterable[Tagged] = self._reaggregate(results)
            if self.sort:
                rows = sorted(rows, key=_sort_key(self.sort))
        elif self.kind == "ordered":
            streams = [[(tuple(r), name) for r in part] for name, part in results]
            rows = heapq.merge(*streams, key=_sort_key(self.sort))
        else:
            rows = ((tuple(r), name) for name, part in results for r in part)
        if self.distinct:
            rows = _unique(rows)
        stop = None if self.limit is None else self.offset + self.limit
        return list(itertools.islice(rows, self.offset, stop))

    def _reaggregate(self, results: Sequence[tuple[str, Sequence[Row]]]) -> Iterator[Tagged]:
        groups: dict[Row, tuple[list[Row], str]] = {}
        for name, part in results:
            for row in part:
                key = tuple(row[i] for i in self._group_partials)
                entry = groups.get(key)
                if entry is None:
                    groups[key] = ([tuple(row)], name)
                else:
                    entry[0].append(tuple(row))
        if not groups and not self._group:
            # a global aggregate over no partition rows at all
            groups[()] = ([], "")
        for key, (partials, name) in groups.items():
            out: list[Any] = [None] * self._width
            for position, value in zip(self._group, key):
                out[position] = value
            for position, aggregate in self._aggregates:
                out[position] = _combine(aggregate, partials)
            yield tuple(out), name


def _unique(rows: Iterable[Tagged]) -> Iterator[Tagged]:
    seen: set[Row] = set()
    for row, name in rows:
        if row not in seen:
            seen.add(row)
            yield row, name


def _combine(aggregate: _Aggregate, partials: list[Row]) -> Any:
    kind = aggregate.kind
    if kind == "count":
        return sum(row[aggregate.partials[0]] or 0 for row in partials)
    values = [row[aggregate.partials[0]] for row in partials]
    present = [v for v in values if v is not None]
    if kind == "avg":
        counts = sum(row[aggregate.partials[1]] or 0 for row in partials)
        if not counts:
            return None
        total = sum(present)
        if isinstance(total, float):
            return total / counts
        # PostgreSQL's avg() of integers and numerics is numeric
        return Decimal(total) / Decimal(counts)
    if not present:
        return None
    if kind == "sum":
        return sum(present)
    if kind == "min":
        return min(present)
    return max(present)


def _compare(a: Any, b: Any, key: SortKey) -> int:
    if a is None or b is None:
        if a is None and b is None:
            return 0
        # None sorts first when nulls_first, whatever the direction
        return (-1 if a is None else 1) * (1 if key.nulls_first else -1)
    if a == b:
        return 0
    less = a < b
    if key.descending:
        less = not less
    return -1 if less else 1


def _sort_key(keys: tuple[SortKey, ...]) -> Callable[[Tagged], Any]:
    def compare(x: Tagged, y: Tagged) -> int:
        for key in keys:
            result = _compare(x[0][key.index], y[0][key.index], key)
            if result:
                return result
        return 0

    return functools.cmp_to_key(compare)


# -- planning ---------------------------------------------------------------------------


def _unlabel(element: Any) -> Any:
    while isinstance(element, elements.Label):
        element = element.element
    return element


def _contains_aggregate(element: ClauseElement) -> bool:
    for node in _walk(element):
        if (
            isinstance(node, functions.FunctionElement)
            and node.name.lower() in _ALL_AGGREGATE_NAMES
        ):
            return True
    return False


def _walk(element: ClauseElement) -> Iterator[Any]:
    stack = [element]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.get_children())


def _aggregate_kind(element: Any) -> str | None:
    """The aggregate a select-list entry is, or None for a plain expression.

    :raises UnmergeableStatement: for aggregates that cannot be combined.
    """
    inner = _unlabel(element)
    if isinstance(inner, elements.Over | elements.WithinGroup):
        raise UnmergeableStatement(
            "window functions and ordered-set aggregates cannot be merged across "
            "partitions; run the statement per partition with execute() instead"
        )
    if isinstance(inner, elements.FunctionFilter):
        raise UnmergeableStatement(
            "aggregate FILTER clauses are not merged yet; move the condition into WHERE"
        )
    if isinstance(inner, functions.FunctionElement):
        name = inner.name.lower()
        if name in _AGGREGATES:
            for node in _walk(inner.clause_expr):
                if (
                    isinstance(node, elements.UnaryExpression)
                    and node.operator is operators.distinct_op
                ):
                    raise UnmergeableStatement(
                        f"{name}(DISTINCT ...) cannot be combined from per-partition results "
                        "(a value may appear in several partitions)"
                    )
            return str(name)
        if name in _ALL_AGGREGATE_NAMES:
            raise UnmergeableStatement(
                f"aggregate {name}() cannot be combined across partitions; use count, sum, "
                "min, max or avg, or run it per partition with execute()"
            )
    if _contains_aggregate(inner):
        raise UnmergeableStatement(
            "an aggregate inside a larger expression cannot be merged across partitions; "
            "select the aggregates themselves and compute the expression from the result"
        )
    return None


def _sort_terms(clause: Any) -> tuple[Any, bool, bool | None]:
    """Unwrap ``x.desc().nulls_first()`` into ``(x, descending, nulls_first or None)``."""
    descending = False
    nulls_first: bool | None = None
    element = clause
    while isinstance(element, elements.UnaryExpression) and element.modifier in (
        operators.desc_op,
        operators.asc_op,
        operators.nulls_first_op,
        operators.nulls_last_op,
    ):
        if element.modifier is operators.desc_op:
            descending = True
        elif element.modifier is operators.nulls_first_op:
            nulls_first = True
        elif element.modifier is operators.nulls_last_op:
            nulls_first = False
        element = element.element
    return element, descending, nulls_first


def _resolve(element: Any, columns: Sequence[Any], names: Sequence[str], what: str) -> int:
    """The position of *element* in the select list.

    :raises UnmergeableStatement: if it is not there.
    """
    if isinstance(element, elements._label_reference):
        element = element.element
    if isinstance(element, elements._textual_label_reference):
        label = element.element
        for i, name in enumerate(names):
            if name == label:
                return i
        for i, column in enumerate(columns):
            if getattr(column, "name", None) == label:
                return i
    else:
        target = _unlabel(element)
        for i, column in enumerate(columns):
            if column is element or _unlabel(column).compare(target):
                return i
    raise UnmergeableStatement(
        f"{what} expression {str(element)!r} is not in the select list; add it to the "
        "selected columns so that rows from different partitions can be merged"
    )


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    return int(value)


def plan(
    statement: Any, keys: Sequence[str] | None = None, *, extra_sort_columns: bool = False
) -> MergePlan:
    """Work out how to run *statement* on many partitions and merge the results.

    :param statement: any executable; only :class:`~sqlalchemy.sql.expression.Select`
      is analysed, anything else (text, DML) is concatenated.
    :param keys: the result column names SQLAlchemy gives the original
      statement (from its compiled form); used for the merged result and to
      resolve ORDER BY labels.
    :param extra_sort_columns: the caller adds every ``sort_columns`` entry to
      the per-partition select list itself (as the ORM session does), so an
      ORDER BY expression outside the select list can be merged too (without
      aggregates, GROUP BY or DISTINCT); its :class:`SortKey` then points past
      the original columns.
    :raises UnmergeableStatement: if the merged result could be wrong.
    """
    if not isinstance(statement, Select):
        return MergePlan(kind="concat", statement=statement)
    # SQLAlchemy 2.0 keeps DISTINCT ON in _distinct_on; 2.1 as a syntax extension
    extensions: dict[str, Any] = getattr(statement, "_get_syntax_extensions_as_dict", dict)()
    if getattr(statement, "_distinct_on", ()) or extensions:
        raise UnmergeableStatement(
            "DISTINCT ON (and other dialect syntax extensions) cannot be merged across "
            "partitions; run the statement per partition with execute()"
        )
    if statement._having_criteria:
        raise UnmergeableStatement(
            "HAVING cannot be applied to per-partition groups (a group's total spans "
            "partitions); drop HAVING and filter the merged rows"
        )
    try:
        limit = _int_or_none(statement._limit)
        offset = _int_or_none(statement._offset) or 0
    except Exception:
        raise UnmergeableStatement(
            "LIMIT/OFFSET must be plain integers to be applied after merging"
        ) from None
    columns = list(statement.selected_columns)
    names = list(keys) if keys is not None else list(statement.selected_columns.keys())
    kinds = [_aggregate_kind(c) for c in columns]
    grouped = bool(statement._group_by_clauses)
    has_aggregates = any(k is not None for k in kinds)

    sort: list[SortKey] = []
    extra: list[Any] = []
    for clause in statement._order_by_clauses:
        element, descending, nulls_first = _sort_terms(clause)
        try:
            index = _resolve(element, columns, names, "ORDER BY")
        except UnmergeableStatement:
            carried = isinstance(element, elements.ColumnElement) and not isinstance(
                element, elements._label_reference | elements._textual_label_reference
            )
            simple = not (has_aggregates or grouped or statement._distinct)
            if not (extra_sort_columns and carried and simple):
                raise
            index = len(columns) + len(extra)
            extra.append(element)
        sort.append(
            SortKey(
                index=index,
                descending=descending,
                # PostgreSQL: NULLS LAST for ASC, NULLS FIRST for DESC
                nulls_first=descending if nulls_first is None else nulls_first,
            )
        )
    sort_columns = tuple((*columns, *extra)[k.index] for k in sort)
    base = MergePlan(
        kind="concat",
        statement=statement,
        keys=names,
        sort=tuple(sort),
        limit=limit,
        offset=offset,
        distinct=bool(statement._distinct),
        sort_columns=sort_columns,
    )

    if not has_aggregates and not grouped:
        per_partition = statement
        if limit is not None or offset:
            # every partition must return enough rows for the global window
            per_partition = statement.offset(None).limit(None if limit is None else offset + limit)
        base.statement = per_partition
        base.kind = "ordered" if sort else "concat"
        return base

    if statement._distinct:
        raise UnmergeableStatement("DISTINCT together with aggregates is not merged")
    group_positions = tuple(i for i, k in enumerate(kinds) if k is None)
    for clause in statement._group_by_clauses:
        index = _resolve(clause, columns, names, "GROUP BY")
        if kinds[index] is not None:
            raise UnmergeableStatement("cannot GROUP BY an aggregate")
    partial_columns: list[Any] = []
    group_partials: list[int] = []
    aggregates: list[tuple[int, _Aggregate]] = []
    for i, (column, kind) in enumerate(zip(columns, kinds)):
        if kind is None:
            group_partials.append(len(partial_columns))
            partial_columns.append(column)
            continue
        argument = _unlabel(column)
        partials: tuple[int, ...]
        if kind == "avg":
            (arg,) = argument.clauses.clauses
            partials = (len(partial_columns), len(partial_columns) + 1)
            partial_columns.append(func.sum(arg))
            partial_columns.append(func.count(arg))
        else:
            partials = (len(partial_columns),)
            partial_columns.append(argument)
        aggregates.append((i, _Aggregate(kind, partials)))
    labelled = [c.label(f"_partpool_{n}") for n, c in enumerate(partial_columns)]
    per_partition = (
        statement.with_only_columns(*labelled, maintain_column_froms=True)
        .order_by(None)
        .limit(None)
        .offset(None)
    )
    base.kind = "aggregate"
    base.statement = per_partition
    base._group = group_positions
    base._group_partials = tuple(group_partials)
    base._aggregates = tuple(aggregates)
    base._width = len(columns)
    return base


def text_sort_columns(merge_plan: MergePlan) -> list[Any]:
    """Sorted-on columns whose order Python may not reproduce (text, enums).

    Python compares strings by code point, which is PostgreSQL's order only
    under the ``C`` (or ``POSIX``) collation; enums sort in declaration order.
    The caller checks the partitions' collation, or an explicit
    ``.collate("C")`` on the ORDER BY column, before merging.
    """
    risky = []
    for column in merge_plan.sort_columns:
        inner = _unlabel(column)
        if isinstance(inner.type, SAEnum):
            risky.append(column)
        elif isinstance(inner.type, String):
            explicit_c = (
                isinstance(inner, elements.BinaryExpression)
                and inner.operator is operators.collate
                and str(inner.right).strip('"').upper() in ("C", "POSIX")
            )
            if not explicit_c:
                risky.append(column)
    return risky
