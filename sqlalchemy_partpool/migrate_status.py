"""``partpool migrate status``: each partition's revision, and drift between partitions.

Two kinds of drift are flagged:

* *revision drift*: the partitions' version tables do not all hold the same
  revisions (a run that failed half-way, a partition added later, a manual
  ``stamp``);
* *schema drift*: a partition's schema differs from the *reference*
  partition's (the first selected, or ``--reference NAME``), whatever the
  version tables say (a hand-made hotfix, an object created outside migrations).
  The reference's schema is reflected into a MetaData and every other
  partition is compared with it by alembic's autogenerate
  (:func:`alembic.autogenerate.compare_metadata`): tables, columns, types,
  nullability, indexes, unique constraints and foreign keys of the default
  schema, the version table left out.  ``include_object`` and ``compare_type``
  given to :func:`.run_migrations` apply.

The status is collected by ``env.py`` itself (``partpool migrate status`` runs
the environment with a :class:`StatusRequest`), so it finds the partitions and
the version table exactly as migrations do.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData

from .migrate_partitions import partition_engine, read_revisions
from .migrate_report import format_revisions

if TYPE_CHECKING:
    from .migrate_run import MigrationRun

__all__ = [
    "MigrationStatus",
    "PartitionRevision",
    "StatusRequest",
    "collect_migration_status",
    "describe_difference",
    "format_migration_status",
]

#: Partitions checked at once (each check reflects one schema).
_STATUS_THREADS = 8
#: Loggers that say, for every partition compared, which context and plugins
#: alembic set up, which sequences it took for SERIAL and what differs (which
#: the status itself shows).
_NOISY_LOGGERS = (
    "alembic.runtime.migration",
    "alembic.runtime.plugins",
    "alembic.ddl",
    "alembic.autogenerate",
)


@dataclass(frozen=True)
class StatusRequest:
    """What ``partpool migrate status`` asks ``env.py`` for.

    :param compare_schema: also compare every partition's schema with the reference's.
    """

    compare_schema: bool = True


@dataclass(frozen=True)
class PartitionRevision:
    """One partition's revision and how its schema compares with the reference's.

    :param name: the partition name.
    :param url: its URL, password masked.
    :param revisions: the revisions in its version table; ``None`` if unreadable.
    :param error: why it could not be read or compared.
    :param differences: how its schema differs from the reference's (empty:
      the same); ``None`` when not compared (the reference itself, or unreadable).
    :param reference: True for the reference partition.
    """

    name: str
    url: str
    revisions: tuple[str, ...] | None
    error: str | None = None
    differences: tuple[str, ...] | None = None
    reference: bool = False


@dataclass(frozen=True)
class MigrationStatus:
    """The revisions and drift of the selected partitions.

    :param heads: the head revisions of the migration scripts.
    :param reference: the reference partition's name.
    :param partitions: one entry per partition, in configuration order.
    :param compared_schema: whether schemas were compared.
    """

    heads: tuple[str, ...]
    reference: str
    partitions: tuple[PartitionRevision, ...] = field(default_factory=tuple)
    compared_schema: bool = True

    def at_head(self, partition: PartitionRevision) -> bool:
        """True if *partition* holds exactly the scripts' head revisions."""
        return partition.revisions is not None and set(partition.revisions) == set(self.heads)

    @property
    def by_revision(self) -> dict[str, list[str]]:
        """Partition names grouped by revision (unreadable ones left out)."""
        groups: dict[str, list[str]] = {}
        for p in self.partitions:
            if p.revisions is not None:
                groups.setdefault(format_revisions(p.revisions), []).append(p.name)
        return groups

    @property
    def revision_drift(self) -> bool:
        """True if the partitions are not all at the same revisions."""
        return len(self.by_revision) > 1

    @property
    def schema_drift(self) -> list[str]:
        """The partitions whose schema differs from the reference's."""
        return [p.name for p in self.partitions if p.differences]

    @property
    def unreachable(self) -> list[str]:
        """The partitions that could not be read."""
        return [p.name for p in self.partitions if p.revisions is None]

    @property
    def ok(self) -> bool:
        """True if no partition drifts and every partition could be read."""
        return not (self.revision_drift or self.schema_drift or self.unreachable)

    @property
    def exit_status(self) -> int:
        """0 if :attr:`ok`, else 1."""
        return 0 if self.ok else 1

    def as_dict(self) -> dict[str, Any]:
        """The status as one JSON-serialisable dict (the ``--json`` document)."""
        return {
            "ok": self.ok,
            "heads": list(self.heads),
            "reference": self.reference,
            "drift": {
                "revisions": self.revision_drift,
                "schema": self.schema_drift,
                "unreachable": self.unreachable,
            },
            "partitions": {
                p.name: {
                    "url": p.url,
                    "revisions": None if p.revisions is None else list(p.revisions),
                    "at_head": self.at_head(p),
                    "reference": p.reference,
                    "schema_differences": None if p.differences is None else list(p.differences),
                    "error": p.error,
                }
                for p in self.partitions
            },
        }


