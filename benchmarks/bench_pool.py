"""W1 checkout + checkin without a query, and W3 connect-per-request vs pooled.

W1 (``checkout``) takes a connection from a pool and gives it back, nothing
else, on one partition, from one thread; every pool holds ``POOL_SIZE``
connections at most and reuses the same one.  Two cases, one per path:

``checkout-pool``: the pool's own API
    ``sa-queuepool`` (baseline): SQLAlchemy's ``QueuePool`` from
    ``create_engine(url, pool_size=5, max_overflow=0)``, ``engine.pool.connect().close()``;
    ``ours``: the partition's :class:`.PartitionPool` with default settings
    (statistics, health, pre-ping within the skip window), the same call;
    ``psycopg2-simple`` / ``psycopg2-threaded``: ``psycopg2.pool``'s
    ``SimpleConnectionPool`` / ``ThreadedConnectionPool(5, 5)``, getconn/putconn;
    ``psycopg-pool``: ``psycopg_pool.ConnectionPool(max_size=5)``, getconn/putconn.
``checkout-engine``: through a SQLAlchemy ``Connection``
    ``sa-engine`` (baseline): ``with engine.connect(): pass``;
    ``ours``: the same on the partition's engine (``sharded.engine(name)``);
    ``ours-routed``: ``with sharded.connect(key=k): pass`` (routing included).

W3 (``connect``) reads one row by key (the W2 statement and data, 4 partitions):

``psycopg2-connect`` (baseline)
    a fresh psycopg2 connection per request: connect, autocommit, query, close;
``sa-nullpool``
    SQLAlchemy with ``NullPool`` (connect per ``engine.connect()``), Core select;
``ours``
    ``sharded.execute(stmt, key=k)`` on the pooled partitions.

The checks verify that every variant reaches the right database (W1) or reads
the same rows (W3), and count round trips per operation through a relay.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from functools import partial
from typing import Any

import psycopg2
from psycopg2.pool import SimpleConnectionPool, ThreadedConnectionPool
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool import create_sharded_engine

from .bench_reads import (
    POINT_READ,
    RAW_SQL,
    Contender,
    RoundTripCounter,
    count_round_trips,
    key_sample,
    libpq_params,
    load_items,
)
from .harness import BenchContext, BenchmarkError, Case, Variant, register

__all__ = ["checkout", "connect"]

#: The pool size every W1 contender is given (only one connection is used).
POOL_SIZE = 5
#: Checkouts whose round trips are counted per contender in the W1 check.
COUNTED_CHECKOUTS = 50
#: W3: partitions and rows per partition (the W2 table, smaller).
CONNECT_PARTITIONS = 4
CONNECT_ROWS_FULL = 1_000
CONNECT_ROWS_QUICK = 100
COUNTED_REQUESTS = 10
#: Operations per round in full mode (quick mode calibrates): fixed, because a
#: single calibrating call of a few microseconds is mostly noise.
OPS_CHECKOUT = 20_000
OPS_CONNECT = 40

_CURRENT_DATABASE = "SELECT current_database()"


# -- W1 contenders: call() checks a connection out and back in; probe() names its database --


def _sa_pool(url: str) -> tuple[Contender, Any]:
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=0)
    pool = engine.pool

    def op() -> None:
        pool.connect().close()

    def probe() -> str:
        conn = pool.connect()
        try:
            cur = conn.cursor()
            cur.execute(_CURRENT_DATABASE)
            return str(cur.fetchone()[0])
        finally:
            conn.close()

    return (
        Contender(
            "sa-queuepool",
            f"create_engine(pool_size={POOL_SIZE}, max_overflow=0).pool.connect().close()",
            op,
            engine.dispose,
        ),
        probe,
    )


def _ours_pool(url: str) -> tuple[Contender, Any]:
    sharded = create_sharded_engine({"p0": url}, max_connections=POOL_SIZE)
    pool = sharded.pool("p0")

    def op() -> None:
        pool.connect().close()

    def probe() -> str:
        conn = pool.connect()
        try:
            cur = conn.cursor()
            cur.execute(_CURRENT_DATABASE)
            return str(cur.fetchone()[0])
        finally:
            conn.close()

    return (
        Contender(
            "ours",
            f"PartitionPool (defaults, max_connections={POOL_SIZE}): pool.connect().close()",
            op,
            sharded.dispose,
        ),
        probe,
    )


def _psycopg2(url: str, *, threaded: bool) -> tuple[Contender, Any]:
    cls = ThreadedConnectionPool if threaded else SimpleConnectionPool
    pool = cls(POOL_SIZE, POOL_SIZE, **libpq_params(url))

    def op() -> None:
        pool.putconn(pool.getconn())

    def probe() -> str:
        conn = pool.getconn()
        try:
            with conn.cursor() as cur:
                cur.execute(_CURRENT_DATABASE)
                name = str(cur.fetchone()[0])
            conn.rollback()
            return name
        finally:
            pool.putconn(conn)

    name = "psycopg2-threaded" if threaded else "psycopg2-simple"
    return (
        Contender(
            name,
            f"psycopg2 {cls.__name__}({POOL_SIZE}, {POOL_SIZE}) getconn/putconn",
            op,
            pool.closeall,
        ),
        probe,
    )


def _psycopg_pool(url: str) -> tuple[Contender, Any]:
    from psycopg.conninfo import make_conninfo
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(
        make_conninfo(**libpq_params(url)), min_size=1, max_size=POOL_SIZE, open=True
    )
    pool.wait(timeout=30)

    def op() -> None:
        pool.putconn(pool.getconn())

    def probe() -> str:
        conn = pool.getconn()
        try:
            row = conn.execute(_CURRENT_DATABASE).fetchone()
            conn.rollback()
            assert row is not None
            return str(row[0])
        finally:
            pool.putconn(conn)

    return (
        Contender(
            "psycopg-pool",
            f"psycopg_pool.ConnectionPool(max_size={POOL_SIZE}) getconn/putconn",
            op,
            pool.close,
        ),
        probe,
    )


def _sa_engine(url: str) -> tuple[Contender, Any]:
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=0)

    def op() -> None:
        with engine.connect():
            pass

    def probe() -> str:
        with engine.connect() as conn:
            return str(conn.execute(text(_CURRENT_DATABASE)).scalar_one())

    return (
        Contender("sa-engine", "with engine.connect(): pass", op, engine.dispose),
        probe,
    )


def _ours_engine(url: str, *, routed: bool) -> tuple[Contender, Any]:
    sharded = create_sharded_engine({"p0": url}, max_connections=POOL_SIZE)
    engine = sharded.engine("p0")

    if routed:

        def op() -> None:
            with sharded.connect(key=42):
                pass

    else:

        def op() -> None:
            with engine.connect():
                pass

    def probe() -> str:
        with sharded.connect(key=42) if routed else engine.connect() as conn:
            return str(conn.execute(text(_CURRENT_DATABASE)).scalar_one())

    if routed:
        return (
            Contender("ours-routed", "with sharded.connect(key=k): pass", op, sharded.dispose),
            probe,
        )
    return (
        Contender("ours", "with sharded.engine(name).connect(): pass", op, sharded.dispose),
        probe,
    )


_POOL_PATH = [
    _sa_pool,
    _ours_pool,
    partial(_psycopg2, threaded=False),
    partial(_psycopg2, threaded=True),
    _psycopg_pool,
]
_ENGINE_PATH = [_sa_engine, partial(_ours_engine, routed=False), partial(_ours_engine, routed=True)]


def _checkout_case(
    name: str, url: str, builders: Sequence[Any], baseline: str, ops: int | None
) -> Iterator[Case]:
    database = url.rsplit("/", 1)[-1].split("?", 1)[0]
    with ExitStack() as stack:
        built = []
        for build in builders:
            contender, probe = build(url)
            stack.callback(contender.close)
            built.append((contender, probe))

        def check() -> str:
            for contender, probe in built:
                found = probe()
                if found != database:
                    raise BenchmarkError(f"{contender.name} reached {found!r}, not {database!r}")
            counter = RoundTripCounter(url)
            trips = []
            try:
                for build in builders:
                    contender, _ = build(counter.url_for(url))
                    try:
                        per_op = count_round_trips(
                            counter, contender.call, contender.call, COUNTED_CHECKOUTS
                        )
                    finally:
                        contender.close()
                    trips.append(f"{contender.name} {per_op:.2f}")
            finally:
                counter.close()
            return f"every variant reached {database}; round trips per checkout: " + ", ".join(
                trips
            )

        yield Case(
            name=name,
            variants=[Variant(c.name, c.call, c.description) for c, _ in built],
            baseline=baseline,
            params={"partitions": 1, "pool_size": POOL_SIZE, "threads": 1},
            ops_per_round=ops,
            check=check,
        )


@register(
    "checkout",
    "W1: checkout + checkin without a query, 1 thread: SQLAlchemy QueuePool (baseline), "
    "ours, psycopg2 pools, psycopg_pool",
)
def checkout(ctx: BenchContext) -> Iterator[Case]:
    """Cases ``checkout-pool`` (the pools' own API) and ``checkout-engine`` (``Connection``)."""
    with ctx.partitions(1, prefix="partpool_bench_checkout") as urls:
        url = urls["p0"]
        ops = None if ctx.quick else OPS_CHECKOUT
        yield from _checkout_case("checkout-pool", url, _POOL_PATH, "sa-queuepool", ops)
        yield from _checkout_case("checkout-engine", url, _ENGINE_PATH, "sa-engine", ops)


# -- W3 ------------------------------------------------------------------------------------


def _connect_contenders(
    urls: Sequence[str], names: Sequence[str], route: dict[int, int]
) -> list[Contender]:
    params = [libpq_params(u) for u in urls]

    def fresh(key: int) -> tuple[Any, ...]:
        conn = psycopg2.connect(**params[route[key]])
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(RAW_SQL, (key,))
                return tuple(cur.fetchone())
        finally:
            conn.close()

    engines = [create_engine(u, poolclass=NullPool) for u in urls]

    def nullpool(key: int) -> tuple[Any, ...]:
        with engines[route[key]].connect() as conn:
            return tuple(conn.execute(POINT_READ, {"k": key}).one())

    def dispose_engines() -> None:
        for engine in engines:
            engine.dispose()

    sharded = create_sharded_engine(dict(zip(names, urls)))

    def ours(key: int) -> tuple[Any, ...]:
        return tuple(sharded.execute(POINT_READ, {"k": key}, key=key).one())

    return [
        Contender(
            "psycopg2-connect",
            "psycopg2.connect() per request: connect, autocommit, query, close",
            fresh,
            lambda: None,
        ),
        Contender(
            "sa-nullpool",
            "create_engine(poolclass=NullPool): a connection per engine.connect()",
            nullpool,
            dispose_engines,
        ),
        Contender(
            "ours", "sharded.execute(select, key=k) on pooled partitions", ours, sharded.dispose
        ),
    ]


def _request(call: Any, keys: Iterator[int]) -> object:
    return call(next(keys))


@register(
    "connect",
    "W3: one point read per request: a fresh psycopg2 connection per request (baseline) "
    "vs SQLAlchemy NullPool vs ours (pooled)",
)
def connect(ctx: BenchContext) -> Iterator[Case]:
    """Case ``connect-per-request`` on 4 partitions."""
    rows = CONNECT_ROWS_QUICK if ctx.quick else CONNECT_ROWS_FULL
    with ctx.partitions(CONNECT_PARTITIONS, prefix="partpool_bench_connect") as urls_by_name:
        names = list(urls_by_name)
        urls = [urls_by_name[n] for n in names]
        with create_sharded_engine(urls_by_name, max_connections=2) as loader:
            placed = load_items(loader, rows)
        index = {name: i for i, name in enumerate(names)}
        route = {key: index[name] for key, name in placed.items()}
        all_keys = sorted(route)
        check_keys = key_sample(all_keys, seed=7, size=20)
        with ExitStack() as stack:
            contenders = _connect_contenders(urls, names, route)
            for contender in contenders:
                stack.callback(contender.close)

            def check() -> str:
                for key in check_keys:
                    want = (key, f"item-{key}", (key * 7919) % 1000)
                    for contender in contenders:
                        got = contender.call(key)
                        if got != want:
                            raise BenchmarkError(
                                f"{contender.name} read {got!r} for key {key}, not {want!r}"
                            )
                counter = RoundTripCounter(urls[0])
                trips = []
                try:
                    for contender in _connect_contenders(
                        [counter.url_for(u) for u in urls], names, route
                    ):
                        try:
                            warm_keys = iter(check_keys * 2)
                            per_op = count_round_trips(
                                counter,
                                lambda c=contender: [c.call(k) for k in check_keys],
                                partial(_request, contender.call, warm_keys),
                                COUNTED_REQUESTS,
                            )
                        finally:
                            contender.close()
                        trips.append(f"{contender.name} {per_op:.2f}")
                finally:
                    counter.close()
                return (
                    f"same rows from every variant for {len(check_keys)} keys; "
                    "round trips per request: " + ", ".join(trips)
                )

            variants = []
            for seed, contender in enumerate(contenders):
                keys = itertools.cycle(key_sample(all_keys, seed=seed))
                variants.append(
                    Variant(
                        contender.name,
                        partial(_request, contender.call, keys),
                        contender.description,
                    )
                )
            yield Case(
                name="connect-per-request",
                variants=variants,
                baseline="psycopg2-connect",
                ops_per_round=None if ctx.quick else OPS_CONNECT,
                params={
                    "partitions": CONNECT_PARTITIONS,
                    "rows_per_partition": rows,
                    "statement": RAW_SQL,
                },
                check=check,
            )
