"""AsyncShardedEngine and the ORM through AsyncSession on real partitions: asyncpg and psycopg.

Each test runs its own event loop (``asyncio.run``; pytest-asyncio is not
used) under an overall deadline, and every wait inside is bounded too.
Connection counts are read from the server (pg_stat_activity), in a thread so
the loop under test is never blocked by the test itself.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from sqlalchemy import ForeignKey, String, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

from sqlalchemy_partpool import (
    ConfigurationError,
    PartitionUnavailable,
    PartpoolError,
    PinViolation,
    PoolClosed,
    PoolExhausted,
    PoolTimeout,
    ShardedSession,
    WarmupError,
)
from sqlalchemy_partpool.async_pool import AsyncPartitionHealth, AsyncPartitionPool
from sqlalchemy_partpool.asyncio import AsyncShardedEngine, create_async_sharded_engine
from sqlalchemy_partpool.testing import free_port

T = TypeVar("T")

DRIVERS = ["asyncpg", "psycopg"]


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run *coro* on a fresh event loop, failing if it takes longer than *timeout*."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def async_url(url: str, driver: str) -> str:
    return make_url(url).set(drivername=f"postgresql+{driver}").render_as_string(False)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, step: float = 0.02
) -> bool:
    """Poll *check* (plain or async) until it holds or *timeout* passes; its last answer."""

    async def answer() -> bool:
        result = check()
        return bool(await result) if inspect.isawaitable(result) else bool(result)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await answer():
            return True
        await asyncio.sleep(step)
    return await answer()


def database_of(url: str) -> str:
    database = make_url(url).database
    assert database is not None
    return database


def partpool_threads() -> list[str]:
    # the watchdog is one thread for the whole process, started by whatever
    # ran first (sync engines in other tests): not an engine's thread
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("partpool-") and t.name != "partpool-watchdog"
    ]


def partpool_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("partpool"))


class Ticker:
    """Counts turns of the event loop: a blocked loop does not tick."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    pytest.importorskip(request.param)
    return str(request.param)


@pytest.fixture
def async_factory(
    make_databases, driver: str
) -> Callable[..., tuple[AsyncShardedEngine, list[str]]]:
    """``factory(n, **options) -> (sharded, database names)`` on n fresh databases.

    Connections belong to the loop that opened them, so each test disposes
    its engine on its own loop; the databases are dropped (with any
    connection a failed test left) by ``make_databases``.
    """

    def factory(n: int = 2, **options: Any) -> tuple[AsyncShardedEngine, list[str]]:
        urls = make_databases(n)
        partitions = {f"p{i}": async_url(url, driver) for i, url in enumerate(urls)}
        return create_async_sharded_engine(partitions, **options), [database_of(u) for u in urls]

    return factory


# -- pool sizing -----------------------------------------------------------------------


def test_min_connections_open_after_warm_up(async_factory, server):
    sharded, databases = async_factory(3, min_connections=3, max_connections=6)

    async def main() -> None:
        assert [await in_thread(server.connections, db) for db in databases] == [0, 0, 0]
        assert await sharded.warm_up() == {}
        for database in databases:
            assert await in_thread(server.connections, database) == 3
        for snap in sharded.stats().values():
            assert (snap.open, snap.idle, snap.checked_out) == (3, 3, 0)
        async with sharded.connect(partition="p1") as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
        # upkeep runs on the loop, not on threads
        assert partpool_tasks() == ["partpool-maintenance"]
        assert partpool_threads() == []
        await sharded.dispose()
        assert partpool_tasks() == []
        for database in databases:
            assert await in_thread(server.wait_for, database, lambda n: n == 0) == 0

    run(main())


def test_never_more_than_max_under_four_times_max_tasks(async_factory, server):
    max_connections = 5
    sharded, (database,) = async_factory(
        1, min_connections=1, max_connections=max_connections, timeout=30
    )
    tasks_n = 4 * max_connections
    per_task = 25
    stop = threading.Event()
    peak = 0

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, server.connections(database))
            time.sleep(0.005)

    async def main() -> None:
        pool_peak = 0

        async def work() -> None:
            nonlocal pool_peak
            for _ in range(per_task):
                async with sharded.connect(partition="p0") as conn:
                    pool_peak = max(pool_peak, sharded.stats()["p0"].open)
                    await conn.execute(text("SELECT pg_sleep(0.002)"))

        await sharded.warm_up()
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            await asyncio.gather(*(work() for _ in range(tasks_n)))
        finally:
            stop.set()
            await in_thread(sampler.join, 10)
        snap = sharded.stats()["p0"]
        assert snap.checkouts == tasks_n * per_task
        assert snap.checkins == snap.checkouts
        assert pool_peak == max_connections
        assert snap.connections_opened == max_connections
        assert snap.wait_p99 > 0  # callers really queued
        await sharded.dispose()

    run(main())
    assert peak == max_connections  # reached, and never above


