"""Writes that span partitions: per-partition commits, or two-phase commit with recovery.

:meth:`.ShardedEngine.begin_many` returns a :class:`MultiPartitionTransaction`:
a transaction is begun on each partition the block touches, and all of them
are committed when the block ends (rolled back if it raises).

Without two-phase commit (the default) the partitions commit one after
another, in name order.  If one commit fails, the partitions before it are
committed, it and the ones after it are rolled back, and
:class:`.PartialCommitError` says exactly which are which.  (If the
connection breaks *during* a COMMIT, that partition's outcome is unknown: the
error says so.)

With ``twophase=True`` PostgreSQL prepared transactions make the write atomic:

1. every partition runs ``PREPARE TRANSACTION 'partpool:<gtrid>:<partition>'``;
   if any prepare fails, all are rolled back and nothing is applied;
2. the decision to commit is recorded (a row in ``partpool_twophase_log`` on
   the log partition, the first partition by default), which is the commit point;
3. every partition runs ``COMMIT PREPARED``.

A crash (of the application or of a partition) between 2 and 3 leaves
prepared transactions behind, holding their locks; :func:`recover_twophase`
finds them and finishes the job: ``COMMIT PREPARED`` where the decision was
recorded, ``ROLLBACK PREPARED`` where it was not and the transaction is older
than a grace period (its coordinator is gone).  Running it twice changes
nothing.  Partitions need ``max_prepared_transactions`` > 0.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Result, RootTransaction, TwoPhaseTransaction

from .errors import PartialCommitError, PartpoolError, RoutingError, TwoPhaseError

if TYPE_CHECKING:
    from .engine import ShardedEngine

__all__ = [
    "LOG_TABLE",
    "MultiPartitionTransaction",
    "PreparedTransaction",
    "RecoveryAction",
    "prepared_transactions",
    "recover_twophase",
]

log = logging.getLogger("sqlalchemy_partpool.transactions")

#: Table (on the log partition) that records two-phase commit decisions.
LOG_TABLE = "partpool_twophase_log"
_GID_PREFIX = "partpool:"

# Called after the commit decision is recorded and before any COMMIT PREPARED;
# the crash-recovery tests use it to stop a coordinator at the worst moment.
_after_decision_hook: Callable[[str], None] | None = None

_CREATE_LOG = f"""
CREATE TABLE IF NOT EXISTS {LOG_TABLE} (
    gtrid text PRIMARY KEY,
    participants text[] NOT NULL,
    decided_at timestamptz NOT NULL DEFAULT now()
)
"""


def _gid(gtrid: str, partition: str) -> str:
    return f"{_GID_PREFIX}{gtrid}:{partition}"


def _parse_gid(gid: str) -> tuple[str, str] | None:
    if not gid.startswith(_GID_PREFIX):
        return None
    gtrid, sep, partition = gid[len(_GID_PREFIX) :].partition(":")
    return (gtrid, partition) if sep else None


class MultiPartitionTransaction:
    """A write across partitions; use it as a context manager.

    ::

        with sharded.begin_many(twophase=True) as tx:
            tx.execute(insert(orders), {...}, key=buyer_id)
            tx.execute(insert(orders), {...}, key=seller_id)
        # committed on both partitions, or on neither

    :param sharded: the engine.
    :param partitions: the partitions the block may touch (default: any).
    :param twophase: use PostgreSQL prepared transactions (atomic across partitions).
    :param log_partition: where two-phase decisions are recorded (default: the
      first configured partition).
    """

    def __init__(
        self,
        sharded: ShardedEngine,
        partitions: Sequence[str] | None = None,
        *,
        twophase: bool = False,
        log_partition: str | None = None,
    ) -> None:
        self.sharded = sharded
        self.allowed = None if partitions is None else frozenset(partitions)
        self.twophase = twophase
        self.gtrid = uuid.uuid4().hex
        self.log_partition = sharded.resolve(
            partition=log_partition if log_partition is not None else next(iter(sharded.partitions))
        )
        self._connections: dict[str, Connection] = {}
        self._transactions: dict[str, RootTransaction] = {}
        self._done = False
        # set once the two-phase commit decision is recorded: from then on a
        # prepared transaction must never be rolled back, only committed
        self._decided = False

    # -- using it ----------------------------------------------------------------------

    def connection(self, key: Any = None, *, partition: str | None = None) -> Connection:
        """The connection of the partition of *key* (or *partition*), its transaction begun."""
        from .engine import NO_KEY

        name = self.sharded.resolve(NO_KEY if key is None else key, partition)
        if self._done:
            raise PartpoolError("this multi-partition transaction has already ended")
        if self.allowed is not None and name not in self.allowed:
            raise RoutingError(
                f"partition {name!r} is not among the partitions of this transaction "
                f"({sorted(self.allowed)}); pass it to begin_many(partitions=...)",
                partition=name,
            )
        conn = self._connections.get(name)
        if conn is None:
            conn = self.sharded.engine(name).connect()
            try:
                transaction: RootTransaction
                if self.twophase:
                    transaction = conn.begin_twophase(xid=_gid(self.gtrid, name))
                else:
                    transaction = conn.begin()
            except BaseException:
                conn.close()
                raise
            self._connections[name] = conn
            self._transactions[name] = transaction
        return conn

    def execute(
        self, statement: Any, params: Any = None, *, key: Any = None, partition: str | None = None
    ) -> Result[Any]:
        """Execute *statement* in the transaction on the partition of *key* (or *partition*)."""
        return self.connection(key, partition=partition).execute(statement, params)

    @property
    def partitions(self) -> tuple[str, ...]:
        """The partitions touched so far, in name order."""
        return tuple(sorted(self._connections))

    # -- ending it ---------------------------------------------------------------------

    def __enter__(self) -> MultiPartitionTransaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def rollback(self) -> None:
        """Roll back on every partition (prepared ones too)."""
        try:
            for name in sorted(self._transactions):
                try:
                    self._transactions[name].rollback()
                except Exception:
                    log.warning(
                        "partition %r: rollback failed; the server discards the "
                        "transaction when the connection closes",
                        name,
                        exc_info=True,
                    )
        finally:
            self._close()

    def commit(self) -> None:
        """Commit on every partition touched.

        :raises PartialCommitError: without two-phase commit, if a commit failed
          after others had succeeded.
        :raises TwoPhaseError: with two-phase commit, if it could not complete.
        """
        try:
            if self.twophase:
                self._commit_twophase()
            else:
                self._commit_each()
        finally:
            self._close()

    def _close(self) -> None:
        self._done = True
        for name, conn in self._connections.items():
            try:
                if self._decided and self._transactions[name].is_active:
                    # Decided but not committed here (interrupted, or COMMIT
                    # PREPARED failed): closing normally would roll the prepared
                    # transaction back.  Drop the session instead; the server
                    # keeps the prepared transaction for recover_twophase().
                    conn.invalidate()
                conn.close()
            except Exception:  # pragma: no cover - closing must not mask the outcome
                log.debug("closing a connection failed", exc_info=True)

    def _commit_each(self) -> None:
        names = sorted(self._transactions)
        committed: list[str] = []
        for i, name in enumerate(names):
            try:
                self._transactions[name].commit()
            except Exception as exc:
                rest = names[i + 1 :]
                for other in rest:
                    try:
                        self._transactions[other].rollback()
                    except Exception:
                        log.warning("partition %r: rollback failed", other, exc_info=True)
                cause = self.sharded.describe_error(name, exc)
                if not committed:
                    raise
                raise PartialCommitError(committed, rest, name, cause) from exc
            committed.append(name)

    def _commit_twophase(self) -> None:
        names = sorted(self._transactions)
        transactions = {n: self._transactions[n] for n in names}
        prepared: list[str] = []
        for name in names:
            transaction = transactions[name]
            assert isinstance(transaction, TwoPhaseTransaction)
            try:
                transaction.prepare()
            except Exception as exc:
                self._abort_prepared(prepared, names)
                raise TwoPhaseError(
                    f"prepare failed on partition {name!r} "
                    f"({self.sharded.describe_error(name, exc)}); the transaction was "
                    "rolled back on every partition, nothing was applied",
                    xid=self.gtrid,
                    outcome="rolled_back",
                    partition=name,
                ) from exc
            prepared.append(name)
        try:
            self._record_decision(names)
        except Exception as exc:
            self._abort_prepared(prepared, names)
            raise TwoPhaseError(
                "could not record the commit decision on partition "
                f"{self.log_partition!r} ({self.sharded.describe_error(self.log_partition, exc)}); "
                "the transaction was rolled back on every partition, nothing was applied",
                xid=self.gtrid,
                outcome="rolled_back",
                partition=self.log_partition,
            ) from exc
        self._decided = True
        if _after_decision_hook is not None:
            _after_decision_hook(self.gtrid)
        failed: dict[str, str] = {}
        for name in names:
            try:
                transactions[name].commit()
            except Exception as exc:
                failed[name] = self.sharded.describe_error(name, exc)
        if failed:
            raise TwoPhaseError(
                f"the commit was decided and applied on {[n for n in names if n not in failed]}, "
                f"but COMMIT PREPARED failed on {sorted(failed)} ({'; '.join(failed.values())}); "
                "those partitions hold the transaction prepared. Run "
                "sharded.recover_twophase() once they are reachable to commit it there.",
                xid=self.gtrid,
                outcome="in_doubt",
                partition=next(iter(failed)),
            )
        self._forget_decision()

    def _abort_prepared(self, prepared: list[str], names: list[str]) -> None:
        for name in names:
            try:
                self._transactions[name].rollback()
            except Exception:
                log.warning(
                    "partition %r: could not roll back the %s transaction %s; "
                    "recover_twophase() will",
                    name,
                    "prepared" if name in prepared else "open",
                    self.gtrid,
                    exc_info=True,
                )

    def _record_decision(self, participants: list[str]) -> None:
        with self.sharded.engine(self.log_partition).begin() as conn:
            ensure_log_table(conn)
            conn.execute(
                text(f"INSERT INTO {LOG_TABLE} (gtrid, participants) VALUES (:g, :p)"),
                {"g": self.gtrid, "p": participants},
            )

    def _forget_decision(self) -> None:
        try:
            with self.sharded.engine(self.log_partition).begin() as conn:
                conn.execute(text(f"DELETE FROM {LOG_TABLE} WHERE gtrid = :g"), {"g": self.gtrid})
        except Exception:
            # harmless: recover_twophase() removes records with nothing left to do
            log.info("could not remove the decision record of %s", self.gtrid, exc_info=True)


def ensure_log_table(conn: Connection) -> None:
    """Create the two-phase decision log table on this connection's partition if missing."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": LOG_TABLE})
    conn.execute(text(_CREATE_LOG))


