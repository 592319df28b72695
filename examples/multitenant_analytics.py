"""Multi-tenant analytics: tenants spread over partitions, read one by one and all at once.

    python examples/multitenant_analytics.py

Creates four scratch databases on the server named by PARTPOOL_URL (an admin
URL such as postgresql://postgres@127.0.0.1/postgres), or on an embedded
throwaway server when PARTPOOL_URL is not set, and removes them at the end.

Shows, on an ``events`` table whose ``tenant`` column is the shard key:

* rows inserted with one ``execute_all(insert(events), rows)``, split by tenant;
* a tenant's own figures with ``execute(..., key=tenant)`` (one partition);
* a cross-tenant top-N (ORDER BY + LIMIT) and totals (GROUP BY) with
  ``execute_all``, merged into the same answer one database would give;
* ``tag_partition=True``, naming the partition each row came from;
* ``on_error="partial"`` during a rolling migration that has not reached
  every partition yet: the partitions that can answer do.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    func,
    insert,
    select,
    text,
)

from sqlalchemy_partpool import ShardedEngine, create_sharded_engine
from sqlalchemy_partpool.testing import scratch_partitions

metadata = MetaData()

events = Table(
    "events",
    metadata,
    # execute_all(insert(events), rows) reads the shard key from this column
    Column("tenant", Text, nullable=False, info={"shard_key": True}),
    Column("id", Integer, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("amount", Numeric(10, 2), nullable=False),
    Column("at", DateTime, nullable=False),
)

TENANTS = [
    "acme", "aperture", "cyberdyne", "globex", "hooli", "initech",
    "soylent", "stark", "tyrell", "umbrella", "wayne", "wonka",
]  # fmt: skip
KINDS = ["signup", "purchase", "renewal", "refund"]


def make_events(count: int, seed: int = 2024) -> list[dict[str, Any]]:
    """*count* deterministic events for the tenants; ids are unique across tenants."""
    rng = random.Random(seed)
    start = datetime(2025, 1, 1)
    return [
        {
            "tenant": rng.choice(TENANTS),
            "id": number,
            "kind": rng.choice(KINDS),
            "amount": Decimal(rng.randint(100, 50_000)) / 100,
            "at": start + timedelta(minutes=rng.randint(0, 90 * 24 * 60)),
        }
        for number in range(1, count + 1)
    ]


def section(title: str) -> None:
    print(f"\n== {title}")


def main(partitions: dict[str, str]) -> None:
    with create_sharded_engine(partitions, min_connections=1, max_connections=4) as sharded:
        for _, engine in sharded.engines():
            metadata.create_all(engine)

        section("Where the tenants live")
        for name in sharded.partitions:
            here = [t for t in TENANTS if sharded.partition_for(t) == name]
            print(f"{name}: {', '.join(here)}")

        rows = make_events(1200)
        written = sharded.execute_all(insert(events), rows)
        assert written.rowcount == len(rows)
        print(f"\nInserted {written.rowcount} events, split by tenant, one batch per partition:")
        print("  " + ", ".join(f"{p}={n}" for p, n in written.rowcounts.items()))

        per_tenant = tenant_reads(sharded)
        top_spenders(sharded, rows)
        totals(sharded, per_tenant)
        latest_with_partition(sharded)
        rolling_migration(sharded)


def tenant_reads(sharded: ShardedEngine) -> dict[str, tuple[int, Decimal]]:
    """Each tenant's own figures, read from its partition only."""
    section("Per tenant: execute(..., key=tenant) reads one partition")
    figures: dict[str, tuple[int, Decimal]] = {}
    print(f"{'tenant':<10} {'partition':<9} {'events':>6} {'amount':>10}")
    for tenant in TENANTS:
        stmt = select(func.count(), func.coalesce(func.sum(events.c.amount), 0)).where(
            events.c.tenant == tenant
        )
        count, amount = sharded.execute(stmt, key=tenant).one()
        figures[tenant] = (count, amount)
        print(f"{tenant:<10} {sharded.partition_for(tenant):<9} {count:>6} {amount:>10}")
    return figures


