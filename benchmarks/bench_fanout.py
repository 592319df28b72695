"""W4 fan-out: one aggregate over 4 and over 8 partitions, sequential vs ``execute_all``.

Every partition holds a ``sales`` table of the same size (40,000 rows in full
mode, 300 in quick mode), loaded with one ``INSERT ... SELECT generate_series``
per partition, then vacuumed and analysed.  The statement is::

    SELECT region, count(*), sum(amount), avg(amount)
    FROM sales WHERE day >= '2024-03-01' GROUP BY region

which costs each partition a sequential scan and a hash aggregate over
numeric values: a few milliseconds of server CPU, so running partitions at
the same time can matter.

Variants, on the same engines and the same pooled connections:

``sequential`` (baseline)
    The per-partition statement that the merge plans (``avg`` split into
    ``sum`` and ``count``) run on one partition after another, as SQLAlchemy's
    ``ShardedSession`` runs a query over several shards, and merged in Python
    with the same merge code.
``ours``
    ``sharded.execute_all(statement)``: the partitions' statements run at the
    same time on the fan-out workers, then the same merge.

The two differ only in running partitions one after another or at once.
Each partition's query is kept single-threaded (``max_parallel_workers_per_gather
= 0``), as if every partition had its own server; on one local server the
speed-up is bounded by the cores that server has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import date
from functools import partial
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    MetaData,
    Numeric,
    Select,
    Table,
    Text,
    func,
    select,
    text,
)
from sqlalchemy.engine import Engine

from sqlalchemy_partpool import ShardedEngine, create_sharded_engine
from sqlalchemy_partpool.merge import MergePlan, plan

from .harness import BenchContext, BenchmarkError, Case, Variant, register

__all__ = ["CUTOFF", "PARTITION_COUNTS", "STATEMENT", "fanout", "sales"]

#: Partition counts compared, each a case of its own.
PARTITION_COUNTS = (4, 8)

#: Rows per partition: enough for a few milliseconds of work per partition in
#: full mode; just enough to exercise the code in quick mode.
ROWS_FULL = 40_000
ROWS_QUICK = 300

metadata = MetaData()

sales = Table(
    "sales",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("region", Text, nullable=False),
    Column("day", Date, nullable=False),
    Column("amount", Numeric(12, 2), nullable=False),
)

#: The aggregate reads the sales from this day on (about 5/6 of the rows).
CUTOFF = date(2024, 3, 1)

#: The aggregate every case runs.
STATEMENT: Select[Any] = (
    select(
        sales.c.region,
        func.count().label("orders"),
        func.sum(sales.c.amount).label("revenue"),
        func.avg(sales.c.amount).label("mean_amount"),
    )
    .where(sales.c.day >= CUTOFF)
    .group_by(sales.c.region)
)

# Deterministic data that differs between partitions (the seed is the
# partition's number): 12 regions, a year of days, amounts up to 1000.00.
_LOAD = text(
    """
    INSERT INTO sales (id, region, day, amount)
    SELECT g,
           'region-' || lpad(((g * 7 + :seed) % 12)::text, 2, '0'),
           date '2024-01-01' + (g % 366),
           ((g::bigint * 7919 + :seed * 104729) % 100000) / 100.0
    FROM generate_series(1, :rows) AS g
    """
)

# Each partition's query runs on one core, as it would on a server of its own.
_CONNECT_OPTIONS = "-c max_parallel_workers_per_gather=0"

# Server-side bound on any statement of the benchmark (seconds).
_STATEMENT_TIMEOUT = 60.0


def _load(engine: Engine, seed: int, rows: int) -> None:
    """Create and fill ``sales`` on one partition, then vacuum and analyse it."""
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(_LOAD, {"seed": seed, "rows": rows})
    with engine.connect() as conn:
        # VACUUM sets hint bits and the visibility map now, not during the
        # first timed scans; ANALYZE gives the planner real statistics.
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE sales"))


def _sequential(
    engines: Sequence[tuple[str, Engine]], merge_plan: MergePlan
) -> list[tuple[Any, ...]]:
    """One partition after another on the same engines, merged with the same code."""
    parts: list[tuple[str, Sequence[tuple[Any, ...]]]] = []
    for name, engine in engines:
        with engine.connect() as connection:
            conn = connection.execution_options(isolation_level="AUTOCOMMIT")
            parts.append((name, [tuple(r) for r in conn.execute(merge_plan.statement)]))
    return [row for row, _ in merge_plan.merge(parts)]


def _ours(sharded: ShardedEngine) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in sharded.execute_all(STATEMENT)]


def _checker(
    sharded: ShardedEngine, engines: Sequence[tuple[str, Engine]], merge_plan: MergePlan
) -> Callable[[], str]:
    """The case's check: both variants give the same groups, and every row is counted once."""

    def check() -> str:
        sequential = sorted(_sequential(engines, merge_plan))
        ours = sorted(_ours(sharded))
        if sequential != ours:
            raise BenchmarkError(
                f"the variants disagree:\n  sequential: {sequential}\n  ours:       {ours}"
            )
        # ... and both count every matching row exactly once
        expected = 0
        count = select(func.count()).select_from(sales).where(sales.c.day >= CUTOFF)
        for _, engine in engines:
            with engine.connect() as conn:
                expected += int(conn.execute(count).scalar_one())
        counted = sum(row[1] for row in ours)
        if counted != expected:
            raise BenchmarkError(f"the merged counts add up to {counted}, not {expected}")
        return f"same {len(ours)} groups from both variants, {counted} rows counted once"

    return check


