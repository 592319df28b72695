"""PgHashRouter agrees with PostgreSQL's own PARTITION BY HASH, key for key.

Two independent checks per key type, against a real server:

* ``satisfies_hash_partition(parent, modulus, remainder, ...)`` -- the
  function PostgreSQL uses in hash partition constraints -- tells which
  remainder each key has, for moduli 2, 4 and 7;
* rows are inserted into hash-partitioned tables (moduli 4 and 7, and a
  mixed-moduli table with partitions (2, 0), (4, 1), (4, 3)) and
  ``tableoid::regclass`` says where PostgreSQL put each one.

A third check compares every 64-bit column hash with the server's own
extended hash functions, so that a mistake in the high bits cannot hide
behind a small modulus.  Each check is one batched query over arrays.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool.routing import HASH_PARTITION_SEED, PgHashRouter, pg_hash

pytestmark = pytest.mark.postgres

SEED = 20240611  # fixed, so that a failure can be reproduced
M64 = (1 << 64) - 1
COMBINE = 0x49A0F4DD15E5A8E3
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def _text(rng: random.Random, length: int) -> str:
    chars = []
    for _ in range(length):
        roll = rng.random()
        if roll < 0.55:
            chars.append(chr(rng.randint(32, 126)))
        elif roll < 0.75:
            chars.append(chr(rng.randint(0xA0, 0x7FF)))
        elif roll < 0.92:
            chars.append(chr(rng.randint(0x800, 0xD7FF)))
        else:
            chars.append(chr(rng.randint(0x10000, 0x10FFFF)))
    return "".join(chars)


def _int8_keys(rng: random.Random) -> list[int]:
    edges = [0, 1, -1, 2, -2, 255, 256, -256, 32767, -32768, 65535, 65536]
    edges += [INT32_MAX, INT32_MIN, INT32_MAX + 1, INT32_MIN - 1, (1 << 32) - 1, 1 << 32]
    edges += [-(1 << 32), INT64_MAX, INT64_MIN, INT64_MAX - 1, INT64_MIN + 1]
    keys = edges + [rng.randint(INT64_MIN, INT64_MAX) for _ in range(2000)]
    keys += [rng.randint(INT32_MIN, INT32_MAX) for _ in range(600)]
    keys += [rng.randint(-1000, 1000) for _ in range(400)]
    return keys


def _int4_keys(rng: random.Random) -> list[int]:
    edges = [0, 1, -1, INT32_MAX, INT32_MIN, INT32_MAX - 1, INT32_MIN + 1, 65536, -65537]
    return edges + [rng.randint(INT32_MIN, INT32_MAX) for _ in range(1500)]


def _int2_keys(rng: random.Random) -> list[int]:
    return [*range(-32768, 32768, 37), 32767, -32768]


def _text_keys(rng: random.Random) -> list[str]:
    fixed = ["", "a", "ab", "abc", "abcd", "abcdefghijk", "abcdefghijkl", "abcdefghijklm"]
    fixed += ["ünïcødé", "日本語", "emoji 😀", "𝄞", " ", "trailing  ", "MiXeD"]
    lengths = [0, 1, 2, 3, 4, 5, 7, 8, 11, 12, 13, 23, 24, 25, 36, 100, 300]
    return fixed + [_text(rng, rng.choice(lengths)) for _ in range(2000)]


def _bytea_keys(rng: random.Random) -> list[bytes]:
    fixed = [b"", b"\x00", b"\x00" * 13, b"\xff" * 12, bytes(range(256))]
    lengths = [1, 2, 3, 4, 8, 11, 12, 13, 16, 24, 25, 64]
    return fixed + [rng.randbytes(rng.choice(lengths)) for _ in range(1200)]


def _uuid_keys(rng: random.Random) -> list[uuid.UUID]:
    fixed = [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1), uuid.uuid5(uuid.NAMESPACE_DNS, "x")]
    return fixed + [uuid.UUID(int=rng.getrandbits(128)) for _ in range(1200)]


def _int8_text_keys(rng: random.Random) -> list[tuple[Any, ...]]:
    ints = _int8_keys(rng)
    keys: list[tuple[Any, ...]] = [
        (rng.choice(ints), _text(rng, rng.randint(0, 30))) for _ in range(1500)
    ]
    # PostgreSQL skips NULL columns when hashing; so must we.
    keys += [(None, "x"), (7, None), (None, None), (None, ""), (0, None)]
    return keys


def _text_int4_uuid_keys(rng: random.Random) -> list[tuple[Any, ...]]:
    return [
        (
            _text(rng, rng.randint(0, 15)),
            rng.randint(INT32_MIN, INT32_MAX),
            uuid.UUID(int=rng.getrandbits(128)),
        )
        for _ in range(800)
    ]


# ---------------------------------------------------------------------------
# Tables: one case per partition key type
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A partition key shape: its columns, SQL array types, and test keys."""

    name: str
    columns: tuple[tuple[str, str], ...]  # (column, SQL type)
    key_types: tuple[str, ...]
    make_keys: Any

    def keys(self) -> list[Any]:
        return list(self.make_keys(random.Random(f"{SEED}-{self.name}")))

    @property
    def composite(self) -> bool:
        return len(self.columns) > 1

    def column_arrays(self, keys: list[Any]) -> list[list[Any]]:
        """One Python list per key column, in the form psycopg2 adapts."""
        rows = [key if self.composite else (key,) for key in keys]
        arrays: list[list[Any]] = []
        for i, (_, sql_type) in enumerate(self.columns):
            column = [row[i] for row in rows]
            if sql_type == "uuid":
                column = [None if v is None else str(v) for v in column]
            arrays.append(column)
        return arrays


