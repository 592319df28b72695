"""sqlalchemy-partpool: a partitioned PostgreSQL database used as one, through SQLAlchemy."""

from __future__ import annotations

from .errors import (
    ConfigurationError,
    ConnectionReturnError,
    NoPartitionForKey,
    PartitionUnavailable,
    PartpoolError,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolTimeout,
    RoutingError,
    ShardKeyMissing,
    UnknownPartition,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "ConfigurationError",
    "ConnectionReturnError",
    "NoPartitionForKey",
    "PartitionUnavailable",
    "PartpoolError",
    "PoolClosed",
    "PoolError",
    "PoolExhausted",
    "PoolTimeout",
    "RoutingError",
    "ShardKeyMissing",
    "UnknownPartition",
    "__version__",
]
