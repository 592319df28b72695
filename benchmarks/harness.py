"""A small harness that measures variants of one workload side by side on a real PostgreSQL.

A *workload* is a generator registered with :func:`register`.  It gets a
:class:`BenchContext` (the settings and a server to create scratch partitions
on), sets up its data, and yields one :class:`Case` per comparison: a few
:class:`Variant` s that do the same work in different ways, one of them the
baseline.  While the generator is suspended at ``yield`` its partitions and
engines stay open; the harness measures the case, then resumes the generator
so that it cleans up::

    @register("fanout", "aggregate over many partitions: sequential vs execute_all")
    def fanout(ctx: BenchContext) -> Iterator[Case]:
        with ctx.partitions(4) as urls, create_sharded_engine(urls) as sharded:
            ...  # create and load tables
            yield Case("fanout-4p", [Variant("sequential", seq), Variant("ours", ours)],
                       baseline="sequential", check=same_answer)

How a case is measured (:func:`measure`):

1. the case's ``check`` runs once, so that variants that disagree are never timed;
2. a calibration pass runs every variant once, and each variant gets the
   number of operations per round that takes about ``round_seconds``;
3. ``warmup`` rounds, then up to ``rounds`` measured rounds.  Every round runs
   every variant, in an order shuffled anew each round, so that machine noise
   (another process, CPU frequency, the server's checkpointer) lands on all
   variants alike instead of on whichever ran during the noisy second.  A
   round records, per variant, seconds per operation;
4. measuring stops after ``rounds`` rounds or when the case's ``seconds``
   budget would be exceeded by one more round (at least one round is kept).

Per variant the report gives the median and the 90th percentile of the per-round
timings, and the ratio of its median to the baseline's median (below 1 is
faster).  Because rounds are interleaved, the per-round ratios to the baseline
are paired samples; their 10th to 90th percentile range shows how steady the
comparison was.

Workload modules are ``benchmarks/bench_*.py``; :func:`discover` imports them
all, so adding a workload is adding a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "BenchContext",
    "BenchmarkError",
    "Case",
    "CaseResult",
    "Settings",
    "Variant",
    "VariantStats",
    "Workload",
    "discover",
    "format_table",
    "measure",
    "percentile",
    "register",
    "run_workloads",
    "workloads",
]

#: Where results go when no ``--json`` path is given (git-ignored).
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Version of the JSON report's layout; bump it when fields change meaning.
REPORT_SCHEMA = 1

# A throwaway server gets this many connections: every partition's pool plus
# the admin connections, with room for the largest fan-out a workload uses.
_SERVER_MAX_CONNECTIONS = 200

# Bounds on the calibrated operations per round: at least one operation, and
# not so many that a very fast operation makes a round mostly loop overhead.
_MAX_OPS_PER_ROUND = 100_000


class BenchmarkError(RuntimeError):
    """A workload could not be run or its variants disagree; the message says which."""


@dataclass(frozen=True)
class Variant:
    """One way of doing a case's work.

    :param name: short name shown in the table (``sequential``, ``ours``).
    :param op: one operation; its return value is ignored.
    :param description: what this variant does, for the JSON report.
    """

    name: str
    op: Callable[[], object]
    description: str = ""


@dataclass(frozen=True)
class Case:
    """Variants compared on the same data in one measurement.

    :param name: unique within the workload, e.g. ``fanout-4p``.
    :param variants: the variants; names must be unique.
    :param baseline: name of the variant the others are compared to.
    :param params: facts about the case (partitions, rows...) for the report.
    :param check: run once before timing; returns a one-line description of
      what it verified, or raises (e.g. :class:`BenchmarkError`) if the
      variants disagree.
    :param ops_per_round: a fixed number of operations per round instead of
      calibrating it from ``round_seconds``.
    """

    name: str
    variants: Sequence[Variant]
    baseline: str
    params: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[], str] | None = None
    ops_per_round: int | None = None

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"case {self.name!r}: variant names must be unique, got {names}")
        if self.baseline not in names:
            raise ValueError(f"case {self.name!r}: baseline {self.baseline!r} is not in {names}")
        if self.ops_per_round is not None and self.ops_per_round < 1:
            raise ValueError(f"case {self.name!r}: ops_per_round must be at least 1")


@dataclass(frozen=True)
class Settings:
    """How long and how carefully to measure; the same for every case of a run.

    :param quick: small data and few rounds: proves the code works, measures nothing.
    :param rounds: measured rounds per case (at most).
    :param warmup: rounds run and discarded before measuring.
    :param seconds: time budget per case for warm-up and measured rounds.
    :param round_seconds: target duration of one variant's share of a round.
    :param seed: seeds the per-round shuffling, so a run's order can be replayed.
    """

    quick: bool = False
    rounds: int = 30
    warmup: int = 2
    seconds: float = 60.0
    round_seconds: float = 0.2
    seed: int = 0

    @classmethod
    def defaults(cls, *, quick: bool, seed: int | None = None) -> Settings:
        """The default settings of a full or a ``--quick`` run.

        :param quick: the quick mode's defaults (3 rounds, tiny rounds, 10 s budget).
        :param seed: the shuffle seed; a random one when ``None``.
        """
        chosen = random.SystemRandom().randrange(2**32) if seed is None else seed
        if quick:
            return cls(
                quick=True, rounds=3, warmup=1, seconds=10.0, round_seconds=0.01, seed=chosen
            )
        return cls(seed=chosen)

    def validate(self) -> None:
        """Raise :class:`ValueError` for settings that cannot bound a run."""
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if self.warmup < 0:
            raise ValueError("warmup must be 0 or more")
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ValueError("seconds must be a positive number")
        if not (self.round_seconds > 0 and math.isfinite(self.round_seconds)):
            raise ValueError("round_seconds must be a positive number")


@dataclass
class VariantStats:
    """What was measured for one variant of a case (timings in seconds per operation)."""

    name: str
    description: str
    ops_per_round: int
    samples: list[float]
    median: float
    p90: float
    mean: float
    minimum: float
    maximum: float
    ratio: float
    paired_ratio_p10: float
    paired_ratio_median: float
    paired_ratio_p90: float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the figures."""
        return dataclasses.asdict(self)


