"""The psycopg2-style getconn/putconn API over real partitions."""

from __future__ import annotations

import threading

import psycopg2
import pytest
from psycopg2 import extensions as ext

from sqlalchemy_partpool import (
    ConnectionReturnError,
    PartitionedConnectionPool,
    PoolClosed,
    PoolTimeout,
    ShardKeyMissing,
    UnknownPartition,
    create_sharded_engine,
)


@pytest.fixture
def pool_factory(make_databases):
    created: list[PartitionedConnectionPool] = []

    def factory(n: int = 2, minconn: int = 1, maxconn: int = 3, **options):
        urls = make_databases(n)
        pool = PartitionedConnectionPool(
            minconn, maxconn, partitions={f"p{i}": u for i, u in enumerate(urls)}, **options
        )
        created.append(pool)
        return pool, [u.rsplit("/", 1)[1] for u in urls]

    yield factory
    for pool in created:
        pool.closeall()


def test_getconn_gives_a_real_psycopg2_connection_on_the_right_partition(pool_factory):
    pool, databases = pool_factory(3)
    by_name = dict(zip(pool.sharded.partitions, databases))
    for key in range(20):
        conn = pool.getconn(key=key)
        try:
            assert isinstance(conn, ext.connection)
            with conn.cursor() as cur:
                cur.execute("SELECT current_database()")
                assert cur.fetchone()[0] == by_name[pool.sharded.partition_for(key)]
            assert pool.partition_of(conn) == pool.sharded.partition_for(key)
        finally:
            pool.putconn(conn)
    assert pool.minconn == {"p0": 1, "p1": 1, "p2": 1}
    assert pool.maxconn == {"p0": 3, "p1": 3, "p2": 3}


def test_seed_recipe_before_and_after(pool_factory):
    """The migration guide's example, run as written."""
    pool, _ = pool_factory(2)
    conn = pool.getconn(key="tenant-1")
    try:
        cur = conn.cursor()
        cur.execute("CREATE TABLE IF NOT EXISTS notes (tenant text, body text)")
        cur.execute("INSERT INTO notes VALUES (%s, %s)", ("tenant-1", "hello"))
        conn.commit()
    finally:
        pool.putconn(conn)
    with pool.connection(key="tenant-1") as conn, conn.cursor() as cur:
        cur.execute("SELECT body FROM notes WHERE tenant = %s", ("tenant-1",))
        assert cur.fetchall() == [("hello",)]


def test_connection_is_returned_and_rolled_back_even_when_the_block_raises(pool_factory, server):
    pool, databases = pool_factory(1, minconn=1, maxconn=1)
    with pool.connection(partition="p0") as conn:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (x int)")
        conn.commit()
    with pytest.raises(RuntimeError), pool.connection(partition="p0") as conn:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("boom")
    # maxconn=1: if the connection had leaked this would time out
    with pool.connection(partition="p0") as conn:
        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM t")
            assert cur.fetchone()[0] == 0
    assert server.states(databases[0]) == ["idle"]


def test_putconn_inside_a_transaction_rolls_back_and_releases_locks(pool_factory, server):
    pool, databases = pool_factory(1, minconn=1, maxconn=2)
    with pool.connection(partition="p0") as conn:
        conn.cursor().execute("CREATE TABLE t (x int)")
        conn.commit()
    conn = pool.getconn(partition="p0")
    conn.cursor().execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
    assert conn.info.transaction_status == ext.TRANSACTION_STATUS_INTRANS
    pool.putconn(conn)
    assert "idle in transaction" not in server.states(databases[0])
    other = pool.getconn(partition="p0")
    try:
        other.cursor().execute("SET lock_timeout = '1s'; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
    finally:
        pool.putconn(other)


def test_failed_transaction_and_autocommit_are_reset(pool_factory):
    pool, _ = pool_factory(1, minconn=1, maxconn=1)
    conn = pool.getconn(partition="p0")
    with pytest.raises(psycopg2.Error):
        conn.cursor().execute("SELECT * FROM missing_table")
    assert conn.info.transaction_status == ext.TRANSACTION_STATUS_INERROR
    pool.putconn(conn)
    conn = pool.getconn(partition="p0")
    assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
    conn.autocommit = True
    pool.putconn(conn)
    conn = pool.getconn(partition="p0")
    assert conn.autocommit is False
    pool.putconn(conn)


def test_double_putconn_and_foreign_connections_are_clear_errors(pool_factory, pg_admin_url):
    pool, _ = pool_factory(1)
    conn = pool.getconn(partition="p0")
    pool.putconn(conn)
    with pytest.raises(ConnectionReturnError, match="returned twice"):
        pool.putconn(conn)
    dsn = pg_admin_url.replace("postgresql+psycopg2://", "postgresql://")
    foreign = psycopg2.connect(dsn)
    try:
        with pytest.raises(ConnectionReturnError):
            pool.putconn(foreign)
    finally:
        foreign.close()
    other_pool, _ = pool_factory(1)
    theirs = other_pool.getconn(partition="p0")
    with pytest.raises(ConnectionReturnError):
        pool.putconn(theirs)
    other_pool.putconn(theirs)


def test_putconn_close_true_and_a_closed_connection_are_discarded(pool_factory, server):
    pool, (database,) = pool_factory(1, minconn=0, maxconn=2)
    conn = pool.getconn(partition="p0")
    pid = conn.get_backend_pid()
    pool.putconn(conn, close=True)
    assert conn.closed
    conn2 = pool.getconn(partition="p0")
    assert conn2.get_backend_pid() != pid
    conn2.close()
    pool.putconn(conn2)
    assert pool.sharded.stats()["p0"].open == 0
    assert server.connections(database) == 0


def test_exhausted_partition_waits_then_times_out(pool_factory):
    pool, _ = pool_factory(1, minconn=0, maxconn=1, timeout=0.3)
    held = pool.getconn(partition="p0")
    got = []
    t = threading.Thread(target=lambda: got.append(pool.getconn(partition="p0")))
    t.start()
    pool.putconn(held)
    t.join(5)
    assert len(got) == 1  # waited and got it, unlike psycopg2's PoolError
    with pytest.raises(PoolTimeout):
        pool.getconn(partition="p0")
    pool.putconn(got[0])


def test_closeall_then_getconn_is_an_error(pool_factory, server):
    pool, databases = pool_factory(2, minconn=2)
    assert [server.connections(d) for d in databases] == [2, 2]
    pool.closeall()
    assert [server.connections(d) for d in databases] == [0, 0]
    with pytest.raises(PoolClosed):
        pool.getconn(key=1)


def test_routing_errors(pool_factory):
    pool, _ = pool_factory(2)
    with pytest.raises(ShardKeyMissing):
        pool.getconn()
    with pytest.raises(UnknownPartition):
        pool.getconn(partition="p9")


def test_sharing_an_existing_sharded_engine(make_databases):
    urls = make_databases(2)
    sharded = create_sharded_engine({"a": urls[0], "b": urls[1]}, lazy=True)
    pool = PartitionedConnectionPool(sharded=sharded)
    with pool.connection(partition="a") as conn:
        assert conn.get_backend_pid() > 0
    pool.closeall()
    assert not sharded.closed  # not ours to dispose
    sharded.dispose()
