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

A coordinator presumed gone may only be slow (a PREPARE waiting for a lock,
say).  So before rolling anything back, recovery records the rollback in the
log too, as a row with no participants: the log's primary key then lets only
one of the two decisions in.  A coordinator that comes back finds its commit
decision refused and rolls back; a recovery that finds the commit decided
first commits.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, RootTransaction, TwoPhaseTransaction
from sqlalchemy.exc import DBAPIError, IntegrityError

from .errors import PartialCommitError, PartpoolError, RoutingError, TwoPhaseError
from .recovery import LOG_TABLE, _gid, _record_rollback, ensure_log_table

if TYPE_CHECKING:
    from .engine import ShardedEngine
    from .fanout import AnyResult

__all__ = ["MultiPartitionTransaction"]

log = logging.getLogger("sqlalchemy_partpool.transactions")

# Called with the gtrid after every participant is prepared and before the
# decision is recorded (the crash-recovery tests use it to stop a coordinator
# whose transactions must then be rolled back)...
_after_prepare_hook: Callable[[str], None] | None = None
# ...and after the commit decision is recorded, before any COMMIT PREPARED (to
# stop it where its transactions must then be committed).
_after_decision_hook: Callable[[str], None] | None = None


class _DecisionUnknown(Exception):
    """The COMMIT of a decision record failed in a way that does not say whether it happened."""


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
        # set once the prepared transactions must no longer be rolled back
        # here: the commit was decided, or whether it was cannot be known (then
        # recover_twophase() settles it from the log)
        self._keep_prepared = False

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
    ) -> AnyResult:
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
                if self._keep_prepared and self._transactions[name].is_active:
                    # Not committed here (interrupted, COMMIT PREPARED failed, or
                    # the decision is unknown): closing normally would roll the
                    # prepared transaction back.  Drop the session instead; the
                    # server keeps the prepared transaction for recover_twophase().
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
        if _after_prepare_hook is not None:
            _after_prepare_hook(self.gtrid)
        try:
            self._record_decision(names)
        except _DecisionUnknown as unknown:
            self._settle_decision(names, unknown.__cause__)
        except Exception as exc:
            self._abort_prepared(prepared, names)
            if isinstance(exc, IntegrityError):
                # the only constraint is the primary key: recover_twophase()
                # recorded a rollback first, having presumed this coordinator dead
                why = (
                    "recover_twophase() had already decided to roll it back (it was prepared "
                    "longer than its older_than); raise older_than above your longest commit"
                )
            else:
                why = (
                    "could not record the commit decision on partition "
                    f"{self.log_partition!r} "
                    f"({self.sharded.describe_error(self.log_partition, exc)})"
                )
            raise TwoPhaseError(
                f"{why}; the transaction was rolled back on every partition, nothing was applied",
                xid=self.gtrid,
                outcome="rolled_back",
                partition=self.log_partition,
            ) from exc
        self._keep_prepared = True
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
                "those partitions hold the transaction prepared (unless the failure hid a "
                "COMMIT PREPARED that went through). Run sharded.recover_twophase() once "
                "they are reachable to commit it there.",
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
        """Record the decision to commit: the commit point.

        :raises _DecisionUnknown: if the record's COMMIT failed without the
          server refusing it (the connection was lost or timed out): the
          server may have committed it all the same.
        """
        with self.sharded.engine(self.log_partition).connect() as conn:
            record = conn.begin()
            ensure_log_table(conn)
            conn.execute(
                text(f"INSERT INTO {LOG_TABLE} (gtrid, participants) VALUES (:g, :p)"),
                {"g": self.gtrid, "p": participants},
            )
            try:
                record.commit()
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise _DecisionUnknown() from exc
                raise
            except Exception as exc:
                raise _DecisionUnknown() from exc

    def _settle_decision(self, names: list[str], cause: BaseException | None) -> None:
        """Find out, or fix, the decision after its COMMIT failed with the outcome unknown.

        Records a rollback unless the commit turns out to be recorded (the log
        admits one decision); returns if it is, raises otherwise.  Rolling
        back on a guess would split the transaction: the log partition is
        often a participant too, one whose ROLLBACK PREPARED is then likely
        to fail, and recovery would commit it there alone.

        :raises TwoPhaseError: ``rolled_back``, or ``in_doubt`` (everything
          left prepared) when the log cannot be asked.
        """
        log_name = self.log_partition
        where = f"partition {log_name!r}" + (
            f" ({self.sharded.describe_error(log_name, cause)})" if cause is not None else ""
        )
        try:
            rolled_back = _record_rollback(self.sharded, log_name, self.gtrid)
        except Exception:
            log.warning("cannot tell whether %s was decided", self.gtrid, exc_info=True)
            self._keep_prepared = True
            raise TwoPhaseError(
                f"recording the commit decision on {where} failed, and whether it was "
                "recorded cannot be checked; every partition holds the transaction "
                f"prepared. Run sharded.recover_twophase() once {log_name!r} is reachable: "
                "it commits or rolls back everywhere, as the log says.",
                xid=self.gtrid,
                outcome="in_doubt",
                partition=log_name,
            ) from cause
        if not rolled_back:
            log.info("the commit decision of %s was recorded despite the error", self.gtrid)
            return
        self._abort_prepared(names, names)
        raise TwoPhaseError(
            f"could not record the commit decision on {where}; the transaction was rolled "
            "back on every partition, nothing was applied",
            xid=self.gtrid,
            outcome="rolled_back",
            partition=log_name,
        ) from cause

    def _forget_decision(self) -> None:
        try:
            with self.sharded.engine(self.log_partition).begin() as conn:
                conn.execute(text(f"DELETE FROM {LOG_TABLE} WHERE gtrid = :g"), {"g": self.gtrid})
        except Exception:
            # harmless: recover_twophase() removes records with nothing left to do
            log.info("could not remove the decision record of %s", self.gtrid, exc_info=True)
