"""W2 point reads by key, from 1 thread and from 8, and the helpers the other workloads share.

Four partitions each hold a small ``items`` table (5,000 rows in full mode,
200 in quick mode), placed by the :class:`.ShardedEngine`'s router, then
vacuumed and analysed.  One operation reads one row by its key::

    SELECT id, name, amount FROM items WHERE id = :k

Every contender reads the same keys (a seeded random sample) from the same
partitions; the ones that do not route by themselves use a key -> partition
table computed once with the same router, so they pay nothing for routing.

``raw-psycopg2`` (baseline)
    A persistent psycopg2 connection per partition (per thread, with 8
    threads), autocommit, one cursor reused: one round trip, the wire's limit.
``psycopg2-pool``
    ``psycopg2.pool.ThreadedConnectionPool`` per partition, getconn/putconn,
    connections switched to autocommit.  ``minconn = maxconn = threads``:
    psycopg2's pools close every connection returned while ``minconn`` are idle.
``psycopg-pool``
    psycopg 3's ``psycopg_pool.ConnectionPool`` per partition (autocommit),
    ``with pool.connection() as conn: conn.execute(...)``.  psycopg 3 binds
    parameters server-side and prepares a statement after 5 executions.
``sa-engine``
    A plain SQLAlchemy engine per partition (QueuePool), Core ``select``,
    ``with engine.connect() as conn: conn.execute(...)``: SQLAlchemy's default
    transactional behaviour, so psycopg2 sends ``BEGIN`` first and the pool
    ``ROLLBACK`` on return.
``sa-autocommit``
    The same with ``isolation_level="AUTOCOMMIT"`` (1 thread only): what
    SQLAlchemy costs for the same single round trip as ours.
``ours``
    ``sharded.execute(stmt, {"k": k}, key=k)``: routed, autocommit, buffered.

With 8 threads an operation is a batch of reads split evenly across 8
persistent threads (25 each in full mode); the time per operation is the
batch's wall time, so reads per second = ``reads_per_op / median``.

The check verifies that every contender returns the same rows, and counts the
round trips each one makes per read through a loopback relay
(:class:`RoundTripCounter`).
"""

from __future__ import annotations

import itertools
import random
import selectors
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg2
from psycopg2.pool import ThreadedConnectionPool
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    create_engine,
    insert,
    select,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool import ShardedEngine, create_sharded_engine

from .harness import BenchContext, BenchmarkError, Case, Variant, register

__all__ = [
    "POINT_READ",
    "RAW_SQL",
    "Contender",
    "Gang",
    "RoundTripCounter",
    "count_round_trips",
    "ensure_headroom",
    "free_connections",
    "items",
    "key_sample",
    "libpq_params",
    "load_items",
    "reads",
]

#: Partitions of the W2 (and W3) data.
PARTITIONS = 4
#: Threads of the concurrent case.
THREADS = 8
#: Rows per partition: a few thousand, so every read is an index lookup in cache.
ROWS_FULL = 5_000
ROWS_QUICK = 200
#: Reads per thread in one operation of the 8-thread case.
PER_THREAD_FULL = 25
PER_THREAD_QUICK = 5
#: Keys in each contender's (cycled) key sequence.
KEY_SAMPLE = 4_096
#: Reads whose round trips are counted per contender in the check.
COUNTED_READS = 40
#: Operations per round in full mode (quick mode calibrates).  Fixed rather than
#: calibrated from one call, whose time is mostly noise at these speeds: every
#: contender's share of a round lasts 0.05-0.5 s.
OPS_1T = 1_000
OPS_8T = 8

metadata = MetaData()

items = Table(
    "items",
    metadata,
    Column("id", BigInteger, primary_key=True, info={"shard_key": True}),
    Column("name", Text, nullable=False),
    Column("amount", Integer, nullable=False),
)

#: The point read, as a Core statement with a bound parameter ``k``.
POINT_READ = select(items.c.id, items.c.name, items.c.amount).where(items.c.id == bindparam("k"))
#: The same read for the DBAPI drivers.
RAW_SQL = "SELECT id, name, amount FROM items WHERE id = %s"


# -- helpers shared by the workloads ------------------------------------------------------


