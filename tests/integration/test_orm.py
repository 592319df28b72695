"""The ORM ShardedSession on real partitions: routing, merging, bulk, relationships, errors."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import (
    ForeignKey,
    String,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool import (
    DuplicateIdentity,
    PinViolation,
    RoutingError,
    ShardedSession,
    ShardKeyChanged,
    ShardKeyMissing,
    UnknownPartition,
    UnmergeableStatement,
    create_sharded_engine,
    set_shard_id,
)


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __shard_key__ = "id"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    country_code: Mapped[str | None] = mapped_column(ForeignKey("countries.code"), default=None)
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "orders"
    __shard_key__ = "customer_id"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    total: Mapped[int]
    status: Mapped[str] = mapped_column(String(10), default="new")
    customer: Mapped[Customer] = relationship(back_populates="orders")
    lines: Mapped[list[OrderLine]] = relationship(back_populates="order")


class OrderLine(Base):
    __tablename__ = "order_lines"
    __shard_key__ = "order"  # follows its order's partition
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    sku: Mapped[str] = mapped_column(String(20))
    order: Mapped[Order] = relationship(back_populates="lines")


class Visit(Base):
    """Shard key in the primary key: get() routes by key."""

    __tablename__ = "visits"
    __shard_key__ = "customer_id"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[int] = mapped_column(primary_key=True)


class Country(Base):
    __tablename__ = "countries"
    __reference_table__ = True
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Loose(Base):
    """Says nothing about where it lives."""

    __tablename__ = "loose"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
def orm(make_databases):
    urls = make_databases(4)
    sharded = create_sharded_engine(
        {f"p{i}": url for i, url in enumerate(urls)}, min_connections=1, max_connections=5
    )
    for _, engine in sharded.engines():
        Base.metadata.create_all(engine)
    statements: dict[str, list[str]] = {name: [] for name in sharded.partitions}
    for name, engine in sharded.engines():
        event.listen(
            engine,
            "before_cursor_execute",
            lambda c, cur, stmt, params, ctx, many, _n=name: statements[_n].append(stmt),
        )
    yield sharded, urls, statements
    sharded.dispose()


def direct_count(url: str, table: str) -> int:
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        count = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
    engine.dispose()
    return int(count)


def populate(sharded, customers: int = 12, orders_each: int = 3) -> None:
    with ShardedSession(sharded) as session:
        for c in range(1, customers + 1):
            customer = Customer(id=c, name=f"customer {c}")
            session.add(customer)
            for j in range(orders_each):
                order = Order(id=c * 100 + j, customer=customer, total=(c * 37 + j * 11) % 50)
                session.add(order)
                session.add(OrderLine(id=(c * 100 + j) * 10, order=order, sku=f"sku-{j}"))
        session.commit()


def touched(statements: dict[str, list[str]]) -> set[str]:
    return {name for name, stmts in statements.items() if stmts}


def reset(statements: dict[str, list[str]]) -> None:
    for stmts in statements.values():
        stmts.clear()


def test_objects_are_written_to_the_partition_of_their_key(orm):
    sharded, urls, _ = orm
    populate(sharded)
    expected = Counter(sharded.partition_for(c) for c in range(1, 13))
    for i, url in enumerate(urls):
        name = f"p{i}"
        assert direct_count(url, "customers") == expected[name]
        assert direct_count(url, "orders") == 3 * expected[name]
        assert direct_count(url, "order_lines") == 3 * expected[name]  # lines follow orders


def test_add_all_alternating_partitions_stays_one_batch_per_partition(orm):
    sharded, _, statements = orm
    with ShardedSession(sharded) as session:
        session.add_all([Customer(id=i, name=f"c{i}") for i in range(1, 201)])
        reset(statements)
        session.commit()
    for name, stmts in statements.items():
        inserts = [s for s in stmts if s.lstrip().upper().startswith("INSERT")]
        assert len(inserts) == 1, (name, len(inserts))


def test_get_with_the_key_in_the_primary_key_asks_one_partition(orm):
    sharded, _, statements = orm
    with ShardedSession(sharded) as session:
        session.add_all([Visit(customer_id=c, day=d) for c in range(1, 9) for d in (1, 2)])
        session.commit()
    with ShardedSession(sharded) as session:
        reset(statements)
        visit = session.get(Visit, (5, 2))
        assert visit is not None
        assert touched(statements) == {sharded.partition_for(5)}
        assert inspect(visit).key[2] == sharded.partition_for(5)


def test_get_without_the_key_searches_the_partitions_concurrently(orm):
    sharded, _, statements = orm
    populate(sharded)
    with ShardedSession(sharded) as session:
        reset(statements)
        order = session.get(Order, 703)
        assert order is None  # no such order
        assert touched(statements) == set(sharded.partitions)
        order = session.get(Order, 702)
        assert order.customer_id == 7
        assert inspect(order).key[2] == sharded.partition_for(7)
        # identity_token narrows it to one partition
        reset(statements)
        session.expunge_all()
        assert session.get(Order, 702, identity_token=sharded.partition_for(7)) is not None
        assert touched(statements) == {sharded.partition_for(7)}


def test_a_key_found_on_two_partitions_is_an_error_naming_both(orm):
    sharded, _, _ = orm
    populate(sharded, customers=4, orders_each=0)
    # the same order id on two partitions, as after a botched data move
    first, second = sharded.partition_for(1), sharded.partition_for(2)
    assert first != second
    for customer, partition in ((1, first), (2, second)):
        with sharded.engine(partition).begin() as conn:
            conn.execute(text("INSERT INTO orders VALUES (999, :c, 1, 'new')"), {"c": customer})
    with ShardedSession(sharded) as session, pytest.raises(DuplicateIdentity) as info:
        session.get(Order, 999)
    assert set(info.value.partitions) == {first, second}
    assert first in str(info.value)
    assert second in str(info.value)


def test_get_by_routable_id_goes_to_one_partition(make_databases):
    urls = make_databases(4)
    sharded = create_sharded_engine({f"p{i}": u for i, u in enumerate(urls)}, min_connections=0)
    ids = sharded.id_generator(worker_id=3)

    class IdBase(DeclarativeBase):
        pass

    class Doc(IdBase):
        __tablename__ = "docs"
        __shard_key__ = "tenant"
        id: Mapped[int] = ids.mapped_column("tenant")
        tenant: Mapped[int]

    try:
        for _, engine in sharded.engines():
            IdBase.metadata.create_all(engine)
        with ShardedSession(sharded) as session:
            docs = [Doc(tenant=t) for t in range(20)]
            session.add_all(docs)
            session.commit()
            made = [(d.id, d.tenant) for d in docs]
        for doc_id, tenant in made:
            assert sharded.partition_for(tenant) == ids.partition_of(doc_id)
        with ShardedSession(sharded) as session:
            counts: dict[str, int] = {n: 0 for n in sharded.partitions}
            for name, engine in sharded.engines():
                event.listen(
                    engine,
                    "before_cursor_execute",
                    lambda *a, _n=name: counts.__setitem__(_n, counts[_n] + 1),
                )
            doc_id, tenant = made[7]
            assert session.get(Doc, doc_id).tenant == tenant
            assert sum(counts.values()) == 1
            assert counts[sharded.partition_for(tenant)] == 1
    finally:
        sharded.dispose()


def test_filtered_selects_are_narrowed_by_the_shard_key(orm):
    sharded, _, statements = orm
    populate(sharded)
    with ShardedSession(sharded) as session:
        reset(statements)
        rows = session.scalars(select(Order).where(Order.customer_id == 5)).all()
        assert {o.customer_id for o in rows} == {5}
        assert touched(statements) == {sharded.partition_for(5)}

        reset(statements)
        rows = session.scalars(select(Order).where(Order.customer_id.in_([2, 9]))).all()
        assert {o.customer_id for o in rows} == {2, 9}
        assert touched(statements) == {sharded.partition_for(2), sharded.partition_for(9)}

        reset(statements)
        rows = session.scalars(
            select(Order).where(or_(Order.customer_id == 3, Order.customer_id == 11))
        ).all()
        assert {o.customer_id for o in rows} == {3, 11}
        assert touched(statements) == {sharded.partition_for(3), sharded.partition_for(11)}

        reset(statements)
        rows = session.scalars(select(Order).where(Order.total > 10)).all()
        assert touched(statements) == set(sharded.partitions)


def test_multi_partition_queries_are_merged_correctly(orm):
    sharded, _, _ = orm
    populate(sharded)
    all_orders = sorted(
        ((c * 37 + j * 11) % 50, c * 100 + j) for c in range(1, 13) for j in range(3)
    )
    with ShardedSession(sharded) as session:
        top = session.scalars(select(Order).order_by(Order.total.desc(), Order.id).limit(5)).all()
        expected = sorted(all_orders, key=lambda t: (-t[0], t[1]))[:5]
        assert [(o.total, o.id) for o in top] == expected
        assert session.scalar(select(func.count()).select_from(Order)) == 36
        assert session.scalar(select(func.count(Order.id)).where(Order.total < 25)) == sum(
            1 for t, _ in all_orders if t < 25
        )
        assert session.scalar(select(func.sum(Order.total))) == sum(t for t, _ in all_orders)
        by_customer = session.execute(
            select(Order.customer_id, func.count(), func.max(Order.total))
            .group_by(Order.customer_id)
            .order_by(Order.customer_id)
        ).all()
        assert [tuple(r)[:2] for r in by_customer] == [(c, 3) for c in range(1, 13)]
        # ids in order, across partitions, with OFFSET applied after the merge
        ids = session.scalars(select(Order.id).order_by(Order.id.desc()).offset(3).limit(4)).all()
        assert ids == sorted((i for _, i in all_orders), reverse=True)[3:7]
        # the identity map stays consistent: a merged object is the session's object
        first = session.scalars(select(Order).order_by(Order.id).limit(1)).one()
        assert session.get(Order, first.id, identity_token=inspect(first).key[2]) is first


def test_updates_and_deletes_by_key_and_fanned_out(orm):
    sharded, _, statements = orm
    populate(sharded)
    with ShardedSession(sharded) as session:
        reset(statements)
        session.execute(update(Order).where(Order.customer_id == 4).values(status="paid"))
        assert touched(statements) == {sharded.partition_for(4)}
        session.execute(update(Order).where(Order.total >= 40).values(status="big"))
        session.execute(delete(OrderLine).where(OrderLine.sku == "sku-2"))
        session.commit()
    with ShardedSession(sharded) as session:
        statuses = Counter(session.scalars(select(Order.status)).all())
        assert statuses["paid"] + statuses["big"] + statuses["new"] == 36
        assert session.scalar(select(func.count()).select_from(OrderLine)) == 24
        paid = session.scalars(select(Order).where(Order.customer_id == 4)).all()
        assert all(o.status in ("paid", "big") for o in paid)


def test_relationships_and_lazy_loads_stay_on_the_parents_partition(orm):
    sharded, _, statements = orm
    populate(sharded)
    home = sharded.partition_for(6)
    with ShardedSession(sharded) as session:
        customer = session.get(Customer, 6, identity_token=home)
        reset(statements)
        orders = customer.orders  # lazy load
        assert {o.id for o in orders} == {600, 601, 602}
        assert touched(statements) == {home}
        reset(statements)
        lines = orders[0].lines
        assert len(lines) == 1
        assert lines[0].order is orders[0]
        assert touched(statements) == {home}
        reset(statements)
        assert orders[0].customer is customer  # many-to-one from the identity map
        assert touched(statements) == set()
    with ShardedSession(sharded) as session:
        customers = session.scalars(
            select(Customer).options(selectinload(Customer.orders)).order_by(Customer.id)
        ).all()
        assert [c.id for c in customers] == list(range(1, 13))
        assert all(len(c.orders) == 3 for c in customers)
        assert all(inspect(o).key[2] == inspect(c).key[2] for c in customers for o in c.orders)
    with ShardedSession(sharded) as session:
        customers = (
            session.scalars(select(Customer).options(joinedload(Customer.orders))).unique().all()
        )
        assert len(customers) == 12
        assert all(len(c.orders) == 3 for c in customers)


def test_bulk_inserts_route_row_by_row_and_stay_batched(orm):
    sharded, urls, statements = orm
    populate(sharded, customers=8, orders_each=0)
    rows = [{"id": 10_000 + i, "customer_id": i % 8 + 1, "total": i % 50} for i in range(400)]
    with ShardedSession(sharded) as session:
        reset(statements)
        session.execute(insert(Order), rows[:200])
        session.bulk_insert_mappings(Order, rows[200:300])
        session.bulk_save_objects([Order(**r) for r in rows[300:]])
        session.commit()
    per_partition = Counter(sharded.partition_for(r["customer_id"]) for r in rows)
    for i, url in enumerate(urls):
        assert direct_count(url, "orders") == per_partition[f"p{i}"]
    assert len([n for n in per_partition if per_partition[n]]) >= 2
    for name, stmts in statements.items():
        inserts = [s for s in stmts if s.lstrip().upper().startswith("INSERT")]
        # one batched INSERT per bulk call on every partition that got rows
        assert len(inserts) == (3 if per_partition[name] else 0), (name, len(inserts))


def test_rollback_across_partitions_writes_nothing(orm):
    sharded, urls, _ = orm
    with ShardedSession(sharded) as session:
        session.add_all([Customer(id=i, name="x") for i in range(1, 9)])
        session.flush()
        session.rollback()
    assert sum(direct_count(u, "customers") for u in urls) == 0


def test_two_phase_commit_across_partitions(orm, pg_server):
    sharded, urls, _ = orm
    with sharded.engine("p0").connect() as conn:
        if int(conn.execute(text("SHOW max_prepared_transactions")).scalar_one()) == 0:
            pytest.skip("the test server has max_prepared_transactions = 0")
    with ShardedSession(sharded, twophase=True) as session:
        session.add_all([Customer(id=i, name="2pc") for i in range(1, 9)])
        session.commit()
    assert sum(direct_count(u, "customers") for u in urls) == 8
    with sharded.engine("p0").connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_prepared_xacts")).scalar_one() == 0


def test_reference_tables_are_written_everywhere_and_read_from_one(orm):
    sharded, urls, statements = orm
    with ShardedSession(sharded) as session:
        session.add_all([Country(code="fr", name="France"), Country(code="jp", name="Japan")])
        session.commit()
    assert [direct_count(u, "countries") for u in urls] == [2, 2, 2, 2]
    with ShardedSession(sharded) as session:
        reset(statements)
        assert sorted(c.code for c in session.scalars(select(Country))) == ["fr", "jp"]
        assert len(touched(statements)) == 1
        france = session.get(Country, "fr")
        france.name = "République française"
        session.delete(session.get(Country, "jp"))
        session.commit()
    for url in urls:
        engine = create_engine(url, poolclass=NullPool)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT code, name FROM countries")).all() == [
                ("fr", "République française")
            ]
        engine.dispose()


def test_bad_input_gets_clear_typed_errors_and_writes_nothing(orm):
    sharded, urls, _ = orm
    with ShardedSession(sharded) as session:
        session.add(Customer(id=1, name="ok"))
        session.add(Order(id=1, total=5))  # no customer: no shard key
        with pytest.raises(ShardKeyMissing, match="customer_id"):
            session.flush()
    assert sum(direct_count(u, "customers") for u in urls) == 0
    with ShardedSession(sharded) as session:
        session.add(OrderLine(id=1, sku="x"))  # no order to follow
        with pytest.raises(ShardKeyMissing, match="order"):
            session.flush()
    populate(sharded, customers=2, orders_each=1)
    with ShardedSession(sharded) as session:
        order = session.scalars(select(Order).where(Order.customer_id == 1)).one()
        order.customer_id = 2
        with pytest.raises(ShardKeyChanged, match="customer_id"):
            session.flush()
    with ShardedSession(sharded) as session:
        with pytest.raises(UnknownPartition):
            session.execute(select(Order), bind_arguments={"shard_id": "nope"})
        with pytest.raises(ShardKeyMissing, match="shard_id"):
            session.connection()
        with pytest.raises(ShardKeyMissing, match="text"):
            session.execute(text("SELECT 1"))
        assert session.execute(text("SELECT 1"), bind_arguments={"shard_id": "p1"}).scalar() == 1
        session.add(Loose(id=1))
        with pytest.raises(RoutingError, match="__shard_key__"):
            session.flush()


def test_a_chooser_returning_no_partition_is_a_clear_error(orm):
    sharded, _, _ = orm
    session = ShardedSession(
        sharded=sharded, shard_chooser=lambda mapper, instance, clause=None: None
    )
    session.add(Customer(id=1, name="x"))
    with pytest.raises(RoutingError, match="shard_chooser returned no partition"):
        session.flush()
    session.close()
    session = ShardedSession(sharded=sharded, execute_chooser=lambda ctx: [])
    with pytest.raises(RoutingError, match="execute_chooser returned no partition"):
        session.execute(select(Order))
    session.close()


def test_pinning_keeps_every_statement_on_the_tenant_partition(orm):
    sharded, _, _ = orm
    populate(sharded)
    tenant = 5
    other = next(
        c for c in range(1, 13) if sharded.partition_for(c) != sharded.partition_for(tenant)
    )
    with ShardedSession(sharded) as session, sharded.pinned(tenant):
        assert len(session.scalars(select(Order).where(Order.customer_id == tenant)).all()) == 3
        assert session.get(Customer, tenant).name == f"customer {tenant}"
        with pytest.raises(PinViolation):
            session.scalars(select(Order)).all()  # would reach every partition
        with pytest.raises(PinViolation):
            session.scalars(select(Order).where(Order.customer_id == other)).all()
        with pytest.raises(PinViolation):
            sharded.execute(text("SELECT 1"), key=other)
        session.add(Customer(id=500 + other, name="x"))
        if sharded.partition_for(500 + other) != sharded.partition_for(tenant):
            with pytest.raises(PinViolation):
                session.flush()
        session.rollback()

    # the pin is per thread: another thread is not pinned
    results = []
    with sharded.pinned(tenant):
        worker = threading.Thread(
            target=lambda: results.append(len(sharded.execute_all(text("SELECT 1")).all()))
        )
        worker.start()
        worker.join(10)
    assert results == [4]


def test_set_shard_id_and_bind_arguments_pick_the_partition(orm):
    sharded, _, statements = orm
    populate(sharded)
    home = sharded.partition_for(8)
    with ShardedSession(sharded) as session:
        reset(statements)
        rows = session.scalars(select(Order).options(set_shard_id(home))).all()
        assert {o.customer_id for o in rows} >= {8}
        assert touched(statements) == {home}
        reset(statements)
        session.execute(select(Order), bind_arguments={"shard_id": home}).all()
        assert touched(statements) == {home}


def test_sessionmaker_easy_path(orm):
    sharded, _, _ = orm
    populate(sharded, customers=3)
    make = sessionmaker(class_=ShardedSession, sharded=sharded)
    with make() as session:
        assert session.scalar(select(func.count()).select_from(Customer)) == 3


def test_sqlalchemy_style_hand_written_choosers_keep_working(orm):
    sharded, _, _ = orm
    populate(sharded)
    engines = dict(sharded.engines())

    def shard_chooser(mapper, instance, clause=None):
        return sharded.partition_for(
            instance.customer_id if isinstance(instance, Order) else instance.id
        )

    def identity_chooser(mapper, primary_key, *, lazy_loaded_from, **kw):
        return list(engines)

    def execute_chooser(context):
        return list(engines)

    session = ShardedSession(
        shard_chooser=shard_chooser,
        identity_chooser=identity_chooser,
        execute_chooser=execute_chooser,
        shards=engines,
    )
    try:
        assert session.scalar(select(func.count()).select_from(Order)) == 36
        assert session.get(Customer, 4).name == "customer 4"
        session.add(Customer(id=77, name="hand"))
        session.commit()
        assert session.scalars(select(Customer).where(Customer.id == 77)).one().name == "hand"
    finally:
        session.close()


# -- regressions -----------------------------------------------------------------------


def test_a_session_can_be_made_inside_a_pin_and_eager_loads_stay_there(orm):
    sharded, _, statements = orm
    populate(sharded)
    with sharded.pinned(7), ShardedSession(sharded) as session:
        reset(statements)
        customer = session.scalars(
            select(Customer).where(Customer.id == 7).options(selectinload(Customer.orders))
        ).one()
        assert len(customer.orders) == 3
        assert touched(statements) == {sharded.partition_for(7)}


def test_reference_and_sharded_rows_in_one_flush_and_joined_reads(orm):
    sharded, _, _ = orm
    with ShardedSession(sharded) as session:
        session.add(Country(code="de", name="Germany"))
        # customers on every partition refer to the new reference row
        session.add_all([Customer(id=i, name=f"c{i}", country_code="de") for i in range(1, 13)])
        session.commit()
    with ShardedSession(sharded) as session:
        rows = session.execute(
            select(Country.code, func.count(Customer.id))
            .join_from(Customer, Country)
            .group_by(Country.code)
        ).all()
        assert [tuple(r) for r in rows] == [("de", 12)]


def test_insert_values_in_the_statement_goes_to_the_keys_partition(orm):
    sharded, urls, _ = orm
    with ShardedSession(sharded) as session:
        session.execute(insert(Customer).values(id=1001, name="values"))
        session.commit()
    home = sharded.partition_for(1001)
    assert [direct_count(u, "customers") for u in urls] == [
        1 if f"p{i}" == home else 0 for i in range(4)
    ]


def test_legacy_query_across_partitions_yields_objects(orm):
    sharded, _, _ = orm
    populate(sharded, customers=6, orders_each=0)
    with ShardedSession(sharded) as session:
        customers = session.query(Customer).order_by(Customer.id.desc()).limit(3).all()
        assert [c.id for c in customers] == [6, 5, 4]
        assert all(isinstance(c, Customer) for c in customers)


def test_text_ordering_with_a_language_collation_is_refused(pg_server):
    names = [f"icu_{i}_{id(pg_server)}" for i in range(2)]
    urls = []
    raw = pg_server.connect()
    raw.autocommit = True
    try:
        with raw.cursor() as cur:
            for name in names:
                cur.execute(
                    f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
                    "ICU_LOCALE 'en-US' LOCALE 'C'"
                )
                urls.append(pg_server.url(name))
    finally:
        raw.close()
    sharded = create_sharded_engine({"a": urls[0], "b": urls[1]}, min_connections=0)
    try:
        for _, engine in sharded.engines():
            Base.metadata.create_all(engine)
        with ShardedSession(sharded) as session:
            with pytest.raises(UnmergeableStatement, match="collate"):
                session.scalars(select(Customer.name).order_by(Customer.name)).all()
            # an explicit byte-order collation merges fine
            session.scalars(
                select(Customer.name.collate("C")).order_by(Customer.name.collate("C"))
            ).all()
        with pytest.raises(UnmergeableStatement, match="collate"):
            sharded.execute_all(select(Customer.name).order_by(Customer.name))
    finally:
        sharded.dispose()
        for name in names:
            pg_server.drop_database(name)


def test_a_users_identity_chooser_decides_where_get_looks(orm):
    sharded, _, statements = orm
    populate(sharded)
    session = ShardedSession(
        sharded=sharded,
        identity_chooser=lambda mapper, pk, **kw: [sharded.partition_for(pk[0] // 100)],
    )
    try:
        reset(statements)
        order = session.get(Order, 502)
        assert order.customer_id == 5
        assert touched(statements) == {sharded.partition_for(5)}
    finally:
        session.close()


def test_rows_of_a_model_that_follows_its_parent_cannot_be_bulk_inserted(orm):
    sharded, _, _ = orm
    with ShardedSession(sharded) as session, pytest.raises(RoutingError, match="add objects"):
        session.execute(insert(OrderLine), [{"id": 1, "order_id": 1, "sku": "x"}])
