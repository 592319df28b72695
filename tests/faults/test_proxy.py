"""Tests of the fault-injecting proxy, against a real PostgreSQL server.

Every wait is bounded: hanging operations run in daemon threads that are
joined with a timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool.testing import (
    FaultProxy,
    ProxyFactory,
    ProxyMode,
    Server,
    ServerFactory,
)


def _connect(proxy: FaultProxy, server: Server, timeout: int = 2) -> Any:
    return server.connect("postgres", host=proxy.host, port=proxy.port, connect_timeout=timeout)


def _select(conn: Any, sql: str = "SELECT 1") -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    conn.rollback()
    return row[0]


def _timed(fn: Callable[[], object]) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class _Background:
    """Run ``fn`` in a daemon thread; keep its result or exception."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc


def _proxy_threads(proxy: FaultProxy) -> list[str]:
    prefix = f"partpool-proxy-{proxy.port}-"
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_pass_through(pg_server: Server, pg_admin_url: str, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(pg_server)
    assert proxy.mode is ProxyMode.PASS
    engine = create_engine(proxy.url_for(pg_admin_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            # The server sees a connection to its own port: we really got through.
            assert conn.execute(text("SELECT inet_server_port()")).scalar() == pg_server.port
            assert proxy.active_connections == 1
            # Large enough for partial sends and several chunks each way.
            payload = conn.execute(text("SELECT repeat('x', 3000000)")).scalar()
            assert payload == "x" * 3_000_000
            echoed = conn.execute(text("SELECT length(:p)"), {"p": "y" * 2_000_000}).scalar()
            assert echoed == 2_000_000
    finally:
        engine.dispose()
    assert proxy.total_connections == 1
    assert _wait_until(lambda: proxy.active_connections == 0)


def test_url_for_keeps_everything_but_the_address(fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(("127.0.0.1", 9))  # never connected to
    url = "postgresql+psycopg2://u:p%40ss@db.invalid:5432/x?sslmode=disable"
    assert proxy.url_for(url) == (
        f"postgresql+psycopg2://u:p%40ss@127.0.0.1:{proxy.port}/x?sslmode=disable"
    )


def test_latency(pg_server: Server, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(pg_server)
    conn = _connect(proxy, pg_server)
    try:
        _select(conn)
        proxy.set_latency(0.15)
        assert proxy.latency == 0.15
        # One round trip: 0.15 s on the way in, 0.15 s on the way out.
        assert _timed(lambda: _select(conn)) >= 0.29
        proxy.heal()
        assert proxy.latency == 0
        assert _timed(lambda: _select(conn)) < 0.15
    finally:
        conn.close()


def test_refuse(pg_server: Server, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(pg_server)
    port = proxy.port
    held = _connect(proxy, pg_server)
    try:
        proxy.refuse()
        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError, match="refused"):
            _connect(proxy, pg_server)
        assert time.monotonic() - started < 1.0
        # Connections made before keep working.
        assert _select(held) == 1

        proxy.heal()
        assert proxy.port == port
        fresh = _connect(proxy, pg_server)
        assert _select(fresh) == 1
        fresh.close()
        assert _select(held) == 1
    finally:
        held.close()


def test_reset(pg_server: Server, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(pg_server)
    conn = _connect(proxy, pg_server)
    backend = _select(conn, "SELECT pg_backend_pid()")
    proxy.reset()
    assert proxy.active_connections == 0
    with pytest.raises(psycopg2.OperationalError):
        _select(conn)
    conn.close()

    # The server's side was reset too: its backend goes away.
    def backend_gone() -> bool:
        check = pg_server.connect("postgres")
        try:
            sql = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {backend}"
            return bool(_select(check, sql) == 0)
        finally:
            check.close()

    assert _wait_until(backend_gone)

    # New connections are reset at once while in reset mode.
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError):
        _connect(proxy, pg_server)
    assert time.monotonic() - started < 1.0

    proxy.heal()
    conn = _connect(proxy, pg_server)
    assert _select(conn) == 1
    conn.close()


def test_reset_once(pg_server: Server, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(pg_server)
    first, second = _connect(proxy, pg_server), _connect(proxy, pg_server)
    proxy.reset_once()
    assert proxy.mode is ProxyMode.PASS
    for conn in (first, second):
        with pytest.raises(psycopg2.OperationalError):
            _select(conn)
        conn.close()
    conn = _connect(proxy, pg_server)
    assert _select(conn) == 1
    conn.close()


def test_blackhole(pg_server: Server, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(pg_server)
    held = _connect(proxy, pg_server)
    try:
        assert _select(held) == 1
        proxy.blackhole()

        # A new connection is accepted, then nothing: libpq times out.
        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError, match="timeout"):
            _connect(proxy, pg_server, timeout=1)
        assert 0.8 <= time.monotonic() - started < 2.5

        # A query on an open connection hangs without an error...
        query = _Background(lambda: _select(held, "SELECT 42"))
        query.thread.join(1.0)
        assert query.thread.is_alive()
        assert query.error is None

        # ...and completes once healed: the bytes were held, not dropped.
        proxy.heal()
        query.thread.join(5.0)
        assert not query.thread.is_alive()
        assert query.error is None
        assert query.result == 42

        fresh = _connect(proxy, pg_server)
        assert _select(fresh) == 1
        fresh.close()
    finally:
        held.close()


def test_stop_is_prompt(pg_server: Server) -> None:
    proxy = FaultProxy(pg_server.host, pg_server.port).start()
    conns = [_connect(proxy, pg_server) for _ in range(3)]
    try:
        proxy.blackhole()
        hung = _Background(lambda: _select(conns[0]))
        assert _proxy_threads(proxy)
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("partpool-proxy-"))
        assert _timed(proxy.stop) < 1.5
        assert _proxy_threads(proxy) == []
        hung.thread.join(5.0)
        assert isinstance(hung.error, psycopg2.OperationalError)
        with pytest.raises(psycopg2.OperationalError):
            _select(conns[1])
        proxy.stop()  # idempotent
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.cluster
def test_killed_server_behind_proxy(
    throwaway_server: ServerFactory, fault_proxy: ProxyFactory
) -> None:
    server = throwaway_server()
    proxy = fault_proxy(server)
    conn = _connect(proxy, server)
    assert _select(conn) == 1
    server.kill()
    with pytest.raises(psycopg2.OperationalError):
        _select(conn)
    conn.close()
    # The proxy accepts, fails to reach the server, and resets the client.
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError):
        _connect(proxy, server)
    assert time.monotonic() - started < 1.5

    server.start()
    conn = _connect(proxy, server)
    assert _select(conn) == 1
    conn.close()
