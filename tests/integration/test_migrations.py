"""Alembic migrations per partition, on real PostgreSQL: ``partpool migrate`` and plain
``alembic`` upgrade and downgrade every partition or a subset, a failure on one partition
is reported and recoverable, concurrent runs never apply a revision twice, offline SQL
comes per partition, ``status`` flags drift, ``init`` writes a working environment."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.util import CommandError
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from sqlalchemy_partpool import ShardedConfig
from sqlalchemy_partpool.migrate_commands import status, upgrade
from sqlalchemy_partpool.migrate_report import (
    DONE,
    FAILED,
    MigrationReport,
    PartitionOutcome,
    Progress,
    format_report,
)
from sqlalchemy_partpool.migrate_run import MigrateOptions, MigrationFailed
from sqlalchemy_partpool.migrations import lock_key

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC_INI = ROOT / "alembic.ini"
HEAD = "0003"
PASSWORD = "Mg-s3cret-pw-42"  # trust auth on the test servers ignores it
WAIT = 30.0  # bound on every wait in this file


# -- helpers ---------------------------------------------------------------------------


def env_with(partitions: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment without PARTPOOL_* settings, plus these partitions."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARTPOOL_")}
    env["PARTPOOL_PARTITIONS"] = " ".join(f"{n}={u}" for n, u in partitions.items())
    env.update(extra)
    return env


def migrate(
    partitions: dict[str, str], *args: str, cwd: Path = ROOT, **extra: str
) -> subprocess.CompletedProcess[str]:
    """``partpool migrate ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sqlalchemy_partpool", "migrate", *args],
        cwd=cwd,
        env=env_with(partitions, **extra),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def alembic(partitions: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Plain ``alembic -c alembic.ini ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ALEMBIC_INI), *args],
        cwd=ROOT,
        env=env_with(partitions),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def engine(url: str) -> Engine:
    return create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


def execute(url: str, *statements: str) -> None:
    with engine(url).connect() as conn:
        for statement in statements:
            conn.execute(text(statement))


def version(url: str) -> str | None:
    """The partition's revision read straight from its version table (None: no table/row)."""
    with engine(url).connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def tables(url: str) -> set[str]:
    with engine(url).connect() as conn:
        return set(inspect(conn).get_table_names())


def columns(url: str, table: str) -> dict[str, bool]:
    """Column name -> nullable."""
    with engine(url).connect() as conn:
        return {c["name"]: c["nullable"] for c in inspect(conn).get_columns(table)}


def versions(partitions: dict[str, str]) -> dict[str, str | None]:
    return {name: version(url) for name, url in partitions.items()}


def report_rows(output: str) -> dict[str, list[str]]:
    """The final report's rows by partition: [before, after, result]."""
    lines = output.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("partition  before"))
    rows = {}
    for line in lines[header + 2 :]:
        cells = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        if len(cells) == 4:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def four(make_databases) -> dict[str, str]:
    """Four empty partition databases, p0..p3."""
    return {f"p{i}": url for i, url in enumerate(make_databases(4, prefix="mig"))}


# -- upgrade and downgrade -------------------------------------------------------------


def test_upgrade_and_downgrade_every_partition_in_parallel_and_in_sequence(four):
    out = ok(migrate(four, "upgrade", "head", "--jobs", "4"))
    assert "up to 4 at once" in out
    rows = report_rows(out)
    assert set(rows) == set(four)
    assert all(
        row[:2] == ["(base)", HEAD] and row[2].startswith("upgraded") for row in rows.values()
    )
    for url in four.values():
        assert version(url) == HEAD
        assert {"widget", "widget_tag", "alembic_version"} <= tables(url)
        assert columns(url, "widget")["color"] is False  # 0003 made it NOT NULL

    out = ok(migrate(four, "downgrade", "base", "--jobs", "1"))
    assert "one after another" in out
    assert all(row[:2] == [HEAD, "(base)"] for row in report_rows(out).values())
    for url in four.values():
        assert version(url) is None
        assert tables(url) == {"alembic_version"}  # each partition keeps its own version table


