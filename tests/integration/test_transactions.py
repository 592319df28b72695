"""Writes across partitions: per-partition commits, two-phase commit, and crash recovery.

Four partitions on two private servers, interleaved so that one server going
down takes out every other partition: server A holds p0 and p2, server B
holds p1 and p3.  The router sends account *n* to partition ``p{n % 4}``.
Every partition has

* ``ledger(id, account, amount)``, with a seed row ``id = n`` on ``p{n}`` that
  two-phase tests update (so that a prepared transaction holds a row lock a
  ``FOR UPDATE NOWAIT`` can see), and
* ``transfers(id, ref)`` whose ``UNIQUE (ref)`` is ``DEFERRABLE INITIALLY
  DEFERRED``: a duplicate ``ref`` is inserted fine and fails only at COMMIT
  or PREPARE TRANSACTION, which is where the failures under test must happen.

Everything is read back through separate, unpooled engines, not through the
:class:`.ShardedEngine` under test.  Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool import ShardedEngine, create_sharded_engine, recovery, transactions
from sqlalchemy_partpool.errors import PartialCommitError, RoutingError, TwoPhaseError
from sqlalchemy_partpool.testing import PostgresServer, free_port, unique_name

pytestmark = pytest.mark.cluster

PARTITIONS = ("p0", "p1", "p2", "p3")
LOCK_NOT_AVAILABLE = "55P03"
SEED_AMOUNT = 100
# bounds for waits on other processes; generous, the usual case takes well under a second
MARKER_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0

_DDL = (
    "CREATE TABLE ledger (id int PRIMARY KEY, account int NOT NULL, amount int NOT NULL)",
    "CREATE TABLE transfers (id int PRIMARY KEY, ref int NOT NULL, "
    "CONSTRAINT transfers_ref_key UNIQUE (ref) DEFERRABLE INITIALLY DEFERRED)",
)

INSERT_LEDGER = text("INSERT INTO ledger (id, account, amount) VALUES (:id, :account, :amount)")
INSERT_TRANSFER = text("INSERT INTO transfers (id, ref) VALUES (:id, :ref)")
CREDIT_SEED = text("UPDATE ledger SET amount = amount + :amount WHERE id = :account")


def route(account: int) -> str:
    return f"p{account % 4}"


def entry(account: int) -> dict[str, int]:
    """The ledger entry the tests write for *account* (on partition ``p{account % 4}``)."""
    return {"id": 10 + account, "account": account, "amount": 5}


def row(account: int) -> tuple[int, int, int]:
    """That entry, as read back."""
    return (10 + account, account, 5)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def servers(pg_bindir: Path) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """Two private servers for the whole module (each test gets fresh databases on them).

    Starting a cluster costs over a second, so the servers are shared; a test
    that kills one restarts it, and the ``cluster`` fixture restarts it
    anyway if the test failed before it could.  ``synchronous_commit`` is on:
    these tests check what survives a crash.
    """
    pair = tuple(
        PostgresServer(
            bindir=pg_bindir,
            max_connections=50,
            max_prepared_transactions=10,
            settings={"synchronous_commit": "on"},
        )
        for _ in range(2)
    )
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda s: s.start(), pair))
        yield pair[0], pair[1]
    finally:
        for server in pair:
            server.cleanup()


@dataclass
class Cluster:
    """Four partitions' URLs and servers, the engine under test, and direct engines."""

    urls: dict[str, str]
    servers: dict[str, PostgresServer]
    databases: dict[str, str]
    direct: dict[str, Engine]
    sharded: ShardedEngine
    others: list[ShardedEngine] = field(default_factory=list)

    def make_sharded(
        self, partitions: dict[str, str] | None = None, **options: Any
    ) -> ShardedEngine:
        """Another ShardedEngine over these (or the given) partitions, disposed at teardown."""
        settings: dict[str, Any] = {
            "router": route,
            "max_connections": 4,
            "connect_timeout": 2,
            "probe_max_interval": 0.2,
            **options,
        }
        sharded = create_sharded_engine(partitions or self.urls, **settings)
        self.others.append(sharded)
        return sharded

    # -- looking from outside -----------------------------------------------------------

    def ledger(self, partition: str) -> list[tuple[int, int, int]]:
        with self.direct[partition].connect() as conn:
            rows = conn.execute(text("SELECT id, account, amount FROM ledger ORDER BY id"))
            return [(r[0], r[1], r[2]) for r in rows]

    def new_ledger_rows(self, partition: str) -> list[tuple[int, int, int]]:
        """Ledger rows other than the seed row."""
        seed = int(partition[1:])
        return [row for row in self.ledger(partition) if row[0] != seed]

    def seed_amount(self, partition: str) -> int:
        with self.direct[partition].connect() as conn:
            return int(
                conn.execute(
                    text("SELECT amount FROM ledger WHERE id = :id"), {"id": int(partition[1:])}
                ).scalar_one()
            )

    def transfers(self, partition: str) -> list[tuple[int, int]]:
        with self.direct[partition].connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(text("SELECT id, ref FROM transfers"))]

    def prepared(self, partition: str) -> set[str]:
        """Global ids of the transactions prepared in this partition's database."""
        with self.direct[partition].connect() as conn:
            return set(
                conn.execute(
                    text("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
                ).scalars()
            )

    def all_prepared(self) -> dict[str, set[str]]:
        return {p: self.prepared(p) for p in PARTITIONS}

    def decisions(self, log_partition: str = "p0") -> set[str]:
        """The gtrids in the two-phase decision log (empty if the table was never created)."""
        with self.direct[log_partition].connect() as conn:
            if conn.execute(text("SELECT to_regclass(:t)"), {"t": recovery.LOG_TABLE}).scalar():
                return set(conn.execute(text(f"SELECT gtrid FROM {recovery.LOG_TABLE}")).scalars())
        return set()

    def seed_row_is_locked(self, partition: str) -> bool:
        """Whether another transaction holds the seed row's lock (FOR UPDATE NOWAIT fails)."""
        with self.direct[partition].connect() as conn:
            try:
                conn.execute(
                    text("SELECT id FROM ledger WHERE id = :id FOR UPDATE NOWAIT"),
                    {"id": int(partition[1:])},
                ).all()
            except OperationalError as exc:
                if getattr(exc.orig, "pgcode", None) == LOCK_NOT_AVAILABLE:
                    return True
                raise
            finally:
                conn.rollback()
        return False

    def key_is_locked(self, partition: str, row_id: int) -> bool:
        """Whether inserting ledger row *row_id* waits on another transaction's insert.

        A prepared INSERT is invisible to SELECT (so FOR UPDATE finds nothing
        to lock), but the unique index makes a second insert of the key wait
        for it; ``lock_timeout`` bounds that wait.
        """
        with self.direct[partition].connect() as conn:
            try:
                conn.execute(text("SET LOCAL lock_timeout = '200ms'"))
                conn.execute(INSERT_LEDGER, {"id": row_id, "account": -1, "amount": 0})
            except OperationalError as exc:
                if getattr(exc.orig, "pgcode", None) == LOCK_NOT_AVAILABLE:
                    return True
                raise
            except IntegrityError:
                return False  # the key exists, committed: nobody holds it
            finally:
                conn.rollback()
        return False


def _prepare_database(url: str, partition: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            for ddl in _DDL:
                conn.execute(text(ddl))
            seed = int(partition[1:])
            conn.execute(INSERT_LEDGER, {"id": seed, "account": seed, "amount": SEED_AMOUNT})
    finally:
        engine.dispose()


def _rollback_leftovers(server: PostgresServer, database: str) -> None:
    if not server.is_running():
        return
    raw = server.connect(database, connect_timeout=5)
    try:
        raw.autocommit = True
        with raw.cursor() as cur:
            cur.execute("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
            for (gid,) in cur.fetchall():
                cur.execute("ROLLBACK PREPARED %s", (gid,))
    finally:
        raw.close()


@pytest.fixture
def cluster(servers: tuple[PostgresServer, PostgresServer]) -> Iterator[Cluster]:
    """Fresh databases p0..p3 (p0, p2 on one server; p1, p3 on the other), tables seeded."""
    a, b = servers
    for server in servers:
        server.start()  # a no-op unless an earlier test left it down
    placement = {"p0": a, "p1": b, "p2": a, "p3": b}
    databases = {p: unique_name(f"tx_{p}") for p in PARTITIONS}
    urls = {p: placement[p].create_database(databases[p]) for p in PARTITIONS}
    for p in PARTITIONS:
        _prepare_database(urls[p], p)
    direct = {p: create_engine(urls[p], poolclass=NullPool) for p in PARTITIONS}
    sharded = create_sharded_engine(
        urls, router=route, max_connections=4, connect_timeout=2, probe_max_interval=0.2
    )
    made = Cluster(urls, placement, databases, direct, sharded)
    try:
        yield made
    finally:
        for engine in [sharded, *made.others]:
            engine.dispose()
        for engine in direct.values():
            engine.dispose()
        for p in PARTITIONS:
            _rollback_leftovers(placement[p], databases[p])
            if placement[p].is_running():
                placement[p].drop_database(databases[p])


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def actions_by_kind(actions: list[recovery.RecoveryAction]) -> dict[str, set[tuple[str, str]]]:
    kinds: dict[str, set[tuple[str, str]]] = {}
    for action in actions:
        kinds.setdefault(action.action, set()).add((action.partition, action.gid))
    return kinds


def gids(gtrid: str, partitions: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(p, f"partpool:{gtrid}:{p}") for p in partitions}


# --------------------------------------------------------------------------- without two-phase


def test_begin_many_commits_on_every_partition_it_touched(cluster):
    with cluster.sharded.begin_many() as tx:
        for account in (0, 1, 2):
            tx.execute(INSERT_LEDGER, entry(account), key=account)
        assert tx.partitions == ("p0", "p1", "p2")

    for account in (0, 1, 2):
        assert cluster.new_ledger_rows(f"p{account}") == [row(account)]
    assert cluster.new_ledger_rows("p3") == []


def test_begin_many_rolls_back_every_partition_when_the_block_raises(cluster):
    with pytest.raises(ZeroDivisionError), cluster.sharded.begin_many() as tx:
        for account in (0, 1, 2):
            tx.execute(INSERT_LEDGER, entry(account), key=account)
        _ = 1 / 0

    for p in PARTITIONS:
        assert cluster.new_ledger_rows(p) == []


def test_commit_failing_after_others_committed_says_exactly_where_the_data_stands(cluster):
    # touched in reverse order: commits still go in name order, p0 first
    with pytest.raises(PartialCommitError) as caught, cluster.sharded.begin_many() as tx:
        for account in (3, 2, 1, 0):
            tx.execute(INSERT_LEDGER, entry(account), key=account)
        # a duplicate ref on p2 passes the INSERTs and fails at p2's COMMIT
        tx.execute(INSERT_TRANSFER, {"id": 1, "ref": 7}, key=2)
        tx.execute(INSERT_TRANSFER, {"id": 2, "ref": 7}, key=2)

    error = caught.value
    assert error.committed == ("p0", "p1")
    assert error.failed == "p2"
    assert error.partition == "p2"
    assert error.rolled_back == ("p3",)
    assert isinstance(error.__cause__, IntegrityError)
    assert "transfers_ref_key" in str(error)
    # what the servers hold, read directly
    assert cluster.new_ledger_rows("p0") == [row(0)]
    assert cluster.new_ledger_rows("p1") == [row(1)]
    assert cluster.new_ledger_rows("p2") == []
    assert cluster.transfers("p2") == []
    assert cluster.new_ledger_rows("p3") == []


def test_commit_failing_on_the_first_partition_raises_the_driver_error_and_applies_nothing(
    cluster,
):
    with pytest.raises(IntegrityError), cluster.sharded.begin_many() as tx:
        tx.execute(INSERT_TRANSFER, {"id": 1, "ref": 7}, key=0)
        tx.execute(INSERT_TRANSFER, {"id": 2, "ref": 7}, key=0)
        tx.execute(INSERT_LEDGER, entry(1), key=1)

    assert cluster.transfers("p0") == []
    assert cluster.new_ledger_rows("p1") == []


def test_partitions_restriction_refuses_any_other_partition(cluster):
    with pytest.raises(RoutingError) as caught, cluster.sharded.begin_many(["p0", "p1"]) as tx:
        tx.execute(INSERT_LEDGER, entry(0), key=0)
        tx.execute(INSERT_LEDGER, entry(2), key=2)

    assert caught.value.partition == "p2"
    assert "begin_many(partitions=" in str(caught.value)
    # the block raised, so what it wrote on an allowed partition was rolled back
    assert cluster.new_ledger_rows("p0") == []
    assert cluster.new_ledger_rows("p2") == []


# --------------------------------------------------------------------------- two-phase


def test_twophase_commit_applies_on_every_partition_and_leaves_nothing_behind(cluster):
    with cluster.sharded.begin_many(twophase=True) as tx:
        for account in (0, 1, 2):
            tx.execute(INSERT_LEDGER, entry(account), key=account)
            tx.execute(CREDIT_SEED, {"account": account, "amount": 5}, key=account)

    for account in (0, 1, 2):
        p = f"p{account}"
        assert cluster.new_ledger_rows(p) == [row(account)]
        assert cluster.seed_amount(p) == SEED_AMOUNT + 5
    assert cluster.all_prepared() == {p: set() for p in PARTITIONS}
    assert tx.gtrid not in cluster.decisions()


def test_twophase_prepare_failure_rolls_back_everywhere(cluster):
    with (
        pytest.raises(TwoPhaseError) as caught,
        cluster.sharded.begin_many(twophase=True) as tx,
    ):
        for account in (0, 1, 2):
            tx.execute(INSERT_LEDGER, entry(account), key=account)
        # checked at PREPARE TRANSACTION on p1, after p0 was prepared
        tx.execute(INSERT_TRANSFER, {"id": 1, "ref": 7}, key=1)
        tx.execute(INSERT_TRANSFER, {"id": 2, "ref": 7}, key=1)

    error = caught.value
    assert error.outcome == "rolled_back"
    assert error.partition == "p1"
    assert error.xid == tx.gtrid
    assert isinstance(error.__cause__, IntegrityError)
    for p in PARTITIONS:
        assert cluster.new_ledger_rows(p) == []
        assert cluster.transfers(p) == []
    assert cluster.all_prepared() == {p: set() for p in PARTITIONS}
    assert cluster.decisions() == set()


# --------------------------------------------------------------------------- coordinator crashes

_COORDINATOR = """
import json, sys, time
from sqlalchemy import text
from sqlalchemy_partpool import create_sharded_engine, transactions

config = json.loads(sys.argv[1])

def stop_here(gtrid):
    print("STOPPED", gtrid, flush=True)
    time.sleep(120)  # until killed

setattr(transactions, config["hook"], stop_here)
sharded = create_sharded_engine(
    config["partitions"], router=lambda account: f"p{account % 4}", max_connections=4
)
with sharded.begin_many(twophase=True) as tx:
    for account in config["accounts"]:
        tx.execute(
            text("INSERT INTO ledger (id, account, amount) VALUES (:id, :account, 5)"),
            {"id": 10 + account, "account": account},
            key=account,
        )
        tx.execute(
            text("UPDATE ledger SET amount = amount + 5 WHERE id = :account"),
            {"account": account},
            key=account,
        )
print("FINISHED without stopping", flush=True)
"""


def crash_coordinator(cluster: Cluster, hook: str, accounts: list[int], tmp_path: Path) -> str:
    """Run a coordinator in a subprocess, SIGKILL it when *hook* is reached; its gtrid."""
    config = {"partitions": cluster.urls, "hook": hook, "accounts": accounts}
    stderr_path = tmp_path / "coordinator.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _COORDINATOR, json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="coordinator-stdout", daemon=True).start()
    try:
        deadline = time.monotonic() + MARKER_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the coordinator did not reach {hook} within {MARKER_TIMEOUT}s")
            if line is None:
                pytest.fail(
                    f"the coordinator exited before {hook}:\n"
                    + stderr_path.read_text(errors="replace")[-3000:]
                )
            if line.startswith("STOPPED "):
                gtrid = line.split()[1]
                break
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(EXIT_TIMEOUT) == -signal.SIGKILL
        return gtrid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


def test_coordinator_killed_after_the_decision_is_committed_by_recovery(cluster, tmp_path):
    touched = ("p0", "p1", "p2")
    gtrid = crash_coordinator(cluster, "_after_decision_hook", [0, 1, 2], tmp_path)

    # in doubt: prepared on every participant, holding their locks, nothing visible
    assert cluster.all_prepared() == {
        **{p: {f"partpool:{gtrid}:{p}"} for p in touched},
        "p3": set(),
    }
    assert gtrid in cluster.decisions()
    for account, p in enumerate(touched):
        assert cluster.seed_row_is_locked(p)
        assert cluster.key_is_locked(p, 10 + account)
        assert cluster.new_ledger_rows(p) == []
        assert cluster.seed_amount(p) == SEED_AMOUNT

    actions = cluster.sharded.recover_twophase()

    assert actions_by_kind(actions) == {"commit": gids(gtrid, touched)}
    assert cluster.all_prepared() == {p: set() for p in PARTITIONS}
    for account, p in enumerate(touched):
        assert cluster.new_ledger_rows(p) == [row(account)]
        assert cluster.seed_amount(p) == SEED_AMOUNT + 5
        assert not cluster.seed_row_is_locked(p)

    # a second run finds nothing to do, and doubles nothing
    assert cluster.sharded.recover_twophase() == []
    for account, p in enumerate(touched):
        assert cluster.new_ledger_rows(p) == [row(account)]
        assert cluster.seed_amount(p) == SEED_AMOUNT + 5


def test_coordinator_killed_before_the_decision_is_rolled_back_once_old_enough(cluster, tmp_path):
    touched = ("p0", "p1", "p2")
    gtrid = crash_coordinator(cluster, "_after_prepare_hook", [0, 1, 2], tmp_path)

    assert cluster.all_prepared() == {
        **{p: {f"partpool:{gtrid}:{p}"} for p in touched},
        "p3": set(),
    }
    assert gtrid not in cluster.decisions()
    assert all(cluster.seed_row_is_locked(p) for p in touched)

    # too recent to presume its coordinator dead: left alone
    waiting = cluster.sharded.recover_twophase(older_than=3600)
    assert actions_by_kind(waiting) == {"wait": gids(gtrid, touched)}
    assert cluster.all_prepared()["p1"] == {f"partpool:{gtrid}:p1"}

    rolled = cluster.sharded.recover_twophase(older_than=0)

    assert actions_by_kind(rolled) == {"rollback": gids(gtrid, touched)}
    assert cluster.all_prepared() == {p: set() for p in PARTITIONS}
    for p in touched:
        assert cluster.new_ledger_rows(p) == []
        assert cluster.seed_amount(p) == SEED_AMOUNT
        assert not cluster.seed_row_is_locked(p)
    assert cluster.sharded.recover_twophase(older_than=0) == []


# --------------------------------------------------------------------------- participant crash


def test_participant_killed_before_commit_prepared_is_committed_after_restart(cluster, monkeypatch):
    server_b = cluster.servers["p1"]  # holds p1 and p3; p3 is not in this transaction

    def kill_p1_server(gtrid: str) -> None:
        server_b.kill()

    monkeypatch.setattr(transactions, "_after_decision_hook", kill_p1_server)
    with (
        pytest.raises(TwoPhaseError) as caught,
        cluster.sharded.begin_many(twophase=True) as tx,
    ):
        for account in (0, 1, 2):
            tx.execute(INSERT_LEDGER, entry(account), key=account)
    monkeypatch.setattr(transactions, "_after_decision_hook", None)

    error = caught.value
    assert error.outcome == "in_doubt"
    assert error.partition == "p1"
    assert error.xid == tx.gtrid
    assert "'p1'" in str(error)
    assert "recover_twophase" in str(error)
    assert cluster.new_ledger_rows("p0") == [row(0)]
    assert cluster.new_ledger_rows("p2") == [row(2)]
    assert cluster.prepared("p0") == cluster.prepared("p2") == set()

    # while p1 is down: its server cannot be asked, nothing is done there
    down = cluster.sharded.recover_twophase()
    assert actions_by_kind(down) == {"skip": {("p1", ""), ("p3", "")}}
    assert tx.gtrid in cluster.decisions()

    server_b.start()
    # the prepared transaction survived the crash (PREPARE TRANSACTION is flushed)
    assert cluster.prepared("p1") == {f"partpool:{tx.gtrid}:p1"}
    assert cluster.new_ledger_rows("p1") == []
    assert wait_until(lambda: cluster.sharded.partition_state("p1") == "up", timeout=15)

    actions = cluster.sharded.recover_twophase()

    assert actions_by_kind(actions) == {"commit": gids(tx.gtrid, ("p1",))}
    assert cluster.all_prepared() == {p: set() for p in PARTITIONS}
    for account in (0, 1, 2):
        assert cluster.new_ledger_rows(f"p{account}") == [row(account)]
    assert cluster.sharded.recover_twophase() == []
    for account in (0, 1, 2):
        assert cluster.new_ledger_rows(f"p{account}") == [row(account)]


# --------------------------------------------------------------------------- what recovery touches


class CoordinatorStopped(Exception):
    """Raised by a hook to stop a coordinator in its tracks, in-process."""


def _prepare_by_hand(cluster: Cluster, partition: str, gid: str, row_id: int) -> None:
    raw = cluster.servers[partition].connect(cluster.databases[partition], connect_timeout=5)
    try:
        with raw.cursor() as cur:
            cur.execute(
                "INSERT INTO ledger (id, account, amount) VALUES (%s, %s, 1)",
                (row_id, int(partition[1:])),
            )
            cur.execute("PREPARE TRANSACTION %s", (gid,))
    finally:
        raw.close()  # the prepared transaction outlives the session


def test_recovery_spares_foreign_transactions_and_unreachable_partitions_dry_run_nothing(
    cluster, monkeypatch
):
    # someone else's prepared transaction on p1
    _prepare_by_hand(cluster, "p1", "someone-else", 901)

    # ours, decided, on p0 and p2: its coordinator stops after the decision
    def stop(gtrid: str) -> None:
        raise CoordinatorStopped(gtrid)

    monkeypatch.setattr(transactions, "_after_decision_hook", stop)
    with pytest.raises(CoordinatorStopped), cluster.sharded.begin_many(twophase=True) as tx:
        tx.execute(INSERT_LEDGER, entry(0), key=0)
        tx.execute(INSERT_LEDGER, entry(2), key=2)
    monkeypatch.setattr(transactions, "_after_decision_hook", None)
    decided = tx.gtrid
    # ours, undecided, on p3: as a dead coordinator leaves it
    undecided = uuid.uuid4().hex
    _prepare_by_hand(cluster, "p3", f"partpool:{undecided}:p3", 13)
    before = cluster.all_prepared()
    assert before == {
        "p0": {f"partpool:{decided}:p0"},
        "p1": {"someone-else"},
        "p2": {f"partpool:{decided}:p2"},
        "p3": {f"partpool:{undecided}:p3"},
    }
    # the same partitions plus one whose server does not exist
    with_dead = cluster.make_sharded(
        {**cluster.urls, "p9": f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/gone"},
        lazy=True,
        connect_timeout=1,
    )
    expected = {
        "skip": {("p9", "")},
        "commit": gids(decided, ("p0", "p2")),
        "rollback": gids(undecided, ("p3",)),
    }

    planned = with_dead.recover_twophase(older_than=0, dry_run=True)

    assert actions_by_kind(planned) == expected
    assert cluster.all_prepared() == before
    assert decided in cluster.decisions()
    assert all(cluster.new_ledger_rows(p) == [] for p in PARTITIONS)

    done = with_dead.recover_twophase(older_than=0)

    assert actions_by_kind(done) == expected
    assert "someone-else" not in {a.gid for a in done}
    assert cluster.all_prepared() == {p: set() for p in ("p0", "p2", "p3")} | {
        "p1": {"someone-else"}
    }
    assert cluster.new_ledger_rows("p0") == [row(0)]
    assert cluster.new_ledger_rows("p2") == [row(2)]
    assert cluster.new_ledger_rows("p3") == []
    # with a partition unreachable the log is not pruned: it might still hold work there
    assert decided in cluster.decisions()

    # all partitions reachable: nothing left to do, old records pruned, the foreign one kept
    assert cluster.sharded.recover_twophase(older_than=0) == []
    assert decided not in cluster.decisions()
    assert cluster.prepared("p1") == {"someone-else"}
    assert cluster.key_is_locked("p1", 901)

    with cluster.direct["p1"].connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("ROLLBACK PREPARED 'someone-else'")
        )
    assert cluster.prepared("p1") == set()


# --------------------------------------------------------------------------- races and drivers


def _waiting_on_a_lock(cluster: Cluster, partition: str) -> bool:
    with cluster.direct[partition].connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def test_recovery_and_a_slow_coordinator_never_split_a_transaction(cluster):
    # An open transaction on p1 holds ref 7 in the deferred unique index, so
    # the coordinator's PREPARE on p1 waits for it, with p0 already prepared.
    blocker = cluster.direct["p1"].connect()
    outcome: dict[str, Any] = {}

    def coordinate() -> None:
        try:
            with cluster.sharded.begin_many(twophase=True) as tx:
                outcome["gtrid"] = tx.gtrid
                tx.execute(INSERT_LEDGER, entry(0), key=0)
                tx.execute(INSERT_LEDGER, entry(1), key=1)
                tx.execute(INSERT_TRANSFER, {"id": 1, "ref": 7}, key=1)
        except Exception as exc:
            outcome["error"] = exc

    coordinator = threading.Thread(target=coordinate, name="slow-coordinator")
    try:
        blocker.execute(INSERT_TRANSFER, {"id": 50, "ref": 7})
        coordinator.start()
        assert wait_until(lambda: cluster.prepared("p0") != set(), timeout=10)
        assert wait_until(lambda: _waiting_on_a_lock(cluster, "p1"), timeout=10)
        gtrid = outcome["gtrid"]

        # a recovery run that presumes every undecided transaction abandoned
        actions = cluster.sharded.recover_twophase(older_than=0)
        assert actions_by_kind(actions) == {"rollback": gids(gtrid, ("p0",))}
    finally:
        blocker.rollback()  # p1's PREPARE goes through now
        blocker.close()
        coordinator.join(15)
    assert not coordinator.is_alive()

    # the coordinator must not commit on p1 what recovery rolled back on p0
    error = outcome.get("error")
    assert isinstance(error, TwoPhaseError), error
    assert error.outcome == "rolled_back"
    assert cluster.new_ledger_rows("p0") == []
    assert cluster.new_ledger_rows("p1") == []
    assert cluster.all_prepared() == {p: set() for p in PARTITIONS}


def test_recovery_commits_with_psycopg3_too(cluster, monkeypatch):
    pytest.importorskip("psycopg")
    urls = {p: url.replace("+psycopg2://", "+psycopg://") for p, url in cluster.urls.items()}
    sharded = cluster.make_sharded(urls)

    def stop(gtrid: str) -> None:
        raise CoordinatorStopped(gtrid)

    monkeypatch.setattr(transactions, "_after_decision_hook", stop)
    with pytest.raises(CoordinatorStopped), sharded.begin_many(twophase=True) as tx:
        tx.execute(INSERT_LEDGER, entry(0), key=0)
        tx.execute(INSERT_LEDGER, entry(1), key=1)
    monkeypatch.setattr(transactions, "_after_decision_hook", None)

    actions = sharded.recover_twophase()

    assert actions_by_kind(actions) == {"commit": gids(tx.gtrid, ("p0", "p1"))}
    assert cluster.new_ledger_rows("p0") == [row(0)]
    assert cluster.new_ledger_rows("p1") == [row(1)]
    assert cluster.all_prepared() == {p: set() for p in PARTITIONS}


@pytest.mark.parametrize("log_reachable", [True, False], ids=["log-reachable", "log-unreachable"])
def test_decision_commit_whose_reply_is_lost_never_splits_the_transaction(
    cluster, fault_proxy, monkeypatch, log_reachable
):
    # p0, a participant and the log partition, is reached through a proxy; its
    # log table gets a deferred trigger that makes the COMMIT of every
    # decision take a second, so the connection can be cut while the server
    # commits: the coordinator cannot know whether its decision was recorded.
    proxy = fault_proxy(cluster.servers["p0"])
    proxied = make_url(cluster.urls["p0"]).set(port=proxy.port)
    sharded = cluster.make_sharded(
        {**cluster.urls, "p0": proxied.render_as_string(hide_password=False)},
        ping_skip_window=0,  # a connection that was cut is never handed out unpinged
    )
    with cluster.direct["p0"].begin() as conn:
        recovery.ensure_log_table(conn)
        conn.execute(
            text(
                "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$"
            )
        )
        conn.execute(
            text(
                f"CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {recovery.LOG_TABLE} "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
            )
        )

    def committing_on_p0() -> bool:
        with cluster.direct["p0"].connect() as conn:
            return bool(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event = 'PgSleep'"
                    )
                ).scalar_one()
            )

    cut: list[bool] = []

    def cut_while_committing() -> None:
        if wait_until(committing_on_p0, timeout=10, step=0.01):
            if not log_reachable:
                proxy.refuse()  # and no new connection gets through either
            proxy.reset_once()  # the server finishes the COMMIT; its reply is lost
            cut.append(True)

    watcher = threading.Thread(target=cut_while_committing, name="cut-while-committing")
    monkeypatch.setattr(transactions, "_after_prepare_hook", lambda gtrid: watcher.start())
    try:
        with pytest.raises(TwoPhaseError) as caught, sharded.begin_many(twophase=True) as tx:
            for account in (0, 1, 2):
                tx.execute(
                    INSERT_LEDGER,
                    entry(account),
                    key=account,
                )
    finally:
        monkeypatch.setattr(transactions, "_after_prepare_hook", None)
        if watcher.is_alive():
            watcher.join(15)
    assert cut == [True]
    # the server went on with the COMMIT whose reply it could not send
    assert wait_until(lambda: tx.gtrid in cluster.decisions(), timeout=10)

    error = caught.value
    assert error.outcome == "in_doubt", error
    assert error.partition == "p0"
    if log_reachable:
        # the coordinator found its decision recorded and committed where it could
        assert "COMMIT PREPARED failed on ['p0']" in str(error)
        assert cluster.new_ledger_rows("p1") == [row(1)]
        assert cluster.new_ledger_rows("p2") == [row(2)]
        in_doubt: tuple[str, ...] = ("p0",)
    else:
        # it could not tell, so it left every partition prepared (never rolled back)
        assert "cannot be checked" in str(error)
        assert all(cluster.new_ledger_rows(p) == [] for p in PARTITIONS)
        in_doubt = ("p0", "p1", "p2")
    assert {p: g for p, g in cluster.all_prepared().items() if g} == {
        p: {f"partpool:{tx.gtrid}:{p}"} for p in in_doubt
    }

    actions = cluster.sharded.recover_twophase()

    assert actions_by_kind(actions) == {"commit": gids(tx.gtrid, in_doubt)}
    assert cluster.all_prepared() == {p: set() for p in PARTITIONS}
    for account in (0, 1, 2):
        assert cluster.new_ledger_rows(f"p{account}") == [row(account)]