CASES = [
    Case("int8", (("k", "int8"),), ("int8",), _int8_keys),
    Case("int4", (("k", "int4"),), ("int4",), _int4_keys),
    Case("int2", (("k", "int2"),), ("int2",), _int2_keys),
    Case("text", (("k", "text"),), ("text",), _text_keys),
    Case("varchar", (("k", "varchar(400)"),), ("varchar",), _text_keys),
    Case("bytea", (("k", "bytea"),), ("bytea",), _bytea_keys),
    Case("uuid", (("k", "uuid"),), ("uuid",), _uuid_keys),
    Case("int8_text", (("a", "int8"), ("b", "text")), ("int8", "text"), _int8_text_keys),
    Case(
        "text_int4_uuid",
        (("a", "text"), ("b", "int4"), ("c", "uuid")),
        ("text", "int4", "uuid"),
        _text_int4_uuid_keys,
    ),
]
CASE_IDS = [case.name for case in CASES]
# (modulus, remainder) sets of the tables created per case.
LAYOUTS = {
    "m4": [(4, r) for r in range(4)],
    "m7": [(7, r) for r in range(7)],
    "mixed": [(2, 0), (4, 1), (4, 3)],
}


def _array_type(sql_type: str) -> str:
    return ("varchar" if sql_type.startswith("varchar") else sql_type) + "[]"


def _unnest(case: Case) -> str:
    """A FROM item yielding (i, <columns>) for the bound key arrays."""
    args = ", ".join(
        f"CAST(:c{i} AS {_array_type(sql_type)})" for i, (_, sql_type) in enumerate(case.columns)
    )
    names = ", ".join(column for column, _ in case.columns)
    return f"unnest({args}) WITH ORDINALITY AS u({names}, i)"


def _params(case: Case, keys: list[Any]) -> dict[str, Any]:
    return {f"c{i}": column for i, column in enumerate(case.column_arrays(keys))}


def _partition_name(case: Case, layout: str, modulus: int, remainder: int) -> str:
    return f"{case.name}_{layout}_m{modulus}_r{remainder}"