@dataclass
class CaseResult:
    """The measurement of one case: per-variant figures and how measuring ended."""

    workload: str
    name: str
    baseline: str
    params: dict[str, Any]
    check: str | None
    rounds: int
    warmup: int
    stopped_by: str
    seconds: float
    order: list[list[str]]
    variants: dict[str, VariantStats]

    def ratios(self) -> dict[str, float]:
        """Variant name -> its median over the baseline's median."""
        return {name: stats.ratio for name, stats in self.variants.items()}

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the case and its figures."""
        return {
            "name": self.name,
            "baseline": self.baseline,
            "params": self.params,
            "check": self.check,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "stopped_by": self.stopped_by,
            "seconds": self.seconds,
            "ratios": self.ratios(),
            "order": self.order,
            "variants": {name: stats.as_dict() for name, stats in self.variants.items()},
        }


# -- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0-100) of *values*, interpolating linearly between ranks.

    The same definition as numpy's default (``linear``): p50 is the median,
    p0 the minimum and p100 the maximum.

    :raises ValueError: if *values* is empty or *q* is outside 0..100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats(variant: Variant, ops: int, samples: list[float], baseline: list[float]) -> VariantStats:
    median = statistics.median(samples)
    paired = [s / b for s, b in zip(samples, baseline) if b > 0]
    base_median = statistics.median(baseline)
    return VariantStats(
        name=variant.name,
        description=variant.description,
        ops_per_round=ops,
        samples=samples,
        median=median,
        p90=percentile(samples, 90),
        mean=statistics.fmean(samples),
        minimum=min(samples),
        maximum=max(samples),
        ratio=median / base_median if base_median > 0 else math.nan,
        paired_ratio_p10=percentile(paired, 10) if paired else math.nan,
        paired_ratio_median=statistics.median(paired) if paired else math.nan,
        paired_ratio_p90=percentile(paired, 90) if paired else math.nan,
    )


# -- measuring --------------------------------------------------------------------------


def _time_ops(op: Callable[[], object], n: int) -> float:
    """Seconds per operation over *n* back-to-back calls of *op*."""
    start = time.perf_counter()
    for _ in range(n):
        op()
    return (time.perf_counter() - start) / n


def measure(
    case: Case,
    settings: Settings,
    *,
    workload: str = "",
    rng: random.Random | None = None,
    progress: Callable[[str], None] | None = None,
) -> CaseResult:
    """Measure every variant of *case*, interleaved round by round (see the module docs).

    :param case: the case.
    :param settings: rounds, warm-up, budget and round length.
    :param workload: the workload's name, for the result.
    :param rng: shuffles the order of variants in each round; seeded from
      ``settings.seed`` when omitted.
    :param progress: called with a line of progress now and then (stderr in the CLI).
    :raises BenchmarkError: if the case's check fails.
    """
    settings.validate()
    rng = rng if rng is not None else random.Random(settings.seed)
    say = progress or (lambda _line: None)
    checked: str | None = None
    if case.check is not None:
        try:
            checked = case.check()
        except Exception as exc:
            raise BenchmarkError(f"{workload}/{case.name}: check failed: {exc}") from exc

    started = time.perf_counter()
    variants = list(case.variants)

    # Calibration: one operation each, in a shuffled order, discarded.
    ops: dict[str, int] = {}
    for variant in rng.sample(variants, len(variants)):
        one = _time_ops(variant.op, 1)
        if case.ops_per_round is not None:
            ops[variant.name] = case.ops_per_round
        else:
            estimate = round(settings.round_seconds / one) if one > 0 else _MAX_OPS_PER_ROUND
            ops[variant.name] = max(1, min(_MAX_OPS_PER_ROUND, estimate))

    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    order: list[list[str]] = []
    warmed = 0
    measured = 0
    stopped_by = "rounds"
    last_round = 0.0
    while measured < settings.rounds:
        elapsed = time.perf_counter() - started
        if measured >= 1 and elapsed + last_round > settings.seconds:
            stopped_by = "budget"
            break
        shuffled = rng.sample(variants, len(variants))
        # Collect garbage outside the timed region, so that one variant does
        # not pay for the allocations of another.
        gc.collect()
        round_start = time.perf_counter()
        timings = {v.name: _time_ops(v.op, ops[v.name]) for v in shuffled}
        last_round = time.perf_counter() - round_start
        if warmed < settings.warmup:
            warmed += 1
            continue
        measured += 1
        order.append([v.name for v in shuffled])
        for name, seconds in timings.items():
            samples[name].append(seconds)
        if measured == 1 or measured % 10 == 0:
            say(f"{workload}/{case.name}: round {measured}/{settings.rounds}")

    baseline = samples[case.baseline]
    return CaseResult(
        workload=workload,
        name=case.name,
        baseline=case.baseline,
        params=dict(case.params),
        check=checked,
        rounds=measured,
        warmup=warmed,
        stopped_by=stopped_by,
        seconds=time.perf_counter() - started,
        order=order,
        variants={v.name: _stats(v, ops[v.name], samples[v.name], baseline) for v in case.variants},
    )


# -- workloads and their registry -------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A registered workload: a generator of cases, see :func:`register`."""

    name: str
    description: str
    cases: Callable[[BenchContext], Iterator[Case]]


