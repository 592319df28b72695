"""Core queries across partitions: routing, merged results against one unpartitioned copy,
failure policies, timeouts and split writes, on real databases."""

from __future__ import annotations

import datetime as dt
import math
import random
import time
from decimal import Decimal

import pytest
from sqlalchemy import (
    Column,
    Date,
    Float,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    delete,
    desc,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool import (
    FanoutError,
    FanoutTimeout,
    QueryTimeout,
    ShardKeyMissing,
    UnmergeableStatement,
    create_sharded_engine,
)

metadata = MetaData()
sales = Table(
    "sales",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("customer", Integer, nullable=False, info={"shard_key": True}),
    Column("region", String(10)),
    Column("amount", Numeric(10, 2)),
    Column("qty", Integer),
    Column("score", Float),
    Column("day", Date),
)


def random_rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    regions = ["north", "south", "east", "west", "Zeta", "alpha"]
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": i + 1,
                "customer": rng.randint(1, 60),
                "region": rng.choice([*regions, None]),
                "amount": Decimal(rng.randint(0, 100_000)) / 100,
                "qty": rng.choice([None, *range(0, 20)]),
                "score": rng.choice([None, rng.uniform(-5, 5)]),
                "day": dt.date(2026, 1, 1) + dt.timedelta(days=rng.randint(0, 364)),
            }
        )
    return rows


@pytest.fixture
def partitioned(make_databases):
    """4 partitions with a sales table, and one unpartitioned copy of the same data."""
    urls = make_databases(5)
    sharded = create_sharded_engine(
        {f"p{i}": url for i, url in enumerate(urls[:4])}, min_connections=1, max_connections=4
    )
    whole = create_engine(urls[4], poolclass=NullPool)
    for _, engine in sharded.engines():
        metadata.create_all(engine)
    metadata.create_all(whole)
    yield sharded, whole, urls
    sharded.dispose()
    whole.dispose()


def load(sharded, whole, rows) -> None:
    result = sharded.execute_all(insert(sales), rows)
    assert result.rowcount == len(rows)
    with whole.begin() as conn:
        conn.execute(insert(sales), rows)


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        # PostgreSQL rounds avg() of numerics to ~16-20 digits; ours is exact to 28
        return abs(a - b) <= Decimal("1e-12") * max(1, abs(b))
    return a == b


def assert_same_rows(got, expected) -> None:
    assert len(got) == len(expected), (got, expected)
    for g, e in zip(got, expected):
        assert len(g) == len(e)
        assert all(same(x, y) for x, y in zip(g, e)), (g, e)


QUERIES = {
    "order_limit_offset": select(sales.c.id, sales.c.amount)
    .order_by(sales.c.amount.desc(), sales.c.id)
    .limit(15)
    .offset(7),
    "order_nulls_text": select(sales.c.id, sales.c.region, sales.c.score)
    .where(sales.c.qty > 5)
    .order_by(sales.c.region, sales.c.score.desc(), sales.c.id),
    "order_nulls_first": select(sales.c.qty, sales.c.id)
    .order_by(sales.c.qty.asc().nulls_first(), sales.c.id.desc())
    .limit(40),
    "order_by_label": select(sales.c.id, (sales.c.qty * 3).label("triple"))
    .order_by(desc("triple"), sales.c.id)
    .limit(25),
    "global_aggregates": select(
        func.count(),
        func.count(sales.c.qty),
        func.sum(sales.c.amount),
        func.min(sales.c.day),
        func.max(sales.c.score),
        func.avg(sales.c.qty),
        func.avg(sales.c.score),
        func.avg(sales.c.amount),
    ),
    "group_by_order": select(
        sales.c.region,
        func.count().label("n"),
        func.sum(sales.c.amount).label("total"),
        func.avg(sales.c.qty).label("mean_qty"),
        func.min(sales.c.day),
        func.max(sales.c.day),
    )
    .group_by(sales.c.region)
    .order_by(sales.c.region),
    "group_by_two_keys_top": select(
        sales.c.region, sales.c.qty, func.sum(sales.c.amount).label("total")
    )
    .where(sales.c.qty.is_not(None))
    .group_by(sales.c.region, sales.c.qty)
    .order_by(desc("total"), sales.c.region, sales.c.qty)
    .limit(10),
    "distinct": select(sales.c.region).distinct().order_by(sales.c.region),
    "filtered_empty": select(func.count(), func.sum(sales.c.qty)).where(sales.c.id < 0),
}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_merged_results_equal_the_unpartitioned_query(partitioned, seed):
    sharded, whole, _ = partitioned
    load(sharded, whole, random_rows(seed, 300 + 50 * seed))
    for name, statement in QUERIES.items():
        got = sharded.execute_all(statement)
        with whole.connect() as conn:
            expected_result = conn.execute(statement)
            expected = [tuple(r) for r in expected_result]
            expected_keys = list(expected_result.keys())
        assert list(got.keys()) == expected_keys, name
        assert_same_rows([tuple(r) for r in got], expected)