def test_pool_timeout_after_timeout_without_blocking_the_loop(async_factory):
    sharded, _ = async_factory(1, min_connections=1, max_connections=1, timeout=0.3)

    async def main() -> None:
        async with sharded.connect(partition="p0") as held:
            await held.execute(text("SELECT 1"))
            with Ticker() as ticker:
                started = time.monotonic()
                with pytest.raises(PoolTimeout) as info:
                    async with sharded.connect(partition="p0"):
                        pass  # pragma: no cover
                waited = time.monotonic() - started
            assert 0.25 <= waited < 2.0
            assert "'p0'" in str(info.value)
            # the loop went on turning while the caller waited
            assert ticker.ticks >= 10
        snap = sharded.stats()["p0"]
        assert (snap.timeouts, snap.waiting, snap.open, snap.checked_out) == (1, 0, 1, 0)
        await sharded.dispose()

    run(main())


def test_waiting_tasks_are_served_in_fifo_order(async_factory):
    sharded, _ = async_factory(1, min_connections=1, max_connections=1, timeout=10)
    served: list[int] = []

    async def main() -> None:
        async def wait_turn(n: int) -> None:
            async with sharded.connect(partition="p0") as conn:
                served.append(n)
                await conn.execute(text("SELECT 1"))

        async with sharded.connect(partition="p0") as held:
            await held.execute(text("SELECT 1"))
            waiters = []
            for n in range(5):
                waiters.append(asyncio.create_task(wait_turn(n)))
                assert await eventually(lambda n=n: sharded.stats()["p0"].waiting == n + 1, 5)
        await asyncio.wait_for(asyncio.gather(*waiters), 10)
        assert served == [0, 1, 2, 3, 4]
        assert sharded.stats()["p0"].connections_opened == 1
        await sharded.dispose()

    run(main())


def test_cancelled_waiter_leaves_no_trace(async_factory):
    sharded, _ = async_factory(1, min_connections=1, max_connections=1, timeout=10)

    async def main() -> None:
        async def take() -> None:
            async with sharded.connect(partition="p0") as conn:
                await conn.execute(text("SELECT 1"))

        async with sharded.connect(partition="p0") as held:
            await held.execute(text("SELECT 1"))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(take(), 0.2)
            assert sharded.stats()["p0"].waiting == 0
            # cancelled just as the connection is handed over: it goes to the next waiter
            doomed = asyncio.create_task(take())
            patient = asyncio.create_task(take())
            assert await eventually(lambda: sharded.stats()["p0"].waiting == 2, 5)
        doomed.cancel()
        await asyncio.wait_for(patient, 5)
        with pytest.raises(asyncio.CancelledError):
            await doomed
        snap = sharded.stats()["p0"]
        assert (snap.open, snap.idle, snap.checked_out, snap.waiting) == (1, 1, 0, 0)
        await asyncio.wait_for(take(), 5)
        await sharded.dispose()

    run(main())


def test_max_waiting_rejects_at_once(async_factory):
    sharded, _ = async_factory(1, min_connections=1, max_connections=1, timeout=10, max_waiting=1)

    async def main() -> None:
        async with sharded.connect(partition="p0") as held:
            await held.execute(text("SELECT 1"))

            async def take() -> None:
                async with sharded.connect(partition="p0"):
                    pass

            first = asyncio.create_task(take())
            assert await eventually(lambda: sharded.stats()["p0"].waiting == 1, 5)
            started = time.monotonic()
            with pytest.raises(PoolExhausted):
                await take()
            assert time.monotonic() - started < 0.5
        await asyncio.wait_for(first, 5)
        await sharded.dispose()

    run(main())