_REGISTRY: dict[str, Workload] = {}


def register(
    name: str, description: str
) -> Callable[[Callable[[BenchContext], Iterator[Case]]], Callable[[BenchContext], Iterator[Case]]]:
    """Register a workload under *name* (a decorator for its case generator).

    :param name: what ``--only`` selects it by.
    :param description: one line on what it measures, printed above its table.
    :raises ValueError: if another workload already has the name.
    """

    def decorate(
        fn: Callable[[BenchContext], Iterator[Case]],
    ) -> Callable[[BenchContext], Iterator[Case]]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.cases is not fn:
            raise ValueError(f"a workload named {name!r} is already registered")
        _REGISTRY[name] = Workload(name, description, fn)
        return fn

    return decorate


def discover() -> dict[str, Workload]:
    """Import every ``benchmarks/bench_*.py`` module and return the registered workloads."""
    import importlib
    import pkgutil

    package = __name__.rpartition(".")[0] or "benchmarks"
    for module in sorted(pkgutil.iter_modules([str(Path(__file__).resolve().parent)])):
        if module.name.startswith("bench_"):
            importlib.import_module(f"{package}.{module.name}")
    return workloads()


def workloads() -> dict[str, Workload]:
    """The workloads registered so far, by name, in registration order."""
    return dict(_REGISTRY)


