"""The examples and the demo run as a user would run them, against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def run(args: list[str], env_extra: dict[str, str], timeout: float = 120) -> str:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PARTPOOL_CONFIG", "PARTPOOL_PARTITIONS")
    }
    env.update(env_extra)
    done = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example, pg_admin_url):
    out = run([sys.executable, str(example)], {"PARTPOOL_URL": pg_admin_url})
    assert out.strip()


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"quickstart.py", "psycopg2_migration.py"}


def test_demo_on_a_given_server(pg_admin_url, admin_engine):
    out = run(
        [
            sys.executable,
            "-m",
            "sqlalchemy_partpool",
            "demo",
            "--url",
            pg_admin_url,
            "--rows",
            "300",
        ],
        {},
    )
    assert "Inserted 300 rows" in out
    assert "Pool figures per partition" in out
    counts = [
        int(line.split()[-2])
        for line in out.splitlines()
        if line.endswith(" rows") and "partpool_demo" in line
    ]
    assert len(counts) == 4
    assert sum(counts) == 300
    # the demo drops what it created
    with admin_engine.connect() as conn:
        left = conn.execute(
            text("SELECT count(*) FROM pg_database WHERE datname LIKE 'partpool_demo%'")
        ).scalar_one()
    assert left == 0


def test_demo_on_the_embedded_default(pg_bindir):
    out = run(
        [sys.executable, "-m", "sqlalchemy_partpool", "demo", "--rows", "100"], {"PARTPOOL_URL": ""}
    )
    assert "embedded throwaway server" in out
    assert "Inserted 100 rows" in out


def test_demo_with_configured_partitions(make_databases):
    urls = make_databases(2)
    out = run(
        [sys.executable, "-m", "sqlalchemy_partpool", "demo", "--rows", "50"],
        {"PARTPOOL_PARTITIONS": f"east={urls[0]} west={urls[1]}"},
    )
    assert "Using the 2 configured partitions" in out
    assert "east" in out
    assert "west" in out
