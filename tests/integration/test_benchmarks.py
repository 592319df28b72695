"""The benchmarks run end to end in --quick mode: a smoke test, never a timed test.

Benchmarks measure speed; this only proves that they work (they set up their
partitions, their variants agree, and they report what they measured), so no
assertion here depends on how fast anything ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postgres


def run_benchmarks(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PARTPOOL_URL"}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_quick_run_reports_every_variant_with_medians_and_ratios(
    pg_admin_url, admin_engine, tmp_path
):
    out = tmp_path / "quick.json"
    done = run_benchmarks(["--quick", "--json", str(out)], {"PARTPOOL_URL": pg_admin_url})
    assert done.returncode == 0, f"benchmarks failed:\n{done.stdout}\n{done.stderr}"

    report = json.loads(out.read_text())
    assert report["settings"]["quick"] is True
    machine = report["machine"]
    for fact in ("cpu_count", "python", "platform", "sqlalchemy", "psycopg2", "postgresql"):
        assert machine[fact], fact
    assert machine["server"]["kind"] == "existing"
    password = make_url(pg_admin_url).password
    assert not password or str(password) not in out.read_text()

    cases = {case["name"]: case for case in report["workloads"]["fanout"]["cases"]}
    assert set(cases) == {"fanout-4p", "fanout-8p"}
    for name, case in cases.items():
        assert case["params"]["partitions"] == int(name.split("-")[1].rstrip("p"))
        assert case["baseline"] == "sequential"
        assert case["check"].startswith("same ")
        assert set(case["variants"]) == {"sequential", "ours"}
        assert case["rounds"] >= 1
        for variant in case["variants"].values():
            assert len(variant["samples"]) == case["rounds"]
            assert variant["median"] > 0
            assert variant["p90"] >= variant["median"]
        assert case["ratios"]["sequential"] == 1.0
        assert case["ratios"]["ours"] > 0

    # the fixed-width table, a ratio line per case, and where the JSON went
    lines = done.stdout.splitlines()
    assert any(line.split()[:3] == ["case", "variant", "ops"] for line in lines)
    assert any(line.startswith("fanout-4p: ours/sequential = ") for line in lines)
    assert any(line.startswith("fanout-8p: ours/sequential = ") for line in lines)
    assert f"Results written to {out}" in done.stdout

    # the scratch partitions were dropped
    with admin_engine.connect() as conn:
        left = conn.execute(
            text("SELECT count(*) FROM pg_database WHERE datname LIKE 'partpool_bench%'")
        ).scalar_one()
    assert left == 0


def test_unknown_workload_is_a_usage_error(tmp_path):
    done = run_benchmarks(["--only", "nosuch", "--json", str(tmp_path / "x.json")], {})
    assert done.returncode == 2
    assert "unknown workload 'nosuch'" in done.stderr
    assert "fanout" in done.stderr
    assert not (tmp_path / "x.json").exists()
