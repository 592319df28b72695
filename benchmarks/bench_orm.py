"""W5 ORM: get() by primary key, a select filtered by shard key, and 1000-row inserts.

One model, ``Item``, whose primary key ``(tenant_id, id)`` holds the shard key
``tenant_id``.  Four partitions hold the tenants the router gives them
(1,000 tenants x 4 items in full mode, 50 x 4 in quick mode); a fifth
database, ``single``, holds all of them for the unsharded baseline.

Sessions, each built once with ``sessionmaker`` and opened fresh for every
operation (so the identity map never answers instead of the database):

``plain`` (baseline)
    a plain :class:`~sqlalchemy.orm.Session` on one engine (``single``);
``sa-sharded``
    SQLAlchemy's own ``ShardedSession`` over a plain engine per partition, with
    hand-written choosers: a tenant -> partition table, and an
    ``execute_chooser`` that looks for ``tenant_id = value`` in the WHERE clause
    (as SQLAlchemy's sharding example does, also reading the values of
    ``session.get()``'s parameters, so that get() asks one shard);
``ours``
    :class:`sqlalchemy_partpool.ShardedSession` on a :class:`.ShardedEngine`
    (choosers from ``__shard_key__``).

Cases:

``orm-get``
    ``session.get(Item, (tenant, id))`` for a random stored item;
``orm-select``
    ``select(Item).where(Item.tenant_id == t).order_by(Item.id)``: 4 objects;
``orm-insert``
    1,000 new objects whose tenants take the partitions in turn (p0, p1, p2,
    p3, p0, ...), ``session.add_all`` + ``commit``;
``orm-bulk-insert``
    the same rows as dicts, ``session.execute(insert(Item), rows)`` + ``commit``:
    ``plain-bulk`` (baseline) and ``ours-bulk``.  (SQLAlchemy's ShardedSession is
    left out: its bulk INSERT would go to every shard its chooser names.)

The checks verify that every session reads the same objects and that every
inserted row landed on its tenant's partition (on ``single`` for the plain
session), and count round trips per operation through a relay.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from functools import partial
from typing import Any

from sqlalchemy import BigInteger, Integer, Text, create_engine, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.horizontal_shard import ShardedSession as SAShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import BinaryExpression, BindParameter

from sqlalchemy_partpool import ShardedSession, create_sharded_engine

from .bench_reads import RoundTripCounter, count_round_trips
from .harness import BenchContext, BenchmarkError, Case, Variant, register

__all__ = ["Item", "orm"]

PARTITIONS = 4
ITEMS_PER_TENANT = 4
TENANTS_FULL = 1_000
TENANTS_QUICK = 50
INSERT_ROWS_FULL = 1_000
INSERT_ROWS_QUICK = 100
#: Reads whose round trips are counted per session in the checks.
COUNTED_READS = 20
#: Operations run before counting, so that every partition's connection is open.
WARM_OPS = 40
#: New rows get ids from here on, so that they never collide with the loaded ones.
FIRST_NEW_ID = 1_000_000_000
POOL_SIZE = 5
#: Operations per round in full mode (quick mode calibrates): fixed, because a
#: single calibrating call is mostly noise; every session's share of a round
#: lasts 0.1-0.4 s.
OPS = {"orm-get": 500, "orm-select": 300, "orm-insert": 3, "orm-bulk-insert": 10}


class Base(DeclarativeBase):
    """Declarative base of the benchmark's model."""


class Item(Base):
    """A tenant's item; the tenant is the shard key and leads the primary key."""

    __tablename__ = "orm_items"
    __shard_key__ = "tenant_id"

    tenant_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(Integer)


def _as_tuple(item: Item) -> tuple[int, int, str, int]:
    return (item.tenant_id, item.id, item.name, item.amount)


# -- the sessions ---------------------------------------------------------------------------


def _tenant_of_criteria(statement: Any, parameters: Any = None) -> int | None:
    """The value of ``tenant_id = <value>`` in a statement's WHERE clause, if any.

    The bound value is the parameter's own, or, for ``session.get()`` (whose
    primary key criterion has value-less parameters), the execution's.
    """
    where = getattr(statement, "whereclause", None)
    if where is None:
        return None
    found: list[int] = []

    def visit_binary(binary: BinaryExpression[Any]) -> None:
        right = binary.right
        if (
            binary.operator is operators.eq
            and getattr(binary.left, "key", None) == "tenant_id"
            and isinstance(right, BindParameter)
        ):
            value = right.effective_value
            if value is None and isinstance(parameters, dict):
                value = parameters.get(right.key)
            if value is not None:
                found.append(int(value))

    visitors.traverse(where, {}, {"binary": visit_binary})
    return found[0] if found else None


