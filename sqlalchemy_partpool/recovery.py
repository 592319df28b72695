"""Two-phase commit bookkeeping and recovery.

The decision log (``partpool_twophase_log`` on the log partition) holds one
row per decided global transaction: a commit decision (its participants
listed) written by the coordinator, or a rollback decision (no participants)
written by :func:`recover_twophase` before it rolls anything back.  Its primary
key admits one decision per transaction, which is what makes a slow
coordinator and a recovery safe against each other.

:func:`recover_twophase` resolves the prepared transactions that
sqlalchemy-partpool left behind after a crash; see
:mod:`~sqlalchemy_partpool.transactions` for the protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from .errors import PartpoolError

if TYPE_CHECKING:
    from .engine import ShardedEngine

__all__ = [
    "LOG_TABLE",
    "PreparedTransaction",
    "RecoveryAction",
    "ensure_log_table",
    "prepared_transactions",
    "recover_twophase",
]

log = logging.getLogger("sqlalchemy_partpool.recovery")

#: Table (on the log partition) that records two-phase commit decisions.
LOG_TABLE = "partpool_twophase_log"
_GID_PREFIX = "partpool:"

# A row records a decision: to commit (participants listed) or, written by
# recover_twophase(), to roll back (no participants).
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
                    text(
                        f"SELECT gtrid FROM {LOG_TABLE} "
                        "WHERE gtrid = ANY(:g) AND cardinality(participants) > 0"
                    ),
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
    rollback_recorded: dict[str, bool] = {}
    for prepared in ours:
        assert prepared.gtrid is not None
        if prepared.gtrid in decided:
            action, reason = "commit", "the commit was decided"
        elif now - prepared.prepared_at > older_than:
            action, reason = "rollback", f"undecided and prepared over {older_than:g}s ago"
            if not dry_run:
                recorded = rollback_recorded.get(prepared.gtrid)
                if recorded is None:
                    try:
                        recorded = _record_rollback(sharded, log_name, prepared.gtrid)
                    except Exception as exc:
                        actions.append(
                            RecoveryAction(
                                prepared.partition,
                                prepared.gid,
                                "skip",
                                "could not record the rollback decision on partition "
                                f"{log_name!r}: {sharded.describe_error(log_name, exc)}",
                            )
                        )
                        continue
                    rollback_recorded[prepared.gtrid] = recorded
                if not recorded:
                    action, reason = "commit", "the commit was decided while recovery ran"
        else:
            actions.append(
                RecoveryAction(prepared.partition, prepared.gid, "wait", "prepared recently")
            )
            continue
        if not dry_run:
            statement = "COMMIT PREPARED" if action == "commit" else "ROLLBACK PREPARED"
            try:
                with sharded.engine(prepared.partition).connect() as conn:
                    # rendered inline, not bound: these statements take no
                    # parameters, which drivers binding server-side (psycopg 3) need
                    conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                        text(f"{statement} :gid").bindparams(
                            bindparam("gid", prepared.gid, literal_execute=True)
                        )
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


def _record_rollback(sharded: ShardedEngine, log_name: str, gtrid: str) -> bool:
    """Record the decision to roll *gtrid* back, unless its commit was decided first.

    The log's primary key admits one decision per transaction, so once this
    returns True the coordinator can no longer record a commit.

    :returns: True if rolling back is the decision, False if committing is.
    """
    with sharded.engine(log_name).begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO {LOG_TABLE} (gtrid, participants) "
                "VALUES (:g, CAST(:p AS text[])) ON CONFLICT (gtrid) DO NOTHING"
            ),
            {"g": gtrid, "p": []},
        )
        participants = conn.execute(
            text(f"SELECT participants FROM {LOG_TABLE} WHERE gtrid = :g"), {"g": gtrid}
        ).scalar_one()
    return not participants


def _prune_log(sharded: ShardedEngine, log_name: str, pending: set[str], older_than: float) -> None:
    """Drop decision records with nothing prepared left anywhere.

    Records younger than *older_than* are kept: a coordinator may still be
    acting on them (a slow one, refused by a rollback record, included).
    """
    with sharded.engine(log_name).begin() as conn:
        conn.execute(
            text(
                f"DELETE FROM {LOG_TABLE} WHERE gtrid <> ALL(:pending) "
                "AND decided_at < now() - make_interval(secs => :age)"
            ),
            {"pending": sorted(pending), "age": older_than},
        )