@dataclass(frozen=True)
class PreparedTransaction:
    """A prepared (in-doubt) transaction left on a partition."""

    partition: str
    gid: str
    gtrid: str | None
    prepared_at: float
    owner: str


@dataclass(frozen=True)
class RecoveryAction:
    """What :func:`recover_twophase` did (or, with ``dry_run``, would do) about one."""

    partition: str
    gid: str
    action: str  # "commit", "rollback", "wait" (too recent), "skip" (partition unreachable)
    reason: str


def prepared_transactions(
    sharded: ShardedEngine, partitions: Sequence[str] | None = None
) -> tuple[list[PreparedTransaction], dict[str, BaseException]]:
    """List prepared transactions on the partitions' databases.

    :returns: the transactions, and partition -> error for partitions that
      could not be asked.
    """
    found: list[PreparedTransaction] = []
    unreachable: dict[str, BaseException] = {}
    for name in partitions or list(sharded.partitions):
        try:
            with sharded.engine(name).connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT gid, extract(epoch FROM prepared), owner FROM pg_prepared_xacts "
                        "WHERE database = current_database()"
                    )
                ).all()
        except Exception as exc:
            unreachable[name] = exc
            continue
        for gid, prepared_at, owner in rows:
            parsed = _parse_gid(gid)
            found.append(
                PreparedTransaction(
                    partition=name,
                    gid=gid,
                    gtrid=parsed[0] if parsed else None,
                    prepared_at=float(prepared_at),
                    owner=owner,
                )
            )
    return found, unreachable