def _sa_sharded_maker(
    urls: Mapping[str, str], home: Mapping[int, str]
) -> tuple[sessionmaker[Any], Callable[[], None]]:
    """SQLAlchemy's ShardedSession with hand-written choosers, as its documentation shows."""
    engines = {
        name: create_engine(url, pool_size=POOL_SIZE, max_overflow=0) for name, url in urls.items()
    }
    everywhere = list(engines)

    def shard_chooser(mapper: Any, instance: Any, clause: Any = None, **kw: Any) -> str:
        if instance is not None:
            return home[instance.tenant_id]
        tenant = _tenant_of_criteria(clause)
        if tenant is None:
            raise BenchmarkError("sa-sharded: no tenant to choose a shard by")
        return home[tenant]

    def identity_chooser(mapper: Any, primary_key: Any, **kw: Any) -> list[str]:
        return [home[primary_key[0]]]

    def execute_chooser(orm_context: Any) -> list[str]:
        tenant = _tenant_of_criteria(orm_context.statement, orm_context.parameters)
        return [home[tenant]] if tenant is not None else everywhere

    maker: sessionmaker[Any] = sessionmaker(
        class_=SAShardedSession,
        shard_chooser=shard_chooser,
        identity_chooser=identity_chooser,
        execute_chooser=execute_chooser,
        shards=engines,
    )

    def close() -> None:
        for engine in engines.values():
            engine.dispose()

    return maker, close


def _makers(
    urls: Mapping[str, str], single: str, home: Mapping[int, str]
) -> dict[str, tuple[sessionmaker[Any], Callable[[], None]]]:
    """name -> (sessionmaker, close) for the three sessions."""
    plain_engine = create_engine(single, pool_size=POOL_SIZE, max_overflow=0)
    sharded = create_sharded_engine(dict(urls), max_connections=POOL_SIZE)
    return {
        "plain": (sessionmaker(plain_engine), plain_engine.dispose),
        "sa-sharded": _sa_sharded_maker(urls, home),
        "ours": (sessionmaker(class_=ShardedSession, sharded=sharded), sharded.dispose),
    }


# -- operations -----------------------------------------------------------------------------


def _get(maker: sessionmaker[Any], keys: Iterator[tuple[int, int]]) -> tuple[Any, ...]:
    with maker() as session:
        item = session.get(Item, next(keys))
        assert item is not None
        return _as_tuple(item)


def _select(maker: sessionmaker[Any], tenants: Iterator[int]) -> list[tuple[Any, ...]]:
    tenant = next(tenants)
    with maker() as session:
        found = session.scalars(select(Item).where(Item.tenant_id == tenant).order_by(Item.id))
        return [_as_tuple(item) for item in found]


class _NewRows:
    """Blocks of new rows whose tenants take the partitions in turn; ids never repeat."""

    def __init__(self, alternating: Sequence[int], size: int) -> None:
        self.alternating = alternating
        self.size = size
        self._first_ids = itertools.count(FIRST_NEW_ID, size)

    def next_block(self) -> list[dict[str, Any]]:
        first = next(self._first_ids)
        return [
            {"tenant_id": tenant, "id": first + i, "name": f"new-{first + i}", "amount": i}
            for i, tenant in enumerate(self.alternating[: self.size])
        ]


def _add_all(maker: sessionmaker[Any], rows: _NewRows) -> int:
    block = rows.next_block()
    with maker() as session:
        session.add_all([Item(**row) for row in block])
        session.commit()
    return block[0]["id"]


def _bulk(maker: sessionmaker[Any], rows: _NewRows) -> int:
    block = rows.next_block()
    with maker() as session:
        session.execute(insert(Item), block)
        session.commit()
    return block[0]["id"]


# -- set-up and checks ----------------------------------------------------------------------


def _load(
    urls: Mapping[str, str], single: str, tenants: int
) -> tuple[dict[int, str], list[tuple[int, int, str, int]]]:
    """Create and fill the tables; returns tenant -> partition and every stored row."""
    rows = [
        {"tenant_id": t, "id": t * ITEMS_PER_TENANT + j, "name": f"item-{t}-{j}", "amount": j}
        for t in range(1, tenants + 1)
        for j in range(ITEMS_PER_TENANT)
    ]
    with create_sharded_engine(dict(urls), max_connections=2) as loader:
        for _, engine in loader.engines():
            with engine.begin() as conn:
                Base.metadata.create_all(conn)
        loader.execute_all(insert(Item.__table__), rows, key="tenant_id")
        home = {t: loader.partition_for(t) for t in range(1, tenants + 1)}
    engine = create_engine(single, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
            conn.execute(insert(Item.__table__), rows)
    finally:
        engine.dispose()
    for url in [*urls.values(), single]:
        engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text("VACUUM ANALYZE orm_items"))
        finally:
            engine.dispose()
    stored = [(r["tenant_id"], r["id"], r["name"], r["amount"]) for r in rows]
    return home, stored