def libpq_params(url: str | URL) -> dict[str, Any]:
    """Keyword arguments for ``psycopg2.connect`` / ``psycopg.connect`` from a SQLAlchemy URL."""
    u = make_url(url)
    params: dict[str, Any] = {
        "host": u.host,
        "port": u.port,
        "user": u.username,
        "password": u.password,
        "dbname": u.database,
    }
    for name, value in u.query.items():
        params[name] = value if isinstance(value, str) else value[-1]
    return {k: v for k, v in params.items() if v is not None}


def free_connections(admin_url: str) -> int:
    """How many more client connections the server at *admin_url* accepts now."""
    engine = create_engine(admin_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT current_setting('max_connections')::int - count(*) "
                        "FROM pg_stat_activity WHERE backend_type = 'client backend'"
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


def ensure_headroom(admin_url: str, needed: int, what: str) -> None:
    """Raise :class:`BenchmarkError` unless the server can take *needed* more connections."""
    free = free_connections(admin_url)
    if free < needed:
        raise BenchmarkError(
            f"{what} needs {needed} connections but the server has room for {free}; "
            "use a server with a larger max_connections (the throwaway one has 200)"
        )


@dataclass
class Contender:
    """One way of doing a workload's operation, with what it holds open.

    :param name: the variant name.
    :param description: what it does, for the report.
    :param call: the operation (its arguments depend on the workload).
    :param close: releases its connections.
    """

    name: str
    description: str
    call: Callable[..., Any]
    close: Callable[[], None]


class Gang:
    """*n* persistent threads that run one job together; :meth:`run` returns when all are done.

    Starting threads per operation would cost more than the reads measured, so
    the threads live as long as the case and meet at two barriers per job.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._start = threading.Barrier(n + 1)
        self._done = threading.Barrier(n + 1)
        self._job: Callable[[int], None] | None = None
        self._errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"bench-gang-{i}", daemon=True)
            for i in range(n)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self, index: int) -> None:
        while True:
            self._start.wait()
            job = self._job
            if job is None:
                return
            try:
                job(index)
            except BaseException as exc:  # reported by run()
                self._errors.append(exc)
            self._done.wait()

    def run(self, job: Callable[[int], None]) -> None:
        """Run ``job(thread_index)`` on every thread at once and wait for all of them.

        :raises BaseException: the first error a thread raised.
        """
        self._job = job
        self._start.wait(timeout=120)
        self._done.wait(timeout=120)
        if self._errors:
            error = self._errors[0]
            self._errors.clear()
            raise error

    def close(self) -> None:
        """Stop the threads."""
        self._job = None
        self._start.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)


class RoundTripCounter:
    """A loopback TCP relay that counts round trips between clients and a PostgreSQL server.

    A round trip is counted each time the server answers after the client
    spoke (per connection): a synchronous client waits for every answer, so
    this is the number of times it waited on the network.  Give clients
    :meth:`url_for` URLs; read :attr:`round_trips` before and after.

    :param server_url: any URL of the server (its host and port are used).
    """

    def __init__(self, server_url: str | URL) -> None:
        url = make_url(server_url)
        query_host = url.query.get("host")
        host = url.host or (query_host if isinstance(query_host, str) else None) or "127.0.0.1"
        port = url.port or 5432
        self._target: tuple[int, Any] = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
            if host.startswith("/")
            else (socket.AF_INET, (host, port))
        )
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._count = 0
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="bench-relay", daemon=True)
        self._thread.start()

    @property
    def round_trips(self) -> int:
        """Round trips counted so far, over all connections."""
        with self._lock:
            return self._count

    def url_for(self, url: str | URL) -> str:
        """*url* redirected through the relay (password kept: for create_engine only)."""
        u = make_url(url).difference_update_query(["host", "port"])
        return u.set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            family, address = self._target
            upstream = socket.socket(family, socket.SOCK_STREAM)
            upstream.connect(address)
            for sock in (client, upstream):
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open.extend((client, upstream))
            threading.Thread(
                target=self._relay, args=(client, upstream), name="bench-relay-conn", daemon=True
            ).start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        spoke = False
        with selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ)
            sel.register(upstream, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in sel.select():
                        source = key.fileobj
                        assert isinstance(source, socket.socket)
                        data = source.recv(65536)
                        if not data:
                            return
                        if source is client:
                            spoke = True
                            upstream.sendall(data)
                        else:
                            if spoke:
                                # counted before the client can see the answer
                                with self._lock:
                                    self._count += 1
                                spoke = False
                            client.sendall(data)
            except OSError:
                return
            finally:
                client.close()
                upstream.close()

    def close(self) -> None:
        """Stop relaying and close every relayed connection."""
        # shutdown() wakes the thread blocked in accept(); close() alone does not
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(timeout=5)


def count_round_trips(
    counter: RoundTripCounter, warm: Callable[[], object], op: Callable[[], object], n: int
) -> float:
    """Round trips per call of *op*, over *n* calls made after one call of *warm*."""
    warm()
    before = counter.round_trips
    for _ in range(n):
        op()
    return (counter.round_trips - before) / n


def load_items(sharded: ShardedEngine, rows_per_partition: int) -> dict[int, str]:
    """Create and fill ``items`` on every partition of *sharded*; returns key -> partition.

    Keys 1..N (N = partitions x rows) go where the router puts them, so
    partitions hold about the same number of rows.
    """
    for _, engine in sharded.engines():
        with engine.begin() as conn:
            metadata.drop_all(conn)
            metadata.create_all(conn)
    total = rows_per_partition * len(sharded.partitions)
    rows = [
        {"id": i, "name": f"item-{i}", "amount": (i * 7919) % 1000} for i in range(1, total + 1)
    ]
    sharded.execute_all(insert(items), rows)
    for _, engine in sharded.engines():
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE items")
            )
    return {row["id"]: sharded.partition_for(row["id"]) for row in rows}


def key_sample(keys: Sequence[int], seed: int, size: int = KEY_SAMPLE) -> list[int]:
    """A seeded random sample of *keys* (with repeats when there are fewer keys than *size*)."""
    rng = random.Random(seed)
    return [rng.choice(keys) for _ in range(size)]


# -- the W2 contenders -------------------------------------------------------------------
#
# Each builder takes the partitions' URLs (in partition order), the key ->
# partition-index table and the thread count, and returns a Contender whose
# call is ``read(thread_index, key) -> tuple``.


def _raw(urls: Sequence[str], route: Mapping[int, int], threads: int) -> Contender:
    conns = [[psycopg2.connect(**libpq_params(u)) for u in urls] for _ in range(threads)]
    for row in conns:
        for conn in row:
            conn.autocommit = True
    cursors = [[conn.cursor() for conn in row] for row in conns]

    def read(thread: int, key: int) -> tuple[Any, ...]:
        cur = cursors[thread][route[key]]
        cur.execute(RAW_SQL, (key,))
        return tuple(cur.fetchone())

    def close() -> None:
        for row in conns:
            for conn in row:
                conn.close()

    return Contender(
        "raw-psycopg2",
        "persistent psycopg2 connection per partition (per thread), autocommit, cursor reused",
        read,
        close,
    )


def _psycopg2_pool(urls: Sequence[str], route: Mapping[int, int], threads: int) -> Contender:
    pools = [ThreadedConnectionPool(threads, threads, **libpq_params(u)) for u in urls]

    def read(thread: int, key: int) -> tuple[Any, ...]:
        pool = pools[route[key]]
        conn = pool.getconn()
        try:
            if not conn.autocommit:
                conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(RAW_SQL, (key,))
                return tuple(cur.fetchone())
        finally:
            pool.putconn(conn)

    def close() -> None:
        for pool in pools:
            pool.closeall()

    return Contender(
        "psycopg2-pool",
        f"psycopg2 ThreadedConnectionPool({threads}, {threads}) per partition, autocommit",
        read,
        close,
    )


def _psycopg_pool(urls: Sequence[str], route: Mapping[int, int], threads: int) -> Contender:
    from psycopg.conninfo import make_conninfo
    from psycopg_pool import ConnectionPool

    pools = [
        ConnectionPool(
            make_conninfo(**libpq_params(u)),
            min_size=1,
            max_size=threads,
            kwargs={"autocommit": True},
            open=True,
        )
        for u in urls
    ]
    for pool in pools:
        pool.wait(timeout=30)

    def read(thread: int, key: int) -> tuple[Any, ...]:
        with pools[route[key]].connection() as conn:
            row = conn.execute(RAW_SQL, (key,)).fetchone()
            assert row is not None
            return tuple(row)

    def close() -> None:
        for pool in pools:
            pool.close()

    return Contender(
        "psycopg-pool",
        f"psycopg_pool.ConnectionPool(max_size={threads}) per partition, autocommit, "
        "pool.connection() + conn.execute()",
        read,
        close,
    )


def _sa_engine(
    urls: Sequence[str], route: Mapping[int, int], threads: int, *, autocommit: bool = False
) -> Contender:
    options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    engines = [create_engine(u, pool_size=threads, max_overflow=0, **options) for u in urls]

    def read(thread: int, key: int) -> tuple[Any, ...]:
        with engines[route[key]].connect() as conn:
            return tuple(conn.execute(POINT_READ, {"k": key}).one())

    def close() -> None:
        for engine in engines:
            engine.dispose()

    if autocommit:
        return Contender(
            "sa-autocommit",
            "plain create_engine(isolation_level='AUTOCOMMIT') per partition, Core select",
            read,
            close,
        )
    return Contender(
        "sa-engine",
        "plain create_engine per partition, Core select in engine.connect() (BEGIN/ROLLBACK)",
        read,
        close,
    )


def _ours(
    urls: Sequence[str], route: Mapping[int, int], threads: int, names: Sequence[str]
) -> Contender:
    sharded = create_sharded_engine(dict(zip(names, urls)), max_connections=threads)

    def read(thread: int, key: int) -> tuple[Any, ...]:
        return tuple(sharded.execute(POINT_READ, {"k": key}, key=key).one())

    return Contender(
        "ours",
        f"sharded.execute(select, key=k), max_connections={threads}",
        read,
        sharded.dispose,
    )


Builder = Callable[[Sequence[str], Mapping[int, int], int], Contender]


def _builders(names: Sequence[str], *, with_sa_autocommit: bool) -> list[Builder]:
    builders: list[Builder] = [_raw, _psycopg2_pool, _psycopg_pool, _sa_engine]
    if with_sa_autocommit:
        builders.append(partial(_sa_engine, autocommit=True))
    builders.append(partial(_ours, names=names))
    return builders


# -- the workload -----------------------------------------------------------------------


def _same_rows(
    contenders: Sequence[Contender], keys: Sequence[int], expected: Callable[[int], tuple[Any, ...]]
) -> None:
    for key in keys:
        want = expected(key)
        for contender in contenders:
            got = contender.call(0, key)
            if got != want:
                raise BenchmarkError(f"{contender.name} read {got!r} for key {key}, not {want!r}")


def _round_trips_line(
    urls: Sequence[str],
    route: Mapping[int, int],
    builders: Sequence[Builder],
    by_partition: Sequence[int],
    sample: Sequence[int],
) -> str:
    """Round trips per read of every contender, measured through a relay."""
    counter = RoundTripCounter(urls[0])
    parts = []
    try:
        proxied = [counter.url_for(u) for u in urls]
        for build in builders:
            contender = build(proxied, route, 1)
            try:

                def warm(c: Contender = contender) -> None:
                    for key in by_partition:
                        c.call(0, key)

                per_read = count_round_trips(
                    counter,
                    warm,
                    partial(_one_read, contender.call, itertools.cycle(sample)),
                    COUNTED_READS,
                )
            finally:
                contender.close()
            parts.append(f"{contender.name} {per_read:.2f}")
    finally:
        counter.close()
    return "round trips per read: " + ", ".join(parts)


@register(
    "reads",
    "W2: point read by key on 4 partitions, 1 and 8 threads: raw psycopg2 (baseline), "
    "psycopg2/psycopg pools, plain SQLAlchemy engine, ours (sharded.execute)",
)
def reads(ctx: BenchContext) -> Iterator[Case]:
    """Cases ``read-1t`` (one read per operation) and ``read-8t`` (a batch across 8 threads)."""
    rows = ROWS_QUICK if ctx.quick else ROWS_FULL
    per_thread = PER_THREAD_QUICK if ctx.quick else PER_THREAD_FULL
    with ctx.partitions(PARTITIONS, prefix="partpool_bench_reads") as urls_by_name:
        names = list(urls_by_name)
        urls = [urls_by_name[n] for n in names]
        ctx.say(f"reads: loading {PARTITIONS} partitions x {rows} rows")
        with create_sharded_engine(urls_by_name, max_connections=2) as loader:
            placed = load_items(loader, rows)
        index = {name: i for i, name in enumerate(names)}
        route = {key: index[name] for key, name in placed.items()}
        all_keys = sorted(route)
        by_partition = [next(k for k in all_keys if route[k] == i) for i in range(len(names))]
        check_keys = key_sample(all_keys, seed=99, size=50)

        def expected(key: int) -> tuple[Any, ...]:
            return (key, f"item-{key}", (key * 7919) % 1000)

        # 1 thread: one read per operation
        builders = _builders(names, with_sa_autocommit=True)
        with ExitStack() as stack:
            contenders = []
            for build in builders:
                contender = build(urls, route, 1)
                stack.callback(contender.close)
                contenders.append(contender)
            variants = []
            for seed, contender in enumerate(contenders):
                keys = itertools.cycle(key_sample(all_keys, seed=seed))
                variants.append(
                    Variant(
                        contender.name,
                        partial(_one_read, contender.call, keys),
                        contender.description,
                    )
                )

            def check_1t() -> str:
                _same_rows(contenders, check_keys, expected)
                trips = _round_trips_line(urls, route, builders, by_partition, check_keys)
                return f"same rows from every variant for {len(check_keys)} keys; {trips}"

            yield Case(
                name="read-1t",
                variants=variants,
                baseline="raw-psycopg2",
                ops_per_round=None if ctx.quick else OPS_1T,
                params={
                    "partitions": PARTITIONS,
                    "rows_per_partition": rows,
                    "threads": 1,
                    "reads_per_op": 1,
                    "statement": RAW_SQL,
                },
                check=check_1t,
            )

        # 8 threads: a batch of reads split across the threads per operation
        builders = _builders(names, with_sa_autocommit=False)
        ensure_headroom(ctx.admin_url, len(builders) * THREADS * PARTITIONS, "read-8t")
        with ExitStack() as stack:
            gang = Gang(THREADS)
            stack.callback(gang.close)
            contenders = []
            for build in builders:
                contender = build(urls, route, THREADS)
                stack.callback(contender.close)
                contenders.append(contender)
            variants = []
            for number, contender in enumerate(contenders):
                streams = [
                    itertools.cycle(key_sample(all_keys, seed=1000 * number + t))
                    for t in range(THREADS)
                ]
                variants.append(
                    Variant(
                        contender.name,
                        partial(_batch, gang, contender.call, streams, per_thread),
                        contender.description,
                    )
                )

            def check_8t() -> str:
                for contender in contenders:

                    def job(thread: int, c: Contender = contender) -> None:
                        for key in check_keys[thread::THREADS]:
                            got = c.call(thread, key)
                            if got != expected(key):
                                raise BenchmarkError(
                                    f"{c.name} read {got!r} for key {key} on thread {thread}"
                                )

                    gang.run(job)
                return (
                    f"same rows from every variant for {len(check_keys)} keys "
                    f"read from {THREADS} threads at once"
                )

            yield Case(
                name="read-8t",
                variants=variants,
                baseline="raw-psycopg2",
                ops_per_round=None if ctx.quick else OPS_8T,
                params={
                    "partitions": PARTITIONS,
                    "rows_per_partition": rows,
                    "threads": THREADS,
                    "reads_per_op": THREADS * per_thread,
                    "statement": RAW_SQL,
                },
                check=check_8t,
            )


def _one_read(read: Callable[[int, int], object], keys: Iterator[int]) -> object:
    return read(0, next(keys))


def _batch(
    gang: Gang, read: Callable[[int, int], object], streams: Sequence[Iterator[int]], count: int
) -> None:
    """One operation of the 8-thread case: *count* reads on each thread, all at once."""

    def job(thread: int) -> None:
        keys = streams[thread % len(streams)]
        for _ in range(count):
            read(thread, next(keys))

    gang.run(job)
