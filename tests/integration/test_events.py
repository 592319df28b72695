"""Events, statistics, leak detection and query deadlines on real partitions."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import event, text

from sqlalchemy_partpool import (
    PartitionEvent,
    PoolExhausted,
    PoolTimeout,
    QueryTimeout,
)


def collect(sharded, *names):
    seen: dict[str, list[PartitionEvent]] = {name: [] for name in names}
    lock = threading.Lock()
    for name in names:

        def listener(ev, _name=name):
            with lock:
                seen[_name].append(ev)

        event.listen(sharded, name, listener)
    return seen


def test_connect_checkout_checkin_events_carry_partition_stats_and_figures(sharded_factory):
    sharded, _ = sharded_factory(2, min_connections=0, max_connections=2, lazy=True)
    seen = collect(sharded, "connect", "checkout", "checkin")
    with sharded.connect(partition="p1") as conn:
        conn.execute(text("SELECT 1"))
    (connect,) = seen["connect"]
    assert connect.partition == "p1"
    assert connect.detail["connect_time"] > 0
    (checkout,) = seen["checkout"]
    assert checkout.name == "checkout"
    assert checkout.stats is not None
    assert checkout.stats.checked_out == 1
    assert checkout.detail["waited"] == 0.0
    assert checkout.state == "up"
    (checkin,) = seen["checkin"]
    assert checkin.stats.checked_out == 0
    assert checkin.detail["used"] > 0
    json.dumps(checkin.as_dict())  # serialisable


def test_sqlalchemy_pool_events_keep_working_on_partition_engines(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=0, lazy=True)
    engine = sharded.engine("p0")
    calls: list[str] = []
    event.listen(engine, "connect", lambda *a: calls.append("connect"))
    event.listen(engine, "checkout", lambda *a: calls.append("checkout"))
    event.listen(engine, "checkin", lambda *a: calls.append("checkin"))
    with sharded.connect(partition="p0") as conn:
        conn.execute(text("SELECT 1"))
    assert calls == ["connect", "checkout", "checkin"]
    # they survive engine.dispose(), which replaces the pool
    engine.dispose()
    calls.clear()
    with sharded.connect(partition="p0") as conn:
        conn.execute(text("SELECT 1"))
    assert calls == ["connect", "checkout", "checkin"]


def test_many_threads_small_pool_timeouts_exhaustion_and_figures_add_up(sharded_factory):
    sharded, _ = sharded_factory(
        1, min_connections=2, max_connections=2, timeout=0.3, max_waiting=3
    )
    seen = collect(sharded, "checkout_timeout", "pool_exhausted")
    outcomes: dict[str, int] = {"ok": 0, "timeout": 0, "exhausted": 0}
    lock = threading.Lock()
    start = threading.Barrier(12)

    def work() -> None:
        start.wait(10)
        try:
            with sharded.connect(partition="p0") as conn:
                conn.execute(text("SELECT pg_sleep(0.5)"))
            result = "ok"
        except PoolTimeout:
            result = "timeout"
        except PoolExhausted:
            result = "exhausted"
        with lock:
            outcomes[result] += 1

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    # while they run: what the pool says must add up at every moment
    for _ in range(20):
        snap = sharded.stats()["p0"]
        assert snap.checkouts == snap.checkins + snap.checked_out
        assert snap.open <= 2
        time.sleep(0.02)
    for t in threads:
        t.join(20)
    # 2 run, 3 may wait (and time out, the others hold their connections for
    # 0.5 s), the other 7 are rejected at once
    assert outcomes == {"ok": 2, "timeout": 3, "exhausted": 7}
    snap = sharded.stats()["p0"]
    assert snap.timeouts == 3
    assert snap.exhausted == 7
    assert snap.checkouts == snap.checkins == 2
    assert len(seen["checkout_timeout"]) == 3
    for ev in seen["checkout_timeout"]:
        assert ev.partition == "p0"
        assert ev.detail["timeout"] == 0.3
        assert 0.3 <= ev.detail["waited"] < 0.4
        assert ev.detail["max_connections"] == 2
        assert ev.detail["in_use"] == 2
        assert "no connection free" in ev.error
    assert len(seen["pool_exhausted"]) == 7
    assert all(ev.detail == {"waiting": 3, "max_waiting": 3} for ev in seen["pool_exhausted"])


def held_connection_for_a_while(sharded):
    # the function name is what the leak report must point at
    return sharded.connect(partition="p0")


def test_a_leaked_connection_is_reported_once_with_its_checkout_stack(sharded_factory, caplog):
    sharded, _ = sharded_factory(1, min_connections=0, max_connections=2, leak_threshold=0.3)
    seen = collect(sharded, "leak_suspected")
    caplog.set_level(logging.WARNING, logger="sqlalchemy_partpool")
    leaked = held_connection_for_a_while(sharded)
    leaked.execute(text("SELECT 1"))
    with sharded.connect(partition="p0") as conn:  # returned in time: not a leak
        conn.execute(text("SELECT 1"))
    deadline = time.monotonic() + 5
    while not seen["leak_suspected"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a second report would come by now
    (ev,) = seen["leak_suspected"]
    assert ev.partition == "p0"
    assert ev.detail["held"] >= 0.3
    assert "held_connection_for_a_while" in ev.detail["stack"]
    assert "test_events.py" in ev.detail["stack"]
    assert ev.detail["thread"] == threading.current_thread().name
    assert "possible leak" in caplog.text
    assert "held_connection_for_a_while" in caplog.text
    assert sharded.stats()["p0"].leaks == 1
    leaked.close()


def test_invalidate_event_and_lost_count_when_a_connection_breaks(sharded_factory, admin_engine):
    sharded, _ = sharded_factory(1, min_connections=1, max_connections=2)
    seen = collect(sharded, "invalidate")
    with sharded.connect(partition="p0") as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with admin_engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(Exception, match=r"terminat|closed"):
            conn.execute(text("SELECT 1"))
    (ev,) = seen["invalidate"]
    assert ev.partition == "p0"
    assert ev.error
    assert sharded.stats()["p0"].connections_lost == 1
    with sharded.connect(partition="p0") as conn:  # and the pool recovers
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert sharded.partition_state("p0") == "up"


def test_health_snapshot_is_json_and_check_health_emits_results(sharded_factory):
    sharded, _ = sharded_factory(3, min_connections=1)
    seen = collect(sharded, "health_check")
    assert sharded.check_health() == {"p0": True, "p1": True, "p2": True}
    assert sorted(ev.partition for ev in seen["health_check"]) == ["p0", "p1", "p2"]
    assert all(ev.detail["ok"] and ev.detail["source"] == "check" for ev in seen["health_check"])
    report = json.loads(json.dumps(sharded.health()))
    assert set(report["partitions"]) == {"p0", "p1", "p2"}
    p0 = report["partitions"]["p0"]
    assert p0["state"] == "up"
    assert p0["last_check"]["ok"] is True
    assert p0["stats"]["open"] == 1


def test_query_timeout_bounds_a_slow_statement_client_side(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=1, max_connections=2, query_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(QueryTimeout) as info, sharded.connect(partition="p0") as conn:
        conn.execute(text("SELECT pg_sleep(10)"))
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 1.5
    assert info.value.partition == "p0"
    with sharded.connect(partition="p0") as conn:  # the pool carries on
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    snap = sharded.stats()["p0"]
    assert snap.connections_lost == 1
    assert snap.checked_out == 0


def test_statement_timeout_is_set_on_every_connection(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=1, statement_timeout=1.5)
    with sharded.connect(partition="p0") as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "1500ms"
        params = conn.connection.dbapi_connection.get_dsn_parameters()
    assert params["keepalives_idle"] == "30"
    assert params["connect_timeout"] == "10"
    assert params["application_name"] == "partpool/p0"


def test_logging_is_quiet_by_default(make_databases):
    (url,) = make_databases(1)
    code = f"""
import time
from sqlalchemy import text
from sqlalchemy_partpool import create_sharded_engine
with create_sharded_engine({{"p0": "{url}"}}, leak_threshold=0.05, max_idle=0.1) as s:
    c = s.connect(partition="p0")
    c.execute(text("SELECT 1"))
    time.sleep(0.5)  # a leak warning is logged by now
    c.close()
print("done")
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    assert done.stderr == ""


def test_events_reject_unknown_names(sharded_factory):
    sharded, _ = sharded_factory(1, lazy=True)
    with pytest.raises(Exception, match="No such event"):
        event.listen(sharded, "no_such_event", lambda ev: None)
