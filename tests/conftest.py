"""Fixtures shared by the whole test suite: PostgreSQL servers, databases, fault proxies.

Server provisioning follows :func:`sqlalchemy_partpool.testing.discover_server`:
``PARTPOOL_TEST_URL`` if set, else a throwaway cluster from local binaries.
When no server can be had, tests that need one are skipped on a developer's
machine but *fail* under CI (``CI=true`` or ``CI=1``), so a broken CI
environment can never pass by skipping everything.

This file imports only ``sqlalchemy_partpool.testing``, SQLAlchemy, psycopg2 and
pytest, so the fixtures keep working while the library itself is half-written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy.engine import URL, make_url

from sqlalchemy_partpool.testing import (
    DatabaseFactory,
    FaultProxy,
    HarnessError,
    PostgresServer,
    ProxyFactory,
    ProxyTarget,
    Server,
    ServerFactory,
    discover_server,
    find_pg_bindir,
    unique_name,
)

logger = logging.getLogger("sqlalchemy_partpool.testing")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it under CI, where a missing server is a broken setup."""
    if _in_ci():
        pytest.fail(f"{reason} (CI is set: refusing to skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """The PostgreSQL server shared by the whole session.

    ``PARTPOOL_TEST_URL``'s server if set, else a throwaway cluster that is
    removed at the end of the session.  Tests must not stop or kill it: use
    ``throwaway_server`` for that.
    """
    server: Server | None = None
    reason = ""
    try:
        server = discover_server()
    except (HarnessError, OSError) as exc:
        reason = f"no PostgreSQL server for tests: {exc}"
    if server is None:
        _unavailable(reason)  # outside the except block: no chained traceback
    yield server
    if isinstance(server, PostgresServer):
        server.cleanup()


@pytest.fixture(scope="session")
def pg_admin_url(pg_server: Server) -> str:
    """SQLAlchemy URL of the shared server's ``postgres`` database (superuser)."""
    return pg_server.url("postgres")


@pytest.fixture
def make_databases(pg_server: Server) -> Iterator[DatabaseFactory]:
    """Factory ``make_databases(n, prefix="p") -> list[str]`` of fresh databases' URLs.

    Each call creates ``n`` empty databases on the shared server; all of them
    are dropped (connections forcibly closed) when the test ends.
    """
    created: list[str] = []

    def make(n: int, prefix: str = "p") -> list[str]:
        if n < 0:
            raise ValueError("n must be >= 0")
        urls = []
        for index in range(n):
            name = unique_name(f"{prefix}{index}")
            pg_server.create_database(name)
            created.append(name)
            urls.append(pg_server.url(name))
        return urls

    yield make
    errors = []
    for name in reversed(created):
        try:
            pg_server.drop_database(name)
        except Exception as exc:
            errors.append(f"{name}: {exc}")
    if errors:
        # Leave the test's own outcome alone; a leftover database is noted, not fatal.
        logger.warning("could not drop test databases: %s", "; ".join(errors))


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    """Directory of the PostgreSQL binaries used for throwaway servers.

    Skips (fails under CI) when there is none.
    """
    bindir: Path | None = None
    reason = "no PostgreSQL binaries found"
    try:
        bindir = find_pg_bindir()
    except HarnessError as exc:
        reason = str(exc)
    if bindir is None:
        _unavailable(f"cannot start throwaway PostgreSQL servers: {reason}")
    return bindir


@pytest.fixture
def throwaway_server(pg_bindir: Path) -> Iterator[ServerFactory]:
    """Factory for private :class:`PostgresServer` instances a test may stop, kill or restart.

    ``throwaway_server(start=True, max_connections=200,
    max_prepared_transactions=20, settings=None)``; every server it made is
    stopped and deleted when the test ends.
    """
    servers: list[PostgresServer] = []

    def make(
        *,
        start: bool = True,
        max_connections: int = 200,
        max_prepared_transactions: int = 20,
        settings: Mapping[str, str | int | float | bool] | None = None,
    ) -> PostgresServer:
        server = PostgresServer(
            bindir=pg_bindir,
            max_connections=max_connections,
            max_prepared_transactions=max_prepared_transactions,
            settings=settings,
        )
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        try:
            server.cleanup()
        except Exception:
            logger.exception("could not clean up %r", server)


def _target_address(target: ProxyTarget) -> tuple[str, int]:
    if isinstance(target, Server):
        return target.host, target.port
    if isinstance(target, tuple) and not isinstance(target, URL):  # URL is a NamedTuple
        host, port = target
        return host, port
    url: URL = make_url(target)
    if url.host is None:
        raise ValueError(f"{url!r} has no host to proxy to")
    return url.host, url.port or 5432


@pytest.fixture
def fault_proxy() -> Iterator[ProxyFactory]:
    """Factory ``fault_proxy(target) -> FaultProxy``, started, stopped at teardown.

    ``target`` is a :class:`Server`, a ``(host, port)`` tuple or a URL.
    """
    proxies: list[FaultProxy] = []

    def make(target: ProxyTarget) -> FaultProxy:
        host, port = _target_address(target)
        proxy = FaultProxy(host, port)
        proxies.append(proxy)
        return proxy.start()

    yield make
    for proxy in proxies:
        proxy.stop()
