"""Test harness for sqlalchemy-partpool: throwaway PostgreSQL servers and a fault proxy.

Used by the project's own test suite, the demo and the benchmarks, and usable
by applications that test against partpool:

* :func:`discover_server` returns a :class:`Server`: the one named by
  ``PARTPOOL_TEST_URL``, or a fresh :class:`PostgresServer` started from local
  binaries (see :func:`find_pg_bindir`).
* :class:`PostgresServer` can also be stopped, killed (SIGKILL, like a crash)
  and restarted by a test.
* :class:`FaultProxy` sits between a client and a server and injects latency,
  refused connections, resets and black holes.

This package imports nothing from the rest of sqlalchemy_partpool, so it works
while the library itself is broken.
"""

from __future__ import annotations

from .databases import URL_ENV, scratch_partitions
from .postgres import (
    BINDIR_ENV,
    OS_USER_ENV,
    TEST_URL_ENV,
    DatabaseFactory,
    ExistingServer,
    HarnessError,
    PostgresServer,
    Server,
    ServerFactory,
    discover_server,
    find_pg_bindir,
    free_port,
    unique_name,
)
from .proxy import FaultProxy, ProxyFactory, ProxyMode, ProxyTarget

__all__ = [
    "BINDIR_ENV",
    "OS_USER_ENV",
    "TEST_URL_ENV",
    "URL_ENV",
    "DatabaseFactory",
    "ExistingServer",
    "FaultProxy",
    "HarnessError",
    "PostgresServer",
    "ProxyFactory",
    "ProxyMode",
    "ProxyTarget",
    "Server",
    "ServerFactory",
    "discover_server",
    "find_pg_bindir",
    "free_port",
    "scratch_partitions",
    "unique_name",
]
