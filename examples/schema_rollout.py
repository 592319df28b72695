"""Schema rollout: one alembic revision history, applied to every partition.

    python examples/schema_rollout.py

Creates four scratch databases on the server named by PARTPOOL_URL (an admin
URL such as postgresql://postgres@127.0.0.1/postgres), or on an embedded
throwaway server when PARTPOOL_URL is not set, and removes them at the end.

It upgrades every partition to the first revision of the project's alembic
environment (migrations/, through alembic.ini), writes rows routed by key, then
rolls out the next two revisions (a new column and table, then a backfill that
makes the column NOT NULL) to all partitions at once, and shows each
partition's revision and that no partition drifts.  The same steps from a shell:

    partpool migrate upgrade 0001
    partpool migrate upgrade head --jobs 4
    partpool migrate status
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from sqlalchemy_partpool import ShardedConfig, create_sharded_engine
from sqlalchemy_partpool.migrate_commands import status, upgrade
from sqlalchemy_partpool.migrate_status import format_migration_status
from sqlalchemy_partpool.testing import scratch_partitions

ALEMBIC_INI = Path(__file__).resolve().parents[1] / "alembic.ini"


def main(partitions: dict[str, str]) -> None:
    config = ShardedConfig.build(partitions, min_connections=1, max_connections=4)

    print("\n== 1. every partition to revision 0001 (the widget table), one after another")
    upgrade(config, "0001", alembic_config=ALEMBIC_INI, jobs=1)

    with create_sharded_engine(config) as sharded:
        for widget_id, name in enumerate(["sprocket", "gear", "cog", "flange", "bolt", "nut"]):
            with sharded.begin(key=widget_id) as conn:
                conn.execute(
                    text("INSERT INTO widget (id, name) VALUES (:id, :name)"),
                    {"id": widget_id, "name": name},
                )
        print(f"wrote 6 widgets, routed by id over {len(partitions)} partitions")

    print("\n== 2. roll out 0002 and 0003 to all partitions, 4 at a time")
    report = upgrade(config, "head", alembic_config=ALEMBIC_INI, jobs=4)
    assert report.ok, report.summary()

    print("\n== 3. status: each partition's revision, and drift")
    print(format_migration_status(status(config, alembic_config=ALEMBIC_INI)))

    with create_sharded_engine(config) as sharded:
        with sharded.connect(key=3) as conn:
            row = conn.execute(text("SELECT name, color FROM widget WHERE id = 3")).one()
        print(
            f"\nwidget 3 lives on {sharded.partition_for(3)}: {row.name!r}, "
            f"color backfilled to {row.color!r}"
        )


if __name__ == "__main__":
    with scratch_partitions(4, prefix="partpool_rollout", announce=True) as urls:
        main(urls)