def test_rows_are_written_to_and_read_from_the_partition_that_owns_them(partitioned):
    sharded, whole, urls = partitioned
    rows = random_rows(9, 200)
    load(sharded, whole, rows)
    for i, url in enumerate(urls[:4]):
        direct = create_engine(url, poolclass=NullPool)
        with direct.connect() as conn:
            customers = conn.execute(select(sales.c.customer)).scalars().all()
        direct.dispose()
        assert customers, f"p{i} got no rows"
        assert {sharded.partition_for(c) for c in customers} == {f"p{i}"}
    row = rows[17]
    got = sharded.execute(
        select(sales.c.id, sales.c.customer).where(sales.c.id == row["id"]), key=row["customer"]
    ).one()
    assert tuple(got) == (row["id"], row["customer"])
    # a routed write lands on the owner only
    sharded.execute(
        update(sales).where(sales.c.id == row["id"]).values(qty=999), key=row["customer"]
    )
    owners = sharded.execute_all(
        select(sales.c.id).where(sales.c.qty == 999), tag_partition=True
    ).all()
    assert [(r.id, r.partition) for r in owners] == [
        (row["id"], sharded.partition_for(row["customer"]))
    ]


def test_result_behaves_like_a_sqlalchemy_result(partitioned):
    sharded, whole, _ = partitioned
    load(sharded, whole, random_rows(4, 120))
    stmt = select(sales.c.id, sales.c.customer).order_by(sales.c.id).limit(5)
    assert sharded.execute_all(stmt).scalars().all() == [1, 2, 3, 4, 5]
    mappings = sharded.execute_all(stmt).mappings().all()
    assert mappings[0]["id"] == 1
    assert set(mappings[0]) == {"id", "customer"}
    assert sharded.execute_all(select(func.count()).select_from(sales)).scalar_one() == 120
    assert sharded.execute_all(select(func.count()).select_from(sales)).one()[0] == 120
    tagged = sharded.execute_all(stmt, tag_partition=True).all()
    assert [r.partition for r in tagged] == [sharded.partition_for(r.customer) for r in tagged]
    result = sharded.execute_all(stmt)
    assert result.partition_names == ("p0", "p1", "p2", "p3")
    assert result.complete


def test_broadcast_dml_adds_up_rowcounts(partitioned):
    sharded, whole, _ = partitioned
    load(sharded, whole, random_rows(5, 100))
    result = sharded.execute_all(delete(sales).where(sales.c.qty.is_(None)))
    with whole.begin() as conn:
        expected = conn.execute(delete(sales).where(sales.c.qty.is_(None))).rowcount
    assert result.rowcount == expected
    assert sum(result.rowcounts.values()) == expected


def test_unmergeable_statements_are_refused_before_running(partitioned):
    sharded, _, _ = partitioned
    statements = []
    event.listen(
        sharded.engine("p0"),
        "before_cursor_execute",
        lambda *args: statements.append(args[2]),
    )
    with pytest.raises(UnmergeableStatement, match="HAVING"):
        sharded.execute_all(
            select(sales.c.region, func.count()).group_by(sales.c.region).having(func.count() > 2)
        )
    assert statements == []
    # concatenation on request
    assert sharded.execute_all(text("SELECT 1"), merge="concat").scalars().all() == [1, 1, 1, 1]


def test_a_split_insert_is_one_round_trip_and_one_transaction_per_partition(partitioned):
    sharded, _, _ = partitioned
    executes: dict[str, list[bool]] = {name: [] for name in sharded.partitions}
    for name, engine in sharded.engines():
        event.listen(
            engine,
            "before_cursor_execute",
            lambda conn, cursor, stmt, params, ctx, many, _n=name: executes[_n].append(many),
        )
    rows = random_rows(6, 800)
    result = sharded.execute_all(insert(sales), rows)
    assert result.rowcount == 800
    for name, calls in executes.items():
        assert len(calls) == 1, (name, calls)  # insertmanyvalues: one batched statement
    assert sum(result.rowcounts.values()) == 800


def test_a_row_without_its_shard_key_writes_nothing(partitioned):
    sharded, _, _ = partitioned
    rows = random_rows(7, 10)
    del rows[5]["customer"]
    with pytest.raises(ShardKeyMissing, match="row 5"):
        sharded.execute_all(insert(sales), rows)
    assert sharded.execute_all(select(func.count()).select_from(sales)).scalar_one() == 0


