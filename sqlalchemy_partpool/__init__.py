"""sqlalchemy-partpool: a partitioned PostgreSQL database used as one, through SQLAlchemy.

Every partition gets its own pooled :class:`~sqlalchemy.engine.Engine`
(a :class:`PartitionPool` sized by ``min_connections``/``max_connections``),
and a :class:`Router` sends each shard key to the partition that owns it::

    from sqlalchemy_partpool import create_sharded_engine

    sharded = create_sharded_engine({"p0": url0, "p1": url1}, max_connections=10)
    with sharded.connect(key=customer_id) as conn:
        conn.execute(...)
"""

from __future__ import annotations

import logging

from .compat import PartitionedConnectionPool
from .config import Partition, PoolSettings, ShardedConfig, mask_url
from .engine import NO_KEY, ShardedEngine, create_sharded_engine
from .errors import (
    ConfigurationError,
    ConnectionReturnError,
    DuplicateIdentity,
    FanoutError,
    FanoutTimeout,
    MigrationLocked,
    NoPartitionForKey,
    PartialCommitError,
    PartitionUnavailable,
    PartpoolError,
    PinViolation,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolTimeout,
    QueryTimeout,
    RoutingError,
    ShardKeyChanged,
    ShardKeyMissing,
    TwoPhaseError,
    UnknownPartition,
    UnmergeableStatement,
    WarmupError,
)
from .events import PartitionEvent, ShardedEngineEvents
from .fanout import FanoutResult
from .health import PartitionHealth, PartitionState
from .ids import IdGenerator
from .pool import PartitionPool
from .recovery import RecoveryAction
from .routing import (
    BucketMove,
    CallableRouter,
    HashRouter,
    LookupRouter,
    PgHashRouter,
    RangeRouter,
    Router,
    make_router,
    pg_hash,
)
from .session import ShardedSession, set_shard_id
from .stats import PoolStats, StatsSnapshot
from .transactions import MultiPartitionTransaction

__version__ = "0.1.0.dev0"

# Quiet by default, like the "sqlalchemy" loggers: applications opt in.
logging.getLogger("sqlalchemy_partpool").addHandler(logging.NullHandler())

__all__ = [
    "NO_KEY",
    "BucketMove",
    "CallableRouter",
    "ConfigurationError",
    "ConnectionReturnError",
    "DuplicateIdentity",
    "FanoutError",
    "FanoutResult",
    "FanoutTimeout",
    "HashRouter",
    "IdGenerator",
    "LookupRouter",
    "MigrationLocked",
    "MultiPartitionTransaction",
    "NoPartitionForKey",
    "PartialCommitError",
    "Partition",
    "PartitionEvent",
    "PartitionHealth",
    "PartitionPool",
    "PartitionState",
    "PartitionUnavailable",
    "PartitionedConnectionPool",
    "PartpoolError",
    "PgHashRouter",
    "PinViolation",
    "PoolClosed",
    "PoolError",
    "PoolExhausted",
    "PoolSettings",
    "PoolStats",
    "PoolTimeout",
    "QueryTimeout",
    "RangeRouter",
    "RecoveryAction",
    "Router",
    "RoutingError",
    "ShardKeyChanged",
    "ShardKeyMissing",
    "ShardedConfig",
    "ShardedEngine",
    "ShardedEngineEvents",
    "ShardedSession",
    "StatsSnapshot",
    "TwoPhaseError",
    "UnknownPartition",
    "UnmergeableStatement",
    "WarmupError",
    "__version__",
    "create_sharded_engine",
    "make_router",
    "mask_url",
    "pg_hash",
    "set_shard_id",
]
