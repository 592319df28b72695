"""Routers: pinned outputs, determinism, rebalancing, validation and errors."""

from __future__ import annotations

import datetime
import enum
import json
import math
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sqlalchemy_partpool.errors import (
    ConfigurationError,
    NoPartitionForKey,
    RoutingError,
    ShardKeyMissing,
    UnknownPartition,
)
from sqlalchemy_partpool.routing import (
    BucketMove,
    CallableRouter,
    HashRouter,
    LookupRouter,
    PgHashRouter,
    RangeRouter,
    Router,
    encode_key,
    make_router,
    pg_hash,
    stable_hash,
)

VECTORS = json.loads((Path(__file__).parent / "routing_vectors.json").read_text("utf-8"))


def untyped(typed: list[Any]) -> Any:
    """Decode a key from the vectors file's ``[type, value]`` form."""
    kind, value = typed
    if kind in ("int", "str"):
        return value
    if kind == "bytes":
        return bytes.fromhex(value)
    if kind == "uuid":
        return uuid.UUID(value)
    assert kind == "tuple"
    return tuple(untyped(part) for part in value)


KEYS = [untyped(k) for k in VECTORS["keys"]]


def outcome(router: Router, key: Any) -> str:
    try:
        return router.route(key)
    except Exception as exc:  # the vectors pin the error class too
        return "!" + type(exc).__name__


def build_vector_router(name: str) -> Router:
    if name.startswith("lookup"):
        entries = {untyped(k): v for k, v in VECTORS["lookup"]["entries"]}
        default = VECTORS["lookup"]["default"] if name == "lookup" else None
        return LookupRouter(entries, default=default)
    spec = VECTORS["routers"][name]
    if "ranges" in spec:
        return RangeRouter.from_ranges([tuple(r) for r in spec["ranges"]])
    partitions = spec.get("partitions") or []
    names = [p[2] if isinstance(p, list) else p for p in partitions]
    return make_router(spec, sorted(set(names)))


# ---------------------------------------------------------------------------
# Golden vectors: a release must never silently re-route a key
# ---------------------------------------------------------------------------


def test_vectors_cover_every_key_type() -> None:
    kinds = Counter(k[0] for k in VECTORS["keys"])
    assert kinds["int"] >= 200
    assert kinds["str"] >= 200
    assert kinds["bytes"] >= 100
    assert kinds["uuid"] >= 100
    assert kinds["tuple"] >= 100
    assert {"hash4", "pg_hash4", "pg_hash_mixed", "range_int", "range_gaps"} <= set(
        VECTORS["routes"]
    )


def test_canonical_encoding_is_unchanged() -> None:
    changed = [
        (key, expected)
        for key, expected in zip(KEYS, VECTORS["encoding"], strict=True)
        if encode_key(key).hex() != expected
    ]
    assert not changed, f"{len(changed)} encodings changed, e.g. {changed[:3]}"


def test_stable_hash_is_unchanged() -> None:
    changed = [
        key
        for key, expected in zip(KEYS, VECTORS["stable_hash"], strict=True)
        if f"{stable_hash(key):016x}" != expected
    ]
    assert not changed, f"{len(changed)} hashes changed, e.g. {changed[:3]}"


def test_pg_hash_is_unchanged() -> None:
    changed = []
    for key, expected in zip(KEYS, VECTORS["pg_hash"], strict=True):
        try:
            got = str(pg_hash(key))
        except RoutingError as exc:
            got = "!" + type(exc).__name__
        if got != expected:
            changed.append((key, expected, got))
    assert not changed, f"{len(changed)} pg_hash values changed, e.g. {changed[:3]}"


@pytest.mark.parametrize("name", sorted(VECTORS["routes"]))
def test_every_strategy_routes_the_golden_keys_as_before(name: str) -> None:
    router = build_vector_router(name)
    expected = VECTORS["routes"][name]
    changed = [
        (key, want, outcome(router, key))
        for key, want in zip(KEYS, expected, strict=True)
        if outcome(router, key) != want
    ]
    assert not changed, f"{name}: {len(changed)} keys re-routed, e.g. {changed[:3]}"


@pytest.mark.parametrize("plan", VECTORS["rebalance"], ids=lambda p: f"{p['partitions']}")
def test_rebalance_plans_are_unchanged(plan: dict[str, Any]) -> None:
    router = HashRouter(plan["partitions"], buckets=plan["buckets"])
    _, moves = router.rebalance(plan["new_partitions"])
    assert [[m.bucket, m.source, m.target] for m in moves] == plan["moves"]