def test_split_insert_with_an_explicit_key_and_returning(partitioned):
    sharded, _, _ = partitioned
    rows = random_rows(8, 30)
    result = sharded.execute_all(
        insert(sales).returning(sales.c.id), rows, key=lambda row: row["customer"]
    )
    assert sorted(result.scalars().all()) == list(range(1, 31))


def test_fail_fast_and_partial_with_one_partition_stopped(throwaway_server):
    up = throwaway_server()
    doomed = throwaway_server()
    urls = {
        "a0": up.create_database("a0"),
        "a1": up.create_database("a1"),
        "b0": doomed.create_database("b0"),
        "b1": doomed.create_database("b1"),
    }
    sharded = create_sharded_engine(urls, min_connections=1, connect_timeout=2)
    try:
        for _, engine in sharded.engines():
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE t (x int)"))
                conn.execute(text("INSERT INTO t VALUES (1), (2)"))
        doomed.stop()
        started = time.monotonic()
        with pytest.raises(FanoutError) as info:
            sharded.execute_all(text("SELECT x FROM t"))
        assert info.value.partition in ("b0", "b1")
        assert "b0" in str(info.value) or "b1" in str(info.value)
        assert time.monotonic() - started < 5
        result = sharded.execute_all(text("SELECT x FROM t"), on_error="partial")
        assert sorted(result.scalars().all()) == [1, 1, 2, 2]
        assert set(result.errors) == {"b0", "b1"}
        assert result.partition_names == ("a0", "a1")
        assert not result.complete
    finally:
        sharded.dispose()


def test_timeout_bounds_a_call_against_a_blackholed_partition(pg_server, fault_proxy):
    names = [f"bh{i}_{int(time.time() * 1000)}" for i in range(3)]
    urls = [pg_server.create_database(n) for n in names]
    proxy = fault_proxy(pg_server)
    sharded = create_sharded_engine(
        {"p0": urls[0], "p1": urls[1], "hole": proxy.url_for(urls[2])},
        min_connections=1,
        ping_skip_window=0.0,
    )
    try:
        for _, engine in sharded.engines():
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE t (x int)"))
                conn.execute(text("INSERT INTO t VALUES (7)"))
        proxy.blackhole()
        timeout = 1.0
        started = time.monotonic()
        with pytest.raises(FanoutTimeout) as info:
            sharded.execute_all(text("SELECT x FROM t"), timeout=timeout)
        elapsed = time.monotonic() - started
        assert info.value.pending == ("hole",)
        assert elapsed < timeout + 0.75
        started = time.monotonic()
        result = sharded.execute_all(text("SELECT x FROM t"), timeout=timeout, on_error="partial")
        elapsed = time.monotonic() - started
        assert elapsed < timeout + 0.75
        assert result.scalars().all() == [7, 7]
        assert isinstance(result.errors["hole"], QueryTimeout)
    finally:
        proxy.heal()
        sharded.dispose()
        for name in names:
            pg_server.drop_database(name)


def test_server_side_statement_timeout_gives_query_timeout(partitioned):
    sharded, _, _ = partitioned
    started = time.monotonic()
    with pytest.raises(FanoutError) as info:
        sharded.execute_all(text("SELECT pg_sleep(5)"), timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert isinstance(info.value.__cause__, QueryTimeout)
    started = time.monotonic()
    with pytest.raises(QueryTimeout):
        sharded.execute(text("SELECT pg_sleep(5)"), partition="p1", timeout=0.3)
    assert time.monotonic() - started < 1.5
    # the connections survive a server-side cancel
    assert sharded.execute_all(text("SELECT 1")).scalars().all() == [1, 1, 1, 1]
    assert all(s.connections_lost == 0 for s in sharded.stats().values())


def test_nested_fan_out_from_a_worker_does_not_deadlock(make_databases):
    urls = make_databases(2)
    sharded = create_sharded_engine(
        {"p0": urls[0], "p1": urls[1]}, fanout_workers=1, max_connections=1
    )
    try:
        inner_results = []

        @event.listens_for(sharded.engine("p0"), "after_cursor_execute")
        def nested(*args):
            if not inner_results:
                inner_results.append(
                    sharded.execute_all(text("SELECT 2"), partitions=["p1"]).scalar_one()
                )

        assert sorted(sharded.execute_all(text("SELECT 1")).scalars().all()) == [1, 1]
        assert inner_results == [2]
    finally:
        sharded.dispose()