def collect_migration_status(run: MigrationRun, request: StatusRequest) -> MigrationStatus:
    """Read every selected partition's revision and compare its schema with the reference's.

    Called by :func:`.run_migrations` when ``config.attributes["partpool.status"]``
    holds a :class:`StatusRequest`.  Partitions are read in parallel threads
    (reading and reflecting go through no alembic proxy).
    """
    with _quiet_alembic():
        return _collect(run, request)


@contextlib.contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Hold back alembic's INFO lines (one set per partition compared) while collecting."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _collect(run: MigrationRun, request: StatusRequest) -> MigrationStatus:
    table, schema = run.version_table
    reference = run.reference()
    include_object = _include_object(table, run.configure_options.get("include_object"))
    reference_metadata: MetaData | None = None
    reference_error: str | None = None
    if request.compare_schema:
        try:
            reference_metadata = _reflect(run, reference, table)
        except Exception as exc:
            reference_error = run.describe(reference, exc)

    def check(name: str) -> PartitionRevision:
        url = next(p.safe_url for p in run.partitions.partitions if p.name == name)
        engine = partition_engine(run.partitions, name)
        try:
            with engine.connect() as connection:
                revisions = read_revisions(connection, table, schema)
                if name == reference or reference_metadata is None:
                    return PartitionRevision(
                        name,
                        url,
                        revisions,
                        error=reference_error if name == reference else None,
                        reference=name == reference,
                    )
                context = MigrationContext.configure(
                    connection,
                    opts={
                        "include_object": include_object,
                        "compare_type": run.configure_options.get("compare_type", True),
                    },
                )
                diffs = compare_metadata(context, reference_metadata)
                differences = tuple(sorted(d for diff in diffs for d in describe_difference(diff)))
                return PartitionRevision(name, url, revisions, differences=differences)
        except Exception as exc:
            return PartitionRevision(name, url, None, error=run.describe(name, exc))
        finally:
            engine.dispose()

    with ThreadPoolExecutor(
        max_workers=max(1, min(_STATUS_THREADS, len(run.names))),
        thread_name_prefix="partpool-migrate-status",
    ) as executor:
        partitions = tuple(executor.map(check, run.names))
    return MigrationStatus(
        heads=tuple(run.env.script.get_heads()),
        reference=reference,
        partitions=partitions,
        compared_schema=reference_metadata is not None,
    )


def _include_object(version_table: str, user: Any) -> Any:
    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ == "table" and name == version_table:
            return False
        return bool(user(obj, name, type_, reflected, compare_to)) if user else True

    return include


def _reflect(run: MigrationRun, name: str, version_table: str) -> MetaData:
    """The schema of partition *name* (its default schema), without the version table."""
    metadata = MetaData()
    engine = partition_engine(run.partitions, name)
    try:
        with engine.connect() as connection:
            metadata.reflect(connection)
    finally:
        engine.dispose()
    if version_table in metadata.tables:
        metadata.remove(metadata.tables[version_table])
    return metadata