def recover_twophase(
    sharded: ShardedEngine,
    *,
    older_than: float = 60.0,
    log_partition: str | None = None,
    dry_run: bool = False,
) -> list[RecoveryAction]:
    """Resolve the in-doubt two-phase transactions that sqlalchemy-partpool left behind.

    For each prepared transaction whose id starts with ``partpool:``: commit
    it if its decision was recorded; roll it back if not and it was prepared
    more than *older_than* seconds ago (its coordinator has died); otherwise
    leave it to its coordinator.  Transactions prepared by other software are
    never touched.  Safe to run at any time and any number of times.

    :param older_than: seconds after which an undecided prepared transaction
      is presumed abandoned.
    :param log_partition: where decisions are recorded (default: the first partition).
    :param dry_run: report what would be done without doing it.
    :returns: one :class:`RecoveryAction` per prepared transaction seen, plus
      ``skip`` entries for partitions that could not be reached.
    :raises PartpoolError: if the decision log cannot be read (then nothing is
      done: without it, committing and rolling back would both be guesses).
    """
    log_name = sharded.resolve(
        partition=log_partition if log_partition is not None else next(iter(sharded.partitions))
    )
    found, unreachable = prepared_transactions(sharded)
    ours = [p for p in found if p.gtrid is not None]
    try:
        with sharded.engine(log_name).begin() as conn:
            ensure_log_table(conn)
            decided = {
                row[0]
                for row in conn.execute(
                    text(f"SELECT gtrid FROM {LOG_TABLE} WHERE gtrid = ANY(:g)"),
                    {"g": sorted({p.gtrid for p in ours if p.gtrid})},
                )
            }
    except Exception as exc:
        raise PartpoolError(
            f"cannot read the two-phase decision log on partition {log_name!r} "
            f"({sharded.describe_error(log_name, exc)}); nothing was resolved. Retry when "
            "it is reachable.",
            partition=log_name,
        ) from exc
    now = time.time()
    actions: list[RecoveryAction] = [
        RecoveryAction(name, "", "skip", sharded.describe_error(name, exc))
        for name, exc in unreachable.items()
    ]
    for prepared in ours:
        if prepared.gtrid in decided:
            action, reason = "commit", "the commit was decided"
        elif now - prepared.prepared_at > older_than:
            action, reason = "rollback", f"undecided and prepared over {older_than:g}s ago"
        else:
            actions.append(
                RecoveryAction(prepared.partition, prepared.gid, "wait", "prepared recently")
            )
            continue
        if not dry_run:
            statement = "COMMIT PREPARED" if action == "commit" else "ROLLBACK PREPARED"
            try:
                with sharded.engine(prepared.partition).connect() as conn:
                    conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                        text(f"{statement} :gid"), {"gid": prepared.gid}
                    )
            except Exception as exc:
                actions.append(
                    RecoveryAction(
                        prepared.partition,
                        prepared.gid,
                        "skip",
                        f"{statement} failed: {sharded.describe_error(prepared.partition, exc)}",
                    )
                )
                continue
            log.warning(
                "partition %r: %s %s (%s)", prepared.partition, statement, prepared.gid, reason
            )
        actions.append(RecoveryAction(prepared.partition, prepared.gid, action, reason))
    if not dry_run and not unreachable:
        _prune_log(sharded, log_name, {p.gtrid for p in ours if p.gtrid}, older_than)
    return actions


def _prune_log(sharded: ShardedEngine, log_name: str, pending: set[str], older_than: float) -> None:
    """Drop decision records with nothing prepared left anywhere."""
    with sharded.engine(log_name).begin() as conn:
        conn.execute(
            text(
                f"DELETE FROM {LOG_TABLE} WHERE gtrid <> ALL(:pending) "
                "AND decided_at < now() - make_interval(secs => :age)"
            ),
            {"pending": sorted(pending), "age": older_than},
        )
