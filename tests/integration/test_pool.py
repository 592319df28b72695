"""Pool sizing against a real server: min up front, max as a ceiling, idle reaping, timeouts.

Connection counts are read from the server (pg_stat_activity), not from the pool.
"""

from __future__ import annotations

import gc
import random
import threading
import time

import pytest
from sqlalchemy import text

from sqlalchemy_partpool import PartitionPool, PoolClosed, PoolExhausted, PoolTimeout


def test_exactly_min_connections_per_partition_after_start(sharded_factory, server):
    sharded, databases = sharded_factory(3, min_connections=3, max_connections=6)
    for database in databases:
        assert server.connections(database) == 3
    for snap in sharded.stats().values():
        assert (snap.open, snap.idle, snap.checked_out) == (3, 3, 0)


def test_lazy_opens_nothing_until_used(sharded_factory, server):
    sharded, databases = sharded_factory(2, min_connections=2, lazy=True)
    assert [server.connections(db) for db in databases] == [0, 0]
    with sharded.connect(partition="p0") as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    # the first use opens one; maintenance then fills up to the minimum
    assert server.wait_for(databases[0], lambda n: n == 2) == 2
    assert server.connections(databases[1]) == 0


def test_never_more_than_max_under_four_times_max_threads(sharded_factory, server):
    max_connections = 5
    sharded, (database,) = sharded_factory(
        1, min_connections=1, max_connections=max_connections, timeout=30
    )
    threads_n = 4 * max_connections
    per_thread = 25
    stop = threading.Event()
    peak = 0
    errors: list[BaseException] = []

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, server.connections(database))
            time.sleep(0.005)

    def work() -> None:
        try:
            for _ in range(per_thread):
                with sharded.connect(partition="p0") as conn:
                    conn.execute(text("SELECT pg_sleep(0.002)"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    stop.set()
    sampler.join(10)
    assert not errors
    snap = sharded.stats()["p0"]
    assert snap.checkouts == threads_n * per_thread
    assert snap.checkins == snap.checkouts
    assert peak == max_connections  # reached, and never above
    assert snap.connections_opened == max_connections
    assert snap.wait_p99 > 0  # callers really queued


def test_idle_connections_above_min_are_closed_after_max_idle(sharded_factory, server):
    sharded, (database,) = sharded_factory(1, min_connections=2, max_connections=8, max_idle=0.5)
    conns = [sharded.connect(partition="p0") for _ in range(8)]
    for conn in conns:
        conn.execute(text("SELECT 1"))
    assert server.connections(database) == 8
    for conn in conns:
        conn.close()
    started = time.monotonic()
    assert server.wait_for(database, lambda n: n == 2, timeout=10) == 2
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 5
    # and the minimum is never reaped
    time.sleep(1.0)
    assert server.connections(database) == 2


def test_min_is_refilled_in_the_background_after_connections_are_lost(sharded_factory, server):
    sharded, (database,) = sharded_factory(1, min_connections=3, max_connections=5)
    with sharded.connect(partition="p0") as conn:
        conn.connection.invalidate()
    assert server.wait_for(database, lambda n: n == 3) == 3
    assert sharded.stats()["p0"].connections_lost == 1


def test_pool_timeout_within_timeout_plus_ten_percent(sharded_factory):
    timeout = 0.8
    sharded, _ = sharded_factory(1, min_connections=0, max_connections=2, timeout=timeout)
    held = [sharded.connect(partition="p0") for _ in range(2)]
    for conn in held:
        conn.execute(text("SELECT 1"))
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        sharded.connect(partition="p0")
    elapsed = time.monotonic() - started
    assert timeout <= elapsed <= timeout * 1.1
    err = info.value
    assert err.partition == "p0"
    assert "p0" in str(err)
    assert err.max_connections == 2
    assert sharded.stats()["p0"].timeouts == 1
    for conn in held:
        conn.close()


def test_waiters_are_served_in_arrival_order(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=1, max_connections=1, timeout=10)
    holder = sharded.connect(partition="p0")
    holder.execute(text("SELECT 1"))
    order: list[int] = []

    def wait_turn(i: int) -> None:
        with sharded.connect(partition="p0"):
            order.append(i)

    threads = []
    for i in range(5):
        t = threading.Thread(target=wait_turn, args=(i,))
        t.start()
        threads.append(t)
        # let each waiter queue before the next arrives
        deadline = time.monotonic() + 5
        while sharded.stats()["p0"].waiting < i + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    holder.close()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]


def test_no_leak_after_thousands_of_operations_with_random_exceptions(sharded_factory, server):
    sharded, databases = sharded_factory(2, min_connections=1, max_connections=4, timeout=30)
    rng = random.Random(1234)
    operations = 3000
    failures = 0

    def work(seed: int, count: int) -> None:
        nonlocal failures
        local = random.Random(seed)
        for i in range(count):
            try:
                if local.random() < 0.5:
                    with sharded.connect(key=i) as conn:
                        conn.execute(text("SELECT 1"))
                        if local.random() < 0.3:
                            raise RuntimeError("boom")
                        if local.random() < 0.1:
                            conn.execute(text("SELECT * FROM no_such_table"))
                else:
                    with sharded.begin(key=i) as conn:
                        conn.execute(text("SELECT 1"))
                        if local.random() < 0.3:
                            raise ValueError("boom in a transaction")
            except (RuntimeError, ValueError, Exception):
                failures += 1

    threads = [
        threading.Thread(target=work, args=(rng.random(), operations // 6)) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures > operations // 10  # exceptions really happened
    for name, snap in sharded.stats().items():
        assert snap.checked_out == 0, name
        assert snap.checkouts == snap.checkins, name
        assert snap.open == snap.idle <= 4
    for database in databases:
        assert server.connections(database) <= 4
        assert "idle in transaction" not in server.states(database)


def test_resize_at_run_time(sharded_factory, server):
    sharded, (database,) = sharded_factory(1, min_connections=1, max_connections=2, timeout=5)
    held = [sharded.connect(partition="p0") for _ in range(2)]
    for conn in held:
        conn.execute(text("SELECT 1"))
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(sharded.connect(partition="p0")))
    waiter.start()
    time.sleep(0.2)
    assert not got
    sharded.resize(max_connections=3)
    waiter.join(5)
    assert len(got) == 1  # the waiter got the new slot at once
    got[0].close()  # type: ignore[attr-defined]
    for conn in held:
        conn.close()
    sharded.resize(min_connections=3, max_connections=3)
    assert server.wait_for(database, lambda n: n == 3) == 3
    sharded.resize(min_connections=1, max_connections=1)
    assert server.wait_for(database, lambda n: n == 1) == 1
    snap = sharded.stats()["p0"]
    assert (snap.min_connections, snap.max_connections, snap.open) == (1, 1, 1)


def test_lifo_reuses_the_most_recently_returned_connection(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=3, max_connections=3)
    pids = []
    for _ in range(5):
        with sharded.connect(partition="p0") as conn:
            pids.append(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
    assert len(set(pids)) == 1


def test_max_lifetime_replaces_connections_but_never_while_checked_out(sharded_factory):
    sharded, _ = sharded_factory(
        1, min_connections=1, max_connections=2, max_lifetime=0.5, lifetime_jitter=0.0
    )
    with sharded.connect(partition="p0") as conn:
        first = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        time.sleep(0.8)  # past its lifetime while checked out: still the same connection
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == first
    time.sleep(0.2)
    with sharded.connect(partition="p0") as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != first


def test_pre_ping_is_skipped_for_a_connection_used_moments_ago(sharded_factory, monkeypatch):
    sharded, _ = sharded_factory(1, min_connections=1, max_connections=1, ping_skip_window=0.3)
    engine = sharded.engine("p0")
    pings = []
    original = engine.dialect.do_ping

    def counting_ping(dbapi_connection):
        pings.append(time.monotonic())
        return original(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counting_ping)
    with sharded.connect(partition="p0") as conn:
        conn.execute(text("SELECT 1"))  # a brand-new connection is never pinged
    assert pings == []
    time.sleep(0.4)  # now it has been idle longer than the window
    for _ in range(10):
        with sharded.connect(partition="p0") as conn:
            conn.execute(text("SELECT 1"))
    assert len(pings) == 1  # only the first checkout pinged
    time.sleep(0.4)
    with sharded.connect(partition="p0") as conn:
        conn.execute(text("SELECT 1"))
    assert len(pings) == 2


def test_engine_dispose_of_one_partition_recreates_its_pool(sharded_factory, server):
    sharded, (database,) = sharded_factory(1, min_connections=2, max_connections=4)
    engine = sharded.engine("p0")
    old_pool = engine.pool
    held = engine.connect()
    held.execute(text("SELECT 1"))
    engine.dispose()
    assert engine.pool is not old_pool
    assert isinstance(engine.pool, PartitionPool)
    held.close()  # returned to the retired pool: closed, not pooled
    # the new pool is refilled to its minimum by the maintenance thread
    assert server.wait_for(database, lambda n: n == 2) == 2
    with sharded.connect(partition="p0") as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


def test_plain_create_engine_with_partition_pool(pg_admin_url):
    from sqlalchemy import create_engine

    engine = create_engine(
        pg_admin_url,
        poolclass=PartitionPool,
        min_connections=0,
        max_connections=2,
        pool_timeout=0.3,
    )
    try:
        with engine.connect() as a, engine.connect() as b:
            a.execute(text("SELECT 1"))
            b.execute(text("SELECT 1"))
            with pytest.raises(PoolTimeout):
                engine.connect()
        assert engine.pool.checkedin() == 2
        assert engine.pool.size() == 2
    finally:
        engine.dispose()


def test_dispose_closes_everything_and_is_final(sharded_factory, server):
    sharded, databases = sharded_factory(2, min_connections=2)
    held = sharded.connect(partition="p0")
    held.execute(text("SELECT 1"))
    sharded.dispose()
    assert server.connections(databases[1]) == 0
    assert server.connections(databases[0]) == 1  # the one still checked out
    held.close()
    assert server.wait_for(databases[0], lambda n: n == 0) == 0
    with pytest.raises(PoolClosed):
        sharded.connect(partition="p0")
    sharded.dispose()  # twice is fine
    assert not sharded._maintenance._thread.is_alive()


def test_max_waiting_rejects_at_once_with_pool_exhausted(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=1, max_connections=1, max_waiting=1, timeout=5)
    holder = sharded.connect(partition="p0")
    holder.execute(text("SELECT 1"))
    waiter = threading.Thread(target=lambda: sharded.connect(partition="p0").close())
    waiter.start()
    deadline = time.monotonic() + 5
    while sharded.stats()["p0"].waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.monotonic()
    with pytest.raises(PoolExhausted) as info:
        sharded.connect(partition="p0")
    assert time.monotonic() - started < 0.5  # rejected, not queued
    assert info.value.partition == "p0"
    assert "max_waiting=1" in str(info.value)
    holder.close()
    waiter.join(5)
    snap = sharded.stats()["p0"]
    assert snap.exhausted == 1
    assert snap.checkouts == snap.checkins == 2


def test_a_connection_dropped_without_close_goes_back_to_the_pool(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=0, max_connections=1, timeout=2)

    def leak() -> None:
        conn = sharded.connect(partition="p0")
        conn.execute(text("SELECT 1"))  # and never closed

    leak()
    gc.collect()
    with sharded.connect(partition="p0") as conn:  # max 1: it must have come back
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    snap = sharded.stats()["p0"]
    assert snap.checked_out == 0
    assert snap.checkouts == snap.checkins == 2
