"""``partpool status``: is every partition up, and what does its server say about it?

One *round* checks every partition, all partitions in parallel:

1. a health check through :meth:`.ShardedEngine.check_health` (connect, ping,
   disconnect), timed, bounded by ``connect_timeout`` and ``ping_timeout``;
2. for a partition that answered, one query on a pooled connection that reads
   the server version, the database's name and size, ``max_connections``,
   ``pg_is_in_recovery()`` and the database's client connections from
   ``pg_stat_activity`` (how many come from sqlalchemy-partpool pools, which
   name themselves ``partpool/<partition>``, and in which states), bounded by
   ``ping_timeout`` through the watchdog's ``query_timeout``.

The round runs on a throwaway, lazy :class:`.ShardedEngine` with
``min_connections=0``, disposed at the end, so nothing stays open between
rounds.  Its connections call themselves ``partpool-status`` and are left out
of the figures they report.

:func:`collect_status` returns a :class:`StatusReport`; :func:`format_status`
renders it as a table, :meth:`StatusReport.as_dict` as JSON; :func:`run_status`
is the command itself (one round, or ``--watch`` rounds).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from sqlalchemy import text

from .config import Partition, ShardedConfig
from .engine import ShardedEngine, create_sharded_engine

__all__ = [
    "STATUS_APPLICATION_NAME",
    "PartitionStatus",
    "ServerFigures",
    "StatusReport",
    "collect_status",
    "format_size",
    "format_status",
    "run_status",
    "short_error",
    "status_config",
]

#: ``application_name`` of the connections ``partpool status`` opens itself; they
#: are not counted in the figures it reports.
STATUS_APPLICATION_NAME = "partpool-status"
#: ``pg_stat_activity.application_name`` pattern of sqlalchemy-partpool pools
#: (the engine names psycopg2 connections ``partpool/<partition>``).
POOL_APPLICATION_PATTERN = "partpool/%"

# One round trip.  Only client backends of this database count; this very
# connection and other `partpool status` runs do not.  "idle in transaction
# (aborted)" counts as idle in transaction: both hold locks until the client acts.
_FIGURES_SQL = text(
    """