@register(
    "fanout",
    "W4: GROUP BY aggregate over N partitions, partitions one after another "
    "(sequential) vs execute_all (ours)",
)
def fanout(ctx: BenchContext) -> Iterator[Case]:
    """Cases ``fanout-4p`` and ``fanout-8p`` on the same partitions (the first 4 of 8)."""
    rows = ROWS_QUICK if ctx.quick else ROWS_FULL
    largest = max(PARTITION_COUNTS)
    merge_plan = plan(STATEMENT)
    with ctx.partitions(largest, prefix="partpool_bench_fanout") as urls:
        ctx.say(f"fanout: loading {largest} partitions x {rows} rows")
        names = list(urls)
        with create_sharded_engine(
            urls,
            min_connections=1,
            max_connections=2,
            statement_timeout=_STATEMENT_TIMEOUT,
            engine_options={"connect_args": {"options": _CONNECT_OPTIONS}},
        ) as loader:
            for seed, (_, engine) in enumerate(loader.engines()):
                _load(engine, seed, rows)
        for n in PARTITION_COUNTS:
            chosen = {name: urls[name] for name in names[:n]}
            with create_sharded_engine(
                chosen,
                min_connections=1,
                max_connections=2,
                statement_timeout=_STATEMENT_TIMEOUT,
                engine_options={"connect_args": {"options": _CONNECT_OPTIONS}},
            ) as sharded:
                engines = list(sharded.engines())
                yield Case(
                    name=f"fanout-{n}p",
                    variants=[
                        Variant(
                            "sequential",
                            partial(_sequential, engines, merge_plan),
                            "per-partition statements one after another, merged in Python",
                        ),
                        Variant(
                            "ours",
                            partial(_ours, sharded),
                            "sharded.execute_all(statement): partitions at once, merged",
                        ),
                    ],
                    baseline="sequential",
                    params={
                        "partitions": n,
                        "rows_per_partition": rows,
                        "fanout_workers": sharded.config.workers,
                        "connect_options": _CONNECT_OPTIONS,
                        "statement": str(STATEMENT.compile(compile_kwargs={"literal_binds": True})),
                    },
                    check=_checker(sharded, engines, merge_plan),
                )