def _alternating(home: Mapping[int, str], names: Sequence[str], size: int) -> list[int]:
    """*size* tenants whose partitions follow p0, p1, p2, p3, p0, ..."""
    by_partition = {name: [t for t, p in sorted(home.items()) if p == name] for name in names}
    return [
        by_partition[names[i % len(names)]][(i // len(names)) % len(by_partition[names[0]])]
        for i in range(size)
    ]


class _Placement:
    """Looks at where inserted rows landed, through unpooled engines."""

    def __init__(self, urls: Mapping[str, str], single: str) -> None:
        self.engines: dict[str, Engine] = {
            name: create_engine(url, poolclass=NullPool)
            for name, url in {**urls, "single": single}.items()
        }

    def tenants(self, first_id: int, size: int) -> dict[str, list[int]]:
        found = {}
        for name, engine in self.engines.items():
            with engine.connect() as conn:
                found[name] = list(
                    conn.execute(
                        text("SELECT tenant_id FROM orm_items WHERE id BETWEEN :a AND :b"),
                        {"a": first_id, "b": first_id + size - 1},
                    ).scalars()
                )
        return found

    def verify(self, who: str, first_id: int, size: int, home: Mapping[int, str] | None) -> None:
        found = self.tenants(first_id, size)
        total = sum(len(v) for v in found.values())
        if total != size:
            raise BenchmarkError(f"{who} inserted {total} rows, not {size}")
        for name, tenants in found.items():
            for tenant in tenants:
                want = "single" if home is None else home[tenant]
                if name != want:
                    raise BenchmarkError(
                        f"{who} put a row of tenant {tenant} on {name}, not {want}"
                    )

    def close(self) -> None:
        for engine in self.engines.values():
            engine.dispose()


@register(
    "orm",
    "W5: ORM get() / select by key / 1000-row alternating insert: plain Session on one "
    "database (baseline), SQLAlchemy's ShardedSession, ours",
)
def orm(ctx: BenchContext) -> Iterator[Case]:
    """Cases ``orm-get``, ``orm-select``, ``orm-insert`` and ``orm-bulk-insert``."""
    tenants = TENANTS_QUICK if ctx.quick else TENANTS_FULL
    size = INSERT_ROWS_QUICK if ctx.quick else INSERT_ROWS_FULL
    with ctx.partitions(PARTITIONS + 1, prefix="partpool_bench_orm") as all_urls:
        names = [f"p{i}" for i in range(PARTITIONS)]
        urls = {name: all_urls[name] for name in names}
        single = all_urls[f"p{PARTITIONS}"]
        ctx.say(f"orm: loading {tenants} tenants x {ITEMS_PER_TENANT} items")
        home, stored = _load(urls, single, tenants)
        alternating = _alternating(home, names, size)
        rng = random.Random(5)
        sample = [rng.choice(stored) for _ in range(2_000)]
        by_key = {(r[0], r[1]): r for r in stored}
        params = {
            "partitions": PARTITIONS,
            "tenants": tenants,
            "items_per_tenant": ITEMS_PER_TENANT,
            "pool_size": POOL_SIZE,
        }
        with ExitStack() as stack:
            makers = _makers(urls, single, home)
            for _, close in makers.values():
                stack.callback(close)
            placement = _Placement(urls, single)
            stack.callback(placement.close)

            def counted(op: Callable[[sessionmaker[Any]], object], n: int) -> str:
                """Round trips per operation of every session, through a relay."""
                counter = RoundTripCounter(single)
                parts = []
                try:
                    proxied = {name: counter.url_for(url) for name, url in urls.items()}
                    for name, (maker, close) in _makers(
                        proxied, counter.url_for(single), home
                    ).items():
                        try:
                            # first enough operations that every partition has its
                            # connection open (and SQLAlchemy its dialect initialised)
                            per_op = count_round_trips(
                                counter,
                                lambda m=maker: [op(m) for _ in range(WARM_OPS)],
                                partial(op, maker),
                                n,
                            )
                        finally:
                            close()
                        parts.append(f"{name} {per_op:.2f}")
                finally:
                    counter.close()
                return ", ".join(parts)

            # -- get
            def check_get() -> str:
                for key in [(r[0], r[1]) for r in sample[:30]]:
                    for name, (maker, _) in makers.items():
                        got = _get(maker, iter([key]))
                        if got != by_key[key]:
                            raise BenchmarkError(
                                f"{name} got {got!r} for {key}, not {by_key[key]!r}"
                            )
                keys = itertools.cycle([(r[0], r[1]) for r in sample])
                trips = counted(lambda m: _get(m, keys), COUNTED_READS)
                return f"same objects from every session for 30 keys; round trips per get: {trips}"

            yield Case(
                name="orm-get",
                variants=[
                    Variant(
                        name,
                        partial(_get, maker, itertools.cycle([(r[0], r[1]) for r in sample])),
                        f"{name}: fresh session, session.get(Item, (tenant, id))",
                    )
                    for name, (maker, _) in makers.items()
                ],
                baseline="plain",
                params=params,
                ops_per_round=None if ctx.quick else OPS["orm-get"],
                check=check_get,
            )

            # -- select by shard key
            tenant_sample = [r[0] for r in sample]

            def check_select() -> str:
                for tenant in tenant_sample[:30]:
                    want = sorted(r for r in stored if r[0] == tenant)
                    for name, (maker, _) in makers.items():
                        got = _select(maker, iter([tenant]))
                        if got != want:
                            raise BenchmarkError(f"{name} selected {got!r} for tenant {tenant}")
                tenants_cycle = itertools.cycle(tenant_sample)
                trips = counted(lambda m: _select(m, tenants_cycle), COUNTED_READS)
                return (
                    f"same {ITEMS_PER_TENANT} objects per tenant from every session for 30 "
                    f"tenants; round trips per select: {trips}"
                )

            yield Case(
                name="orm-select",
                variants=[
                    Variant(
                        name,
                        partial(_select, maker, itertools.cycle(tenant_sample)),
                        f"{name}: fresh session, select(Item).where(Item.tenant_id == t)",
                    )
                    for name, (maker, _) in makers.items()
                ],
                baseline="plain",
                params=params,
                ops_per_round=None if ctx.quick else OPS["orm-select"],
                check=check_select,
            )

            # -- inserts
            new_rows = _NewRows(alternating, size)

            def check_insert(ops: Mapping[str, Callable[[], int]]) -> str:
                for name, op in ops.items():
                    first = op()
                    placement.verify(name, first, size, None if name.startswith("plain") else home)
                return f"every variant put its {size} rows on the right databases"

            inserts = {
                name: partial(_add_all, maker, new_rows) for name, (maker, _) in makers.items()
            }

            def check_add_all() -> str:
                placed = check_insert(inserts)
                trips = counted(lambda m: _add_all(m, new_rows), 1)
                return f"{placed}; round trips per insert: {trips}"

            yield Case(
                name="orm-insert",
                variants=[
                    Variant(name, op, f"{name}: {size} objects, add_all + commit")
                    for name, op in inserts.items()
                ],
                baseline="plain",
                params={**params, "rows_per_insert": size, "partition_order": "p0,p1,p2,p3,p0,..."},
                ops_per_round=None if ctx.quick else OPS["orm-insert"],
                check=check_add_all,
            )

            bulk = {
                "plain-bulk": partial(_bulk, makers["plain"][0], new_rows),
                "ours-bulk": partial(_bulk, makers["ours"][0], new_rows),
            }

            def check_bulk() -> str:
                placed = check_insert(bulk)
                counter = RoundTripCounter(single)
                parts = []
                try:
                    proxied = {name: counter.url_for(url) for name, url in urls.items()}
                    built = _makers(proxied, counter.url_for(single), home)
                    try:
                        for name, source in (("plain-bulk", "plain"), ("ours-bulk", "ours")):
                            maker = built[source][0]
                            per_op = count_round_trips(
                                counter,
                                partial(_bulk, maker, new_rows),
                                partial(_bulk, maker, new_rows),
                                1,
                            )
                            parts.append(f"{name} {per_op:.2f}")
                    finally:
                        for _, close in built.values():
                            close()
                finally:
                    counter.close()
                return f"{placed}; round trips per insert: {', '.join(parts)}"

            yield Case(
                name="orm-bulk-insert",
                variants=[
                    Variant(name, op, f"{name}: {size} rows, session.execute(insert(Item), rows)")
                    for name, op in bulk.items()
                ],
                baseline="plain-bulk",
                params={**params, "rows_per_insert": size, "partition_order": "p0,p1,p2,p3,p0,..."},
                ops_per_round=None if ctx.quick else OPS["orm-bulk-insert"],
                check=check_bulk,
            )
