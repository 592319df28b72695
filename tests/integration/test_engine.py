"""ShardedEngine on real databases: rows land on the right partition, errors are typed."""

from __future__ import annotations

import logging
import socket

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool import (
    ConfigurationError,
    PartpoolError,
    RoutingError,
    ShardKeyMissing,
    UnknownPartition,
    WarmupError,
    create_sharded_engine,
)


def test_connect_by_key_reaches_the_partition_the_router_names(sharded_factory):
    sharded, databases = sharded_factory(4, min_connections=1)
    by_name = dict(zip(sharded.partitions, databases))
    for key in list(range(40)) + [f"tenant-{i}" for i in range(20)]:
        with sharded.connect(key=key) as conn:
            current = conn.execute(text("SELECT current_database()")).scalar_one()
        assert current == by_name[sharded.partition_for(key)]


def test_begin_writes_are_on_the_right_partition_and_only_there(sharded_factory, pg_admin_url):
    sharded, databases = sharded_factory(3, min_connections=0)
    for _, engine in sharded.engines():
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE item (k int PRIMARY KEY)"))
    keys = list(range(100))
    for key in keys:
        with sharded.begin(key=key) as conn:
            conn.execute(text("INSERT INTO item VALUES (:k)"), {"k": key})
    # read every partition directly, bypassing the library
    base = pg_admin_url.rsplit("/", 1)[0]
    seen = {}
    for name, database in zip(sharded.partitions, databases):
        direct = create_engine(f"{base}/{database}", poolclass=NullPool)
        with direct.connect() as conn:
            seen[name] = {k for (k,) in conn.execute(text("SELECT k FROM item"))}
        direct.dispose()
    assert set().union(*seen.values()) == set(keys)
    assert sum(len(v) for v in seen.values()) == len(keys)
    for key in keys:
        assert key in seen[sharded.partition_for(key)]


def test_begin_rolls_back_when_the_block_raises(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=1)
    with sharded.begin(partition="p0") as conn:
        conn.execute(text("CREATE TABLE t (x int)"))
    with pytest.raises(RuntimeError), sharded.begin(partition="p0") as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
        raise RuntimeError("abort")
    with sharded.connect(partition="p0") as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 0


def test_routing_errors_are_typed(sharded_factory):
    sharded, _ = sharded_factory(2, lazy=True)
    with pytest.raises(UnknownPartition) as info:
        sharded.connect(partition="nope")
    assert "p0" in str(info.value) and "'nope'" in str(info.value)
    assert isinstance(info.value, PartpoolError)
    with pytest.raises(ShardKeyMissing):
        sharded.connect()
    with pytest.raises(ShardKeyMissing):
        sharded.connect(key=None)
    with pytest.raises(UnknownPartition):
        sharded.engine("nope")
    key = 7
    wrong = next(n for n in sharded.partitions if n != sharded.partition_for(key))
    with pytest.raises(RoutingError, match="belongs to partition"):
        sharded.connect(key=key, partition=wrong)
    with sharded.connect(key=key, partition=sharded.partition_for(key)) as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_warm_up_failure_raises_and_closes_what_it_opened(make_databases, server):
    (url,) = make_databases(1)
    dead = f"postgresql+psycopg2://app:hunter2-secret@127.0.0.1:{_closed_port()}/nowhere"
    with pytest.raises(WarmupError) as info:
        create_sharded_engine({"good": url, "dead": dead}, min_connections=2)
    err = info.value
    assert set(err.errors) == {"dead"}
    assert "dead" in str(err) and "hunter2-secret" not in str(err)
    assert server.connections(url.rsplit("/", 1)[1]) == 0


def test_start_anyway_when_not_all_partitions_are_required(make_databases, caplog):
    (url,) = make_databases(1)
    dead = f"postgresql+psycopg2://app:hunter2-secret@127.0.0.1:{_closed_port()}/nowhere"
    caplog.set_level(logging.DEBUG)
    sharded = create_sharded_engine(
        {"good": url, "dead": dead}, min_connections=1, require_all_partitions=False
    )
    try:
        with sharded.connect(partition="good") as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
        with pytest.raises(Exception) as info:
            sharded.connect(partition="dead")
        assert "hunter2-secret" not in str(info.value)
        assert "partition 'dead': warm-up failed" in caplog.text
    finally:
        sharded.dispose()
    assert "hunter2-secret" not in caplog.text


def test_passwords_never_appear_in_reprs_logs_stats_or_errors(pg_admin_url, make_databases, caplog):
    # The test servers trust local connections, so any password is accepted;
    # what matters is that this one is never written anywhere.
    secret = "Pa55-w0rd-never-shown"
    (url,) = make_databases(1)
    with_password = url.replace("postgres@", f"postgres:{secret}@", 1)
    assert secret in with_password
    caplog.set_level(logging.DEBUG)
    sharded = create_sharded_engine({"p0": with_password}, min_connections=1)
    try:
        with sharded.connect(partition="p0") as conn:
            conn.execute(text("SELECT 1"))
        outputs = [
            repr(sharded),
            repr(sharded.partitions["p0"]),
            repr(sharded.config),
            str(sharded.stats()),
            repr(sharded.engine("p0")),
            sharded.pool("p0").status(),
        ]
        with pytest.raises(ConfigurationError) as info:
            create_sharded_engine({"p0": with_password}, max_connections=0)
        outputs.append(str(info.value))
    finally:
        sharded.dispose()
    outputs.append(caplog.text)
    for text_ in outputs:
        assert secret not in text_
    assert "Created new connection" in caplog.text  # debug logging really was on


def test_engine_options_pass_through_for_all_and_per_partition(make_databases):
    urls = make_databases(2)
    sharded = create_sharded_engine(
        {
            "p0": urls[0],
            "p1": {
                "url": urls[1],
                "engine_options": {"connect_args": {"application_name": "custom"}},
            },
        },
        engine_options={"execution_options": {"isolation_level": "REPEATABLE READ"}},
        lazy=True,
    )
    try:
        with sharded.connect(partition="p0") as conn:
            assert (
                conn.execute(text("SHOW transaction_isolation")).scalar_one() == "repeatable read"
            )
            assert conn.execute(text("SHOW application_name")).scalar_one() == "partpool/p0"
        with sharded.connect(partition="p1") as conn:
            assert conn.execute(text("SHOW application_name")).scalar_one() == "custom"
    finally:
        sharded.dispose()


def test_invalid_create_engine_keyword_is_a_configuration_error(make_databases):
    (url,) = make_databases(1)
    sharded = create_sharded_engine({"p0": url}, engine_options={"no_such_option": 1}, lazy=True)
    try:
        with pytest.raises(ConfigurationError, match="no_such_option") as info:
            sharded.engine("p0")
        assert info.value.partition == "p0"
    finally:
        sharded.dispose()


def test_context_manager_disposes(make_databases, server):
    (url,) = make_databases(1)
    with create_sharded_engine({"p0": url}, min_connections=2) as sharded:
        assert server.connections(url.rsplit("/", 1)[1]) == 2
    assert sharded.closed
    assert server.wait_for(url.rsplit("/", 1)[1], lambda n: n == 0) == 0