def _router(case: Case, layout: str) -> PgHashRouter:
    bounds = [(m, r, _partition_name(case, layout, m, r)) for m, r in LAYOUTS[layout]]
    return PgHashRouter(bounds, key_types=case.key_types)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(pg_admin_url: str) -> Iterator[Engine]:
    """A fresh UTF-8 database with every hash-partitioned table; dropped afterwards."""
    admin = sa.create_engine(pg_admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    name = f"partpool_pghash_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    engine = sa.create_engine(sa.make_url(pg_admin_url).set(database=name), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            for case in CASES:
                columns = ", ".join(f"{c} {t}" for c, t in case.columns)
                key = ", ".join(c for c, _ in case.columns)
                for layout, bounds in LAYOUTS.items():
                    parent = f"{case.name}_{layout}"
                    conn.exec_driver_sql(
                        f"CREATE TABLE {parent} (i int8, {columns}) PARTITION BY HASH ({key})"
                    )
                    for m, r in bounds:
                        conn.exec_driver_sql(
                            f"CREATE TABLE {_partition_name(case, layout, m, r)} PARTITION OF "
                            f"{parent} FOR VALUES WITH (MODULUS {m}, REMAINDER {r})"
                        )
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def _fetch(conn: Connection, sql: str, params: dict[str, Any]) -> list[Any]:
    return list(conn.execute(sa.text(sql), params))


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("modulus", [2, 4, 7])
def test_remainders_match_satisfies_hash_partition(
    scratch: Engine, case: Case, modulus: int
) -> None:
    keys = case.keys()
    source = _unnest(case)
    values = ", ".join(column for column, _ in case.columns)
    # Single-column keys go through the VARIADIC array form, multi-column keys
    # through the plain call, so both of PostgreSQL's code paths are used.
    call = f"VARIADIC ARRAY[{values}]" if not case.composite else values
    sql = (
        f"SELECT u.i, r FROM {source}, generate_series(0, :m - 1) AS r "
        f"WHERE satisfies_hash_partition('{case.name}_m4'::regclass, :m, r, {call})"
    )
    with scratch.connect() as conn:
        rows = _fetch(conn, sql, {**_params(case, keys), "m": modulus})
    server = {int(i) - 1: int(r) for i, r in rows}
    assert len(rows) == len(keys), "each key must satisfy exactly one remainder"
    router = PgHashRouter([f"r{r}" for r in range(modulus)], key_types=case.key_types)
    mismatches = [
        (keys[i], server[i], router.remainder_for(keys[i], modulus))
        for i in range(len(keys))
        if router.remainder_for(keys[i], modulus) != server[i]
    ]
    assert not mismatches, f"{len(mismatches)} keys disagree, e.g. {mismatches[:3]}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_router_picks_the_partition_postgresql_stores_the_row_in(
    scratch: Engine, case: Case, layout: str
) -> None:
    keys = case.keys()
    parent = f"{case.name}_{layout}"
    source = _unnest(case)
    columns = ", ".join(column for column, _ in case.columns)
    with scratch.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO {parent} (i, {columns}) SELECT u.i, {columns} FROM {source}"),
            _params(case, keys),
        )
        rows = _fetch(conn, f"SELECT i, tableoid::regclass::text FROM {parent}", {})
        conn.exec_driver_sql(f"TRUNCATE {parent}")
    placed = {int(i) - 1: table for i, table in rows}
    assert len(placed) == len(keys)
    router = _router(case, layout)
    mismatches = [
        (keys[i], placed[i], router.route(keys[i]))
        for i in range(len(keys))
        if router.route(keys[i]) != placed[i]
    ]
    assert not mismatches, f"{len(mismatches)} rows elsewhere, e.g. {mismatches[:3]}"