def top_spenders(sharded: ShardedEngine, rows: list[dict[str, Any]]) -> None:
    """The five largest events across all tenants: ORDER BY + LIMIT, merged."""
    section("Top 5 events across tenants: ORDER BY amount DESC LIMIT 5 on every partition")
    stmt = (
        select(events.c.id, events.c.tenant, events.c.kind, events.c.amount)
        .order_by(events.c.amount.desc(), events.c.id)
        .limit(5)
    )
    top = sharded.execute_all(stmt).all()
    for event_id, tenant, kind, amount in top:
        print(f"#{event_id:<5} {tenant:<10} {kind:<9} {amount:>8}")
    expected = sorted(rows, key=lambda r: (-r["amount"], r["id"]))[:5]
    assert [r[0] for r in top] == [r["id"] for r in expected], "top-5 differs from the data"


def totals(sharded: ShardedEngine, per_tenant: dict[str, tuple[int, Decimal]]) -> None:
    """Totals by kind and by tenant: GROUP BY re-aggregated across partitions."""
    section("Totals by kind: GROUP BY, re-aggregated across partitions")
    by_kind = sharded.execute_all(
        select(
            events.c.kind,
            func.count().label("events"),
            func.sum(events.c.amount).label("total"),
            func.avg(events.c.amount).label("mean"),
        ).group_by(events.c.kind)
    ).all()
    print(f"{'kind':<9} {'events':>6} {'total':>10} {'mean':>8}")
    for kind, count, total, mean in sorted(by_kind):
        print(f"{kind:<9} {count:>6} {total:>10} {mean:>8.2f}")

    # Cross-checks: the merged totals equal the sum of the per-tenant reads ...
    assert sum(r.events for r in by_kind) == sum(c for c, _ in per_tenant.values())
    assert sum(r.total for r in by_kind) == sum(a for _, a in per_tenant.values())
    # ... and GROUP BY tenant across partitions equals each tenant's own read.
    by_tenant = sharded.execute_all(
        select(events.c.tenant, func.count(), func.sum(events.c.amount)).group_by(events.c.tenant)
    ).all()
    assert {t: (c, a) for t, c, a in by_tenant} == {t: v for t, v in per_tenant.items() if v[0] > 0}
    print("cross-check: merged totals == sum of per-tenant reads, for every tenant too")


def latest_with_partition(sharded: ShardedEngine) -> None:
    """The latest events, each with the partition it came from."""
    section("Latest events, tag_partition=True names each row's partition")
    latest = sharded.execute_all(
        select(events.c.at, events.c.id, events.c.tenant)
        .order_by(events.c.at.desc(), events.c.id)
        .limit(4),
        tag_partition=True,
    )
    for at, event_id, tenant, partition in latest:
        print(f"{at:%Y-%m-%d %H:%M}  #{event_id:<5} {tenant:<10} from {partition}")
        assert partition == sharded.partition_for(tenant)


def rolling_migration(sharded: ShardedEngine) -> None:
    """A column added on some partitions only: on_error="partial" answers from the others."""
    section('Rolling migration: on_error="partial" while one partition lags behind')
    names = list(sharded.partitions)
    lagging = names[-1]
    for name in names[:-1]:
        with sharded.begin(partition=name) as conn:
            conn.execute(text("ALTER TABLE events ADD COLUMN channel text NOT NULL DEFAULT 'web'"))
    print(f"column 'channel' added on {', '.join(names[:-1])}; not yet on {lagging}")

    # The table as the new release sees it.
    events_v2 = Table("events", MetaData(), Column("tenant", Text), Column("channel", Text))
    stmt = select(func.count()).select_from(events_v2).where(events_v2.c.channel == "web")
    result = sharded.execute_all(stmt, on_error="partial")
    web = result.scalar_one()
    answered_by = ", ".join(result.partition_names)
    print(f"web events on the partitions that answered ({answered_by}): {web}")
    for name, exc in result.errors.items():
        print(f"  {name} failed: {sharded.describe_error(name, exc)}")
    assert not result.complete
    assert set(result.errors) == {lagging}
    answered = select(func.count()).select_from(events)
    assert web == sum(sharded.execute(answered, partition=n).scalar_one() for n in names[:-1])

    with sharded.begin(partition=lagging) as conn:
        conn.execute(text("ALTER TABLE events ADD COLUMN channel text NOT NULL DEFAULT 'web'"))
    complete = sharded.execute_all(stmt, on_error="partial")
    assert complete.complete
    print(f"after migrating {lagging}: {complete.scalar_one()} web events, all partitions answered")


if __name__ == "__main__":
    with scratch_partitions(4, prefix="partpool_multitenant", announce=True) as urls:
        main(urls)
