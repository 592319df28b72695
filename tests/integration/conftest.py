"""Fixtures for tests that run against real PostgreSQL databases."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool import ShardedEngine, create_sharded_engine


@pytest.fixture(scope="session")
def admin_engine(pg_admin_url: str) -> Iterator[Engine]:
    """An unpooled engine on the server's ``postgres`` database, for looking from outside."""
    engine = create_engine(pg_admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


class ServerView:
    """What the server itself says about our connections (pg_stat_activity)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def connections(self, database: str) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                ).scalar_one()
            )

    def states(self, database: str) -> list[str]:
        with self.engine.connect() as conn:
            return [
                row[0]
                for row in conn.execute(
                    text("SELECT state FROM pg_stat_activity WHERE datname = :db"),
                    {"db": database},
                )
            ]

    def wait_for(
        self, database: str, predicate: Callable[[int], bool], timeout: float = 10.0
    ) -> int:
        """Poll until ``predicate(count)`` holds; return the last count."""
        deadline = time.monotonic() + timeout
        count = self.connections(database)
        while not predicate(count) and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.connections(database)
        return count


@pytest.fixture(scope="session")
def server(admin_engine: Engine) -> ServerView:
    return ServerView(admin_engine)


def database_of(url: str) -> str:
    database = make_url(url).database
    assert database is not None
    return database


@pytest.fixture
def sharded_factory(make_databases) -> Iterator[Callable[..., tuple[ShardedEngine, list[str]]]]:
    """``factory(n, **options) -> (sharded, database names)`` on n fresh databases."""
    created: list[ShardedEngine] = []

    def factory(n: int = 2, **options) -> tuple[ShardedEngine, list[str]]:
        urls = make_databases(n)
        partitions = {f"p{i}": url for i, url in enumerate(urls)}
        sharded = create_sharded_engine(partitions, **options)
        created.append(sharded)
        return sharded, [database_of(u) for u in urls]

    yield factory
    for sharded in created:
        sharded.dispose()