# -- the server and the context given to workloads --------------------------------------


class BenchContext:
    """What a workload gets: the settings, and a server to create scratch partitions on.

    :param settings: the run's settings (``settings.quick`` selects small data).
    :param admin_url: an admin URL of the server the partitions are created on.
    :param progress: where progress lines go.
    """

    def __init__(
        self, settings: Settings, admin_url: str, progress: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self.admin_url = admin_url
        self._progress = progress or (lambda _line: None)

    @property
    def quick(self) -> bool:
        """True in ``--quick`` mode: use small data."""
        return self.settings.quick

    def say(self, line: str) -> None:
        """Report progress (on stderr in the CLI; the table on stdout stays clean)."""
        self._progress(line)

    @contextlib.contextmanager
    def partitions(self, n: int, *, prefix: str = "partpool_bench") -> Iterator[dict[str, str]]:
        """Create *n* empty databases and yield ``{"p0": url, ...}``; drop them on exit.

        :param n: how many partitions.
        :param prefix: prefix of the database names.
        """
        from sqlalchemy_partpool.testing import scratch_partitions

        with scratch_partitions(n, url=self.admin_url, prefix=prefix) as urls:
            yield urls


@contextlib.contextmanager
def open_server(url: str | None) -> Iterator[tuple[str, str]]:
    """Yield ``(admin_url, kind)``: the server at *url*, or a throwaway one.

    :param url: an admin URL of an existing server; ``None`` starts a throwaway
      :class:`~sqlalchemy_partpool.testing.PostgresServer` (removed on exit).
    """
    from sqlalchemy_partpool.testing import ExistingServer, PostgresServer

    if url:
        server = ExistingServer(url)
        server.check()
        yield server.url(server.admin_database), "existing"
        return
    owned = PostgresServer(max_connections=_SERVER_MAX_CONNECTIONS)
    try:
        owned.start()
        yield owned.url("postgres"), "throwaway"
    finally:
        owned.cleanup()


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def machine_facts(admin_url: str, server_kind: str) -> dict[str, Any]:
    """Facts that decide how numbers compare: CPUs, versions, platform, the server.

    :param admin_url: the server's admin URL (asked for its version and settings).
    :param server_kind: ``"throwaway"`` or ``"existing"``.
    """
    import psycopg2
    import sqlalchemy
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    import sqlalchemy_partpool

    url = make_url(admin_url)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            version = conn.execute(text("SELECT version()")).scalar_one()
            rows = conn.execute(
                text(
                    "SELECT name, setting FROM pg_settings WHERE name IN "
                    "('server_version', 'max_connections', 'shared_buffers', "
                    "'max_parallel_workers_per_gather', 'fsync', 'synchronous_commit')"
                )
            )
            settings = {str(name): str(value) for name, value in rows}
    finally:
        engine.dispose()
    host = url.host or str(url.query.get("host", "")) or "localhost"
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg2": psycopg2.__version__.split()[0],
        "libpq": psycopg2.__libpq_version__,
        "sqlalchemy_partpool": sqlalchemy_partpool.__version__,
        "git": _git_revision(),
        "postgresql": version,
        "postgresql_settings": settings,
        "server": {
            "kind": server_kind,
            "url": url.render_as_string(hide_password=True),
            "local": host in ("localhost", "127.0.0.1", "::1") or host.startswith("/"),
        },
    }


# -- running and reporting --------------------------------------------------------------


