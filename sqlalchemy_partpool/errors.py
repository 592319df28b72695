"""Every exception sqlalchemy-partpool raises, in one place.

The hierarchy has :class:`PartpoolError` at its root, so one ``except`` clause
catches everything the library raises on purpose.  Where an error means the same
thing as one of SQLAlchemy's, it subclasses that one too, so that existing
``except sqlalchemy.exc.TimeoutError`` clauses keep working
(:class:`PoolTimeout` is one).

Messages name the partition involved and say what to do next.  They never
contain a password: URLs are rendered with ``hide_password=True``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import exc as sa_exc

__all__ = [
    "ConfigurationError",
    "ConnectionReturnError",
    "DuplicateIdentity",
    "FanoutError",
    "FanoutTimeout",
    "MigrationLocked",
    "NoPartitionForKey",
    "PartialCommitError",
    "PartitionUnavailable",
    "PartpoolError",
    "PinViolation",
    "PoolClosed",
    "PoolError",
    "PoolExhausted",
    "PoolTimeout",
    "QueryTimeout",
    "RoutingError",
    "ShardKeyChanged",
    "ShardKeyMissing",
    "TwoPhaseError",
    "UnknownPartition",
    "UnmergeableStatement",
    "WarmupError",
    "redact",
]


def _names(names: Iterable[str], limit: int = 8) -> str:
    listed = sorted(names)
    shown = ", ".join(repr(n) for n in listed[:limit])
    if len(listed) > limit:
        shown += f", ... ({len(listed) - limit} more)"
    return shown or "(none)"


class PartpoolError(Exception):
    """Base class of every error raised by sqlalchemy-partpool.

    :ivar partition: the partition the error concerns, when there is one.
    """

    partition: str | None

    def __init__(self, message: str, *, partition: str | None = None) -> None:
        super().__init__(message)
        self.partition = partition


class ConfigurationError(PartpoolError, sa_exc.ArgumentError):
    """The partition or pool configuration is invalid.

    Raised up front, when the configuration is read or an engine is built, so
    that a bad setting never surfaces later as a failed query.

    :ivar option: the offending option's name, when one option is at fault.
    """

    option: str | None

    def __init__(
        self, message: str, *, partition: str | None = None, option: str | None = None
    ) -> None:
        where = f"partition {partition!r}: " if partition is not None else ""
        super().__init__(where + message, partition=partition)
        self.option = option


class RoutingError(PartpoolError):
    """A statement or key could not be routed to a partition."""


class UnknownPartition(RoutingError, LookupError):
    """A partition name that the :class:`.ShardedEngine` does not know.

    :ivar known: the partition names that do exist.
    """

    known: tuple[str, ...]

    def __init__(self, partition: str, known: Iterable[str] = ()) -> None:
        self.known = tuple(sorted(known))
        super().__init__(
            f"unknown partition {partition!r}; known partitions are {_names(self.known)}. "
            "Check the name, or add the partition to the configuration.",
            partition=partition,
        )

    def __str__(self) -> str:
        # LookupError (via KeyError-like formatting) would repr() the message.
        return str(self.args[0])


class ShardKeyMissing(RoutingError):
    """An operation needs a shard key (or an explicit partition) and got neither."""

    def __init__(self, message: str | None = None, *, partition: str | None = None) -> None:
        super().__init__(
            message
            or "no shard key given: pass key=<shard key> to route by key, or "
            "partition=<name> to choose the partition yourself",
            partition=partition,
        )


class NoPartitionForKey(RoutingError):
    """The router has no partition for this key (outside every range, not in the lookup).

    :ivar key: the key that could not be routed.
    """

    key: Any

    def __init__(self, key: Any, router: str, hint: str) -> None:
        self.key = key
        super().__init__(f"{router} has no partition for shard key {key!r}: {hint}")


class PoolError(PartpoolError):
    """A problem with a partition's connection pool."""


class PoolTimeout(PoolError, sa_exc.TimeoutError):
    """No connection became free within the pool's ``timeout``.

    Also a :class:`sqlalchemy.exc.TimeoutError`, which is what a plain
    :class:`~sqlalchemy.pool.QueuePool` raises in the same situation.

    :ivar timeout: the timeout that expired, in seconds.
    :ivar waited: how long the caller actually waited, in seconds.
    :ivar max_connections: the partition's connection ceiling.
    """

    timeout: float
    waited: float
    max_connections: int

    def __init__(
        self, partition: str, *, timeout: float, waited: float, max_connections: int, in_use: int
    ) -> None:
        self.timeout = timeout
        self.waited = waited
        self.max_connections = max_connections
        super().__init__(
            f"partition {partition!r}: no connection free after {waited:.3f}s "
            f"(timeout {timeout:g}s; {in_use} of max_connections={max_connections} checked out). "
            "Return connections sooner (use `with` blocks), raise max_connections, "
            "or raise timeout.",
            partition=partition,
        )


