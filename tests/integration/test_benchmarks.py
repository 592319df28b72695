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
from typing import Any

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


#: Every workload of the plan: case -> (baseline, variants) in quick mode.
EXPECTED = {
    "fanout": {
        "fanout-4p": ("sequential", {"sequential", "ours"}),
        "fanout-8p": ("sequential", {"sequential", "ours"}),
    },
    "checkout": {
        "checkout-pool": (
            "sa-queuepool",
            {"sa-queuepool", "ours", "psycopg2-simple", "psycopg2-threaded", "psycopg-pool"},
        ),
        "checkout-engine": ("sa-engine", {"sa-engine", "ours", "ours-routed"}),
    },
    "reads": {
        "read-1t": (
            "raw-psycopg2",
            {
                "raw-psycopg2",
                "psycopg2-pool",
                "psycopg-pool",
                "sa-engine",
                "sa-autocommit",
                "ours",
            },
        ),
        "read-8t": (
            "raw-psycopg2",
            {"raw-psycopg2", "psycopg2-pool", "psycopg-pool", "sa-engine", "ours"},
        ),
    },
    "connect": {
        "connect-per-request": ("psycopg2-connect", {"psycopg2-connect", "sa-nullpool", "ours"}),
    },
    "orm": {
        "orm-get": ("plain", {"plain", "sa-sharded", "ours"}),
        "orm-select": ("plain", {"plain", "sa-sharded", "ours"}),
        "orm-insert": ("plain", {"plain", "sa-sharded", "ours"}),
        "orm-bulk-insert": ("plain-bulk", {"plain-bulk", "ours-bulk"}),
    },
    "startup": {
        "startup-8p": ("sa-engines", {"sa-engines", "ours-lazy", "ours-warm"}),
        "startup-32p": ("sa-engines", {"sa-engines", "ours-lazy", "ours-warm"}),
    },
}


@pytest.fixture(scope="module")
def quick_run(
    pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    """One ``--quick`` run of every workload, shared by the tests below."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    done = run_benchmarks(["--quick", "--json", str(out)], {"PARTPOOL_URL": pg_admin_url})
    assert done.returncode == 0, f"benchmarks failed:\n{done.stdout}\n{done.stderr}"
    return done, json.loads(out.read_text()), out


def test_quick_run_reports_every_variant_with_medians_and_ratios(
    quick_run, pg_admin_url, admin_engine
):
    done, report, out = quick_run
    assert report["settings"]["quick"] is True
    machine = report["machine"]
    for fact in ("cpu_count", "python", "platform", "sqlalchemy", "psycopg2", "postgresql"):
        assert machine[fact], fact
    assert machine["server"]["kind"] == "existing"
    password = make_url(pg_admin_url).password
    assert not password or str(password) not in out.read_text()

    assert set(report["workloads"]) == set(EXPECTED)
    lines = done.stdout.splitlines()
    for workload, expected_cases in EXPECTED.items():
        cases = {case["name"]: case for case in report["workloads"][workload]["cases"]}
        assert set(cases) == set(expected_cases), workload
        for name, case in cases.items():
            baseline, variants = expected_cases[name]
            assert case["baseline"] == baseline, name
            assert set(case["variants"]) == variants, name
            assert case["check"], name
            assert case["rounds"] >= 1
            for variant in case["variants"].values():
                assert len(variant["samples"]) == case["rounds"]
                assert variant["median"] > 0
                assert variant["p90"] >= variant["median"]
            assert case["ratios"][baseline] == 1.0
            for variant in variants - {baseline}:
                assert case["ratios"][variant] > 0
                # a ratio line per variant under the table
                assert any(line.startswith(f"{name}: {variant}/{baseline} = ") for line in lines)

    fanout = {case["name"]: case for case in report["workloads"]["fanout"]["cases"]}
    for name, case in fanout.items():
        assert case["params"]["partitions"] == int(name.split("-")[1].rstrip("p"))
        assert case["check"].startswith("same ")

    # the fixed-width table and where the JSON went
    assert any(line.split()[:3] == ["case", "variant", "ops"] for line in lines)
    assert f"Results written to {out}" in done.stdout

    # the scratch partitions were dropped
    with admin_engine.connect() as conn:
        left = conn.execute(
            text("SELECT count(*) FROM pg_database WHERE datname LIKE 'partpool_bench%'")
        ).scalar_one()
    assert left == 0


def test_quick_run_counts_round_trips_of_every_variant(quick_run):
    _, report, _ = quick_run
    counted = {
        ("checkout", "checkout-pool"): "round trips per checkout: ",
        ("checkout", "checkout-engine"): "round trips per checkout: ",
        ("reads", "read-1t"): "round trips per read: ",
        ("connect", "connect-per-request"): "round trips per request: ",
        ("orm", "orm-get"): "round trips per get: ",
        ("orm", "orm-select"): "round trips per select: ",
        ("orm", "orm-insert"): "round trips per insert: ",
        ("orm", "orm-bulk-insert"): "round trips per insert: ",
    }
    for (workload, name), label in counted.items():
        case = next(c for c in report["workloads"][workload]["cases"] if c["name"] == name)
        trips = dict(part.rsplit(" ", 1) for part in case["check"].split(label, 1)[1].split(", "))
        assert set(trips) == set(case["variants"]), name
        for variant, count in trips.items():
            assert float(count) >= 0, (name, variant)
    # a pooled checkout without a query never talks to the server
    pool = next(c for c in report["workloads"]["checkout"]["cases"] if c["name"] == "checkout-pool")
    assert pool["check"].endswith("psycopg-pool 0.00")


def test_quick_run_startup_checks_lazy_opens_no_connection(quick_run):
    _, report, _ = quick_run
    for case in report["workloads"]["startup"]["cases"]:
        partitions = case["params"]["partitions"]
        assert case["check"].startswith(
            f"lazy: 0 connections after 0.3 s; warm: {partitions} (one per partition)"
        )
        assert set(case["params"]["startup_seconds_median"]) == set(case["variants"])
        for figures in case["params"]["memory_bytes"].values():
            assert figures["heap_retained_per_partition"] > 0


def test_unknown_workload_is_a_usage_error(tmp_path):
    done = run_benchmarks(["--only", "nosuch", "--json", str(tmp_path / "x.json")], {})
    assert done.returncode == 2
    assert "unknown workload 'nosuch'" in done.stderr
    assert "fanout" in done.stderr
    assert not (tmp_path / "x.json").exists()