def test_plain_alembic_applies_to_every_partition_and_a_subset(four):
    out = ok(alembic(four, "upgrade", "head"))
    assert set(report_rows(out)) == set(four)
    assert versions(four) == dict.fromkeys(four, HEAD)

    ok(alembic(four, "-x", "partitions=p1,p3", "-x", "jobs=1", "downgrade", "0001"))
    assert versions(four) == {"p0": HEAD, "p1": "0001", "p2": HEAD, "p3": "0001"}
    assert "color" not in columns(four["p1"], "widget")
    assert "color" in columns(four["p0"], "widget")

    current = ok(alembic(four, "current"))
    assert re.search(r"^p0: 0003 \(head\)$", current, re.MULTILINE)
    assert re.search(r"^p1: 0001$", current, re.MULTILINE)

    history = ok(migrate(four, "history"))
    assert history.index("0002 -> 0003") < history.index("0001 -> 0002")


def test_partitions_option_migrates_only_those(four):
    out = ok(migrate(four, "upgrade", "0002", "--partitions", "p2,p0"))
    assert set(report_rows(out)) == {"p0", "p2"}
    assert versions(four) == {"p0": "0002", "p1": None, "p2": "0002", "p3": None}

    bad = migrate(four, "upgrade", "head", "--partitions", "p0,nope")
    assert bad.returncode == 2
    assert "unknown partition 'nope'" in bad.stderr
    assert versions(four) == {"p0": "0002", "p1": None, "p2": "0002", "p3": None}


# -- failures --------------------------------------------------------------------------


def test_failure_on_one_partition_is_reported_and_a_rerun_after_the_fix_completes(four):
    ok(migrate(four, "upgrade", "0001", "--jobs", "1"))
    # a conflicting object on p2 only: 0002's CREATE TABLE widget_tag fails there
    execute(four["p2"], "CREATE TABLE widget_tag (note text)")

    failed = migrate(four, "upgrade", "head", "--jobs", "4")
    assert failed.returncode == 1
    rows = report_rows(failed.stdout)
    assert rows["p2"][:2] == ["0001", "0001"]
    assert rows["p2"][2].startswith("FAILED: at upgrade 0001 -> 0002")
    assert 'relation "widget_tag" already exists' in rows["p2"][2]
    for name in ("p0", "p1", "p3"):
        assert rows[name][:2] == ["0001", HEAD]
    assert "failed on partition(s) p2" in failed.stderr
    assert "0003: p0, p1, p3; 0001: p2" in failed.stderr
    # p2 rolled back as a whole: no half-applied 0002, the others consistent
    assert versions(four) == {"p0": HEAD, "p1": HEAD, "p2": "0001", "p3": HEAD}
    assert "color" not in columns(four["p2"], "widget")
    assert columns(four["p2"], "widget_tag") == {"note": True}
    assert columns(four["p1"], "widget")["color"] is False

    execute(four["p2"], "DROP TABLE widget_tag")
    out = ok(migrate(four, "upgrade", "head", "--jobs", "1"))
    rows = report_rows(out)
    assert rows["p2"][:2] == ["0001", HEAD]
    assert rows["p2"][2].startswith("upgraded")
    assert all(rows[n][2].startswith("unchanged") for n in ("p0", "p1", "p3"))
    assert versions(four) == dict.fromkeys(four, HEAD)


def test_after_a_failure_no_further_partition_starts_unless_continue_on_error(four):
    config = ShardedConfig.build(four)
    upgrade(config, "0001", alembic_config=ALEMBIC_INI, jobs=1, stdout=io.StringIO())
    execute(four["p1"], "CREATE TABLE widget_tag (note text)")

    out = io.StringIO()
    with pytest.raises(MigrationFailed) as info:
        upgrade(config, alembic_config=ALEMBIC_INI, jobs=1, stdout=out)
    report = info.value.report
    assert [p.status for p in report.partitions] == ["done", "failed", "skipped", "skipped"]
    assert report.partitions[2].error.startswith("not started because p1 failed")
    assert versions(four) == {"p0": HEAD, "p1": "0001", "p2": "0001", "p3": "0001"}
    assert "p1" in str(info.value)
    assert "[2/4] p1: FAILED" in out.getvalue()  # plain log lines: out is not a terminal

    with pytest.raises(MigrationFailed) as info:
        upgrade(config, alembic_config=ALEMBIC_INI, jobs=1, continue_on_error=True, stdout=out)
    assert info.value.report.names(FAILED) == ["p1"]
    assert versions(four) == {"p0": HEAD, "p1": "0001", "p2": HEAD, "p3": HEAD}


