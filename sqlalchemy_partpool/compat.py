"""The psycopg2 pool API (``getconn``/``putconn``), partitioned.

For code written against ``psycopg2.pool.SimpleConnectionPool`` or
``ThreadedConnectionPool``::

    pool = PartitionedConnectionPool(1, 10, partitions={"p0": dsn0, "p1": dsn1})
    conn = pool.getconn(key=customer_id)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ...")
        conn.commit()
    finally:
        pool.putconn(conn)

    # or, better, a context manager that always returns the connection:
    with pool.connection(key=customer_id) as conn:
        ...

Differences from psycopg2's pools, all on purpose:

* it is thread-safe (like ``ThreadedConnectionPool``);
* when all ``maxconn`` connections are out, ``getconn`` *waits* up to the
  pool's ``timeout`` and then raises :class:`.PoolTimeout`, instead of raising
  ``PoolError`` at once;
* idle connections above ``minconn`` are closed after ``max_idle`` seconds
  (psycopg2 keeps up to ``minconn`` idle and closes the rest at once on return);
* a connection returned inside a transaction is rolled back, one whose
  server connection was lost is discarded, and ``autocommit`` is switched back
  off, so the next caller always gets a clean connection.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy.pool import PoolProxiedConnection

from .config import PartitionsSpec
from .engine import NO_KEY, ShardedEngine, create_sharded_engine
from .errors import ConfigurationError, ConnectionReturnError, PoolClosed

__all__ = ["PartitionedConnectionPool"]

# psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN: the server connection is gone.
_TRANSACTION_STATUS_UNKNOWN = 4


class PartitionedConnectionPool:
    """``getconn()``/``putconn()`` over a :class:`.ShardedEngine`.

    Connections handed out are the driver's own (psycopg2) connection objects,
    so ``conn.cursor()``, ``conn.commit()``, ``conn.autocommit = True`` and
    ``psycopg2.extras`` work as before.

    :param minconn: connections kept open per partition (``min_connections``).
    :param maxconn: ceiling per partition (``max_connections``).
    :param partitions: ``{name: url or libpq dsn}`` or any partition spec that
      :func:`.create_sharded_engine` accepts.
    :param sharded: an existing :class:`.ShardedEngine` to use instead of
      *partitions* (its sizes apply; it is not disposed by :meth:`closeall`
      unless ``owns_engine=True``).
    :param options: further options for :func:`.create_sharded_engine`
      (``router``, ``timeout``, ``max_idle`` ...).
    :raises ConfigurationError: on invalid settings.
    """

    def __init__(
        self,
        minconn: int | None = None,
        maxconn: int | None = None,
        *,
        partitions: PartitionsSpec | None = None,
        sharded: ShardedEngine | None = None,
        owns_engine: bool | None = None,
        **options: Any,
    ) -> None:
        if (partitions is None) == (sharded is None):
            raise ConfigurationError("pass exactly one of partitions= or sharded=")
        if sharded is None:
            assert partitions is not None
            if minconn is not None:
                options["min_connections"] = minconn
            if maxconn is not None:
                options["max_connections"] = maxconn
            sharded = create_sharded_engine(partitions, **options)
            owns_engine = True if owns_engine is None else owns_engine
        elif minconn is not None or maxconn is not None or options:
            raise ConfigurationError(
                "with sharded=, set sizes on the ShardedEngine, not on the pool"
            )
        self.sharded = sharded
        self._owns_engine = bool(owns_engine)
        self._lock = threading.Lock()
        # id(driver connection) -> (the pool's proxy for it, partition name)
        self._out: dict[int, tuple[PoolProxiedConnection, str]] = {}
        self.closed = False

    @property
    def minconn(self) -> Mapping[str, int]:
        """``min_connections`` of every partition."""
        return {name: s.min_connections for name, s in self.sharded.stats().items()}

    @property
    def maxconn(self) -> Mapping[str, int]:
        """``max_connections`` of every partition."""
        return {name: s.max_connections for name, s in self.sharded.stats().items()}

    def getconn(self, key: Any = NO_KEY, partition: str | None = None) -> Any:
        """Check out a connection to the partition of *key* (or *partition*).

        The psycopg2 pools' ``key`` argument named a connection slot; here it
        is the shard key.  Return the connection with :meth:`putconn`.

        :raises ShardKeyMissing: if neither is given.
        :raises UnknownPartition: for an unknown partition.
        :raises PoolTimeout: if the partition's pool stays exhausted for ``timeout``.
        :raises PoolClosed: after :meth:`closeall`.
        """
        if self.closed:
            raise PoolClosed("connection pool is closed; create a new one")
        name = self.sharded.resolve(key, partition)
        proxy = self.sharded.engine(name).raw_connection()
        driver = proxy.driver_connection
        with self._lock:
            self._out[id(driver)] = (proxy, name)
        return driver

    def partition_of(self, conn: Any) -> str:
        """The partition a checked-out connection belongs to.

        :raises ConnectionReturnError: if *conn* is not checked out from this pool.
        """
        with self._lock:
            entry = self._out.get(id(conn))
        if entry is None or entry[0].driver_connection is not conn:
            raise ConnectionReturnError("connection is not checked out from this pool")
        return entry[1]

    def putconn(self, conn: Any, key: Any = None, close: bool = False) -> None:
        """Return a connection to its partition's pool.

        An open transaction is rolled back; a connection whose server went
        away, or ``close=True``, is closed and replaced on demand.

        :param conn: a connection from :meth:`getconn`.
        :param key: accepted for psycopg2 compatibility and ignored; the
          connection knows its partition.
        :param close: close the connection instead of pooling it.
        :raises ConnectionReturnError: if *conn* was already returned or never
          came from this pool.
        """
        with self._lock:
            entry = self._out.get(id(conn))
            if entry is None or entry[0].driver_connection is not conn:
                raise ConnectionReturnError(
                    "putconn() got a connection that is not checked out from this pool "
                    "(returned twice, or from another pool)"
                )
            del self._out[id(conn)]
        proxy, _ = entry
        lost = bool(getattr(conn, "closed", False)) or (
            _transaction_status(conn) == _TRANSACTION_STATUS_UNKNOWN
        )
        if close or lost:
            proxy.invalidate()
            return
        if getattr(conn, "autocommit", False):
            # psycopg2 refuses to change autocommit inside a transaction; with
            # autocommit on there is none, so this cannot fail.
            cast(Any, conn).autocommit = False
        # The pool's reset-on-return rolls back an open or failed transaction.
        proxy.close()

    @contextmanager
    def connection(self, key: Any = NO_KEY, partition: str | None = None) -> Iterator[Any]:
        """Check out a connection for a ``with`` block; it is returned even if the block raises.

        Uncommitted work is rolled back on return: call ``conn.commit()`` inside
        the block to keep it.
        """
        conn = self.getconn(key, partition)
        try:
            yield conn
        finally:
            self.putconn(conn)

    def closeall(self) -> None:
        """Close every pooled connection; checked-out ones are closed when returned.

        Later ``getconn`` calls raise :class:`.PoolClosed`.
        """
        self.closed = True
        if self._owns_engine:
            self.sharded.dispose()

    def __enter__(self) -> PartitionedConnectionPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.closeall()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._out)} checked out"
        return f"<PartitionedConnectionPool {state} over {self.sharded!r}>"


def _transaction_status(conn: Any) -> int | None:
    info = getattr(conn, "info", None)
    status = getattr(info, "transaction_status", None)
    return status if isinstance(status, int) else None
