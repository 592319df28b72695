"""Prometheus and OpenTelemetry metrics report what the pools on real databases do."""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from typing import Any

import prometheus_client
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url

from sqlalchemy_partpool import PoolExhausted, PoolTimeout, create_sharded_engine
from sqlalchemy_partpool.metrics import opentelemetry as partpool_otel
from sqlalchemy_partpool.metrics.prometheus import (
    PartpoolCollector,
    register,
    unregister,
)
from sqlalchemy_partpool.stats import WAIT_BUCKETS

STATES = ("up", "suspect", "down", "recovering")


class Scrape:
    """One scrape of a registry, parsed back with prometheus_client's own parser."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.text = generate_latest(registry).decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in self.families.values()
            for s in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def buckets(self, name: str, partition: str) -> list[tuple[float, float]]:
        """``(le, cumulative count)`` of a histogram, in exposition order."""
        family = self.families[name]
        return [
            (float(s.labels["le"]), s.value)
            for s in family.samples
            if s.name == f"{name}_bucket" and s.labels["partition"] == partition
        ]


def query(sharded: Any, partition: str, times: int = 1) -> None:
    for _ in range(times):
        with sharded.connect(partition=partition) as conn:
            conn.execute(text("SELECT 1"))


def registered(sharded: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    register(sharded, registry)
    return registry


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- Prometheus -----------------------------------------------------------------------------


def test_scrape_after_start_shows_min_connections_open_and_idle(sharded_factory, server):
    sharded, databases = sharded_factory(2, min_connections=1, max_connections=3)
    m = Scrape(registered(sharded))

    assert m.families["partpool_connections"].type == "gauge"
    assert m.families["partpool_checkouts"].type == "counter"
    assert m.families["partpool_checkout_wait_seconds"].type == "histogram"
    for partition, database in zip(sharded.partitions, databases):
        assert server.connections(database) == 1
        assert m("partpool_connections", partition=partition, state="idle") == 1
        assert m("partpool_connections", partition=partition, state="in_use") == 0
        assert m("partpool_connections", partition=partition, state="connecting") == 0
        assert m("partpool_connections_min", partition=partition) == 1
        assert m("partpool_connections_max", partition=partition) == 3
        assert m("partpool_waiting_requests", partition=partition) == 0
        assert m("partpool_connections_opened_total", partition=partition) == 1
        assert m("partpool_checkouts_total", partition=partition) == 0
        assert m("partpool_partition_up", partition=partition) == 1
        assert m("partpool_consecutive_connect_failures", partition=partition) == 0
        for state in STATES:
            expected = 1 if state == "up" else 0
            assert m("partpool_partition_state", partition=partition, state=state) == expected


def test_checkouts_checkins_and_wait_histogram_count_every_query(sharded_factory, server):
    sharded, databases = sharded_factory(2, min_connections=1, max_connections=3)
    registry = registered(sharded)
    query(sharded, "p0", times=7)
    m = Scrape(registry)

    assert m("partpool_checkouts_total", partition="p0") == 7
    assert m("partpool_checkins_total", partition="p0") == 7
    assert m("partpool_checkouts_total", partition="p1") == 0
    # the one warm connection served every query
    assert m("partpool_connections_opened_total", partition="p0") == 1
    assert server.connections(databases[0]) == 1
    assert m("partpool_connection_use_seconds_total", partition="p0") > 0

    assert m("partpool_checkout_wait_seconds_count", partition="p0") == 7
    assert m("partpool_checkout_wait_seconds_sum", partition="p0") == 0
    buckets = m.buckets("partpool_checkout_wait_seconds", "p0")
    # every finite bound but the pool's catch-all last one, then +Inf
    assert [le for le, _ in buckets] == [*WAIT_BUCKETS[:-1], float("inf")]
    # an idle connection was there every time: no checkout waited
    assert all(count == 7 for _, count in buckets)
    assert all(count == 0 for _, count in m.buckets("partpool_checkout_wait_seconds", "p1"))


def test_connection_state_gauges_follow_checked_out_connections(sharded_factory, server):
    sharded, databases = sharded_factory(1, min_connections=1, max_connections=3)
    registry = registered(sharded)
    with ExitStack() as stack:
        for _ in range(2):
            stack.enter_context(sharded.connect(partition="p0"))
        m = Scrape(registry)
        assert m("partpool_connections", partition="p0", state="in_use") == 2
        assert m("partpool_connections", partition="p0", state="idle") == 0
        assert m("partpool_connections_opened_total", partition="p0") == 2
        assert server.connections(databases[0]) == 2
    m = Scrape(registry)
    assert m("partpool_connections", partition="p0", state="in_use") == 0
    assert m("partpool_connections", partition="p0", state="idle") == 2
    assert m("partpool_checkins_total", partition="p0") == 2


def test_waiting_caller_shows_in_gauge_and_its_wait_in_the_histogram(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=1, max_connections=1, timeout=10, max_waiting=1)
    registry = registered(sharded)
    coarse = (0.0, 0.0625, 4.0)
    register(sharded, registry, namespace="coarse", wait_buckets=coarse)
    waited: list[float] = []

    def waiter() -> None:
        started = time.monotonic()
        with sharded.connect(partition="p0"):
            waited.append(time.monotonic() - started)

    held = sharded.connect(partition="p0")
    thread = threading.Thread(target=waiter, name="metrics-test-waiter")
    try:
        thread.start()
        assert wait_until(lambda: Scrape(registry)("partpool_waiting_requests", partition="p0"))
        # max_waiting=1 is reached: one more caller is turned away at once
        with pytest.raises(PoolExhausted):
            sharded.connect(partition="p0")
        time.sleep(0.1)
    finally:
        held.close()
        thread.join(10)
    assert len(waited) == 1

    m = Scrape(registry)
    assert m("partpool_waiting_requests", partition="p0") == 0
    assert m("partpool_pool_exhausted_total", partition="p0") == 1
    assert m("partpool_checkouts_total", partition="p0") == 2
    assert m("partpool_checkout_wait_seconds_count", partition="p0") == 2
    total = m("partpool_checkout_wait_seconds_sum", partition="p0")
    assert 0.1 <= total <= waited[0]
    buckets = m.buckets("partpool_checkout_wait_seconds", "p0")
    assert buckets[0] == (0.0, 1)  # the first checkout found the warm connection
    # the waiter lies in the bucket whose bounds frame its wait
    upper = next(i for i, (_, count) in enumerate(buckets) if count == 2)
    assert buckets[upper - 1][0] <= total <= buckets[upper][0]
    # fewer bounds count exactly what the full histogram counts at those bounds
    assert m.buckets("coarse_checkout_wait_seconds", "p0") == [
        b for b in buckets if b[0] in (*coarse, float("inf"))
    ]
    assert m("coarse_checkout_wait_seconds_sum", partition="p0") == total


def test_checkout_timeout_is_counted(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=1, max_connections=1, timeout=0.2)
    registry = registered(sharded)
    with sharded.connect(partition="p0"), pytest.raises(PoolTimeout):
        sharded.connect(partition="p0")
    m = Scrape(registry)
    assert m("partpool_checkout_timeouts_total", partition="p0") == 1
    # a checkout that timed out got no connection: not in the histogram
    assert m("partpool_checkouts_total", partition="p0") == 1
    assert m("partpool_checkout_wait_seconds_count", partition="p0") == 1


def test_unreachable_partition_shows_down(make_databases):
    (url,) = make_databases(1)
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    sharded = create_sharded_engine(
        {"p0": url, "p1": dead},
        min_connections=1,
        down_after=1,
        connect_timeout=1,
        require_all_partitions=False,
    )
    try:
        registry = registered(sharded)
        assert wait_until(lambda: sharded.partition_state("p1") == "down")
        m = Scrape(registry)
        assert m("partpool_partition_up", partition="p0") == 1
        assert m("partpool_partition_up", partition="p1") == 0
        for state in STATES:
            expected = 1 if state == "down" else 0
            assert m("partpool_partition_state", partition="p1", state=state) == expected
        assert m("partpool_consecutive_connect_failures", partition="p1") >= 1
        assert m("partpool_connect_errors_total", partition="p1") >= 1
        assert m("partpool_connect_errors_total", partition="p0") == 0
        assert m("partpool_connections", partition="p1", state="idle") == 0
    finally:
        sharded.dispose()


def test_http_server_serves_the_metrics(sharded_factory):
    sharded, _ = sharded_factory(2, min_connections=1, max_connections=3)
    registry = registered(sharded)
    query(sharded, "p1", times=3)
    httpd, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = httpd.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read().decode()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    assert 'partpool_checkouts_total{partition="p1"} 3.0' in body
    samples = {
        (s.name, s.labels.get("partition")): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("partpool_checkout_wait_seconds_count", "p1")] == 3
    assert samples[("partpool_checkouts_total", "p0")] == 0


def test_register_refuses_duplicate_names_and_unregister_removes_them(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=0)
    registry = CollectorRegistry()
    collector = register(sharded, registry)
    with pytest.raises(ValueError, match="Duplicated"):
        register(sharded, registry)
    other = register(sharded, registry, namespace="orders_pool")
    assert Scrape(registry)("orders_pool_connections_max", partition="p0") == 10
    unregister(collector, registry)
    names = Scrape(registry).families
    assert not [n for n in names if n.startswith("partpool_")]
    assert "orders_pool_checkouts" in names
    unregister(other, registry)
    with pytest.raises(ValueError, match="namespace"):
        PartpoolCollector(sharded, namespace="2bad-name")
    with pytest.raises(ValueError, match="wait_buckets"):
        PartpoolCollector(sharded, wait_buckets=[0.001])


@pytest.mark.parametrize(
    ("module", "dependency", "extra"),
    [
        ("prometheus", "prometheus_client", "prometheus"),
        ("opentelemetry", "opentelemetry", "opentelemetry"),
    ],
)
def test_missing_backend_says_what_to_install(monkeypatch, module, dependency, extra):
    for name in [n for n in sys.modules if n == dependency or n.startswith(f"{dependency}.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, dependency, None)
    monkeypatch.delitem(sys.modules, f"sqlalchemy_partpool.metrics.{module}")
    with pytest.raises(ImportError, match=rf"pip install 'sqlalchemy-partpool\[{extra}\]'"):
        importlib.import_module(f"sqlalchemy_partpool.metrics.{module}")


def test_metrics_package_imports_no_backend():
    code = (
        "import sys, sqlalchemy_partpool\n"
        "before = set(sys.modules)\n"
        "import sqlalchemy_partpool.metrics\n"
        "new = set(sys.modules) - before\n"
        "backends = ('prometheus_client', 'opentelemetry')\n"
        "print(sorted(n for n in new if n.split('.')[0] in backends))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# -- OpenTelemetry ----------------------------------------------------------------------------


def collect(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Data points by instrument name."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: list(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def point(points: dict[str, list[Any]], name: str, **attributes: str) -> Any:
    wanted = {f"db.client.connection.{k.replace('_', '.')}": v for k, v in attributes.items()}
    (found,) = [p for p in points[name] if dict(p.attributes) == wanted]
    return found


def test_opentelemetry_reports_pool_figures_and_checkout_histograms(sharded_factory):
    sharded, _ = sharded_factory(2, min_connections=1, max_connections=2, timeout=1.0)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    handle = partpool_otel.instrument(sharded, meter_provider=provider)
    count = "db.client.connection.count"
    pending = "db.client.connection.pending_requests"
    waited: list[float] = []

    def waiter() -> None:
        started = time.monotonic()
        with sharded.connect(partition="p0"):
            waited.append(time.monotonic() - started)

    try:
        query(sharded, "p0", times=5)
        first = sharded.connect(partition="p0")
        with sharded.connect(partition="p0"):
            with pytest.raises(PoolTimeout):
                sharded.connect(partition="p0")
            points = collect(reader)
            assert point(points, count, pool_name="p0", state="used").value == 2
            assert point(points, count, pool_name="p0", state="idle").value == 0
            assert point(points, count, pool_name="p1", state="used").value == 0
            assert point(points, count, pool_name="p1", state="idle").value == 1
            for pool in ("p0", "p1"):
                assert point(points, "db.client.connection.idle.min", pool_name=pool).value == 1
                assert point(points, "db.client.connection.max", pool_name=pool).value == 2
                assert point(points, pending, pool_name=pool).value == 0
            assert point(points, "db.client.connection.timeouts", pool_name="p0").value == 1
            assert point(points, "db.client.connection.timeouts", pool_name="p1").value == 0

            thread = threading.Thread(target=waiter, name="metrics-test-otel-waiter")
            thread.start()
            try:
                assert wait_until(
                    lambda: point(collect(reader), pending, pool_name="p0").value == 1
                )
                time.sleep(0.1)
            finally:
                first.close()
                thread.join(10)
        assert len(waited) == 1

        points = collect(reader)
        assert point(points, pending, pool_name="p0").value == 0
        wait = point(points, "db.client.connection.wait_time", pool_name="p0")
        assert wait.count == 8  # 5 queries, the 2 connections held, the waiter
        assert 0.1 <= wait.sum <= waited[0]
        assert tuple(wait.explicit_bounds) == partpool_otel.WAIT_TIME_BUCKETS
        assert wait.bucket_counts[0] == 7  # no wait: bucket (-inf, 0.0]
        assert point(points, "db.client.connection.use_time", pool_name="p0").count == 8
        # only the second connection held was opened after instrumenting
        assert point(points, "db.client.connection.create_time", pool_name="p0").count == 1
        assert [p.attributes for p in points["db.client.connection.wait_time"]] == [
            {"db.client.connection.pool.name": "p0"}
        ]
    finally:
        handle.uninstrument()
    assert not handle.active
    query(sharded, "p0", times=3)
    points = collect(reader)
    assert point(points, "db.client.connection.wait_time", pool_name="p0").count == 8
    handle.uninstrument()  # twice is fine
    provider.shutdown()


def test_opentelemetry_pool_name_prefix_tells_engines_apart(sharded_factory):
    sharded, _ = sharded_factory(1, min_connections=1)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    handle = partpool_otel.instrument(sharded, meter_provider=provider, pool_name_prefix="orders/")
    try:
        query(sharded, "p0")
        points = collect(reader)
        assert point(points, "db.client.connection.max", pool_name="orders/p0").value == 10
        assert point(points, "db.client.connection.wait_time", pool_name="orders/p0").count == 1
    finally:
        handle.uninstrument()
        provider.shutdown()