SELECT current_setting('server_version') AS server_version,
       current_setting('server_version_num')::int AS server_version_num,
       current_database() AS database,
       pg_database_size(current_database()) AS size_bytes,
       current_setting('max_connections')::int AS max_connections,
       pg_is_in_recovery() AS in_recovery,
       (SELECT count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend') AS server_connections,
       a.*
FROM (
    SELECT count(*) AS total,
           count(*) FILTER (WHERE state = 'active') AS active,
           count(*) FILTER (WHERE state = 'idle') AS idle,
           count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS idle_in_transaction,
           count(*) FILTER (WHERE pool) AS partpool,
           count(*) FILTER (WHERE pool AND state = 'active') AS partpool_active,
           count(*) FILTER (WHERE pool AND state = 'idle') AS partpool_idle,
           count(*) FILTER (WHERE pool AND state LIKE 'idle in transaction%')
               AS partpool_idle_in_transaction,
           extract(epoch FROM now() - min(xact_start))::float8 AS oldest_transaction_age
    FROM (
        SELECT state, xact_start, coalesce(application_name LIKE :pool_pattern, false) AS pool
        FROM pg_stat_activity
        WHERE datname = current_database()
          AND backend_type = 'client backend'
          AND pid <> pg_backend_pid()
          AND application_name IS DISTINCT FROM :status_name
    ) AS s
) AS a
"""
)

_ERROR_PREFIXES = re.compile(
    r"""
    ^\(\w+(?:\.\w+)*\)\s*                                   # SQLAlchemy's "(psycopg2.X) "
    | connection\ to\ server\ (?:at|on\ socket)\ "[^"]*"
      (?:\ \([^)]*\))?(?:,\ port\ \d+)?\ failed:\s*         # libpq's where-it-was prefix
    | ^(?:FATAL|ERROR|PANIC):\s+                            # the server's severity
    """,
    re.VERBOSE,
)
_SHORT_ERROR_LENGTH = 48
# Seconds a round waits for its engine's disposal; usually it takes milliseconds.
_DISPOSE_WAIT = 0.2


@dataclass(frozen=True)
class ServerFigures:
    """What a partition's server said about itself and the partition's database.

    Connection figures count client backends connected to the partition's
    database, except the status command's own.
    """

    server_version: str
    server_version_num: int
    database: str
    size_bytes: int
    max_connections: int
    in_recovery: bool
    server_connections: int
    connections: int
    partpool_connections: int
    states: Mapping[str, int]
    partpool_states: Mapping[str, int]
    oldest_transaction_age: float | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ServerFigures:
        """Build the figures from the row of the status query."""

        def states(prefix: str, total: int) -> dict[str, int]:
            counts = {
                key: int(row[prefix + key]) for key in ("active", "idle", "idle_in_transaction")
            }
            counts["other"] = total - sum(counts.values())
            return counts

        total = int(row["total"])
        partpool = int(row["partpool"])
        age = row["oldest_transaction_age"]
        return cls(
            server_version=str(row["server_version"]),
            server_version_num=int(row["server_version_num"]),
            database=str(row["database"]),
            size_bytes=int(row["size_bytes"]),
            max_connections=int(row["max_connections"]),
            in_recovery=bool(row["in_recovery"]),
            server_connections=int(row["server_connections"]),
            connections=total,
            partpool_connections=partpool,
            states=states("", total),
            partpool_states=states("partpool_", partpool),
            oldest_transaction_age=None if age is None else round(float(age), 3),
        )


@dataclass(frozen=True)
class PartitionStatus:
    """The outcome of one round for one partition.

    :param name: the partition name.
    :param url: its URL, password masked.
    :param up: whether the health check (connect + ping) worked.
    :param latency: seconds the health check took, whether it worked or not.
    :param error: why the check failed, or (when up) why the figures could not
      be read; one line, password-free.
    :param figures: what the server said, when it could be asked.
    """

    name: str
    url: str
    up: bool
    latency: float | None
    error: str | None = None
    figures: ServerFigures | None = None

    @property
    def state(self) -> str:
        """``up`` or ``down``."""
        return "up" if self.up else "down"

    def as_dict(self) -> dict[str, Any]:
        """The status as a JSON-serialisable dict; every key present, ``None`` if unknown.

        ``error`` says why a partition is down, or why the figures of one that is
        up could not be read.
        """
        f = self.figures

        def figure(name: str) -> Any:
            return None if f is None else getattr(f, name)

        return {
            "state": self.state,
            "error": self.error,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 2),
            "url": self.url,
            "server_version": figure("server_version"),
            "server_version_num": figure("server_version_num"),
            "in_recovery": figure("in_recovery"),
            "database": figure("database"),
            "size_bytes": figure("size_bytes"),
            "max_connections": figure("max_connections"),
            "connections": None
            if f is None
            else {
                "total": f.connections,
                "partpool": f.partpool_connections,
                "server_total": f.server_connections,
                "states": dict(f.states),
                "partpool_states": dict(f.partpool_states),
            },
            "oldest_transaction_age": figure("oldest_transaction_age"),
        }


@dataclass(frozen=True)
class StatusReport:
    """One round's outcome for every partition, in configuration order.

    :param time: when the round started (seconds since the epoch).
    :param duration: how long the round took, in seconds.
    :param partitions: the partitions' statuses.
    """

    time: float
    duration: float
    partitions: tuple[PartitionStatus, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True if every partition is up."""
        return all(p.up for p in self.partitions)

    @property
    def exit_status(self) -> int:
        """0 if every partition is up, else 1."""
        return 0 if self.ok else 1

    def as_dict(self) -> dict[str, Any]:
        """The report as one JSON-serialisable dict (the ``--json`` document)."""
        up = sum(p.up for p in self.partitions)
        return {
            "ok": self.ok,
            "time": round(self.time, 3),
            "duration_ms": round(self.duration * 1000, 1),
            "summary": {
                "partitions": len(self.partitions),
                "up": up,
                "down": len(self.partitions) - up,
            },
            "partitions": {p.name: p.as_dict() for p in self.partitions},
        }


def status_config(config: ShardedConfig, timeout: float | None = None) -> ShardedConfig:
    """The configuration the status command connects with, derived from the user's.

    Lazy, ``min_connections=0`` on every partition, connections named
    ``partpool-status``, statements bounded by ``ping_timeout`` (a status
    query must not hang on a sick server).

    :param config: the user's configuration.
    :param timeout: seconds that override ``connect_timeout``, ``ping_timeout``
      and the query bound of every partition; ``None`` keeps the configured ones.
    :raises ConfigurationError: if *timeout* is not a positive number.
    """
    partitions = tuple(_status_partition(config, p, timeout) for p in config.partitions)
    return dataclasses.replace(config, partitions=partitions, lazy=True)


