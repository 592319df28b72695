"""Core statements on one partition or many: routed execution and concurrent fan-out.

:meth:`.ShardedEngine.execute` runs one statement on the partition that owns
a key, as its own transaction (autocommit: one statement is atomic anyway, and
it saves the empty ``BEGIN``/``ROLLBACK`` round trips).

:meth:`.ShardedEngine.execute_all` runs a statement on many partitions *at the
same time*, on a bounded worker pool owned by the engine, and merges the rows
into one correct result (:mod:`~sqlalchemy_partpool.merge`).  SQLAlchemy's own
``ShardedSession`` runs a multi-shard query one shard after another.

An ``INSERT`` given a list of rows is split by shard key instead, and each
partition's share goes in one round trip (executemany / insertmanyvalues), in
one transaction per partition.

Per-call ``timeout`` really bounds the call: PostgreSQL's ``statement_timeout``
is set for the statement (``SET LOCAL`` in the same round trip), the worker
gets a client-side deadline (the :mod:`~sqlalchemy_partpool.watchdog`), and
the caller stops waiting when the time is up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from time import monotonic
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.engine import Connection, Result
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.sql import Insert
from sqlalchemy.sql.selectable import Select

from .errors import (
    FanoutError,
    FanoutTimeout,
    QueryTimeout,
    ShardKeyMissing,
    UnmergeableStatement,
)
from .fastpath import fast_read
from .merge import MergePlan, plan, text_sort_columns
from .pinning import check_pin
from .watchdog import (
    GRACE,
    TIMEOUT_OPTION,
    install_statement_deadlines,
    interrupt_connection,
    watchdog,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .engine import ShardedEngine

    #: A Result of rows of any width (``Result[Any]`` would mean one column).
    AnyResult = Result[Unpack[tuple[Any, ...]]]
    _ResultBase = IteratorResult[Unpack[tuple[Any, ...]]]
else:
    AnyResult = Result
    _ResultBase = IteratorResult

__all__ = ["Fanout", "FanoutResult"]

log = logging.getLogger("sqlalchemy_partpool.fanout")

OnError = Literal["raise", "partial"]
MergeMode = Literal["auto", "concat"]


class FanoutResult(_ResultBase):
    """The merged result of :meth:`.ShardedEngine.execute_all`: a SQLAlchemy ``Result``.

    Iterate it, or use ``.all()``, ``.scalars()``, ``.mappings()``,
    ``.one()``... as with any ``Result``.  Also:

    :ivar partition_names: the partitions whose rows are in the result.
    :ivar errors: partition -> the exception, for partitions that failed or did
      not answer in time (only with ``on_error="partial"``; empty otherwise).
    :ivar rowcounts: partition -> rows affected, for DML.
    """

    partition_names: tuple[str, ...]
    errors: dict[str, BaseException]
    rowcounts: dict[str, int]

    @property
    def rowcount(self) -> int:
        """Rows affected on all partitions together (DML)."""
        return sum(count for count in self.rowcounts.values() if count > 0)

    @property
    def complete(self) -> bool:
        """True when every partition asked answered."""
        return not self.errors


def _result(
    keys: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    partitions: Sequence[str],
    errors: dict[str, BaseException],
    rowcounts: dict[str, int],
) -> FanoutResult:
    result = FanoutResult(SimpleResultMetaData(list(keys)), iter(rows))
    result.partition_names = tuple(partitions)
    result.errors = errors
    result.rowcounts = rowcounts
    return result


@dataclass
class _Call:
    """Shared state of one fan-out call, so that it can be cancelled."""

    deadline: float | None
    running: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self, partition: str, dbapi_connection: Any) -> bool:
        with self.lock:
            if self.cancelled:
                return False
            self.running[partition] = dbapi_connection
            return True

    def finished(self, partition: str) -> None:
        with self.lock:
            self.running.pop(partition, None)

    def cancel(self, partitions: Sequence[str] | None = None) -> None:
        """Stop statements still running: a CancelRequest, then the socket if need be."""
        with self.lock:
            self.cancelled = True
            targets = [
                (name, conn)
                for name, conn in self.running.items()
                if partitions is None or name in partitions
            ]
        for name, connection in targets:
            threading.Thread(
                target=_cancel, args=(name, connection), name=f"partpool-cancel-{name}", daemon=True
            ).start()


def _cancel(partition: str, dbapi_connection: Any) -> None:
    # A polite PostgreSQL cancel first; if the server cannot even be reached
    # to cancel (hung, black-holed), shutting the socket frees the worker.
    deadline = watchdog.arm(1.0, lambda: interrupt_connection(dbapi_connection))
    try:
        cancel = getattr(dbapi_connection, "cancel", None)
        if cancel is not None:
            cancel()
    except Exception:
        log.debug("partition %r: cancel request failed", partition, exc_info=True)
        interrupt_connection(dbapi_connection)
    finally:
        watchdog.disarm(deadline)


def _shard_key_getter(statement: Insert, key: Any) -> Callable[[Mapping[str, Any]], Any]:
    if callable(key):
        return key  # type: ignore[no-any-return]
    if key is None:
        table = statement.table
        info = getattr(table, "info", {})
        key = info.get("shard_key")
        if key is None:
            for column in getattr(table, "columns", ()):
                if column.info.get("shard_key"):
                    key = column.key
                    break
    if key is None:
        raise ShardKeyMissing(
            "execute_all(insert(...), rows) splits rows by shard key but does not know which "
            "column it is: pass key='column' (or a function of the row), or mark the column "
            "with Column(..., info={'shard_key': True})"
        )
    name = str(key)
    return lambda row: row[name]


class Fanout:
    """The worker pool that runs statements on many partitions at once.

    Workers never wait on one another (each task holds at most one connection,
    of its own partition, and never waits for another task), so the pool
    cannot deadlock against the partitions' ``max_connections``: at worst tasks
    queue.  A fan-out started from inside a worker runs its tasks inline.

    :param sharded: the engine whose partitions it serves.
    :param workers: the most statements run at once.
    """

    def __init__(self, sharded: ShardedEngine, workers: int) -> None:
        self.sharded = sharded
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def _pool(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        max_workers=self.workers,
                        thread_name_prefix="partpool-fanout",
                        initializer=self._mark_worker,
                    )
                executor = self._executor
        return executor

    def _mark_worker(self) -> None:
        self._local.worker = True

    def shutdown(self) -> None:
        """Stop the workers (running statements finish first)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    # -- one partition ---------------------------------------------------------------

    def execute(
        self,
        statement: Any,
        partition: str,
        params: Any = None,
        *,
        timeout: float | None = None,
    ) -> AnyResult:
        """Run *statement* on *partition* as its own transaction; return a buffered result."""
        engine = self.sharded.engine(partition)
        options: dict[str, Any] = {}
        if timeout is not None:
            install_statement_deadlines(engine, partition, None)
            options[TIMEOUT_OPTION] = timeout
        many = isinstance(params, list) and len(params) > 1
        if not many and timeout is None:
            fast = fast_read(engine, statement, params)
            if fast is not None:
                return fast
        if many:
            # several parameter sets: all or nothing, in one transaction
            with engine.begin() as conn:
                result = conn.execute(statement, params, execution_options=options)
                return _buffer(result)
        with engine.connect() as conn, _autocommit(conn):
            result = conn.execute(statement, params, execution_options=options)
            return _buffer(result)

    # -- many partitions ---------------------------------------------------------------

    def execute_all(
        self,
        statement: Any,
        params: Any = None,
        *,
        partitions: Sequence[str] | None = None,
        key: Any = None,
        merge: MergeMode = "auto",
        tag_partition: bool = False,
        on_error: OnError = "raise",
        timeout: float | None = None,
    ) -> FanoutResult:
        """See :meth:`.ShardedEngine.execute_all`."""
        if on_error not in ("raise", "partial"):
            raise ValueError(f"on_error must be 'raise' or 'partial', not {on_error!r}")
        names = (
            list(self.sharded.partitions)
            if partitions is None
            else [self.sharded.resolve(partition=p) for p in partitions]
        )
        if isinstance(statement, Insert) and isinstance(params, list) and params:
            return self._insert_rows(statement, params, names, key, on_error, timeout)
        check_pin(self.sharded, names, "execute_all()")
        merge_plan = self._plan(statement, merge, names)
        if tag_partition and merge_plan.kind == "aggregate":
            raise UnmergeableStatement(
                "tag_partition=True does not apply to aggregates merged across partitions"
            )

        def run(conn: Connection) -> tuple[list[tuple[Any, ...]], list[str], int]:
            result = conn.execute(merge_plan.statement, params)
            if result.returns_rows:
                keys = list(result.keys())
                return [tuple(r) for r in result], keys, -1
            return [], [], result.rowcount

        outcomes, errors = self._run(
            {name: run for name in names}, on_error, timeout, autocommit=True
        )
        answered = [n for n in names if n in outcomes]
        keys: list[str] = merge_plan.keys or []
        if merge_plan.kind != "aggregate" or not keys:
            keys = next((outcomes[n][1] for n in answered if outcomes[n][1]), keys)
        merged = merge_plan.merge([(n, outcomes[n][0]) for n in answered])
        if tag_partition:
            rows = [(*row, name) for row, name in merged]
            keys = [*keys, "partition"]
        else:
            rows = [row for row, _ in merged]
        rowcounts = {n: outcomes[n][2] for n in answered if outcomes[n][2] >= 0}
        return _result(keys, rows, answered, errors, rowcounts)

    def _plan(self, statement: Any, merge: MergeMode, names: Sequence[str]) -> MergePlan:
        if merge == "concat" or not isinstance(statement, Select):
            return MergePlan(kind="concat", statement=statement)
        if merge != "auto":
            raise ValueError(f"merge must be 'auto' or 'concat', not {merge!r}")
        dialect = self.sharded.engine(names[0]).dialect if names else None
        keys = None
        if dialect is not None:
            compiled = statement.compile(dialect=dialect)
            keys = [entry.keyname for entry in compiled._result_columns]
        merge_plan = plan(statement, keys)
        risky = text_sort_columns(merge_plan)
        if risky and not all(self.sharded.sorts_like_python(n) for n in names):
            raise UnmergeableStatement(
                f"ORDER BY {', '.join(str(c) for c in risky)} sorts text (or an enum) with "
                "the partition's collation, which the merge cannot reproduce; sort with "
                "column.collate('C'), or use databases created with the C collation"
            )
        return merge_plan

    def _insert_rows(
        self,
        statement: Insert,
        rows: list[Any],
        names: Sequence[str],
        key: Any,
        on_error: OnError,
        timeout: float | None,
    ) -> FanoutResult:
        get_key = _shard_key_getter(statement, key)
        groups: dict[str, list[Any]] = {}
        for number, row in enumerate(rows):
            try:
                shard_key = get_key(row)
            except (KeyError, TypeError):
                shard_key = None
            if shard_key is None:
                raise ShardKeyMissing(
                    f"row {number} has no shard key value; nothing was written. Give every "
                    "row its shard key."
                )
            partition = self.sharded.partition_for(shard_key)
            if partition not in names:
                raise UnmergeableStatement(
                    f"row {number} belongs to partition {partition!r}, which is not among "
                    f"the partitions given ({list(names)}); nothing was written"
                )
            groups.setdefault(partition, []).append(row)

        def writer(share: list[Any]) -> Callable[[Connection], tuple[list[Any], list[str], int]]:
            def run(conn: Connection) -> tuple[list[Any], list[str], int]:
                result = conn.execute(statement, share)
                if result.returns_rows:
                    return [tuple(r) for r in result], list(result.keys()), len(share)
                return [], [], len(share)

            return run

        ordered = [n for n in names if n in groups]
        check_pin(self.sharded, ordered, "execute_all(insert(...), rows)")
        outcomes, errors = self._run(
            {n: writer(groups[n]) for n in ordered}, on_error, timeout, autocommit=False
        )
        answered = [n for n in ordered if n in outcomes]
        keys: list[str] = next((outcomes[n][1] for n in answered if outcomes[n][1]), [])
        rows_out = [row for n in answered for row in outcomes[n][0]]
        rowcounts = {n: outcomes[n][2] for n in answered}
        return _result(keys, rows_out, answered, errors, rowcounts)

    def _run(
        self,
        tasks: Mapping[str, Callable[[Connection], Any]],
        on_error: OnError,
        timeout: float | None,
        *,
        autocommit: bool,
    ) -> tuple[dict[str, Any], dict[str, BaseException]]:
        # The caller gives the servers a moment past the timeout to report their
        # own statement_timeout cancellations before giving up on them.
        call = _Call(deadline=None if timeout is None else monotonic() + timeout + GRACE)
        options: dict[str, Any] = {}
        if timeout is not None:
            options[TIMEOUT_OPTION] = timeout

        def task(name: str, fn: Callable[[Connection], Any]) -> Any:
            engine = self.sharded.engine(name)
            if timeout is not None:
                install_statement_deadlines(engine, name, None)
            with engine.connect() as connection:
                conn = connection.execution_options(**options) if options else connection
                if not call.started(name, conn.connection.dbapi_connection):
                    raise FanoutError({name: RuntimeError("cancelled")}, {name: "cancelled"})
                try:
                    if autocommit:
                        with _autocommit(conn):
                            return fn(conn)
                    value = fn(conn)
                    conn.commit()
                    return value
                finally:
                    call.finished(name)

        outcomes: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        if getattr(self._local, "worker", False) or len(tasks) == 1:
            # inside a worker (nested fan-out), or nothing to parallelise
            for name, fn in tasks.items():
                try:
                    outcomes[name] = task(name, fn)
                except Exception as exc:
                    if on_error == "raise":
                        raise self._failure({name: exc}) from exc
                    errors[name] = exc
            return outcomes, errors

        executor = self._pool()
        futures: dict[Future[Any], str] = {
            executor.submit(task, name, fn): name for name, fn in tasks.items()
        }
        pending = set(futures)
        while pending:
            remaining = None if call.deadline is None else call.deadline - monotonic()
            if remaining is not None and remaining <= 0:
                break
            done, pending = wait(pending, timeout=remaining, return_when=FIRST_EXCEPTION)
            for future in done:
                name = futures[future]
                error = future.exception()
                if error is None:
                    outcomes[name] = future.result()
                    continue
                errors[name] = error
                if on_error == "raise":
                    for other in pending:
                        other.cancel()
                    call.cancel()
                    raise self._failure({name: error}) from error
        if pending:
            late = [futures[f] for f in pending]
            for future in pending:
                future.cancel()
            call.cancel(late)
            assert timeout is not None
            timed_out = FanoutTimeout(timeout, late, dict(errors), self._describe(errors))
            if on_error == "raise":
                raise timed_out
            for name in late:
                errors[name] = QueryTimeout(name, timeout=timeout)
        return outcomes, errors

    def _describe(self, errors: Mapping[str, BaseException]) -> dict[str, str]:
        return {name: self.sharded.describe_error(name, exc) for name, exc in errors.items()}

    def _failure(self, errors: dict[str, BaseException]) -> FanoutError:
        return FanoutError(errors, self._describe(errors))