def describe_difference(diff: Any) -> list[str]:
    """Phrases for one item of :func:`~alembic.autogenerate.compare_metadata`'s output.

    The diff says what would make the partition match the reference, so an
    ``add_table`` is a table the partition is *missing*, a ``remove_table`` one
    it has *extra*.
    """
    if isinstance(diff, list):
        return [phrase for item in diff for phrase in describe_difference(item)]
    kind = diff[0]
    side = "missing" if kind.startswith("add_") else "extra"
    if kind in ("add_table", "remove_table"):
        return [f"{side} table {diff[1].name}"]
    if kind in ("add_column", "remove_column"):
        return [f"{side} column {diff[2]}.{diff[3].name}"]
    if kind in ("add_index", "remove_index"):
        return [f"{side} index {diff[1].name} on {diff[1].table.name}"]
    if kind in ("add_constraint", "remove_constraint"):
        return [f"{side} constraint {diff[1].name} on {diff[1].table.name}"]
    if kind in ("add_fk", "remove_fk"):
        fk = diff[1]
        columns = ", ".join(c.name for c in fk.columns)
        return [f"{side} foreign key {fk.name or columns} on {fk.parent.name}"]
    if kind.startswith("modify_"):
        _, _, table, column, _, here, there = diff
        what = kind.removeprefix("modify_")
        if what == "nullable":
            here, there = _nullable(here), _nullable(there)
            return [f"column {table}.{column}: {here} here, {there} on the reference"]
        return [f"column {table}.{column}: {what} {here} here, {there} on the reference"]
    return [repr(diff)]


def _nullable(value: Any) -> str:
    return "nullable" if value else "NOT NULL"


def format_migration_status(status: MigrationStatus) -> str:
    """The status as a heading, a table (partition, revision, at head, schema, url) and verdicts."""
    lines = [
        f"partpool migrate status: {len(status.partitions)} partitions; script head "
        f"{format_revisions(status.heads)}; reference partition {status.reference}"
    ]
    header = ("partition", "revision", "at head", f"schema vs {status.reference}", "url")
    rows: list[tuple[str, ...]] = [header]
    for p in status.partitions:
        if p.revisions is None:
            schema = f"unreadable: {p.error}"
        elif p.reference:
            schema = "(reference)" + (f", not reflected: {p.error}" if p.error else "")
        elif p.differences is None:
            schema = "not compared"
        elif p.differences:
            schema = "DIFFERS: " + "; ".join(p.differences)
        else:
            schema = "same"
        rows.append(
            (
                p.name,
                format_revisions(p.revisions),
                "-" if p.revisions is None else ("yes" if status.at_head(p) else "no"),
                schema,
                p.url,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells[:4], widths)) + "  " + cells[4]

    lines.append(line(header))
    lines.append("  ".join("-" * w for w in [*widths, 3]))
    lines.extend(line(r) for r in rows[1:])
    groups = status.by_revision
    if status.revision_drift:
        listed = "; ".join(f"{rev}: {', '.join(names)}" for rev, names in groups.items())
        lines.append(f"DRIFT: the partitions are at different revisions ({listed})")
    if status.schema_drift:
        lines.append(
            f"DRIFT: the schema of {', '.join(status.schema_drift)} differs from the "
            f"reference partition {status.reference}"
        )
    if status.unreachable:
        lines.append(f"UNREADABLE: {', '.join(status.unreachable)}")
    if status.ok:
        revision = next(iter(groups), "(base)")
        compared = " with the same schema" if status.compared_schema else ""
        behind = "" if revision == format_revisions(status.heads) else " (not the head)"
        lines.append(f"no drift: every partition is at {revision}{behind}{compared}")
    return "\n".join(lines)
