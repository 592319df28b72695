"""The psycopg2.pool recipe, before and after: the code of docs/migrating-from-psycopg2-pool.md.

    python examples/psycopg2_migration.py

Runs the "before" version (one psycopg2 ThreadedConnectionPool per partition and
a hand-written routing function) and the "after" version (one
PartitionedConnectionPool) on the same scratch databases, and checks that both
put every row where the routing function says.
"""

from __future__ import annotations

from psycopg2.pool import ThreadedConnectionPool
from sqlalchemy.engine import make_url

from sqlalchemy_partpool import PartitionedConnectionPool
from sqlalchemy_partpool.testing import scratch_partitions


def partition_for(customer_id: int) -> str:
    return "p0" if customer_id % 2 == 0 else "p1"


def before(dsns: dict[str, str]) -> None:
    pools = {name: ThreadedConnectionPool(1, 10, dsn) for name, dsn in dsns.items()}
    try:
        for customer_id in range(10):
            pool = pools[partition_for(customer_id)]
            conn = pool.getconn()
            try:
                cur = conn.cursor()
                cur.execute("INSERT INTO notes VALUES (%s, %s)", (customer_id, "before"))
                conn.commit()
            finally:
                pool.putconn(conn)
    finally:
        for pool in pools.values():
            pool.closeall()


def after(dsns: dict[str, str]) -> dict[str, list[int]]:
    # The same DSNs and the same routing function, now behind one pool.
    pool = PartitionedConnectionPool(1, 10, partitions=dsns, router=partition_for)
    try:
        for customer_id in range(10, 20):
            with pool.connection(key=customer_id) as conn:
                cur = conn.cursor()
                cur.execute("INSERT INTO notes VALUES (%s, %s)", (customer_id, "after"))
                conn.commit()
        placed = {}
        for name in dsns:
            with pool.connection(partition=name) as conn, conn.cursor() as cur:
                cur.execute("SELECT customer_id FROM notes ORDER BY customer_id")
                placed[name] = [row[0] for row in cur.fetchall()]
        return placed
    finally:
        pool.closeall()


def libpq_dsn(url: str) -> str:
    u = make_url(url)
    return f"host={u.host} port={u.port} dbname={u.database} user={u.username}"


def main(urls: dict[str, str]) -> None:
    dsns = {name: libpq_dsn(url) for name, url in urls.items()}
    for dsn in dsns.values():
        pool = ThreadedConnectionPool(1, 1, dsn)
        conn = pool.getconn()
        conn.cursor().execute("CREATE TABLE notes (customer_id int, body text)")
        conn.commit()
        pool.putconn(conn)
        pool.closeall()
    before(dsns)
    placed = after(dsns)
    for name, ids in placed.items():
        assert all(partition_for(i) == name for i in ids), (name, ids)
        print(f"{name}: customers {ids}")
    assert sorted(placed["p0"] + placed["p1"]) == list(range(20))
    print("before and after agree: every row is on the partition partition_for() names")


if __name__ == "__main__":
    with scratch_partitions(2, prefix="partpool_migration", announce=True) as urls:
        main(urls)
