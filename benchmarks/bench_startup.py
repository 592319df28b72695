"""W6 start-up and memory with many partitions: lazy vs warm.

With 64 and with 256 partitions (8 and 32 in quick mode), spread over 4
databases (partition *i* on database *i* mod 4: pools are per partition name,
so this costs the server connections, not databases), one operation builds
the engine(s) and disposes of them:

``sa-engines`` (baseline)
    a plain ``create_engine(url, pool_size=10, max_overflow=0)`` per partition
    in a dict, then ``dispose()`` of each: what the partitions cost in plain
    SQLAlchemy before anything connects;
``ours-lazy``
    ``create_sharded_engine(partitions, lazy=True)`` then ``dispose()``;
``ours-warm``
    ``create_sharded_engine(partitions)`` (``min_connections=1``: one connection
    opened per partition, all partitions in parallel) then ``dispose()``.

The timed operation includes ``dispose()``; start-up alone is measured while
setting up the case (median of 5 start-ups, 1 in quick mode) and given in the
case's parameters with the memory figures: Python heap retained per partition
after start-up (``tracemalloc``; libpq's own buffers are C allocations it does
not see) and the growth of the resident set per partition, measured in a fresh
interpreter (in this one, memory freed by earlier start-ups would be reused and
hide it).

The check counts the server's connections to the partitions' databases
(``pg_stat_activity``): none after a lazy start-up (also after the background
maintenance had time to run), one per partition after a warm one, and none
after ``dispose()``.

Warm start-ups of 256 partitions open 256 connections while those of the last
round may still be closing: when the run's server has no room for twice that,
the case gets a throwaway server of its own with a larger ``max_connections``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool import ShardedEngine, create_sharded_engine
from sqlalchemy_partpool.testing import HarnessError, PostgresServer, unique_name

from .bench_reads import free_connections
from .harness import BenchContext, BenchmarkError, Case, Variant, register

__all__ = ["startup"]

COUNTS_FULL = (64, 256)
COUNTS_QUICK = (8, 32)
DATABASES = 4
#: Start-ups timed (each) while setting up a case, outside the harness' rounds.
SAMPLES_FULL = 5
SAMPLES_QUICK = 1
#: How long a lazy engine is left alone before its connections are counted:
#: longer than the background maintenance's longest tick (1 s).
LAZY_WAIT_FULL = 1.2
LAZY_WAIT_QUICK = 0.3

Thing = Any  # what a start-up returns and its dispose takes


def _sa_engines(partitions: Mapping[str, str]) -> dict[str, Engine]:
    return {
        name: create_engine(url, pool_size=10, max_overflow=0) for name, url in partitions.items()
    }


def _dispose_engines(engines: dict[str, Engine]) -> None:
    for engine in engines.values():
        engine.dispose()


def _ours(partitions: Mapping[str, str], *, lazy: bool) -> ShardedEngine:
    return create_sharded_engine(dict(partitions), lazy=lazy)


def _dispose_ours(sharded: ShardedEngine) -> None:
    sharded.dispose()


def _cycle(start: Callable[[], Thing], stop: Callable[[Thing], None]) -> None:
    stop(start())


def _startup_seconds(start: Callable[[], Thing], stop: Callable[[Thing], None], n: int) -> float:
    """Median seconds of *n* start-ups (each disposed of afterwards, untimed)."""
    timings = []
    for _ in range(n):
        gc.collect()
        begun = time.perf_counter()
        thing = start()
        timings.append(time.perf_counter() - begun)
        stop(thing)
    return statistics.median(timings)


# Run in a fresh interpreter, so that memory freed by earlier start-ups is not
# reused and hidden: the resident set before and after one start-up, after a
# start-up of one partition has done the imports and first-use caches.
_RSS_SCRIPT = """
import gc, json, os, sys
from sqlalchemy import create_engine
from sqlalchemy_partpool import create_sharded_engine

def rss():
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

kind, partitions = json.load(sys.stdin)

def start(chosen):
    if kind == "sa-engines":
        return {n: create_engine(u, pool_size=10, max_overflow=0) for n, u in chosen.items()}
    return create_sharded_engine(chosen, lazy=kind == "ours-lazy")

def stop(thing):
    if isinstance(thing, dict):
        for engine in thing.values():
            engine.dispose()
    else:
        thing.dispose()

first = start(dict(list(partitions.items())[:1]))
gc.collect()
before = rss()
thing = start(partitions)
gc.collect()
after = rss()
stop(thing)
stop(first)
print(json.dumps(after - before))
"""


def _rss_growth(kind: str, partitions: Mapping[str, str]) -> float | None:
    """Resident-set growth per partition of one start-up in a fresh interpreter (Linux)."""
    if not os.path.exists("/proc/self/statm"):
        return None
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT],
        input=json.dumps([kind, dict(partitions)]),
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": path},
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchmarkError(f"measuring the memory of {kind} failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1]) / len(partitions)


def _memory(
    kind: str,
    start: Callable[[], Thing],
    stop: Callable[[Thing], None],
    partitions: Mapping[str, str],
) -> dict[str, float | None]:
    """Bytes per partition: Python heap retained and peak (tracemalloc), and RSS growth."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        thing = start()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stop(thing)
    n = len(partitions)
    return {
        "heap_retained_per_partition": (current - before) / n,
        "heap_peak_per_partition": (peak - before) / n,
        "rss_growth_per_partition": _rss_growth(kind, partitions),
    }


