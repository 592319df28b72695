"""What a migration run did on each partition, and how it is shown while it runs.

:class:`PartitionOutcome` is one partition's result (revision before and after,
error), :class:`MigrationReport` the whole run's; :func:`format_report` renders
the report as the table ``partpool migrate`` and ``alembic upgrade`` print at the
end.  :class:`Progress` shows the run as it goes: a progress bar on a terminal,
one plain line per finished partition otherwise (CI logs, pipes).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = [
    "DONE",
    "FAILED",
    "SKIPPED",
    "MigrationReport",
    "PartitionOutcome",
    "Progress",
    "format_report",
    "format_revisions",
]

#: The partition's transaction committed (which includes "nothing to do").
DONE = "done"
#: The run on the partition failed and was rolled back; the error says why.
FAILED = "failed"
#: The partition was not started, because another one failed first.
SKIPPED = "skipped"

_VERBS = {"upgrade": "upgraded", "downgrade": "downgraded", "stamp": "stamped"}


def format_revisions(heads: Sequence[str] | None) -> str:
    """Revisions for people: ``0002``, ``0002+0003b`` for several heads, ``(base)``, ``?``.

    :param heads: the revisions in a partition's version table; ``None`` if unknown.
    """
    if heads is None:
        return "?"
    return "+".join(sorted(heads)) if heads else "(base)"


@dataclass(frozen=True)
class PartitionOutcome:
    """The result of a migration command on one partition.

    :param name: the partition name.
    :param status: :data:`DONE`, :data:`FAILED` or :data:`SKIPPED`.
    :param before: the revisions before the run; ``None`` if they could not be read.
    :param after: the revisions after the run; ``None`` if they could not be read.
    :param error: why it failed or was skipped: one line, password-free.
    :param duration: seconds the partition's run took, lock wait included.
    """

    name: str
    status: str
    before: tuple[str, ...] | None = None
    after: tuple[str, ...] | None = None
    error: str | None = None
    duration: float | None = None

    @property
    def changed(self) -> bool:
        """True if the partition ended at other revisions than it started at."""
        return self.before is not None and self.after is not None and self.before != self.after

    def describe(self, command: str = "") -> str:
        """``upgraded (0.41 s)``, ``unchanged``, ``FAILED: <error>``, ``skipped: <why>``."""
        if self.status == FAILED:
            return f"FAILED: {self.error or 'unknown error'}"
        if self.status == SKIPPED:
            return f"skipped: {self.error}" if self.error else "skipped"
        verb = _VERBS.get(command.split(" ", 1)[0], "migrated") if self.changed else "unchanged"
        return verb if self.duration is None else f"{verb} ({self.duration:.2f} s)"

    def as_dict(self) -> dict[str, Any]:
        """The outcome as a JSON-serialisable dict (also the worker's result file)."""
        return {
            "name": self.name,
            "status": self.status,
            "before": None if self.before is None else list(self.before),
            "after": None if self.after is None else list(self.after),
            "error": self.error,
            "duration": None if self.duration is None else round(self.duration, 3),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionOutcome:
        """Rebuild an outcome from :meth:`as_dict`'s output."""
        before, after = data.get("before"), data.get("after")
        return cls(
            name=str(data["name"]),
            status=str(data["status"]),
            before=None if before is None else tuple(before),
            after=None if after is None else tuple(after),
            error=data.get("error"),
            duration=data.get("duration"),
        )


@dataclass(frozen=True)
class MigrationReport:
    """A migration command's result over the selected partitions, in configuration order.

    :param command: what ran, as typed: ``upgrade head``, ``downgrade 0001``.
    :param partitions: one outcome per selected partition; ``after`` is read
      from the partition once the run is over.
    :param jobs: how many partitions ran at once (1: one after another, in-process).
    :param duration: seconds the whole run took.
    """

    command: str
    partitions: tuple[PartitionOutcome, ...] = field(default_factory=tuple)
    jobs: int = 1
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        """True if every selected partition ran and committed."""
        return all(p.status == DONE for p in self.partitions)

    @property
    def exit_status(self) -> int:
        """0 if :attr:`ok`, else 1."""
        return 0 if self.ok else 1

    def names(self, status: str) -> list[str]:
        """The partitions whose outcome has *status*."""
        return [p.name for p in self.partitions if p.status == status]

    def by_revision(self) -> dict[str, list[str]]:
        """Partition names grouped by the revisions they are at now."""
        groups: dict[str, list[str]] = {}
        for p in self.partitions:
            groups.setdefault(format_revisions(p.after), []).append(p.name)
        return groups

    def summary(self) -> str:
        """One line: what failed, which partitions are at which revision, what to do next."""
        failed, skipped = self.names(FAILED), self.names(SKIPPED)
        where = "; ".join(
            f"{revision}: {', '.join(names)}" for revision, names in self.by_revision().items()
        )
        if self.ok:
            return f"{self.command} done on {len(self.partitions)} partitions (now at {where})"
        parts = [f"{self.command} failed on partition(s) {', '.join(failed)}"]
        if skipped:
            parts.append(f"not started on {', '.join(skipped)}")
        first = next(p for p in self.partitions if p.status == FAILED)
        return (
            f"{'; '.join(parts)}. Partitions are now at {where}. "
            f"First error ({first.name}): {(first.error or '').rstrip('.')}. Each partition's "
            "run is one "
            "transaction, so a failed partition is left as it was; fix the cause and run "
            "the same command again (partitions already at the target are left alone)."
        )

    def as_dict(self) -> dict[str, Any]:
        """The report as one JSON-serialisable dict."""
        return {
            "ok": self.ok,
            "command": self.command,
            "jobs": self.jobs,
            "duration_ms": round(self.duration * 1000, 1),
            "partitions": {p.name: p.as_dict() for p in self.partitions},
        }


def format_report(report: MigrationReport) -> str:
    """The report as a heading line and a table: partition, before, after, result."""
    counts = {s: len(report.names(s)) for s in (DONE, FAILED, SKIPPED)}
    mode = "one after another" if report.jobs == 1 else f"up to {report.jobs} at once"
    lines = [
        f"{report.command}: {counts[DONE]} of {len(report.partitions)} partitions done, "
        f"{counts[FAILED]} failed, {counts[SKIPPED]} not started "
        f"({report.duration:.2f} s, {mode})"
    ]
    rows = [("partition", "before", "after", "result")]
    rows += [
        (
            p.name,
            format_revisions(p.before),
            format_revisions(p.after),
            p.describe(report.command),
        )
        for p in report.partitions
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells[:3], widths)) + "  " + cells[3]

    lines.append(line(rows[0]))
    lines.append("  ".join("-" * w for w in [*widths, len("result")]))
    lines.extend(line(r) for r in rows[1:])
    return "\n".join(lines)


class Progress:
    """Shows a run over many partitions as it goes.

    On a terminal: one line redrawn in place, ``[#####-----] 5/10 done, 3
    running, 0 failed``.  Elsewhere: one line per finished partition, so a CI
    log says what happened and when.  Quiet when *enabled* is false.

    :param stream: where to write (the command's standard output).
    :param total: how many partitions will be reported.
    :param title: what runs, e.g. ``upgrade head``.
    :param enabled: False to show nothing (``alembic -q``).
    :param width: characters of the bar.
    :param log_stream: where worker processes' log lines are relayed (default
      ``sys.stderr``, where the in-process run's logs go too).
    """

    def __init__(
        self,
        stream: TextIO,
        total: int,
        title: str,
        *,
        enabled: bool = True,
        width: int = 30,
        log_stream: TextIO | None = None,
    ) -> None:
        self.stream = stream
        self.log_stream = log_stream
        self.total = total
        self.title = title
        self.enabled = enabled
        self.width = width
        self.tty = enabled and _isatty(stream)
        self.done = 0
        self.failed = 0
        self.running: list[str] = []
        self._started = time.monotonic()
        self._drawn = False

    def begin(self, jobs: int) -> None:
        """Announce the run (plain mode) or draw the empty bar (terminal)."""
        if not self.enabled:
            return
        if self.tty:
            self._draw()
        else:
            mode = "one after another" if jobs == 1 else f"up to {jobs} at once"
            self._write(f"{self.title}: {self.total} partitions, {mode}\n")

    def started(self, name: str, *, logs_follow: bool = False) -> None:
        """Partition *name* has started.

        :param logs_follow: the partition runs in this process, whose log lines
          go to the same terminal: clear the bar so that they start on a clean
          line (it is drawn again when the partition finishes).
        """
        self.running.append(name)
        if self.tty and logs_follow:
            if self._drawn:
                self._write("\r\033[K")
                self._drawn = False
        elif self.tty:
            self._draw()

    def finished(self, outcome: PartitionOutcome) -> None:
        """Partition *outcome.name* has finished (or was skipped)."""
        if outcome.name in self.running:
            self.running.remove(outcome.name)
        self.done += 1
        self.failed += outcome.status == FAILED
        if not self.enabled:
            return
        if self.tty:
            self._draw()
            return
        where = ""
        if outcome.status == DONE and outcome.changed:
            where = f", {format_revisions(outcome.before)} -> {format_revisions(outcome.after)}"
        elif outcome.status == DONE:
            where = f", at {format_revisions(outcome.after)}"
        self._write(
            f"[{self.done}/{self.total}] {outcome.name}: {outcome.describe(self.title)}{where}\n"
        )

    def relay(self, name: str, lines: Iterable[str], *, failed: bool = False) -> None:
        """Show a worker's own log lines, prefixed with its partition.

        On a terminal only a failed worker's lines are shown (above the bar);
        elsewhere every worker's.
        """
        if not self.enabled or (self.tty and not failed):
            return
        if self.tty and self._drawn:
            self._write("\r\033[K")
        stream = self.log_stream or sys.stderr
        for text in lines:
            stream.write(f"{name} | {text.rstrip()}\n")
        stream.flush()
        if self.tty:
            self._draw()

    def close(self) -> None:
        """Finish the bar's line so that what follows starts on a fresh one."""
        if self.tty and self._drawn:
            self._draw()
            self._write("\n")
            self._drawn = False

    def _draw(self) -> None:
        filled = self.width * self.done // max(1, self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        running = f", {len(self.running)} running" if self.running else ""
        failed = f", {self.failed} FAILED" if self.failed else ""
        elapsed = time.monotonic() - self._started
        self._write(
            f"\r\033[K{self.title} [{bar}] {self.done}/{self.total} done{running}{failed}"
            f" ({elapsed:.1f} s)"
        )
        self._drawn = True

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