def test_routes_do_not_depend_on_pythonhashseed() -> None:
    sample = VECTORS["keys"][::7]
    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_routing import untyped, build_vector_router, outcome
keys = [untyped(k) for k in json.loads(sys.stdin.read())]
names = {sorted(VECTORS["routes"])!r}
print(json.dumps({{n: [outcome(build_vector_router(n), k) for k in keys] for n in names}}))
"""
    results = []
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(sample),
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=120,
        )
        results.append(json.loads(proc.stdout))
    here = {
        name: [outcome(build_vector_router(name), untyped(k)) for k in sample]
        for name in sorted(VECTORS["routes"])
    }
    assert results[0] == here
    assert results[1] == here
    assert results[2] == here


# ---------------------------------------------------------------------------
# The canonical encoding
# ---------------------------------------------------------------------------


class Colour(enum.IntEnum):
    RED = 1


class One:
    """Not equal to 1 in Python, but an integer key of 1 through ``__index__``."""

    def __index__(self) -> int:
        return 1


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, "1"),
        (1, b"1"),
        ("1", b"1"),
        ((1, 23), (12, 3)),
        (("a", "bc"), ("ab", "c")),
        (1, (1,)),
        (0, -1),
        (127, 128),
        (-128, 128),
        ((1, 2), (1, (2,))),
        (uuid.UUID(int=1), uuid.UUID(int=1).bytes),
        ("", b""),
    ],
)
def test_keys_of_different_types_or_shapes_never_collide(a: Any, b: Any) -> None:
    assert encode_key(a) != encode_key(b)
    assert stable_hash(a) != stable_hash(b)


def test_equivalent_spellings_of_a_key_encode_alike() -> None:
    assert encode_key(b"xyz") == encode_key(bytearray(b"xyz")) == encode_key(memoryview(b"xyz"))
    assert encode_key(Colour.RED) == encode_key(1)
    assert encode_key((b"a", 1)) == encode_key((bytearray(b"a"), 1))


def test_encoding_layout_is_tag_length_payload() -> None:
    assert encode_key(1) == b"i\x00\x00\x00\x01\x01"
    assert encode_key(-1) == b"i\x00\x00\x00\x01\xff"
    assert encode_key(128) == b"i\x00\x00\x00\x02\x00\x80"
    assert encode_key("é") == b"s\x00\x00\x00\x02\xc3\xa9"
    assert encode_key(b"") == b"b\x00\x00\x00\x00"
    assert encode_key(uuid.UUID(int=1)) == b"u\x00\x00\x00\x10" + bytes(15) + b"\x01"
    assert encode_key((1, "a")) == (
        b"t\x00\x00\x00\x02" + b"i\x00\x00\x00\x01\x01" + b"s\x00\x00\x00\x01a"
    )


def test_hash_router_fast_path_agrees_with_the_general_encoding() -> None:
    router = HashRouter([f"p{i}" for i in range(5)], buckets=997)
    for key in [0, -1, 2**63, 2**300, -(2**300), "", "x" * 1000, "日本", Colour.RED]:
        assert router.route(key) == router.assignment[router.bucket_for(key)]


# ---------------------------------------------------------------------------
# Errors common to every router
# ---------------------------------------------------------------------------

ALL_ROUTERS: list[Router] = [
    HashRouter(["a", "b"]),
    PgHashRouter(["a", "b"]),
    RangeRouter([10], ["a", "b"]),
    RangeRouter([], ["a"]),
    LookupRouter({1: "a"}, default="b"),
    CallableRouter(lambda key: "a", ["a", "b"]),
]


@pytest.mark.parametrize("router", ALL_ROUTERS, ids=repr)
def test_none_key_raises_shard_key_missing(router: Router) -> None:
    with pytest.raises(ShardKeyMissing):
        router.route(None)


@pytest.mark.parametrize("router", [HashRouter(["a", "b"]), LookupRouter({1: "a"}, default="b")])
def test_none_inside_a_composite_key_raises_shard_key_missing(router: Router) -> None:
    with pytest.raises(ShardKeyMissing, match="None part"):
        router.route((1, None))


@pytest.mark.parametrize("router", ALL_ROUTERS[:2] + ALL_ROUTERS[4:5], ids=repr)
@pytest.mark.parametrize("key", [1.5, True, [1, 2], {1}, object(), datetime.date(2024, 1, 1)])
def test_unsupported_key_type_raises_routing_error_listing_supported_types(
    router: Router, key: Any
) -> None:
    with pytest.raises(RoutingError, match=r"supported shard key types are int"):
        router.route(key)


def test_list_key_error_suggests_a_tuple() -> None:
    with pytest.raises(RoutingError, match="use a tuple"):
        HashRouter(["a"]).route([1, 2])


def test_lone_surrogate_is_a_routing_error() -> None:
    with pytest.raises(RoutingError, match="not valid Unicode"):
        HashRouter(["a"]).route("\ud800")


def test_empty_tuple_is_not_a_key() -> None:
    with pytest.raises(RoutingError, match="empty tuple"):
        HashRouter(["a"]).route(())


# ---------------------------------------------------------------------------
# route_many
# ---------------------------------------------------------------------------


def test_route_many_groups_keys_by_partition_in_input_order() -> None:
    router = RangeRouter([10, 20], ["low", "mid", "high"])
    groups = router.route_many([25, 1, 15, 3, 30, 12, 2])
    assert groups == {"high": [25, 30], "low": [1, 3, 2], "mid": [15, 12]}
    assert list(groups) == ["high", "low", "mid"]


def test_route_many_agrees_with_route_for_hash_keys() -> None:
    router = HashRouter([f"p{i}" for i in range(4)])
    keys = list(range(500)) + [f"k{i}" for i in range(500)]
    groups = router.route_many(keys)
    assert sum(len(g) for g in groups.values()) == len(keys)
    for partition, group in groups.items():
        assert all(router.route(k) == partition for k in group)
        assert group == [k for k in keys if router.route(k) == partition]


def test_route_many_accepts_a_generator_and_raises_for_none() -> None:
    router = HashRouter(["a", "b"])
    assert router.route_many(iter([])) == {}
    with pytest.raises(ShardKeyMissing):
        router.route_many(iter([1, None]))


# ---------------------------------------------------------------------------
# HashRouter
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 8])
def test_hash_distribution_is_roughly_uniform(n: int) -> None:
    router = HashRouter([f"p{i}" for i in range(n)])
    for keys in (range(10_000), [f"user-{i}" for i in range(10_000)]):
        counts = Counter(router.route(k) for k in keys)
        expected = 10_000 / n
        assert set(counts) == set(router.partitions)
        assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts
        chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
        assert chi2 < 30, counts  # far above the 99.9th percentile for 7 degrees of freedom


def test_default_assignment_is_round_robin() -> None:
    router = HashRouter(["a", "b", "c"], buckets=7)
    assert router.assignment == ("a", "b", "c", "a", "b", "c", "a")
    assert router.buckets_of("a") == [0, 3, 6]
    assert router.buckets_of("c") == [2, 5]


def test_assignment_as_mapping_or_sequence() -> None:
    seq = HashRouter(["a", "b"], buckets=4, assignment=["b", "b", "a", "b"])
    mapping = HashRouter(["a", "b"], buckets=4, assignment={0: "b", 1: "b", 2: "a", 3: "b"})
    assert seq.assignment == mapping.assignment == ("b", "b", "a", "b")
    for key in range(100):
        assert seq.route(key) == mapping.route(key) == seq.assignment[seq.bucket_for(key)]


def test_partition_without_buckets_is_allowed_and_listed() -> None:
    router = HashRouter(["a", "b"], buckets=2, assignment=["a", "a"])
    assert router.partitions == ("a", "b")
    assert router.buckets_of("b") == []
    assert {router.route(k) for k in range(50)} == {"a"}


def test_buckets_of_unknown_partition() -> None:
    with pytest.raises(UnknownPartition, match="'zz'"):
        HashRouter(["a"]).buckets_of("zz")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"partitions": []}, "empty"),
        ({"partitions": "abc"}, "sequence of partition names"),
        ({"partitions": ["a", "a"]}, "more than once"),
        ({"partitions": ["a", ""]}, "non-empty strings"),
        ({"partitions": ["a", 1]}, "non-empty strings"),
        ({"partitions": ["a", "b", "c"], "buckets": 2}, "less than the 3 partitions"),
        ({"partitions": ["a"], "buckets": 0}, "at least 1"),
        ({"partitions": ["a"], "buckets": 2.0}, "integer"),
        ({"partitions": ["a"], "buckets": True}, "integer"),
        ({"partitions": ["a"], "buckets": 2, "assignment": ["a", "x"]}, "unknown partition 'x'"),
        ({"partitions": ["a"], "buckets": 2, "assignment": ["a"]}, "1 entries but there are 2"),
        ({"partitions": ["a"], "buckets": 3, "assignment": {0: "a"}}, "leaves 2 of 3 buckets"),
        ({"partitions": ["a"], "buckets": 2, "assignment": {0: "a", 1: "a", 2: "a"}}, "bucket 2"),
        ({"partitions": ["a"], "buckets": 1, "assignment": {"0": "a"}}, "bucket numbers"),
        ({"partitions": ["a"], "buckets": 1, "assignment": "a"}, "sequence of partition names"),
    ],
)
def test_hash_router_validation(kwargs: dict[str, Any], match: str) -> None:
    partitions = kwargs.pop("partitions")
    with pytest.raises(ConfigurationError, match=match):
        HashRouter(partitions, **kwargs)


# ---------------------------------------------------------------------------
# HashRouter.rebalance
# ---------------------------------------------------------------------------


def names(n: int, start: int = 0) -> list[str]:
    return [f"p{i}" for i in range(start, start + n)]


def check_plan(old: HashRouter, new: HashRouter, moves: list[BucketMove]) -> None:
    """Moves are exactly the changed buckets, and the result is balanced."""
    changed = [b for b in range(old.buckets) if old.assignment[b] != new.assignment[b]]
    assert [m.bucket for m in moves] == changed
    for move in moves:
        assert move.source == old.assignment[move.bucket]
        assert move.target == new.assignment[move.bucket]
    counts = Counter(new.assignment)
    share = old.buckets // len(new.partitions)
    assert all(counts[p] in (share, share + 1) for p in new.partitions), counts
    assert set(counts) <= set(new.partitions)
    # Fewest moves possible: every bucket above a partition's final count had to go.
    before = Counter(old.assignment)
    assert len(moves) == sum(max(0, before[p] - counts[p]) for p in before)


@pytest.mark.parametrize(
    ("buckets", "n_old", "n_new"),
    [
        (b, n_old, n_new)
        for b in (7, 10, 64, 100, 1024)
        for n_old, n_new in ((1, 2), (3, 4), (4, 5), (4, 8), (5, 7))
        if n_new <= b
    ],
)
def test_adding_partitions_moves_only_old_to_new_and_balances(
    buckets: int, n_old: int, n_new: int
) -> None:
    old = HashRouter(names(n_old), buckets=buckets)
    new, moves = old.rebalance(names(n_new))
    check_plan(old, new, moves)
    added = set(names(n_new)) - set(names(n_old))
    assert all(m.source in old.partitions and m.target in added for m in moves)


@pytest.mark.parametrize(
    ("buckets", "n_old", "removed"),
    [
        (b, n_old, removed)
        for b in (7, 10, 64, 100, 1024)
        for n_old, removed in ((2, [0]), (4, [1]), (5, [0, 4]), (8, [2, 3, 5]))
        if n_old <= b
    ],
)
def test_removing_partitions_moves_only_their_buckets(
    buckets: int, n_old: int, removed: list[int]
) -> None:
    old = HashRouter(names(n_old), buckets=buckets)
    gone = {f"p{i}" for i in removed}
    new, moves = old.rebalance([p for p in old.partitions if p not in gone])
    check_plan(old, new, moves)
    assert {m.bucket for m in moves} == {b for p in gone for b in old.buckets_of(p)}


def test_rebalance_chain_keeps_moving_only_what_it_must() -> None:
    router = HashRouter(names(2), buckets=1024)
    for step in range(3, 12):
        new, moves = router.rebalance(names(step))
        check_plan(router, new, moves)
        router = new
    new, moves = router.rebalance(names(10, start=1))  # p0 and p11 leave, p... none join
    check_plan(router, new, moves)
    swapped, moves = new.rebalance([*names(9, start=1), "fresh"])  # one out, one in
    check_plan(new, swapped, moves)
    assert {m.source for m in moves} == {"p10"}
    assert {m.target for m in moves} == {"fresh"}


def test_adding_one_partition_moves_a_fifth_of_the_keys() -> None:
    old = HashRouter(names(4))
    new, moves = old.rebalance(names(5))
    assert len(moves) == 204  # 1024 // 5: only the new partition's share moves
    keys = range(20_000)
    moved = [k for k in keys if old.route(k) != new.route(k)]
    assert all(new.route(k) == "p4" for k in moved)
    assert 0.17 < len(moved) / len(keys) < 0.23


def test_rebalance_is_deterministic_and_leaves_the_router_alone() -> None:
    old = HashRouter(names(3), buckets=100)
    before = old.assignment
    a = old.rebalance(names(5))
    b = old.rebalance(names(5))
    assert a[0].assignment == b[0].assignment
    assert a[1] == b[1]
    assert old.assignment == before


def test_rebalance_of_an_unbalanced_assignment_balances_it() -> None:
    old = HashRouter(["a", "b"], buckets=10, assignment=["a"] * 9 + ["b"])
    new, moves = old.rebalance(["a", "b"])
    check_plan(old, new, moves)
    assert len(moves) == 4


def test_rebalanced_router_round_trips_through_describe() -> None:
    new, _ = HashRouter(names(4)).rebalance(names(5))
    spec = new.describe()
    assert json.loads(json.dumps(spec)) == spec
    rebuilt = make_router(spec, names(5))
    assert isinstance(rebuilt, HashRouter)
    assert rebuilt.assignment == new.assignment


@pytest.mark.parametrize(
    ("new_partitions", "match"),
    [([], "empty"), (["a", "a"], "more than once"), (names(11), "cannot spread 10 buckets")],
)
def test_rebalance_validation(new_partitions: list[str], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        HashRouter(names(2), buckets=10).rebalance(new_partitions)


# ---------------------------------------------------------------------------
# PgHashRouter and pg_hash
# ---------------------------------------------------------------------------


def test_pg_hash_of_a_one_column_key_equals_its_one_tuple() -> None:
    assert pg_hash(42) == pg_hash((42,))
    assert PgHashRouter(names(4)).route("x") == PgHashRouter(names(4)).route(("x",))


def test_pg_hash_int_widths_agree_in_range() -> None:
    for value in (0, 1, -1, 32767, -32768):
        assert pg_hash(value, "smallint") == pg_hash(value, "integer") == pg_hash(value, "bigint")
    for value in (2**31 - 1, -(2**31)):
        assert pg_hash(value, "int4") == pg_hash(value, "int8")


def test_pg_hash_router_int_fast_path_agrees_with_pg_hash() -> None:
    router = PgHashRouter(names(7))
    for key in [0, -1, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63), Colour.RED, *range(-500, 500)]:
        assert router.route(key) == f"p{pg_hash(key) % 7}"


def test_pg_hash_skips_none_parts_as_postgresql_skips_nulls() -> None:
    assert pg_hash((None, 5)) == pg_hash((5, None)) == pg_hash(5)
    assert pg_hash((None, None)) == 0


def test_pg_hash_key_types_override_inference() -> None:
    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert pg_hash(str(value), "uuid") == pg_hash(value)
    assert pg_hash(value.bytes, "uuid") == pg_hash(value)
    assert pg_hash(str(value)) != pg_hash(value)  # a str is text unless told otherwise
    assert pg_hash("x", "varchar") == pg_hash("x", "text")


@pytest.mark.parametrize(
    ("key", "key_types", "match"),
    [
        (2**63, None, "out of range"),
        (40_000, "smallint", "out of range"),
        (2**31, "integer", "out of range"),
        ("12", "int", "is a str"),
        (12, "text", "not a str"),
        (12, "bytea", "not bytes"),
        ("nope", "uuid", "not a UUID"),
        (12, "uuid", "not a uuid.UUID"),
        ((1, 2), "int", "2 part"),
        (1, ["int", "text"], "1 part"),
        ((1, (2, 3)), None, "unsupported type"),
        (1.0, None, "supported shard key types"),
        (True, None, "bool"),
        ("a\0b", None, "NUL"),
    ],
)
def test_pg_hash_rejects_values_postgresql_would_not_store(
    key: Any, key_types: Any, match: str
) -> None:
    with pytest.raises(RoutingError, match=match):
        pg_hash(key, key_types)


def test_pg_hash_router_forms_agree() -> None:
    as_list = PgHashRouter(["a", "b", "c", "d"])
    as_mapping = PgHashRouter({3: "d", 0: "a", 2: "c", 1: "b"}, modulus=4)
    as_triples = PgHashRouter([(4, r, n) for r, n in enumerate("abcd")])
    for key in [*range(200), *(f"k{i}" for i in range(200))]:
        assert as_list.route(key) == as_mapping.route(key) == as_triples.route(key)
    assert as_mapping.partitions == ("a", "b", "c", "d")


def test_pg_hash_router_mixed_moduli() -> None:
    router = PgHashRouter([(4, 3, "q3"), (2, 0, "half"), (4, 1, "q1")])
    assert router.partitions == ("half", "q1", "q3")
    for key in range(500):
        h = pg_hash(key)
        expected = "half" if h % 2 == 0 else ("q1" if h % 4 == 1 else "q3")
        assert router.route(key) == expected


def test_pg_hash_router_uncovered_remainder_raises_no_partition_for_key() -> None:
    router = PgHashRouter({0: "a"}, modulus=2)
    outcomes = Counter(outcome(router, k) for k in range(200))
    assert set(outcomes) == {"a", "!NoPartitionForKey"}
    key = next(k for k in range(200) if pg_hash(k) % 2 == 1)
    with pytest.raises(NoPartitionForKey, match="remainder"):
        router.route(key)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ([[]], {}, "empty"),
        (["abc"], {}, "sequence of names"),
        ([["a", "a"]], {}, "more than once"),
        ([["a", "b"]], {"modulus": 3}, "modulus=3 but 2 partitions"),
        ([{0: "a"}], {}, "need modulus"),
        ([{2: "a"}], {"modulus": 2}, "not below modulus"),
        ([{0: "a", 1: "a"}], {"modulus": 2}, "more than once"),
        ([[(4, 0, "a"), (3, 1, "b")]], {}, "3 does not divide"),
        ([[(2, 0, "a"), (4, 2, "b")]], {}, "overlaps"),
        ([[(2, 0, "a"), (2, 0, "b")]], {}, "listed twice"),
        ([[(2, 5, "a")]], {}, "not below modulus"),
        ([[(0, 0, "a")]], {}, "at least 1"),
        ([[(2, 0)]], {}, "triple"),
        ([[(2, 0, "a")]], {"modulus": 2}, "triples"),
        ([["a"]], {"key_types": ["float"]}, "unknown key type 'float'"),
        ([["a"]], {"key_types": []}, "empty"),
    ],
)
def test_pg_hash_router_validation(args: list[Any], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        PgHashRouter(*args, **kwargs)


# ---------------------------------------------------------------------------
# RangeRouter
# ---------------------------------------------------------------------------


def test_range_router_boundaries() -> None:
    router = RangeRouter([0, 100, 200], ["neg", "low", "mid", "high"])
    cases = {-(2**70): "neg", -1: "neg", 0: "low", 99: "low", 100: "mid", 199: "mid"}
    cases |= {200: "high", 2**70: "high"}
    for key, partition in cases.items():
        assert router.route(key) == partition


def test_range_router_dates_and_strings() -> None:
    dates = RangeRouter(
        [datetime.date(2024, 1, 1), datetime.date(2025, 1, 1)], ["old", "y24", "new"]
    )
    assert dates.route(datetime.date(2024, 6, 1)) == "y24"
    assert dates.describe()["bounds"] == ["2024-01-01", "2025-01-01"]
    words = RangeRouter(["m"], ["a-l", "m-z"])
    assert [words.route(w) for w in ("apple", "m", "zoo")] == ["a-l", "m-z", "m-z"]


def test_range_router_may_reuse_a_partition() -> None:
    router = RangeRouter([10, 20], ["a", "b", "a"])
    assert router.partitions == ("a", "b")
    assert [router.route(k) for k in (5, 15, 25)] == ["a", "b", "a"]


def test_range_router_mixing_types_is_a_routing_error() -> None:
    router = RangeRouter([10, 20], ["a", "b", "c"])
    with pytest.raises(RoutingError, match="cannot be compared"):
        router.route("15")
    with pytest.raises(RoutingError, match="NaN"):
        router.route(math.nan)


def test_from_ranges_with_gaps() -> None:
    router = RangeRouter.from_ranges(
        {"mid": (100, 200), "low": (None, 0), "top": (200, 300), "far": (1000, None)}
    )
    assert router.partitions == ("low", "mid", "top", "far")
    assert router.route(-5) == "low"
    assert router.route(100) == "mid"
    assert router.route(200) == "top"
    assert router.route(10**9) == "far"
    for gap in (0, 50, 99, 300, 999):
        with pytest.raises(NoPartitionForKey, match=r"gap|above|below"):
            router.route(gap)


def test_from_ranges_bounded_both_sides() -> None:
    router = RangeRouter.from_ranges([("only", 10, 20)])
    assert router.route(15) == "only"
    with pytest.raises(NoPartitionForKey, match="below the lowest bound 10"):
        router.route(5)
    with pytest.raises(NoPartitionForKey, match="above the highest bound 20"):
        router.route(20)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: RangeRouter([1, 2], ["a", "b"]), "2 bounds need 3 partitions"),
        (lambda: RangeRouter([2, 1], ["a", "b", "c"]), "strictly increasing"),
        (lambda: RangeRouter([1, 1], ["a", "b", "c"]), "strictly increasing"),
        (lambda: RangeRouter([1, "b"], ["a", "b", "c"]), "comparable"),
        (lambda: RangeRouter([None], ["a", "b"]), "cannot be None"),
        (lambda: RangeRouter(5, ["a"]), "sequence"),  # type: ignore[arg-type]
        (lambda: RangeRouter([1], "ab"), "sequence of names"),
        (lambda: RangeRouter([1], ["a", ""]), "non-empty"),
        (lambda: RangeRouter.from_ranges({}), "empty"),
        (lambda: RangeRouter.from_ranges({"a": (0, 10), "b": (5, 20)}), "overlap"),
        (lambda: RangeRouter.from_ranges({"a": (None, 10), "b": (None, 20)}), "overlap"),
        (lambda: RangeRouter.from_ranges({"a": (0, None), "b": (5, 20)}), "overlap"),
        (lambda: RangeRouter.from_ranges({"a": (10, 10)}), "empty"),
        (lambda: RangeRouter.from_ranges({"a": (0, 10), "b": ("x", "y")}), "comparable"),
        (lambda: RangeRouter.from_ranges([("a", 0)]), "expected"),
    ],
)
def test_range_router_validation(build: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        build()


# ---------------------------------------------------------------------------
# LookupRouter and CallableRouter
# ---------------------------------------------------------------------------


def test_lookup_router_distinguishes_key_types() -> None:
    router = LookupRouter({1: "int", "1": "str", b"1": "bytes", (1,): "tuple"}, default="other")
    assert [router.route(k) for k in (1, "1", b"1", (1,), 2)] == [
        "int",
        "str",
        "bytes",
        "tuple",
        "other",
    ]
    assert router.route(bytearray(b"1")) == "bytes"
    assert router.partitions == ("bytes", "int", "other", "str", "tuple")
    assert len(router) == 4


def test_lookup_router_without_default() -> None:
    router = LookupRouter({"acme": "big"})
    with pytest.raises(NoPartitionForKey, match="not in the lookup table"):
        router.route("other")


@pytest.mark.parametrize(
    ("mapping", "default", "match"),
    [
        ({}, None, "no key could be routed"),
        ({1.5: "a"}, None, "unsupported type"),
        ({1: "a", One(): "b"}, None, "same shard key"),
        ({1: ""}, None, "non-empty"),
        ([(1, "a")], None, "mapping"),
    ],
)
def test_lookup_router_validation(mapping: Any, default: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        LookupRouter(mapping, default=default)


def test_callable_router_checks_the_answer() -> None:
    router = CallableRouter(lambda key: "eu" if key < 100 else "mars", ["eu", "us"])
    assert router.route(5) == "eu"
    with pytest.raises(UnknownPartition, match=r"'mars'.*'eu', 'us'") as info:
        router.route(500)
    assert info.value.partition == "mars"
    with pytest.raises(RoutingError, match="must return a partition name"):
        CallableRouter(lambda key: 3, ["a"]).route(1)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="not callable"):
        CallableRouter("nope", ["a"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# make_router, describe, repr
# ---------------------------------------------------------------------------


def test_make_router_from_strings_and_none() -> None:
    assert isinstance(make_router(None, ["a", "b"]), HashRouter)
    assert isinstance(make_router("hash", ["a", "b"]), HashRouter)
    pg = make_router("pg_hash", ["a", "b"])
    assert isinstance(pg, PgHashRouter)
    assert pg.partitions == ("a", "b")


def test_make_router_from_toml_style_tables() -> None:
    hashed = make_router(
        {"strategy": "hash", "buckets": 4, "assignment": {"0": "b", "1": "a", "2": "a", "3": "b"}},
        ["a", "b"],
    )
    assert isinstance(hashed, HashRouter)
    assert hashed.assignment == ("b", "a", "a", "b")
    pg = make_router(
        {
            "strategy": "pg_hash",
            "partitions": {"1": "b", "0": "a"},
            "modulus": 2,
            "key_types": ["uuid"],
        },
        ["a", "b"],
    )
    assert isinstance(pg, PgHashRouter)
    assert pg.key_types == ("uuid",)
    mixed = make_router(
        {"strategy": "pg_hash", "partitions": [[2, 0, "a"], [2, 1, "b"]]}, ["a", "b"]
    )
    assert mixed.partitions == ("a", "b")
    ranged = make_router({"strategy": "range", "bounds": [10]}, ["a", "b"])
    assert ranged.route(10) == "b"
    spans = make_router(
        {"strategy": "range", "ranges": {"a": [None, 0], "b": [0, None]}}, ["a", "b"]
    )
    assert spans.route(-1) == "a"
    lookup = make_router(
        {"strategy": "lookup", "mapping": {"7": "b"}, "key_type": "int", "default": "a"}, ["a", "b"]
    )
    assert lookup.route(7) == "b"
    assert lookup.route("7") == "a"


def test_make_router_accepts_routers_and_callables() -> None:
    router = RangeRouter([1], ["a", "b"])
    assert make_router(router, ["a", "b", "c"]) is router
    wrapped = make_router(lambda key: "c", ["a", "b", "c"])
    assert isinstance(wrapped, CallableRouter)
    assert wrapped.route(1) == "c"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("consistent", "unknown routing strategy 'consistent'.*'hash' and 'pg_hash'"),
        ("range", "needs options"),
        ({"strategy": "modulo"}, "unknown routing strategy 'modulo'.*'hash', 'pg_hash', 'range'"),
        ({"buckets": 4}, "unknown routing strategy None"),
        ({"strategy": "hash", "bukets": 4}, "unknown option 'bukets'.*'buckets'"),
        ({"strategy": "pg_hash", "buckets": 4}, "unknown option 'buckets'.*'modulus'"),
        ({"strategy": "range"}, "needs bounds"),
        ({"strategy": "range", "ranges": {"a": [0, 1]}, "bounds": [1]}, "not both"),
        ({"strategy": "lookup", "mapping": {"x": "a"}, "key_type": "int"}, "not a valid int"),
        ({"strategy": "lookup", "mapping": {"x": "a"}, "key_type": "float"}, "unknown key_type"),
        ({"strategy": "hash", "assignment": {"one": "a"}, "buckets": 1}, "must be integers"),
        ({"strategy": "hash", "partitions": ["a", "zz"]}, "'zz', which are not configured"),
        ({"strategy": "range", "bounds": [1], "partitions": ["a", "zz"]}, "'zz'"),
        (RangeRouter([1], ["a", "zz"]), "'zz', which are not configured"),
        (42, "cannot build a router from 42"),
    ],
)
def test_make_router_rejects_bad_configuration(spec: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make_router(spec, ["a", "b"])


def test_make_router_validates_partitions() -> None:
    with pytest.raises(ConfigurationError, match="more than once"):
        make_router(None, ["a", "a"])


@pytest.mark.parametrize(
    "router",
    [
        HashRouter(names(3), buckets=16),
        HashRouter(names(2), buckets=4, assignment=["p1", "p1", "p0", "p1"]),
        PgHashRouter(names(5)),
        PgHashRouter({0: "a", 2: "c"}, modulus=4, key_types="int4"),
        PgHashRouter([(2, 0, "a"), (4, 1, "b")]),
        RangeRouter([10, 20], ["a", "b", "c"]),
        RangeRouter.from_ranges({"a": (None, 5), "b": (7, None)}),
    ],
    ids=repr,
)
def test_describe_is_json_and_rebuilds_an_equivalent_router(router: Router) -> None:
    spec = router.describe()
    assert json.loads(json.dumps(spec)) == spec
    rebuilt = make_router(json.loads(json.dumps(spec)), router.partitions)
    assert rebuilt.describe() == spec
    for key in range(-50, 50):
        assert outcome(rebuilt, key) == outcome(router, key)


def always_a(key: Any) -> str:
    return "a"


def test_describe_of_lookup_and_callable() -> None:
    assert LookupRouter({1: "a"}, default="b").describe() == {
        "strategy": "lookup",
        "partitions": ["a", "b"],
        "keys": 1,
        "default": "b",
    }
    described = CallableRouter(always_a, ["a"]).describe()
    assert described["strategy"] == "callable"
    assert described["function"].endswith("test_routing.always_a")
    json.dumps(described)


def test_repr_is_short_and_names_the_parameters() -> None:
    assert repr(HashRouter(["a", "b"], buckets=8)) == (
        "HashRouter(partitions=['a', 'b'], buckets=8)"
    )
    rebalanced, _ = HashRouter(names(4)).rebalance(names(5))
    text = repr(rebalanced)
    assert "assignment=<1024 items>" in text
    assert len(text) < 200
    assert repr(PgHashRouter(["a", "b"])) == "PgHashRouter(partitions=['a', 'b'], modulus=2)"