class _Connections:
    """Counts the server's connections to the partitions' databases."""

    def __init__(self, admin_url: str, databases: Sequence[str]) -> None:
        self.engine = create_engine(admin_url, poolclass=NullPool)
        self.databases = list(databases)

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(:names)"),
                    {"names": self.databases},
                ).scalar_one()
            )

    def settle(self, want: int, timeout: float = 10.0) -> int:
        """The count once it is *want* (backends exit a moment after their client closes)."""
        deadline = time.monotonic() + timeout
        found = self.count()
        while found != want and time.monotonic() < deadline:
            time.sleep(0.05)
            found = self.count()
        return found

    def close(self) -> None:
        self.engine.dispose()


@contextlib.contextmanager
def _databases(ctx: BenchContext, partitions: int) -> Iterator[tuple[list[str], str, str]]:
    """Yield ``(database URLs, admin URL, where)`` on a server with room for warm start-ups."""
    needed = 2 * partitions + 20
    if free_connections(ctx.admin_url) >= needed:
        with ctx.partitions(DATABASES, prefix="partpool_bench_startup") as urls:
            yield list(urls.values()), ctx.admin_url, "the run's server"
        return
    ctx.say(f"startup: starting a server with max_connections={needed + 50}")
    server = PostgresServer(max_connections=needed + 50)
    try:
        try:
            server.start()
        except HarnessError as exc:
            raise BenchmarkError(
                f"startup-{partitions}p needs a server with room for {needed} connections "
                f"(this one has fewer) and could not start one: {exc}"
            ) from exc
        base = unique_name("partpool_bench_startup")
        urls = [server.create_database(f"{base}_d{i}") for i in range(DATABASES)]
        yield urls, server.url("postgres"), f"a throwaway server, max_connections={needed + 50}"
    finally:
        server.cleanup()


@register(
    "startup",
    "W6: start-up + dispose with 64 and 256 partitions: plain create_engine per partition "
    "(baseline), ours lazy, ours warm (min_connections=1)",
)
def startup(ctx: BenchContext) -> Iterator[Case]:
    """Cases ``startup-64p`` and ``startup-256p`` (``-8p``/``-32p`` in quick mode)."""
    counts = COUNTS_QUICK if ctx.quick else COUNTS_FULL
    samples = SAMPLES_QUICK if ctx.quick else SAMPLES_FULL
    lazy_wait = LAZY_WAIT_QUICK if ctx.quick else LAZY_WAIT_FULL
    for n in counts:
        with _databases(ctx, n) as (databases, admin_url, where):
            yield from _case(n, databases, admin_url, where, samples, lazy_wait)


def _case(
    n: int,
    databases: Sequence[str],
    admin_url: str,
    where: str,
    samples: int,
    lazy_wait: float,
) -> Iterator[Case]:
    partitions = {f"p{i:03d}": databases[i % len(databases)] for i in range(n)}
    contenders: dict[str, tuple[Callable[[], Thing], Callable[[Thing], None], str]] = {
        "sa-engines": (
            lambda: _sa_engines(partitions),
            _dispose_engines,
            f"{n} x create_engine(url, pool_size=10, max_overflow=0), then dispose()",
        ),
        "ours-lazy": (
            lambda: _ours(partitions, lazy=True),
            _dispose_ours,
            f"create_sharded_engine({n} partitions, lazy=True), then dispose()",
        ),
        "ours-warm": (
            lambda: _ours(partitions, lazy=False),
            _dispose_ours,
            f"create_sharded_engine({n} partitions) opening 1 connection each, then dispose()",
        ),
    }
    connections = _Connections(admin_url, [str(make_url(u).database) for u in databases])
    try:
        # one start-up of each first: imports and SQLAlchemy's first-use caches
        for start, stop, _ in contenders.values():
            _cycle(start, stop)
        startup_seconds = {
            name: _startup_seconds(start, stop, samples)
            for name, (start, stop, _) in contenders.items()
        }
        memory = {
            name: _memory(name, start, stop, partitions)
            for name, (start, stop, _) in contenders.items()
        }

        def check() -> str:
            base = connections.settle(0)
            if base:
                raise BenchmarkError(f"{base} connections to the partitions before starting")
            lazy = _ours(partitions, lazy=True)
            try:
                time.sleep(lazy_wait)
                after_lazy = connections.count()
            finally:
                lazy.dispose()
            if after_lazy:
                raise BenchmarkError(f"a lazy start-up of {n} partitions opened {after_lazy}")
            warm = _ours(partitions, lazy=False)
            try:
                after_warm = connections.count()
            finally:
                warm.dispose()
            if after_warm != n:
                raise BenchmarkError(f"a warm start-up of {n} partitions opened {after_warm}")
            left = connections.settle(0)
            if left:
                raise BenchmarkError(f"{left} connections were left open after dispose()")
            return (
                f"lazy: 0 connections after {lazy_wait:.1f} s; warm: {after_warm} (one per "
                f"partition); 0 after dispose. Start-up alone (median of {samples}): "
                + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in startup_seconds.items())
                + "; per partition, Python heap / resident set: "
                + ", ".join(f"{k} {_kib(m)}" for k, m in memory.items())
            )

        yield Case(
            name=f"startup-{n}p",
            variants=[
                Variant(name, _bound_cycle(start, stop), description)
                for name, (start, stop, description) in contenders.items()
            ],
            baseline="sa-engines",
            params={
                "partitions": n,
                "databases": len(databases),
                "server": where,
                "startup_seconds_median": startup_seconds,
                "startup_samples": samples,
                "memory_bytes": memory,
            },
            check=check,
        )
    finally:
        connections.close()


def _kib(memory: Mapping[str, float | None]) -> str:
    heap = memory["heap_retained_per_partition"] or 0.0
    rss = memory["rss_growth_per_partition"]
    return f"{heap / 1024:.1f} / {'-' if rss is None else f'{rss / 1024:.1f}'} KiB"


def _bound_cycle(start: Callable[[], Thing], stop: Callable[[Thing], None]) -> Callable[[], None]:
    return lambda: _cycle(start, stop)