def _status_partition(config: ShardedConfig, p: Partition, timeout: float | None) -> Partition:
    settings = p.settings(config.pool)
    overrides: dict[str, Any] = {"min_connections": 0}
    if timeout is not None:
        overrides.update(
            connect_timeout=timeout, ping_timeout=timeout, query_timeout=timeout, timeout=timeout
        )
    else:
        overrides["query_timeout"] = settings.ping_timeout
    # engine options merge shallowly, so the partition's connect_args must carry
    # the shared ones too, or they would be lost
    connect_args = {
        **(config.engine_options.get("connect_args") or {}),
        **(p.engine_options.get("connect_args") or {}),
        "application_name": STATUS_APPLICATION_NAME,
    }
    return dataclasses.replace(
        p,
        engine_options={**p.engine_options, "connect_args": connect_args},
        pool={**p.pool, **overrides},
    )


def collect_status(config: ShardedConfig, timeout: float | None = None) -> StatusReport:
    """Check every partition once, all in parallel, and ask each live server for its figures.

    Each partition is checked and then, if it answered, queried, independently
    of the others, so a slow partition delays only its own row.  Opens at most
    two connections per partition (the check's and the query's), one after
    the other, and closes them before returning.

    :param config: the partitions to check.
    :param timeout: seconds overriding ``connect_timeout`` and ``ping_timeout``
      (see :func:`status_config`); ``None`` keeps the configured ones.
    :raises ConfigurationError: if the configuration cannot make an engine.
    """
    started_at = time.time()
    started = time.monotonic()
    sharded = create_sharded_engine(status_config(config, timeout))
    try:
        names = list(sharded.partitions)
        with ThreadPoolExecutor(
            max_workers=max(1, min(32, len(names))), thread_name_prefix="partpool-status"
        ) as executor:
            outcomes = dict(zip(names, executor.map(lambda n: _check(sharded, n), names)))
        checks = {
            name: health.get("last_check") or {}
            for name, health in sharded.health()["partitions"].items()
        }
        duration = time.monotonic() - started
    finally:
        _dispose(sharded)
    results = []
    for name, partition in sharded.partitions.items():
        up, figures, error = outcomes[name]
        check = checks.get(name, {})
        if not up:
            error = check.get("error") or "the health check did not run"
        results.append(
            PartitionStatus(
                name=name,
                url=partition.safe_url,
                up=up,
                latency=check.get("latency"),
                error=error,
                figures=figures,
            )
        )
    return StatusReport(time=started_at, duration=duration, partitions=tuple(results))


def _check(sharded: ShardedEngine, name: str) -> tuple[bool, ServerFigures | None, str | None]:
    """Whether partition *name* answered, its figures, and why they are missing."""
    if not sharded.check_health([name])[name]:
        return False, None, None
    try:
        return True, _read_figures(sharded, name), None
    except Exception as exc:
        return True, None, sharded.describe_error(name, exc)


def _dispose(sharded: ShardedEngine) -> None:
    """Dispose of *sharded*, waiting for it at most :data:`_DISPOSE_WAIT` seconds.

    A failed check starts the partition's health prober, and disposal waits for
    the prober's connection attempt, which on an unreachable host lasts up to
    ``connect_timeout``.  A daemon thread waits for it instead, so a round is
    bounded by the checks themselves.
    """
    thread = threading.Thread(target=sharded.dispose, name="partpool-status-dispose", daemon=True)
    thread.start()
    thread.join(_DISPOSE_WAIT)


def _read_figures(sharded: ShardedEngine, name: str) -> ServerFigures:
    with sharded.connect(partition=name) as conn:
        row = (
            conn.execute(
                _FIGURES_SQL,
                {"pool_pattern": POOL_APPLICATION_PATTERN, "status_name": STATUS_APPLICATION_NAME},
            )
            .mappings()
            .one()
        )
        conn.rollback()
    return ServerFigures.from_row(dict(row))


# -- rendering -------------------------------------------------------------------------


def format_size(size: int | None) -> str:
    """A byte count for people: ``512 B``, ``7.5 kB``, ``12 MB``, ``1.2 GB`` (1 kB = 1024 B).

    The units are PostgreSQL's ``pg_size_pretty`` ones; ``-`` for ``None``.
    """
    if size is None:
        return "-"
    units = ("B", "kB", "MB", "GB", "TB")
    value, unit = float(size), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{size} B"
    return f"{value:.1f} {units[unit]}" if value < 10 else f"{value:.0f} {units[unit]}"


