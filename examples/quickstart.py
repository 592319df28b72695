"""Quick start: partitions with min/max pools, rows routed by key, pool figures.

    python examples/quickstart.py

Creates four scratch databases on the server named by PARTPOOL_URL (an admin
URL such as postgresql://postgres@127.0.0.1/postgres), or on an embedded
throwaway server when PARTPOOL_URL is not set, and removes them at the end.
"""

from __future__ import annotations

from sqlalchemy import text

from sqlalchemy_partpool import create_sharded_engine
from sqlalchemy_partpool.testing import scratch_partitions


def main(partitions: dict[str, str]) -> None:
    # min_connections are opened now, on all partitions in parallel;
    # max_connections is a hard ceiling per partition.
    with create_sharded_engine(partitions, min_connections=1, max_connections=5) as sharded:
        for _, engine in sharded.engines():
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE account (id int PRIMARY KEY, owner text)"))

        # Every write goes to the partition that owns its key.
        for account_id, owner in enumerate(["ada", "grace", "edsger", "barbara", "donald"]):
            with sharded.begin(key=account_id) as conn:
                conn.execute(
                    text("INSERT INTO account VALUES (:id, :owner)"),
                    {"id": account_id, "owner": owner},
                )

        # ... and so does every read by key.
        with sharded.connect(key=3) as conn:
            owner = conn.execute(text("SELECT owner FROM account WHERE id = 3")).scalar_one()
        print(f"account 3 lives on {sharded.partition_for(3)} and belongs to {owner}")

        for name, engine in sharded.engines():
            with engine.connect() as conn:
                ids = conn.execute(text("SELECT id FROM account ORDER BY id")).scalars().all()
            snap = sharded.stats()[name]
            print(
                f"{name}: accounts {ids}; pool open={snap.open} idle={snap.idle} "
                f"checkouts={snap.checkouts}"
            )


if __name__ == "__main__":
    with scratch_partitions(4, prefix="partpool_quickstart", announce=True) as urls:
        main(urls)
