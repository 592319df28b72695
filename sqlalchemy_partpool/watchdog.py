"""Client-side deadlines for driver calls that could otherwise block forever.

A server that stops answering (hung, or behind a firewall that black-holes
traffic) leaves a client blocked in ``recv()``: PostgreSQL's own
``statement_timeout`` is enforced by the very server that stopped answering,
and TCP keepalives are answered by a kernel that is still alive.  The only
bound that always works is on the client: when a deadline passes, the
:class:`Watchdog` shuts the connection's socket down, the blocked call fails
at once with the driver's "connection closed" error, and SQLAlchemy
invalidates the connection as a disconnect.

One daemon thread (``partpool-watchdog``) serves every deadline of the
process from a heap; arming and disarming cost a lock and a heap push.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import monotonic
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = [
    "GRACE",
    "TIMEOUT_OPTION",
    "Deadline",
    "Watchdog",
    "install_statement_deadlines",
    "interrupt_connection",
    "watchdog",
]

log = logging.getLogger("sqlalchemy_partpool.watchdog")


def interrupt_connection(dbapi_connection: Any) -> bool:
    """Shut down the socket under a DBAPI connection, failing any call blocked on it.

    Works for drivers that expose ``fileno()`` (psycopg2, psycopg 3).  The
    file descriptor itself stays open and owned by the driver; only the
    socket is shut down, in both directions.

    :returns: True if the socket was shut down.
    """
    fileno = getattr(dbapi_connection, "fileno", None)
    if fileno is None:
        return False
    try:
        fd = fileno()
        # A dup shares the socket; shutdown() acts on the socket, so the
        # driver's own descriptor sees it, while close() only drops the dup.
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception:  # already closed: nothing to interrupt
        return False
    return True


class Deadline:
    """An armed deadline; pass it to :meth:`Watchdog.disarm` when the call returns.

    :ivar fired: True once the action ran.
    """

    __slots__ = ("action", "at", "cancelled", "fired", "seq")

    def __init__(self, at: float, seq: int, action: Callable[[], object]) -> None:
        self.at = at
        self.seq = seq
        self.action = action
        self.cancelled = False
        self.fired = False

    def __lt__(self, other: Deadline) -> bool:
        return (self.at, self.seq) < (other.at, other.seq)


class Watchdog:
    """Runs an action when a deadline passes, unless it was disarmed first."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[Deadline] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, action: Callable[[], object]) -> Deadline:
        """Run *action* in *seconds* unless :meth:`disarm` is called first."""
        deadline = Deadline(monotonic() + seconds, next(self._seq), action)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="partpool-watchdog", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, deadline)
            if self._heap[0] is deadline:
                self._cond.notify()
        return deadline

    def disarm(self, deadline: Deadline) -> bool:
        """Cancel *deadline*; returns False if its action already ran.

        Actions run under the watchdog's lock, so once this returns the action
        has either completed or will never run: a connection cannot be
        interrupted after its caller has moved on.
        """
        with self._cond:
            deadline.cancelled = True
            return not deadline.fired

    @contextmanager
    def guard(self, seconds: float | None, dbapi_connection: Any) -> Iterator[Deadline | None]:
        """Interrupt *dbapi_connection* if the block runs longer than *seconds*.

        ``None`` means no deadline.
        """
        if seconds is None:
            yield None
            return
        deadline = self.arm(seconds, lambda: interrupt_connection(dbapi_connection))
        try:
            yield deadline
        finally:
            self.disarm(deadline)

    def _run(self) -> None:
        with self._cond:
            while True:
                heap = self._heap
                while heap and heap[0].cancelled:
                    heapq.heappop(heap)
                wait = heap[0].at - monotonic() if heap else 60.0
                if not heap or wait > 0:
                    self._cond.wait(wait)
                    continue
                due = heapq.heappop(heap)
                due.fired = True
                # Under the lock on purpose (see disarm); actions are a couple
                # of non-blocking system calls.
                try:
                    due.action()
                except Exception:  # pragma: no cover - must not kill the thread
                    log.exception("watchdog action failed")