def test_dispose_closes_everything_and_refuses_new_checkouts(async_factory, server):
    sharded, (database,) = async_factory(1, min_connections=2, max_connections=4)

    async def main() -> None:
        await sharded.warm_up()
        async with sharded.connect(partition="p0") as conn:
            await conn.execute(text("SELECT 1"))
            await sharded.dispose()
            # the checked-out connection still works until it is returned
            await conn.execute(text("SELECT 1"))
        assert await in_thread(server.wait_for, database, lambda n: n == 0) == 0
        assert partpool_tasks() == []
        with pytest.raises(PoolClosed):
            async with sharded.connect(partition="p0"):
                pass  # pragma: no cover
        await sharded.dispose()  # twice is fine

    run(main())


# -- background upkeep on the loop -----------------------------------------------------


def test_idle_connections_above_min_are_closed_and_min_is_refilled(async_factory, server):
    sharded, (database,) = async_factory(
        1, min_connections=1, max_connections=4, max_idle=0.3, keepalive_time=None
    )

    async def main() -> None:
        await sharded.warm_up()
        barrier = asyncio.Event()

        async def hold() -> None:
            async with sharded.connect(partition="p0") as conn:
                await conn.execute(text("SELECT 1"))
                await barrier.wait()

        holders = [asyncio.create_task(hold()) for _ in range(4)]
        assert await eventually(lambda: sharded.stats()["p0"].checked_out == 4, 5)
        assert await in_thread(server.connections, database) == 4
        barrier.set()
        await asyncio.wait_for(asyncio.gather(*holders), 5)
        # above the minimum, idle past max_idle: closed by the maintenance task
        assert await in_thread(server.wait_for, database, lambda n: n == 1) == 1
        assert sharded.stats()["p0"].open == 1
        # a higher minimum is filled in the background
        await sharded.resize(min_connections=3)
        assert await in_thread(server.wait_for, database, lambda n: n == 3) == 3
        assert sharded.stats()["p0"].open == 3
        await sharded.dispose()

    run(main())


def test_lazy_engine_fills_to_min_after_first_use(async_factory, server):
    sharded, databases = async_factory(2, min_connections=2, max_connections=4, lazy=True)

    async def main() -> None:
        async with sharded.connect(partition="p0") as conn:
            await conn.execute(text("SELECT 1"))
        assert await in_thread(server.wait_for, databases[0], lambda n: n == 2) == 2
        assert await in_thread(server.connections, databases[1]) == 0
        await sharded.dispose()

    run(main())


def test_keepalive_replaces_connections_killed_on_the_server(async_factory, server, admin_engine):
    sharded, (database,) = async_factory(
        1, min_connections=2, max_connections=4, keepalive_time=0.2
    )

    def backends() -> set[int]:
        with admin_engine.connect() as conn:
            return set(
                conn.execute(
                    text("SELECT pid FROM pg_stat_activity WHERE datname = :db"), {"db": database}
                ).scalars()
            )

    def kill() -> None:
        with admin_engine.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"),
                {"db": database},
            )

    async def main() -> None:
        await sharded.warm_up()
        before = await in_thread(backends)
        assert len(before) == 2
        await in_thread(kill)

        async def replaced() -> bool:
            now = await in_thread(backends)
            return len(now) == 2 and not (now & before)

        assert await eventually(replaced, 10)
        snap = sharded.stats()["p0"]
        assert snap.connections_lost >= 2
        assert (snap.open, snap.idle) == (2, 2)
        await sharded.dispose()

    run(main())


def test_connections_past_their_lifetime_are_replaced(async_factory, server):
    sharded, (database,) = async_factory(
        1, min_connections=2, max_connections=4, max_lifetime=0.4, lifetime_jitter=0.0
    )

    async def main() -> None:
        await sharded.warm_up()
        assert await eventually(lambda: sharded.stats()["p0"].connections_closed >= 2, 10)
        assert await in_thread(server.wait_for, database, lambda n: n == 2) == 2
        snap = sharded.stats()["p0"]
        assert snap.open == 2
        assert snap.connections_opened >= 4
        await sharded.dispose()

    run(main())


# -- health and pings, through a fault proxy -----------------------------------------------