def test_an_unreachable_partition_stops_the_run_before_anything_starts(four):
    dead = make_url(four["p3"]).set(port=1).render_as_string(hide_password=False)
    partitions = {**four, "p3": dead}
    done = migrate(partitions, "upgrade", "head", "--jobs", "4")
    assert done.returncode == 1
    rows = report_rows(done.stdout)
    assert rows["p3"][2].startswith("FAILED: cannot read its revision")
    assert rows["p0"][2] == "skipped: not started because p3 could not be reached"
    assert versions(four) == dict.fromkeys(four, None)


# -- concurrent runs -------------------------------------------------------------------


SLOW_REVISION = '''\
"""A slow revision: the concurrency test holds every partition's lock while it runs."""
import os

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("CREATE TABLE applied (revision text)")
    op.execute("SELECT pg_sleep(%s)" % float(os.environ["SLOW_SECONDS"]))
    op.execute("INSERT INTO applied VALUES ('0004')")


def downgrade():
    op.execute("DROP TABLE applied")
'''


def copy_environment(target: Path) -> Path:
    """The project's environment copied to *target*, with the slow revision 0004 added."""
    shutil.copytree(
        ROOT / "migrations", target / "migrations", ignore=shutil.ignore_patterns("__pycache__")
    )
    (target / "migrations" / "versions" / "0004_slow.py").write_text(SLOW_REVISION)
    shutil.copy(ALEMBIC_INI, target / "alembic.ini")
    return target


def held_locks(admin_engine: Engine, databases: list[str]) -> int:
    key = lock_key() & 0xFFFFFFFFFFFFFFFF
    with admin_engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = ANY(:dbs) "
                "AND l.classid::text::bigint = :high AND l.objid::text::bigint = :low"
            ),
            {"dbs": databases, "high": key >> 32, "low": key & 0xFFFFFFFF},
        ).scalar_one()