class PoolExhausted(PoolError, sa_exc.TimeoutError):
    """More callers are already waiting for a connection than ``max_waiting`` allows.

    Raised at once instead of queueing, so that a traffic spike fails fast
    rather than piling up waiters.
    """

    def __init__(self, partition: str, *, waiting: int, max_waiting: int) -> None:
        self.waiting = waiting
        self.max_waiting = max_waiting
        super().__init__(
            f"partition {partition!r}: {waiting} callers already waiting for a connection "
            f"(max_waiting={max_waiting}); request rejected. Shed load, or raise "
            "max_connections or max_waiting.",
            partition=partition,
        )


class PoolClosed(PoolError, sa_exc.InvalidRequestError):
    """The pool or :class:`.ShardedEngine` was disposed and cannot hand out connections."""


class ConnectionReturnError(PoolError):
    """A connection was returned that is not checked out from this pool.

    Raised by :meth:`.PartitionedConnectionPool.putconn` for a double return or
    a connection that came from somewhere else.
    """


class PartitionUnavailable(PartpoolError, sa_exc.SQLAlchemyError):
    """The partition is marked down; the call fails at once instead of waiting.

    :ivar since: when the partition was marked down (``time.time()``).
    :ivar cause: a description of the last error seen, password-free.
    """

    def __init__(self, partition: str, *, since: float | None = None, cause: str = "") -> None:
        self.since = since
        self.cause = cause
        detail = f" (last error: {cause})" if cause else ""
        super().__init__(
            f"partition {partition!r} is unavailable{detail}; calls fail fast until the "
            "background prober reconnects. Retry later or route around it.",
            partition=partition,
        )


class WarmupError(PartpoolError):
    """Some partitions could not open their ``min_connections`` at start-up.

    Raised by :func:`.create_sharded_engine` (unless
    ``require_all_partitions=False``) after closing whatever was opened.

    :ivar errors: partition name -> the error it raised.
    """

    errors: dict[str, BaseException]

    def __init__(self, errors: dict[str, BaseException], describe: dict[str, str]) -> None:
        self.errors = errors
        lines = "; ".join(f"{name}: {describe[name]}" for name in sorted(errors))
        super().__init__(
            f"{len(errors)} partition(s) could not connect at start-up ({lines}). "
            "Check the URLs and that the servers are up, or pass "
            "require_all_partitions=False to start anyway and retry in the background.",
            partition=next(iter(sorted(errors))) if len(errors) == 1 else None,
        )


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each secret in *text* with ``***``.

    Used on driver error messages before they go into our own messages, logs,
    events or health snapshots.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class QueryTimeout(PartpoolError, sa_exc.TimeoutError):
    """A statement, commit or rollback did not finish within ``query_timeout``.

    The connection's socket was shut down to free the caller, so the
    connection is discarded; the server may still be working on the
    statement (set ``statement_timeout`` below ``query_timeout`` so that the
    server cancels it first).
    """

    def __init__(self, partition: str, *, timeout: float, what: str = "statement") -> None:
        self.timeout = timeout
        super().__init__(
            f"partition {partition!r}: {what} did not complete within query_timeout={timeout:g}s; "
            "the connection was closed. The server may be overloaded or unreachable; retry, "
            "or raise query_timeout for long statements.",
            partition=partition,
        )


class UnmergeableStatement(PartpoolError, sa_exc.InvalidRequestError):
    """A statement whose per-partition results cannot be merged into a correct answer.

    Raised by :meth:`.ShardedEngine.execute_all` before anything runs, instead
    of returning a wrong result; the message says what to change.
    """


class FanoutError(PartpoolError):
    """A statement run on several partitions failed on at least one of them.

    :ivar partition: the first partition that failed.
    :ivar errors: partition name -> the exception it raised.
    """

    errors: dict[str, BaseException]

    def __init__(self, errors: dict[str, BaseException], describe: dict[str, str]) -> None:
        self.errors = errors
        first = next(iter(errors))
        others = f" (and {len(errors) - 1} more partitions)" if len(errors) > 1 else ""
        super().__init__(
            f"partition {first!r} failed: {describe[first]}{others}; the statement was "
            "cancelled on the other partitions. Pass on_error='partial' to get the rows "
            "of the partitions that answered.",
            partition=first,
        )