def test_down_partition_fails_fast_and_the_prober_task_brings_it_back(
    pg_server, make_databases, fault_proxy, driver
):
    (url,) = make_databases(1)
    proxy = fault_proxy(pg_server)
    sharded = create_async_sharded_engine(
        {"p0": async_url(proxy.url_for(url), driver)},
        min_connections=0,
        max_connections=2,
        down_after=2,
        connect_timeout=2,
        probe_max_interval=0.2,
        lazy=True,
    )

    async def main() -> None:
        proxy.refuse()
        # callers' failed connects and the prober's count together towards down_after
        for _ in range(10):
            if sharded.partition_state("p0") == "down":
                break
            with pytest.raises(Exception) as info:
                async with sharded.connect(partition="p0"):
                    pass  # pragma: no cover
            if not isinstance(info.value, PartitionUnavailable):
                assert "partpool-prober-p0" in partpool_tasks()
        assert sharded.partition_state("p0") == "down"
        started = time.monotonic()
        with pytest.raises(PartitionUnavailable):
            async with sharded.connect(partition="p0"):
                pass  # pragma: no cover
        assert time.monotonic() - started < 0.1
        # the prober is a task on this loop, not a thread
        assert "partpool-prober-p0" in partpool_tasks()
        assert not [t for t in partpool_threads() if "prober" in t]
        proxy.heal()
        assert await eventually(lambda: sharded.partition_state("p0") == "up", 10)
        async with sharded.connect(partition="p0") as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
        await sharded.dispose()

    run(main())


def test_pre_ping_is_bounded_by_ping_timeout_on_the_loop(
    pg_server, make_databases, fault_proxy, driver
):
    (url,) = make_databases(1)
    proxy = fault_proxy(pg_server)
    sharded = create_async_sharded_engine(
        {"p0": async_url(proxy.url_for(url), driver)},
        min_connections=1,
        max_connections=2,
        ping_timeout=0.3,
        ping_skip_window=0.0,
        keepalive_time=None,
        connect_timeout=5,
    )

    async def main() -> None:
        await sharded.warm_up()
        proxy.blackhole()
        # heal while the pool replaces the connection whose ping timed out
        asyncio.get_running_loop().call_later(0.6, proxy.heal)
        with Ticker() as ticker:
            started = time.monotonic()
            async with sharded.connect(partition="p0") as conn:
                assert await conn.scalar(text("SELECT 1")) == 1
            elapsed = time.monotonic() - started
        assert 0.3 <= elapsed < 5.0
        assert ticker.ticks >= 10  # the ping waited on the loop, not in it
        snap = sharded.stats()["p0"]
        assert snap.connections_lost >= 1
        assert snap.connections_opened >= 2
        await sharded.dispose()

    run(main())


def test_warm_up_reports_partitions_it_cannot_reach(make_databases, driver):
    (url,) = make_databases(1)
    dead = make_url(url).set(host="127.0.0.1", port=free_port())
    partitions = {"ok": async_url(url, driver), "dead": async_url(str(dead), driver)}

    async def main(require_all: bool) -> None:
        sharded = create_async_sharded_engine(
            partitions, connect_timeout=2, require_all_partitions=require_all
        )
        try:
            if require_all:
                with pytest.raises(WarmupError) as info:
                    await sharded.warm_up()
                assert set(info.value.errors) == {"dead"}
            else:
                errors = await sharded.warm_up()
                assert set(errors) == {"dead"}
            # the reachable partition got its minimum all the same
            assert sharded.stats()["ok"].open == 1
        finally:
            await sharded.dispose()

    run(main(True))
    run(main(False))


def test_async_partition_pool_works_on_its_own(make_databases, driver):
    (url,) = make_databases(1)

    async def main() -> None:
        engine = create_async_engine(
            async_url(url, driver),
            poolclass=AsyncPartitionPool,
            min_connections=1,
            max_connections=2,
            pool_timeout=0.2,
        )
        pool = engine.sync_engine.pool
        assert isinstance(pool, AsyncPartitionPool)
        # its prober must not be a thread: a thread cannot open asyncio connections
        assert isinstance(pool.health, AsyncPartitionHealth)
        assert await pool.fill_async() == []
        async with engine.connect() as a, engine.connect() as b:
            assert await a.scalar(text("SELECT 1")) == await b.scalar(text("SELECT 1")) == 1
            with pytest.raises(PoolTimeout):
                async with engine.connect():
                    pass  # pragma: no cover
        assert pool.snapshot().open == 2
        await engine.dispose()

    run(main())


