"""Merge planning and merging, without a database: statements in, rows in, rows out."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
from sqlalchemy import (
    Column,
    Date,
    Enum,
    Integer,
    MetaData,
    String,
    Table,
    desc,
    distinct,
    func,
    select,
    text,
)

from sqlalchemy_partpool import UnmergeableStatement
from sqlalchemy_partpool.merge import plan, text_sort_columns

metadata = MetaData()
sales = Table(
    "sales",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("region", String),
    Column("kind", Enum("a", "b", name="kind")),
    Column("qty", Integer),
    Column("day", Date),
)


try:  # SQLAlchemy 2.1
    from sqlalchemy.dialects.postgresql import distinct_on

    DISTINCT_ON = select(sales.c.region).ext(distinct_on(sales.c.region))
except ImportError:  # SQLAlchemy 2.0
    DISTINCT_ON = select(sales.c.region).distinct(sales.c.region)


def split(rows, parts=3, seed=0):
    rng = random.Random(seed)
    shares = [[] for _ in range(parts)]
    for row in rows:
        shares[rng.randrange(parts)].append(row)
    return shares


def test_plain_select_is_concatenated_and_limit_applies_after():
    p = plan(select(sales.c.id).limit(3).offset(1))
    assert p.kind == "concat"
    assert p.statement._limit == 4  # each partition returns offset + limit rows
    assert p.statement._offset is None
    merged = p.merge([("a", [(1,), (2,)]), ("b", [(3,), (4,)])])
    assert merged == [((2,), "a"), ((3,), "b"), ((4,), "b")]


def test_ordered_merge_with_nulls_and_directions_matches_a_full_sort():
    rng = random.Random(7)
    rows = [(i, rng.choice([None, 1, 2, 3]), rng.randint(0, 5)) for i in range(200)]
    t = Table("t", MetaData(), Column("id", Integer), Column("a", Integer), Column("b", Integer))
    stmt = select(t.c.id, t.c.a, t.c.b).order_by(t.c.a.desc(), t.c.b, t.c.id.desc()).limit(50)
    p = plan(stmt)
    assert p.kind == "ordered"

    def pg_key(row):
        # PostgreSQL: DESC puts NULLs first; ASC puts them last
        a_desc = (0, 0) if row[1] is None else (1, -row[1])
        return (a_desc, row[2], -row[0])

    shares = [sorted(share, key=pg_key) for share in split(rows)]
    merged = [row for row, _ in p.merge([(str(i), s) for i, s in enumerate(shares)])]
    assert merged == sorted(rows, key=pg_key)[:50]


def test_explicit_nulls_first_on_ascending():
    t = Table("t", MetaData(), Column("a", Integer))
    p = plan(select(t.c.a).order_by(t.c.a.asc().nulls_first()))
    merged = p.merge([("x", [(None,), (1,), (3,)]), ("y", [(None,), (2,)])])
    assert [r[0] for r, _ in merged] == [None, None, 1, 2, 3]


def test_order_by_label_name():
    p = plan(select(sales.c.id, (sales.c.qty * 2).label("double")).order_by(desc("double")))
    assert p.sort[0].index == 1
    assert p.sort[0].descending


def test_aggregates_are_rewritten_and_recombined():
    stmt = select(
        sales.c.region,
        func.count().label("n"),
        func.sum(sales.c.qty),
        func.avg(sales.c.qty),
        func.min(sales.c.day),
        func.max(sales.c.qty),
    ).group_by(sales.c.region)
    p = plan(stmt, keys=["region", "n", "sum_1", "avg_1", "min_1", "max_1"])
    assert p.kind == "aggregate"
    sql = str(p.statement)
    assert "avg" not in sql  # avg becomes sum and count per partition
    assert sql.count("count(") == 2
    # partition rows: region, count, sum, sum(qty), count(qty), min(day), max
    part_a = [("x", 2, 10, 10, 2, 5, 7), ("y", 1, None, None, 0, None, None)]
    part_b = [("x", 1, 5, 5, 1, 3, 5)]
    merged = dict((row[0], row) for row, _ in p.merge([("a", part_a), ("b", part_b)]))
    assert merged["x"] == ("x", 3, 15, Decimal(5), 3, 7)
    assert merged["y"] == ("y", 1, None, None, None, None)


def test_global_aggregate_over_nothing_returns_one_row():
    p = plan(select(func.count(), func.sum(sales.c.qty)))
    assert p.merge([("a", [(0, None)]), ("b", [(0, None)])]) == [((0, None), "a")]
    assert [r for r, _ in p.merge([])] == [(0, None)]


def test_aggregates_sorted_and_limited_after_merging():
    stmt = (
        select(sales.c.region, func.sum(sales.c.qty).label("total"))
        .group_by(sales.c.region)
        .order_by(desc("total"))
        .limit(2)
    )
    p = plan(stmt, keys=["region", "total"])
    assert p.statement._limit is None  # no LIMIT pushed down to the partitions
    merged = p.merge([("a", [("x", 1), ("y", 5), ("z", 2)]), ("b", [("x", 9), ("z", 2)])])
    assert [r for r, _ in merged] == [("x", 10), ("y", 5)]


def test_distinct_removes_duplicates_across_partitions():
    p = plan(select(sales.c.region).distinct().order_by(sales.c.region))
    merged = p.merge([("a", [("x",), ("y",)]), ("b", [("x",), ("z",)])])
    assert [r[0] for r, _ in merged] == ["x", "y", "z"]


@pytest.mark.parametrize(
    ("statement", "fragment"),
    [
        (select(func.count(distinct(sales.c.qty))), "DISTINCT"),
        (DISTINCT_ON, "DISTINCT ON"),
        (
            select(sales.c.region, func.count()).group_by(sales.c.region).having(func.count() > 1),
            "HAVING",
        ),
        (select(func.row_number().over(order_by=sales.c.id)), "window"),
        (select(func.sum(sales.c.qty) / func.count()), "larger expression"),
        (select(func.string_agg(sales.c.region, ",")), "string_agg"),
        (select(sales.c.id).order_by(sales.c.qty), "not in the select list"),
        (select(func.count()).group_by(sales.c.region), "not in the select list"),
    ],
)
def test_statements_that_cannot_be_merged_correctly_are_refused(statement, fragment):
    with pytest.raises(UnmergeableStatement, match=fragment):
        plan(statement)


def test_text_and_dml_are_concatenated():
    assert plan(text("SELECT 1")).kind == "concat"
    assert plan(sales.delete()).kind == "concat"


def test_text_sorting_needs_a_byte_order_collation():
    assert text_sort_columns(plan(select(sales.c.region).order_by(sales.c.region)))
    assert not text_sort_columns(
        plan(select(sales.c.region.collate("C")).order_by(sales.c.region.collate("C")))
    )
    assert text_sort_columns(plan(select(sales.c.kind).order_by(sales.c.kind)))  # enum order
    assert not text_sort_columns(plan(select(sales.c.qty).order_by(sales.c.qty)))