def _close(cases: Iterator[Case]) -> None:
    close = getattr(cases, "close", None)
    if close is not None:
        close()


def run_workloads(
    selected: Sequence[Workload],
    settings: Settings,
    admin_url: str,
    *,
    progress: Callable[[str], None] | None = None,
) -> list[tuple[Workload, list[CaseResult]]]:
    """Set up and measure every case of every selected workload, one after another.

    :param selected: the workloads, in order.
    :param settings: the run's settings.
    :param admin_url: the server to create partitions on.
    :param progress: where progress lines go.
    :raises BenchmarkError: if a workload's check fails.
    """
    ctx = BenchContext(settings, admin_url, progress)
    rng = random.Random(settings.seed)
    results: list[tuple[Workload, list[CaseResult]]] = []
    for workload in selected:
        ctx.say(f"{workload.name}: {workload.description}")
        measured: list[CaseResult] = []
        cases = workload.cases(ctx)
        try:
            for case in cases:
                measured.append(
                    measure(case, settings, workload=workload.name, rng=rng, progress=progress)
                )
        finally:
            _close(cases)  # the workload drops its partitions even when measuring failed
        results.append((workload, measured))
    return results


def report(
    results: Sequence[tuple[Workload, Sequence[CaseResult]]],
    settings: Settings,
    machine: Mapping[str, Any],
    *,
    started: datetime,
    duration: float,
) -> dict[str, Any]:
    """The JSON report: machine facts, settings and every case's figures."""
    return {
        "schema": REPORT_SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "duration_seconds": round(duration, 3),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "machine": dict(machine),
        "settings": dataclasses.asdict(settings),
        "workloads": {
            workload.name: {
                "description": workload.description,
                "cases": [result.as_dict() for result in cases],
            }
            for workload, cases in results
        },
    }


def write_json(data: Mapping[str, Any], path: Path | None, started: datetime) -> Path:
    """Write the report to *path*, or to ``benchmarks/results/<timestamp>.json``.

    :returns: the path written.
    """
    if path is None:
        path = RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def format_table(results: Sequence[tuple[Workload, Sequence[CaseResult]]]) -> str:
    """The results as a fixed-width table per workload, with a ratio summary under each.

    Columns: case, variant, operations per round x measured rounds (``*`` when the
    time budget ended measuring early), median and p90 milliseconds per operation,
    the ratio of medians to the baseline, and the 10th-90th percentile range of the
    per-round (paired) ratios.
    """
    header = (
        f"{'case':<14} {'variant':<12} {'ops x rounds':>13} {'median ms':>11} "
        f"{'p90 ms':>11} {'ratio':>7}  {'paired p10-p90':<14}"
    )
    lines: list[str] = []
    for workload, cases in results:
        lines.append(f"== {workload.name}: {workload.description}")
        lines.append(header)
        lines.append("-" * len(header))
        summary: list[str] = []
        for case in cases:
            first = True
            budget = "*" if case.stopped_by == "budget" else ""
            for name, stats in case.variants.items():
                spread = (
                    "(baseline)"
                    if name == case.baseline
                    else f"{_ratio(stats.paired_ratio_p10)}-{_ratio(stats.paired_ratio_p90)}"
                )
                runs = f"{stats.ops_per_round} x {case.rounds}{budget}"
                lines.append(
                    f"{case.name if first else '':<14} {name:<12} {runs:>13} "
                    f"{_ms(stats.median):>11} {_ms(stats.p90):>11} {_ratio(stats.ratio):>7}  "
                    f"{spread:<14}".rstrip()
                )
                first = False
                if name != case.baseline:
                    summary.append(
                        f"{case.name}: {name}/{case.baseline} = {_ratio(stats.ratio)} "
                        f"(paired {_ratio(stats.paired_ratio_p10)}-"
                        f"{_ratio(stats.paired_ratio_p90)})"
                    )
            if case.check:
                lines.append(f"{'':<14} check: {case.check}")
        lines.append("")
        lines.extend(summary)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def now() -> datetime:
    """The current time, timezone-aware (UTC), for report timestamps."""
    return datetime.now(timezone.utc)