def test_sync_engine_used_outside_the_greenlet_bridge_does_not_hurt_the_partition(async_factory):
    sharded, _ = async_factory(1, min_connections=2, max_connections=4, ping_skip_window=0.0)

    async def main() -> None:
        await sharded.warm_up()
        for _ in range(5):  # more than down_after
            with pytest.raises(MissingGreenlet):
                sharded.sync_engine.engine("p0").connect()
        snap = sharded.stats()["p0"]
        assert sharded.partition_state("p0") == "up"
        assert (snap.open, snap.idle, snap.connections_lost, snap.connect_errors) == (2, 2, 0, 0)
        async with sharded.connect(partition="p0") as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
        await sharded.dispose()

    run(main())


# -- configuration ---------------------------------------------------------------------


def test_only_asyncio_drivers_are_accepted():
    with pytest.raises(ConfigurationError, match="asyncio driver"):
        create_async_sharded_engine({"p0": "postgresql+psycopg2://u@h/db"}, lazy=True)
    with pytest.raises(ConfigurationError, match="query_timeout"):
        create_async_sharded_engine(
            {"p0": "postgresql+psycopg://u@h/db"}, lazy=True, query_timeout=5
        )


def test_sync_only_operations_of_the_sync_engine_raise(async_factory):
    sharded, _ = async_factory(1, lazy=True)
    with pytest.raises(PartpoolError, match="await warm_up"):
        sharded.sync_engine.warm_up()
    with pytest.raises(PartpoolError, match="check_health"):
        sharded.sync_engine.check_health()
    assert isinstance(sharded.engine("p0").sync_engine.pool, AsyncPartitionPool)
    run(sharded.dispose())


# -- the ORM through AsyncSession ------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "orders"
    __shard_key__ = "customer_id"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    total: Mapped[int]
    customer: Mapped[Customer] = relationship(back_populates="orders")


CUSTOMERS = 40


@pytest.fixture
def orm(async_factory) -> tuple[AsyncShardedEngine, async_sessionmaker[AsyncSession]]:
    """Four partitions and an AsyncSession factory over them (tables: :func:`_populate`)."""
    sharded, _ = async_factory(4, min_connections=1, max_connections=4)
    factory = async_sessionmaker(
        sync_session_class=ShardedSession, sharded=sharded.sync_engine, expire_on_commit=False
    )
    return sharded, factory


async def _populate(sharded: AsyncShardedEngine, factory: async_sessionmaker[AsyncSession]) -> None:
    """Create the tables on every partition and add customers with two orders each."""
    for name in sharded.partitions:
        async with sharded.begin(partition=name) as conn:
            await conn.run_sync(Base.metadata.create_all)
    async with factory() as session:
        for i in range(1, CUSTOMERS + 1):
            customer = Customer(id=i, name=f"c{i:02d}")
            customer.orders = [Order(id=i * 10 + k, total=i * 10 + k) for k in range(2)]
            session.add(customer)
        await session.commit()


def test_orm_objects_land_on_their_partitions_and_get_is_routed(orm):
    sharded, factory = orm

    async def main() -> None:
        await _populate(sharded, factory)
        expected: dict[str, int] = {}
        for i in range(1, CUSTOMERS + 1):
            name = sharded.partition_for(i)
            expected[name] = expected.get(name, 0) + 1
        assert len(expected) == 4  # the data really spans the partitions
        for name in sharded.partitions:
            async with sharded.connect(partition=name) as conn:
                ids = (await conn.scalars(text("SELECT id FROM customers"))).all()
                orders = (await conn.scalars(text("SELECT customer_id FROM orders"))).all()
            assert len(ids) == expected[name]
            assert all(sharded.partition_for(i) == name for i in ids)
            assert all(sharded.partition_for(c) == name for c in orders)
        async with factory() as session:
            checkouts = sum(s.checkouts for s in sharded.stats().values())
            customer = await session.get(Customer, 7)
            assert customer is not None
            assert customer.name == "c07"
            # routed by key: one partition asked
            assert sum(s.checkouts for s in sharded.stats().values()) == checkouts + 1
            assert await session.get(Customer, 999) is None
        await sharded.dispose()

    run(main())


