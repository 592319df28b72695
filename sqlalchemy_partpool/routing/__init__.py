"""Routers: decide which partition holds a shard key.

A :class:`Router` maps a *shard key* (the value that decides where a row lives)
to a *partition* name.  Every strategy here is deterministic across processes,
machines and Python versions: none uses the built-in :func:`hash` (salted per
process by ``PYTHONHASHSEED``), and none depends on the iteration order of a
set.  A release must never silently send a key somewhere else, so the outputs
are pinned by golden vectors in the test suite.

Strategies:

* :class:`HashRouter` -- a stable 64-bit hash of the key picks one of a fixed
  number of buckets; an assignment table maps buckets to partitions, so
  partitions can be added or removed by moving whole buckets
  (:meth:`HashRouter.rebalance`).
* :class:`PgHashRouter` -- the same answer as PostgreSQL's own
  ``PARTITION BY HASH`` (modulus/remainder), computed client-side.
* :class:`RangeRouter` -- ordered boundaries, as ``PARTITION BY RANGE``.
* :class:`LookupRouter` -- an explicit key -> partition table.
* :class:`CallableRouter` -- any function you supply.

:func:`make_router` builds one from configuration (a string, or a table as
loaded from TOML).

The package, one module per idea:

* :mod:`.keys` -- the canonical key encoding (:func:`encode_key`) and
  :func:`stable_hash`;
* :mod:`.base` -- the :class:`Router` base class and shared validation;
* :mod:`.hashing` -- :class:`HashRouter` and :class:`BucketMove`;
* :mod:`.pghash` -- :func:`pg_hash` and :class:`PgHashRouter`;
* :mod:`.ranges` -- :class:`RangeRouter`;
* :mod:`.lookup` -- :class:`LookupRouter`, :class:`CallableRouter`;
* :mod:`.factory` -- :func:`make_router`.

Import from ``sqlalchemy_partpool.routing``; the modules are an implementation
detail.
"""

from __future__ import annotations

from .base import Router
from .factory import make_router
from .hashing import BucketMove, HashRouter
from .keys import encode_key, stable_hash
from .lookup import CallableRouter, LookupRouter, RouteFunction
from .pghash import HASH_PARTITION_SEED, PgHashRouter, pg_hash
from .ranges import RangeRouter

__all__ = [
    "HASH_PARTITION_SEED",
    "BucketMove",
    "CallableRouter",
    "HashRouter",
    "LookupRouter",
    "PgHashRouter",
    "RangeRouter",
    "RouteFunction",
    "Router",
    "encode_key",
    "make_router",
    "pg_hash",
    "stable_hash",
]