def short_error(description: str | None, limit: int = _SHORT_ERROR_LENGTH) -> str:
    """The gist of an error description, for a table cell.

    Drops the exception class, SQLAlchemy's ``(driver.Error)`` tag, libpq's
    ``connection to server at "host", port N failed:`` prefix (the URL column
    says where) and the severity (``FATAL:``), and cuts the rest to *limit*
    characters.
    """
    if not description:
        return ""
    head, sep, rest = description.partition(": ")
    message = rest if sep and re.fullmatch(r"[A-Za-z_][\w.]*", head) else description
    previous = None
    while previous != message:
        previous = message
        message = _ERROR_PREFIXES.sub("", message, count=1).strip()
    message = message or head
    return message if len(message) <= limit else message[: limit - 3].rstrip() + "..."


def _local_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(sep=" ", timespec="seconds")


def format_status(report: StatusReport) -> str:
    """The report as a heading line and a fixed-width table, one row per partition."""
    up = sum(p.up for p in report.partitions)
    lines = [
        f"partpool status at {_local_time(report.time)}: {up} of {len(report.partitions)} "
        f"partitions up (checked in {report.duration * 1000:.0f} ms)"
    ]
    header = (
        "partition", "state", "latency", "version", "size",
        "partpool/total/max", "idle in tx", "url",
    )  # fmt: skip
    right_aligned = {2, 4, 5, 6}
    rows: list[tuple[str, ...]] = [header]
    for p in report.partitions:
        f = p.figures
        state = p.state
        if f is not None and f.in_recovery:
            state += " (standby)"
        if p.error:
            state += (
                f": {short_error(p.error)}" if not p.up else f", no figures: {short_error(p.error)}"
            )
        rows.append(
            (
                p.name,
                state,
                "-" if p.latency is None else f"{p.latency * 1000:.1f} ms",
                "-" if f is None else f.server_version.split()[0],
                "-" if f is None else format_size(f.size_bytes),
                "-"
                if f is None
                else f"{f.partpool_connections}/{f.connections}/{f.max_connections}",
                "-" if f is None else str(f.states["idle_in_transaction"]),
                p.url,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(w) if i in right_aligned else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    lines.append(line(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(r) for r in rows[1:])
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------

_CLEAR_SCREEN = "\033[H\033[2J"


def run_status(
    config: ShardedConfig,
    out: TextIO,
    *,
    as_json: bool = False,
    timeout: float | None = None,
    watch: float | None = None,
    count: int | None = None,
) -> int:
    """Run ``partpool status``: print one round, or a round every *watch* seconds.

    With *watch*, a terminal is cleared between rounds; any other output gets
    every round after a blank line (tables start with a timestamp; JSON rounds
    are one compact document per line).  Ctrl-C stops watching and exits 0.

    :param config: the partitions to check.
    :param out: where to print.
    :param as_json: print JSON instead of a table.
    :param timeout: seconds overriding ``connect_timeout`` and ``ping_timeout``.
    :param watch: seconds between the starts of rounds; ``None`` runs one round.
    :param count: stop after this many rounds; ``None`` watches until interrupted.
    :returns: the exit status of the last round: 0 if every partition was up, else 1
      (0 when interrupted while watching, 130 when interrupted otherwise).
    """
    clear = watch is not None and not as_json and out.isatty()
    rounds = 0
    status = 0
    try:
        while True:
            started = time.monotonic()
            report = collect_status(config, timeout=timeout)
            status = report.exit_status
            if as_json:
                document = report.as_dict()
                rendered = (
                    json.dumps(document) if watch is not None else json.dumps(document, indent=2)
                )
            else:
                rendered = format_status(report)
                if clear:
                    rendered = f"{_CLEAR_SCREEN}every {watch:g}s, Ctrl-C to stop\n{rendered}"
                elif rounds and watch is not None:
                    rendered = "\n" + rendered
            print(rendered, file=out, flush=True)
            rounds += 1
            if watch is None or (count is not None and rounds >= count):
                return status
            time.sleep(max(0.0, started + watch - time.monotonic()))
    except KeyboardInterrupt:
        return 0 if watch is not None else 130