# bytea's extended hash (hashvarlenaextended) takes `internal` and cannot be
# called from SQL; the placement tests cover bytea.
COLUMN_HASH_FUNCTIONS = {
    "int8": "hashint8extended",
    "int4": "hashint4extended",
    "int2": "hashint2extended",
    "text": "hashtextextended",
    "varchar": "hashtextextended",
    "uuid": "uuid_hash_extended",
}


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in COLUMN_HASH_FUNCTIONS], ids=lambda c: c.name
)
def test_column_hashes_match_the_servers_extended_hash_functions(
    scratch: Engine, case: Case
) -> None:
    # The row hash of one non-null column is hash_combine64(0, h) = h + constant,
    # so every bit of h can be compared with the server's own function.
    keys = case.keys()
    function = COLUMN_HASH_FUNCTIONS[case.name]
    sql = f"SELECT u.i, {function}(k, :seed) FROM {_unnest(case)}"
    assert HASH_PARTITION_SEED < 1 << 63  # so it binds as a positive int8
    with scratch.connect() as conn:
        rows = _fetch(conn, sql, {**_params(case, keys), "seed": HASH_PARTITION_SEED})
    mismatches = []
    for i, signed in rows:
        key = keys[int(i) - 1]
        expected = (int(signed) + COMBINE) & M64
        if pg_hash(key, case.key_types) != expected:
            mismatches.append(key)
    assert len(rows) == len(keys)
    assert not mismatches, f"{len(mismatches)} keys hash differently, e.g. {mismatches[:3]}"


COLLATION_QUERIES = {
    # ICU's root locale, or failing that any ICU collation.
    "icu": "collprovider = 'i' ORDER BY collname <> 'und-x-icu', collname",
    # A real libc locale, not one of the byte-order ones (C, C.UTF-8, ucs_basic).
    "libc": "collprovider = 'c' AND collname NOT IN ('C', 'POSIX', 'ucs_basic') "
    "AND collname NOT ILIKE 'C.%' "
    "ORDER BY collname NOT ILIKE 'en_US%', collname",
}


def test_text_hash_is_the_same_under_other_deterministic_collations(scratch: Engine) -> None:
    """Deterministic collations hash the raw UTF-8 bytes, whatever the locale.

    Tries one ICU and one libc collation, whichever the server has.
    """
    with scratch.connect() as conn:
        collations = [
            name
            for query in COLLATION_QUERIES.values()
            for name in conn.execute(
                sa.text(
                    "SELECT quote_ident(collname) FROM pg_collation WHERE collisdeterministic "
                    f"AND collencoding IN (-1, pg_char_to_encoding('UTF8')) AND {query} LIMIT 1"
                )
            ).scalars()
        ]
    if not collations:
        pytest.skip("the server has no deterministic collation besides the byte-order ones")
    keys = _text_keys(random.Random(SEED))
    for n, collation in enumerate(collations):
        table = f"coll_{n}"
        with scratch.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE TABLE {table} (i int8, k text COLLATE {collation}) PARTITION BY HASH (k)"
            )
            for r in range(5):
                conn.exec_driver_sql(
                    f"CREATE TABLE {table}_r{r} PARTITION OF {table} "
                    f"FOR VALUES WITH (MODULUS 5, REMAINDER {r})"
                )
            conn.execute(
                sa.text(
                    f"INSERT INTO {table} SELECT i, k "
                    "FROM unnest(CAST(:k AS text[])) WITH ORDINALITY AS u(k, i)"
                ),
                {"k": keys},
            )
            rows = _fetch(conn, f"SELECT i, tableoid::regclass::text FROM {table}", {})
            conn.exec_driver_sql(f"DROP TABLE {table}")
        router = PgHashRouter([f"{table}_r{r}" for r in range(5)])
        wrong = [keys[int(i) - 1] for i, part in rows if router.route(keys[int(i) - 1]) != part]
        assert len(rows) == len(keys)
        assert not wrong, f"{collation}: {len(wrong)} keys elsewhere, e.g. {wrong[:3]}"
