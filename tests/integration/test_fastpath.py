"""The fast path for routed reads gives exactly what the full SQLAlchemy path gives."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
    DateTime,
    Enum,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Uuid,
    bindparam,
    event,
    exc,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from sqlalchemy_partpool import create_sharded_engine, fastpath


class Mood(enum.Enum):
    happy = "happy"
    sad = "sad"


metadata = MetaData()
things = Table(
    "things",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(20)),
    Column("price", Numeric(10, 2)),
    Column("born", Date),
    Column("seen", DateTime(timezone=True)),
    Column("mood", Enum(Mood)),
    Column("doc", JSON),
    Column("docb", JSONB),
    Column("tags", ARRAY(String)),
    Column("ok", Boolean),
    Column("blob", LargeBinary),
    Column("ref", Uuid),
)

ROWS = [
    {
        "id": i,
        "name": f"thing {i}",
        "price": Decimal(i) / 4,
        "born": dt.date(2026, 1, 1) + dt.timedelta(days=i),
        "seen": dt.datetime(2026, 5, 1, 12, i, tzinfo=dt.timezone.utc),
        "mood": Mood.happy if i % 2 else Mood.sad,
        "doc": {"i": i, "list": [1, 2]},
        "docb": {"k": str(i)},
        "tags": ["a", str(i)],
        "ok": bool(i % 3),
        "blob": bytes([i, i + 1]),
        "ref": uuid.UUID(int=i),
    }
    for i in range(1, 8)
]


@pytest.fixture
def sharded(make_databases):
    (url,) = make_databases(1)
    sharded = create_sharded_engine({"p0": url}, min_connections=1, max_connections=2)
    metadata.create_all(sharded.engine("p0"))
    with sharded.begin(partition="p0") as conn:
        conn.execute(things.insert(), ROWS)
    yield sharded
    sharded.dispose()


def full_path(sharded, statement, params=None):
    with sharded.connect(partition="p0") as conn:
        result = conn.execute(statement, params)
        return list(result.keys()), [tuple(r) for r in result]


@pytest.fixture
def fast_calls(monkeypatch):
    calls = {"fast": 0}
    original = fastpath.fast_read

    def counting(engine, statement, params):
        result = original(engine, statement, params)
        if result is not None:
            calls["fast"] += 1
        return result

    monkeypatch.setattr("sqlalchemy_partpool.fanout.fast_read", counting)
    return calls


STATEMENTS = [
    select(things),
    select(things).where(things.c.id == 3),
    select(things.c.name, things.c.price * 2, func.upper(things.c.name).label("up")),
    select(things.c.mood, things.c.doc["i"], things.c.tags[1]).order_by(things.c.id),
    select(things).where(things.c.mood == Mood.happy),
    select(things).where(things.c.docb == {"k": "2"}),
    select(func.count(), func.sum(things.c.price), func.max(things.c.seen)),
    select(things.c.id, things.c.id.label("id_again")),
    select(things).where(things.c.id == bindparam("wanted")),
]


@pytest.mark.parametrize("statement", STATEMENTS, ids=lambda s: str(s).split("\n")[0][:40])
def test_fast_path_rows_and_keys_equal_the_full_path(sharded, fast_calls, statement):
    params = {"wanted": 5} if "wanted" in str(statement) else None
    fast = sharded.execute(statement, params, partition="p0")
    assert fast_calls["fast"] == 1, "the fast path was not taken"
    keys, rows = full_path(sharded, statement, params)
    assert list(fast.keys()) == keys
    assert [tuple(r) for r in fast] == rows


def test_results_behave_like_sqlalchemy_results(sharded, fast_calls):
    assert sharded.execute(
        select(things.c.id).order_by(things.c.id), partition="p0"
    ).scalars().all() == list(range(1, 8))
    row = sharded.execute(select(things).where(things.c.id == 2), partition="p0").one()
    assert row.mood is Mood.sad
    assert row._mapping["price"] == Decimal("0.50")
    assert (
        sharded.execute(select(things).where(things.c.id == 2), partition="p0")
        .mappings()
        .one()["name"]
        == "thing 2"
    )
    assert fast_calls["fast"] == 3


def test_declined_cases_take_the_full_path_and_still_work(sharded, fast_calls):
    # expanding IN is rendered at execution time
    rows = (
        sharded.execute(
            select(things.c.id).where(things.c.id.in_([1, 2])).order_by(things.c.id), partition="p0"
        )
        .scalars()
        .all()
    )
    assert rows == [1, 2]
    # text() is not a Select
    assert sharded.execute(text("SELECT 1"), partition="p0").scalar() == 1
    # a per-call timeout needs the statement hooks
    assert (
        sharded.execute(
            select(things.c.id).where(things.c.id == 1), partition="p0", timeout=5
        ).scalar()
        == 1
    )
    assert fast_calls["fast"] == 0
    # an engine event disables it: listeners must see every statement
    seen = []
    event.listen(sharded.engine("p0"), "before_cursor_execute", lambda *a: seen.append(a[2]))
    sharded.execute(select(things.c.id).where(things.c.id == 1), partition="p0")
    assert fast_calls["fast"] == 0
    assert len(seen) == 1


def test_errors_are_wrapped_like_sqlalchemys(sharded):
    missing = Table("missing_table", MetaData(), Column("x", Integer))
    with pytest.raises(exc.ProgrammingError, match="missing_table") as info:
        sharded.execute(select(missing), partition="p0")
    assert info.value.orig is not None
    # the connection is fine afterwards and nothing leaked
    assert sharded.execute(select(func.count()).select_from(things), partition="p0").scalar() == 7
    snap = sharded.stats()["p0"]
    assert snap.checked_out == 0
    assert snap.checkouts == snap.checkins


def test_a_disconnect_invalidates_the_connection(make_databases, admin_engine, fast_calls):
    (url,) = make_databases(1)
    sharded = create_sharded_engine(
        {"p0": url}, min_connections=1, max_connections=1, pre_ping=False
    )
    try:
        pid = sharded.execute(select(func.pg_backend_pid()), partition="p0").scalar()
        with admin_engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(exc.OperationalError) as info:
            sharded.execute(select(func.pg_backend_pid()), partition="p0")
        assert info.value.connection_invalidated
        assert fast_calls["fast"] == 1  # the failed call went the fast way too
        assert sharded.stats()["p0"].connections_lost == 1
        assert sharded.execute(select(func.pg_backend_pid()), partition="p0").scalar() != pid
    finally:
        sharded.dispose()


def test_no_transaction_is_left_open(sharded, server):
    for _ in range(5):
        sharded.execute(select(things.c.id).where(things.c.id == 1), partition="p0")
    states = server.states(sharded.engine("p0").url.database)
    assert "idle in transaction" not in states