def test_orm_multi_partition_select_is_merged_globally_and_runs_concurrently(orm):
    sharded, factory = orm

    async def main() -> None:
        await _populate(sharded, factory)
        async with factory() as session:
            newest = (
                await session.scalars(select(Customer).order_by(Customer.id.desc()).limit(5))
            ).all()
            assert [c.id for c in newest] == [40, 39, 38, 37, 36]
            page = (
                await session.scalars(select(Customer).order_by(Customer.name).offset(3).limit(4))
            ).all()
            assert [c.name for c in page] == ["c04", "c05", "c06", "c07"]
            total = await session.scalar(select(func.count()).select_from(Customer))
            assert total == CUSTOMERS
            # every partition sleeps 0.2 s once (an uncorrelated subquery runs
            # once per query): one partition after another would take 0.8 s
            slow = (
                select(Customer)
                .where(select(func.pg_sleep(0.2)).scalar_subquery().is_not(None))
                .order_by(Customer.id)
                .limit(3)
            )
            with Ticker() as ticker:
                started = time.monotonic()
                rows = (await session.scalars(slow)).all()
                elapsed = time.monotonic() - started
            assert [c.id for c in rows] == [1, 2, 3]
            assert 0.2 <= elapsed < 0.6, elapsed
            assert ticker.ticks >= 5
        await sharded.dispose()

    run(main())


def test_orm_selectinload_across_partitions(orm):
    sharded, factory = orm

    async def main() -> None:
        await _populate(sharded, factory)
        async with factory() as session:
            customers = (
                await session.scalars(
                    select(Customer)
                    .where(Customer.id.in_([1, 2, 3, 4, 5, 6]))
                    .options(selectinload(Customer.orders))
                    .order_by(Customer.id)
                )
            ).all()
            assert [c.id for c in customers] == [1, 2, 3, 4, 5, 6]
            assert len({sharded.partition_for(c.id) for c in customers}) > 1
            for customer in customers:
                # loaded already: no lazy load (which would need await) happens here
                assert sorted(o.id for o in customer.orders) == [
                    customer.id * 10,
                    customer.id * 10 + 1,
                ]
            order = await session.get(Order, 71, options=[selectinload(Order.customer)])
            assert order is not None
            assert order.customer.id == 7
        await sharded.dispose()

    run(main())


def test_orm_rollback_discards_work_on_every_partition(orm):
    sharded, factory = orm

    async def main() -> None:
        await _populate(sharded, factory)
        async with factory() as session:
            ids = [101, 102, 103, 104, 105, 106, 107, 108]
            assert len({sharded.partition_for(i) for i in ids}) > 1
            session.add_all([Customer(id=i, name=f"new{i}") for i in ids])
            await session.flush()
            seen = await session.scalar(
                select(func.count()).select_from(Customer).where(Customer.id > 100)
            )
            assert seen == len(ids)
            await session.rollback()
        async with factory() as session:
            after = await session.scalar(
                select(func.count()).select_from(Customer).where(Customer.id > 100)
            )
            assert after == 0
            assert await session.scalar(select(func.count()).select_from(Customer)) == CUSTOMERS
        for snap in sharded.stats().values():
            assert snap.checked_out == 0
        await sharded.dispose()

    run(main())


def test_orm_pinned_session_stays_on_its_partition(orm):
    sharded, factory = orm

    async def main() -> None:
        await _populate(sharded, factory)
        home = sharded.partition_for(5)
        other = next(i for i in range(1, CUSTOMERS + 1) if sharded.partition_for(i) != home)
        async with factory() as session:
            with sharded.pinned(5):
                assert (await session.get(Customer, 5)) is not None
                with pytest.raises(PinViolation):
                    await session.get(Customer, other)
        await sharded.dispose()

    run(main())


def test_orm_twophase_commit_across_partitions(orm, admin_engine):
    sharded, _ = orm
    factory = async_sessionmaker(
        sync_session_class=ShardedSession, sharded=sharded.sync_engine, twophase=True
    )

    async def main() -> None:
        await _populate(sharded, factory)
        async with factory() as session:
            ids = [201, 202, 203, 204, 205, 206]
            assert len({sharded.partition_for(i) for i in ids}) > 1
            session.add_all([Customer(id=i, name=f"tp{i}") for i in ids])
            await session.commit()
        async with factory() as session:
            count = await session.scalar(
                select(func.count()).select_from(Customer).where(Customer.id > 200)
            )
            assert count == 6
        await sharded.dispose()

    run(main())
    databases = [p.url.database for p in sharded.partitions.values()]
    with admin_engine.connect() as conn:
        left = conn.execute(
            text("SELECT count(*) FROM pg_prepared_xacts WHERE database = ANY(:dbs)"),
            {"dbs": databases},
        ).scalar_one()
    assert left == 0
