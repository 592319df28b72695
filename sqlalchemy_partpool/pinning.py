"""Tenant pinning: a context in which every statement must stay on one partition.

::

    with sharded.pinned(tenant_id):
        handle_request()  # any statement reaching another partition raises PinViolation

The pin lives in a :class:`contextvars.ContextVar`, so it holds per thread and
per asyncio task, and nests (the inner pin wins while it lasts).  It is checked
where statements are routed: :meth:`.ShardedEngine.connect`/``begin``/
``execute``/``execute_all``/``begin_many`` and everything the ORM
:class:`.ShardedSession` sends, loads or flushes.  ``sharded.engine(name)``
remains an explicit, unchecked way out.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import PinViolation

if TYPE_CHECKING:
    from .engine import ShardedEngine

__all__ = ["Pin", "check_pin", "current_pin", "pinned"]


@dataclass(frozen=True)
class Pin:
    """The active pin: which engine, which partition, and the key that chose it."""

    sharded: ShardedEngine
    partition: str
    key: Any


_PIN: contextvars.ContextVar[Pin | None] = contextvars.ContextVar("partpool_pin", default=None)


def current_pin(sharded: ShardedEngine) -> Pin | None:
    """The pin active for *sharded* in this context, if any."""
    pin = _PIN.get()
    return pin if pin is not None and pin.sharded is sharded else None


@contextmanager
def pinned(sharded: ShardedEngine, key: Any) -> Iterator[Pin]:
    """Pin the current context to the partition of *key* (see module docs)."""
    pin = Pin(sharded, sharded.partition_for(key), key)
    token = _PIN.set(pin)
    try:
        yield pin
    finally:
        _PIN.reset(token)


def check_pin(sharded: ShardedEngine, partitions: Iterable[str], what: str) -> None:
    """Raise :class:`.PinViolation` if any of *partitions* is not the pinned one."""
    pin = _PIN.get()
    if pin is None or pin.sharded is not sharded:
        return
    others = [p for p in partitions if p != pin.partition]
    if others:
        raise PinViolation(pin.partition, others, what)