class FanoutTimeout(FanoutError, sa_exc.TimeoutError):
    """Some partitions did not answer within the call's ``timeout``.

    :ivar pending: the partitions that had not answered.
    """

    pending: tuple[str, ...]

    def __init__(
        self,
        timeout: float,
        pending: list[str],
        errors: dict[str, BaseException],
        describe: dict[str, str],
    ) -> None:
        self.pending = tuple(pending)
        self.timeout = timeout
        PartpoolError.__init__(
            self,
            f"no answer within timeout={timeout:g}s from partition(s) "
            f"{', '.join(repr(p) for p in pending)}; their statements were cancelled. "
            "Raise timeout, or pass on_error='partial' to get the other partitions' rows.",
            partition=pending[0] if pending else None,
        )
        self.errors = errors


class PartialCommitError(PartpoolError):
    """A multi-partition write committed on some partitions and not on others.

    Only raised without two-phase commit (``twophase=False``); the message
    and attributes say exactly where the data stands.

    :ivar committed: partitions whose transaction committed.
    :ivar rolled_back: partitions whose transaction was rolled back.
    :ivar failed: the partition whose commit failed, and why.
    """

    def __init__(
        self,
        committed: list[str],
        rolled_back: list[str],
        failed: str,
        cause: str,
    ) -> None:
        self.committed = tuple(committed)
        self.rolled_back = tuple(rolled_back)
        self.failed = failed
        super().__init__(
            f"commit failed on partition {failed!r} ({cause}) after committing on "
            f"{list(self.committed)}; rolled back on {list(self.rolled_back)}. The write is "
            "only partly applied: reconcile these partitions, or use twophase=True.",
            partition=failed,
        )


class TwoPhaseError(PartpoolError):
    """Two-phase commit could not complete; see the message for where each partition stands.

    :ivar xid: the global transaction id.
    :ivar outcome: ``"rolled_back"`` (nothing applied) or ``"in_doubt"``
      (some partitions hold the transaction prepared: either the commit was
      decided and COMMIT PREPARED failed there, or whether the decision was
      recorded could not be checked; :func:`.recover_twophase` settles it from
      the decision log, committing or rolling back everywhere).
    """

    def __init__(self, message: str, *, xid: str, outcome: str, partition: str | None) -> None:
        self.xid = xid
        self.outcome = outcome
        super().__init__(message, partition=partition)


class PinViolation(RoutingError):
    """A statement would reach a partition other than the one the context is pinned to.

    Raised instead of running, inside ``with sharded.pinned(key):``.

    :ivar pinned: the partition the context is pinned to.
    :ivar attempted: the partitions the statement would have reached.
    """

    def __init__(self, pinned: str, attempted: Iterable[str], what: str) -> None:
        self.pinned = pinned
        self.attempted = tuple(sorted(attempted))
        super().__init__(
            f"{what} would reach partition(s) {_names(self.attempted)}, but this context is "
            f"pinned to partition {pinned!r}; filter by the pinned key, or leave the "
            "pinned() block for cross-partition work",
            partition=pinned,
        )


class DuplicateIdentity(RoutingError):
    """The same primary key was found on more than one partition.

    :ivar partitions: the partitions holding it.
    """

    def __init__(self, what: str, partitions: Iterable[str]) -> None:
        self.partitions = tuple(sorted(partitions))
        super().__init__(
            f"{what} exists on partitions {_names(self.partitions)}; a key must live on one "
            "partition. Pass identity_token=<partition> to choose, and repair the data.",
            partition=self.partitions[0] if self.partitions else None,
        )


class ShardKeyChanged(RoutingError):
    """The shard key of a stored object was changed; rows do not move between partitions."""


class MigrationLocked(PartpoolError):
    """Another run holds a partition's migration lock.

    :ivar holder: who holds it (``pid 4242, partpool-migrate/p3, for 2.1 s``), if visible.
    """

    def __init__(self, partition: str, holder: str | None, waited: float) -> None:
        waiting = "did not wait" if waited <= 0 else f"waited {waited:g} s"
        super().__init__(
            f"partition {partition!r} is being migrated by another run "
            f"({holder or 'holder not visible'}); {waiting}. Let that run finish and run "
            "this command again, or pass --lock-timeout SECONDS (alembic: -x "
            "lock_timeout=SECONDS) to wait for it.",
            partition=partition,
        )
        self.holder = holder