@contextmanager
def _autocommit(conn: Connection) -> Iterator[None]:
    """Run the block's statements in autocommit mode, each its own transaction.

    A single statement is atomic anyway, and autocommit spares the round trips
    of ``BEGIN`` and of the ``ROLLBACK`` at check-in.  The driver's own
    ``autocommit`` flag is switched (client-side in psycopg2 and psycopg 3);
    SQLAlchemy's ``isolation_level="AUTOCOMMIT"`` would cost a ``SET`` round
    trip when the connection is returned.
    """
    dbapi = conn.connection.dbapi_connection
    if dbapi is None or not hasattr(dbapi, "autocommit"):
        conn.execution_options(isolation_level="AUTOCOMMIT")
        yield
        return
    if (
        not dbapi.autocommit
        and getattr(dbapi, "isolation_level", None) is not None
        and getattr(conn.dialect, "_on_connect_isolation_level", None) is None
    ):
        # SQLAlchemy's reset of a per-connection isolation_level option leaves
        # the driver at an explicit level, and psycopg2 then sends SET
        # default_transaction_isolation each time it leaves autocommit.  Unless
        # the engine itself asks for a level, going back to the server default
        # (client-side, as autocommit is off) keeps the call at one round trip.
        dbapi.isolation_level = None
    dbapi.autocommit = True
    try:
        yield
    finally:
        if not getattr(dbapi, "closed", False):
            dbapi.autocommit = False


def _buffer(result: AnyResult) -> AnyResult:
    """Read a result fully so the connection can go back to the pool."""
    if not getattr(result, "returns_rows", True):
        return result
    return result.freeze()()