def test_two_concurrent_runs_never_apply_a_revision_twice(four, tmp_path, admin_engine):
    env_dir = copy_environment(tmp_path)
    ok(migrate(four, "upgrade", HEAD, "--jobs", "1", cwd=env_dir))
    databases = [make_url(u).database for u in four.values()]
    first = subprocess.Popen(
        [sys.executable, "-m", "sqlalchemy_partpool", "migrate", "upgrade", "head", "--jobs", "4"],
        cwd=env_dir,
        env=env_with(four, SLOW_SECONDS="4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + WAIT
        while held_locks(admin_engine, databases) < 4:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never held every lock"
            time.sleep(0.05)

        # a second deploy that does not wait fails at once, naming the partition
        refused = migrate(four, "upgrade", "head", "--jobs", "1", cwd=env_dir, SLOW_SECONDS="0")
        assert refused.returncode == 1
        rows = report_rows(refused.stdout)
        assert rows["p0"][2].startswith("FAILED: MigrationLocked: partition 'p0' is being migrated")
        assert "partpool-migrate/p0" in rows["p0"][2]
        assert "--lock-timeout" in refused.stderr
        assert [rows[n][2].split(":")[0] for n in ("p1", "p2", "p3")] == ["skipped"] * 3

        # a third one waits for the lock, then finds nothing left to do: under the
        # lock it reads the revision the first run committed
        wait = ["--lock-timeout", str(WAIT)]
        waited = migrate(four, "upgrade", "head", "--jobs", "1", *wait, cwd=env_dir)
        rows = report_rows(ok(waited))
        assert all(row[0] == "0004" and row[2].startswith("unchanged") for row in rows.values())
        stdout, stderr = first.communicate(timeout=WAIT)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, stdout + stderr
    assert all(row[:2] == [HEAD, "0004"] for row in report_rows(stdout).values())
    for url in four.values():
        assert version(url) == "0004"
        with engine(url).connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM applied")).scalar_one() == 1


# -- offline SQL -----------------------------------------------------------------------


def with_password(url: str) -> str:
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


def test_offline_sql_is_one_script_per_partition(four, tmp_path):
    partitions = {name: with_password(url) for name, url in four.items()}
    sql = ok(alembic(partitions, "-x", "partitions=p0,p2", "upgrade", "head", "--sql"))
    headers = re.findall(r"^-- partition: (\w+) \((.*)\)$", sql, re.MULTILINE)
    assert [name for name, _ in headers] == ["p0", "p2"]
    assert all(":***@" in url for _, url in headers)
    assert PASSWORD not in sql
    key = lock_key()
    for script in sql.split("-- partition: ")[1:]:
        assert script.index("BEGIN;") < script.index(f"pg_advisory_xact_lock({key})")
        assert "CREATE TABLE widget (" in script
        assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in script
        assert script.rstrip().endswith("COMMIT;")
    assert versions(four) == dict.fromkeys(four, None)  # offline: nothing touched

    out = ok(migrate(partitions, "upgrade", "head", "--sql-dir", str(tmp_path / "sql")))
    assert sorted(p.name for p in (tmp_path / "sql").iterdir()) == [f"p{i}.sql" for i in range(4)]
    assert "partition p3: wrote" in out
    # a script applies as it stands
    with engine(four["p3"]).connect() as conn:
        conn.exec_driver_sql((tmp_path / "sql" / "p3.sql").read_text())
    assert versions(four) == {"p0": None, "p1": None, "p2": None, "p3": HEAD}


# -- status and drift ------------------------------------------------------------------


def status_rows(output: str) -> dict[str, list[str]]:
    lines = output.splitlines()
    rows = {}
    for line in lines[lines.index(next(x for x in lines if x.startswith("---"))) + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 5:
            rows[cells[0]] = cells[1:]
    return rows


def test_status_shows_revisions_and_flags_drift(four):
    ok(migrate(four, "upgrade", "head", "--jobs", "1"))
    out = ok(migrate(four, "status"))
    assert "no drift: every partition is at 0003 with the same schema" in out
    rows = status_rows(out)
    assert rows["p0"][:3] == [HEAD, "yes", "(reference)"]
    assert all(rows[n][:3] == [HEAD, "yes", "same"] for n in ("p1", "p2", "p3"))

    ok(migrate(four, "downgrade", "0002", "--partitions", "p1"))
    execute(
        four["p3"], "CREATE TABLE stray (id int)", "CREATE INDEX ix_widget_name ON widget (name)"
    )
    drifted = migrate(four, "status")
    assert drifted.returncode == 1
    rows = status_rows(drifted.stdout)
    assert rows["p1"][:2] == ["0002", "no"]
    assert rows["p1"][2] == "DIFFERS: column widget.color: nullable here, NOT NULL on the reference"
    assert rows["p2"][2] == "same"
    assert rows["p3"][2] == "DIFFERS: extra index ix_widget_name on widget; extra table stray"
    assert (
        "the partitions are at different revisions (0003: p0, p2, p3; 0002: p1)" in drifted.stdout
    )
    assert "the schema of p1, p3 differs from the reference partition p0" in drifted.stdout

    document = json.loads(migrate(four, "status", "--json", "--reference", "p3").stdout)
    assert document["ok"] is False
    assert document["reference"] == "p3"
    assert document["drift"] == {"revisions": True, "schema": ["p0", "p1", "p2"], "unreachable": []}
    assert "missing table stray" in document["partitions"]["p0"]["schema_differences"]
    assert document["partitions"]["p1"]["revisions"] == ["0002"]
    assert document["partitions"]["p1"]["at_head"] is False

    only_revisions = status(
        ShardedConfig.build(four),
        alembic_config=ALEMBIC_INI,
        partitions=["p0", "p3"],
        compare_schema=False,
    )
    assert only_revisions.ok  # same revision, schema not compared
    assert [p.name for p in only_revisions.partitions] == ["p0", "p3"]


# -- init and autogenerate -------------------------------------------------------------


MODELS = """\
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(100), index=True)
"""


def test_init_writes_an_environment_that_autogenerates_and_upgrades(four, tmp_path):
    out = ok(migrate(four, "init", "db/migrations", "-c", "db/alembic.ini", cwd=tmp_path))
    assert "wrote db/migrations/env.py" in out
    ini = (tmp_path / "db" / "alembic.ini").read_text()
    assert "script_location = %(here)s/migrations" in ini
    refused = migrate(four, "init", "db/migrations", "-c", "db/alembic.ini", cwd=tmp_path)
    assert refused.returncode == 2
    assert "is not empty" in refused.stderr

    (tmp_path / "models.py").write_text(MODELS)
    env_py = tmp_path / "db" / "migrations" / "env.py"
    env_py.write_text(
        env_py.read_text().replace(
            "target_metadata = None", "from models import Base\n\ntarget_metadata = Base.metadata"
        )
    )
    execute(four["p2"], "CREATE TABLE item (id int PRIMARY KEY, title varchar(100))")
    generated = ok(
        migrate(
            four,
            *("revision", "-c", "db/alembic.ini", "--autogenerate", "-m", "create item"),
            *("--rev-id", "a1", "--reference", "p1"),
            cwd=tmp_path,
        )
    )
    assert "Generating" in generated
    script = (tmp_path / "db" / "migrations" / "versions" / "a1_create_item.py").read_text()
    assert "op.create_table('item'" in script  # compared with p1, where there is no item table
    assert "op.create_index(op.f('ix_item_title')" in script

    execute(four["p2"], "DROP TABLE item")
    out = ok(migrate(four, "upgrade", "head", "-c", "db/alembic.ini", cwd=tmp_path))
    assert set(report_rows(out)) == set(four)
    for url in four.values():
        assert version(url) == "a1"
        assert "item" in tables(url)


# -- sixteen partitions ----------------------------------------------------------------


@pytest.mark.slow
def test_sixteen_partitions_in_parallel_and_one_after_another(make_databases):
    """Both ways reach the same state; how long each takes is printed (not asserted)."""
    sixteen = {f"s{i:02}": url for i, url in enumerate(make_databases(16, prefix="mig16_"))}
    timings = {}
    for jobs in ("8", "1"):
        started = time.perf_counter()
        out = ok(migrate(sixteen, "upgrade", "head", "--jobs", jobs))
        timings[jobs] = time.perf_counter() - started
        assert len(report_rows(out)) == 16
        assert versions(sixteen) == dict.fromkeys(sixteen, HEAD)
        if jobs == "8":
            ok(migrate(sixteen, "downgrade", "base", "--jobs", "1"))
            assert versions(sixteen) == dict.fromkeys(sixteen, None)
    print(f"16 partitions: --jobs 8 {timings['8']:.2f} s, --jobs 1 {timings['1']:.2f} s")


# -- without a server: options, report, progress ---------------------------------------


def test_x_arguments_override_options_and_are_checked():
    options = MigrateOptions(jobs=2).with_x_arguments(
        {"partitions": "a, b", "jobs": "6", "continue_on_error": "1", "lock_timeout": "2.5"}
    )
    assert options == MigrateOptions(
        partitions=("a", "b"), jobs=6, continue_on_error=True, lock_timeout=2.5
    )
    for bad in (
        {"jobs": "0"},
        {"jobs": "many"},
        {"lock_timeout": "-1"},
        {"continue_on_error": "x"},
    ):
        with pytest.raises(CommandError, match=next(iter(bad))):
            MigrateOptions().with_x_arguments(bad)


def test_lock_key_is_stable_and_per_version_table():
    assert lock_key() == lock_key("alembic_version", None)
    assert lock_key() != lock_key("other_version")
    assert -(2**63) <= lock_key() < 2**63


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    outcomes = [
        PartitionOutcome("p0", DONE, ("0001",), ("0002",), duration=0.1),
        PartitionOutcome("p1", FAILED, ("0001",), ("0001",), error="boom"),
    ]
    terminal = FakeTerminal()
    bar = Progress(terminal, 2, "upgrade head")
    bar.begin(2)
    for outcome in outcomes:
        bar.started(outcome.name)
        bar.finished(outcome)
    bar.close()
    drawn = terminal.getvalue()
    assert "\r\033[Kupgrade head [###############---------------] 1/2 done" in drawn
    assert "2/2 done, 1 FAILED" in drawn
    assert drawn.endswith("\n")

    log = io.StringIO()
    lines = Progress(log, 2, "upgrade head")
    lines.begin(1)
    for outcome in outcomes:
        lines.finished(outcome)
    assert log.getvalue().splitlines() == [
        "upgrade head: 2 partitions, one after another",
        "[1/2] p0: upgraded (0.10 s), 0001 -> 0002",
        "[2/2] p1: FAILED: boom",
    ]
    assert "\r" not in log.getvalue()

    report = MigrationReport("upgrade head", tuple(outcomes), jobs=2, duration=1.0)
    assert not report.ok
    assert "p1         0001    0001   FAILED: boom" in format_report(report)
    assert "Partitions are now at 0002: p0; 0001: p1" in report.summary()