#: The process-wide watchdog used by the pools.
watchdog = Watchdog()


#: Execution option carrying a per-call timeout (seconds) to the statement hooks.
TIMEOUT_OPTION = "partpool_timeout"

# A per-call deadline allows the server this much longer than the
# statement_timeout sent with the statement, so that the server normally
# cancels first and the connection survives.
GRACE = 0.25


def install_statement_deadlines(engine: Engine, partition: str, default: float | None) -> None:
    """Bound statements on *engine* client-side (once per engine; later calls do nothing).

    Each statement gets a deadline: the per-call ``partpool_timeout`` execution
    option when given (then ``SET LOCAL statement_timeout`` travels in the same
    round trip, and the client waits :data:`GRACE` longer), otherwise
    *default* (the partition's ``query_timeout``), otherwise none.  Past it the
    connection's socket is shut down; the caller gets :class:`.QueryTimeout`
    and the connection is invalidated as a disconnect, without distrusting the
    rest of the pool.  With a *default*, commits and rollbacks (including the
    pool's reset-on-return) get the same deadline.
    """
    from sqlalchemy import event

    from .errors import QueryTimeout

    if engine.__dict__.get("_partpool_deadlines"):
        return
    engine.__dict__["_partpool_deadlines"] = True

    def before(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any
    ) -> tuple[str, Any]:
        if context is None:
            return statement, params
        timeout = context.execution_options.get(TIMEOUT_OPTION)
        seconds = default if timeout is None else timeout + GRACE
        if seconds is None:
            return statement, params
        dbapi = conn.connection.dbapi_connection
        context._partpool_deadline = watchdog.arm(seconds, lambda: interrupt_connection(dbapi))
        context._partpool_timeout = default if timeout is None else timeout
        if timeout is None:
            return statement, params
        # One round trip: statements of one simple-protocol query run as one
        # implicit transaction, so SET LOCAL holds for the statement (and for
        # the rest of an explicit transaction).
        ms = max(1, round(timeout * 1000))
        return f"SET LOCAL statement_timeout = {ms}; {statement}", params

    def after(conn: Any, cursor: Any, statement: Any, params: Any, context: Any, many: Any) -> None:
        deadline = getattr(context, "_partpool_deadline", None)
        if deadline is not None:
            watchdog.disarm(deadline)
            context._partpool_deadline = None

    def on_error(ctx: Any) -> BaseException | None:
        context = ctx.execution_context
        deadline = getattr(context, "_partpool_deadline", None)
        if deadline is None:
            return None
        context._partpool_deadline = None
        timeout = context._partpool_timeout
        if watchdog.disarm(deadline):
            # the server cancelled it (statement_timeout): same meaning, clearer error
            if getattr(ctx.original_exception, "pgcode", None) == "57014":
                return QueryTimeout(partition, timeout=timeout)
            return None  # an ordinary error, before the deadline
        ctx.is_disconnect = True
        # one slow statement says nothing about the other connections
        ctx.invalidate_pool_on_disconnect = False
        return QueryTimeout(partition, timeout=timeout)

    event.listen(engine, "before_cursor_execute", before, retval=True)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine, "handle_error", on_error)

    if default is not None:
        dialect = engine.dialect
        for name in ("do_commit", "do_rollback"):
            original = getattr(dialect, name)
            setattr(dialect, name, _guarded(original, default, partition, name[3:]))


def _guarded(
    original: Callable[[Any], None], seconds: float, partition: str, what: str
) -> Callable[[Any], None]:
    from .errors import QueryTimeout

    def call(dbapi_connection: Any) -> None:
        with watchdog.guard(seconds, dbapi_connection) as deadline:
            try:
                original(dbapi_connection)
            except Exception as exc:
                if deadline is not None and deadline.fired:
                    raise QueryTimeout(partition, timeout=seconds, what=what) from exc
                raise

    return call
