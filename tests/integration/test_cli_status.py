"""``partpool status`` against real servers: the table, the JSON figures, down partitions,
watching, exit statuses, and passwords that never show."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from sqlalchemy_partpool import cli, status

ROOT = Path(__file__).resolve().parents[2]
PARTPOOL = Path(sys.executable).with_name("partpool")
PASSWORD = "Zq-s3cret-pw-71"  # trust auth on the test servers ignores it


def env_with(**extra: str) -> dict[str, str]:
    """The test's environment without any PARTPOOL_* setting, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARTPOOL_")}
    env.update(extra)
    return env


def status_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sqlalchemy_partpool", "status", *args]


def run(
    command: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def partitions_env(urls: dict[str, str]) -> dict[str, str]:
    return env_with(PARTPOOL_PARTITIONS=" ".join(f"{n}={u}" for n, u in urls.items()))


def with_password(url: str) -> str:
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


def table_rows(output: str) -> dict[str, list[str]]:
    """Table rows by partition name, split on runs of two or more spaces."""
    lines = output.strip().splitlines()
    dashes = next(i for i, line in enumerate(lines) if line.startswith("---"))
    rows = {}
    for line in lines[dashes + 1 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def in_process(args: list[str], monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple[int, str]:
    for name in list(os.environ):
        if name.startswith("PARTPOOL_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    return cli.main(args, out=out), out.getvalue()


def test_table_shows_every_partition_up(make_databases, monkeypatch):
    urls = make_databases(2)
    code, out = in_process(
        ["status"], monkeypatch, PARTPOOL_PARTITIONS=f"east={urls[0]} west={urls[1]}"
    )
    assert code == 0, out
    assert "2 of 2 partitions up" in out
    rows = table_rows(out)
    assert set(rows) == {"east", "west"}
    for name, url in zip(("east", "west"), urls):
        row = rows[name]
        assert row[1] == "up"
        assert row[2].endswith(" ms")
        assert row[3][0].isdigit()  # server version
        assert row[4].endswith("MB")  # an empty database is a few MB
        partpool, total, max_connections = row[5].split("/")
        assert (partpool, total) == ("0", "0")  # the command does not count itself
        assert int(max_connections) > 0
        assert row[6] == "0"
        assert row[7] == make_url(url).render_as_string(hide_password=True)


def test_json_counts_partpool_connections_and_their_states(
    make_databases, pg_server, admin_engine, monkeypatch
):
    urls = make_databases(2)
    database = make_url(urls[0]).database
    assert database is not None
    opened = [pg_server.connect(database, application_name=f"partpool/x{i}") for i in range(3)] + [
        pg_server.connect(database, application_name="someone-else")
    ]
    try:
        opened[0].cursor().execute("SELECT 1")  # leaves p0 idle in transaction
        opened[3].cursor().execute("SELECT 1")  # and another app too
        time.sleep(0.2)  # so the oldest transaction has an age
        code, out = in_process(
            ["status", "--json"], monkeypatch, PARTPOOL_PARTITIONS=f"p0={urls[0]} p1={urls[1]}"
        )
    finally:
        for conn in opened:
            conn.close()
    assert code == 0, out
    document = json.loads(out)
    assert document["ok"] is True
    assert abs(document["time"] - time.time()) < 30
    assert document["summary"] == {"partitions": 2, "up": 2, "down": 0}
    p0 = document["partitions"]["p0"]
    with admin_engine.connect() as conn:
        max_connections = int(conn.execute(text("SHOW max_connections")).scalar_one())
        version_num = int(conn.execute(text("SHOW server_version_num")).scalar_one())
        size = int(conn.execute(text("SELECT pg_database_size(:d)"), {"d": database}).scalar_one())
    assert p0["state"] == "up"
    assert p0["error"] is None
    assert p0["latency_ms"] > 0
    assert p0["database"] == database
    assert p0["server_version_num"] == version_num
    assert p0["in_recovery"] is False
    assert p0["max_connections"] == max_connections
    assert abs(p0["size_bytes"] - size) < 1024 * 1024
    assert p0["connections"]["total"] == 4
    assert p0["connections"]["partpool"] == 3
    assert p0["connections"]["partpool_states"] == {
        "active": 0,
        "idle": 2,
        "idle_in_transaction": 1,
        "other": 0,
    }
    assert p0["connections"]["states"]["idle_in_transaction"] == 2
    assert p0["oldest_transaction_age"] >= 0.2
    p1 = document["partitions"]["p1"]
    assert p1["connections"]["total"] == 0
    assert p1["oldest_transaction_age"] is None


def test_stopped_server_is_down_others_up_exit_1_within_the_timeout(
    make_databases, throwaway_server
):
    urls = make_databases(2)
    doomed = throwaway_server()
    doomed_url = doomed.create_database("gone")
    doomed.stop()
    env = partitions_env({"p0": urls[0], "p1": urls[1], "gone": doomed_url})
    started = time.monotonic()
    done = run(status_command("--timeout", "2"), env)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    rows = table_rows(done.stdout)
    assert rows["p0"][1] == rows["p1"][1] == "up"
    assert rows["gone"][1].startswith("down: ")
    assert "refused" in rows["gone"][1] or "No such file" in rows["gone"][1]
    assert "2 of 3 partitions up" in done.stdout
    assert elapsed < 2 * 2 + 10  # connect + ping bound, plus interpreter start-up

    done = run(status_command("--json", "--timeout", "2"), env)
    assert done.returncode == 1
    document = json.loads(done.stdout)
    assert document["ok"] is False
    gone = document["partitions"]["gone"]
    assert gone["state"] == "down"
    assert gone["error"]
    assert gone["connections"] is None
    assert document["partitions"]["p0"]["state"] == "up"


def test_blackholed_partition_is_down_within_the_timeout(make_databases, fault_proxy, pg_server):
    urls = make_databases(2)
    proxy = fault_proxy(pg_server)
    proxy.blackhole()  # accepts the connection, never answers
    env = partitions_env({"p0": urls[0], "hung": proxy.url_for(urls[1])})
    started = time.monotonic()
    done = run(status_command("--json", "--timeout", "1"), env)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    document = json.loads(done.stdout)
    assert document["partitions"]["p0"]["state"] == "up"
    hung = document["partitions"]["hung"]
    assert hung["state"] == "down"
    assert "timeout" in hung["error"]
    # libpq's connect_timeout is whole seconds (some versions make 1 into 2)
    assert 900 <= hung["latency_ms"] < 2500
    assert document["duration_ms"] < 3000
    assert elapsed < 3 + 5  # plus interpreter start-up


def test_watch_count_prints_that_many_rounds_apart(make_databases):
    urls = make_databases(1)
    done = run(status_command("--watch", "0.2", "--count", "3"), partitions_env({"p0": urls[0]}))
    assert done.returncode == 0, done.stderr
    rounds = done.stdout.strip().split("\n\n")
    assert len(rounds) == 3
    for text_of_round in rounds:
        assert text_of_round.startswith("partpool status at ")
        assert table_rows(text_of_round)["p0"][1] == "up"
    assert "\033" not in done.stdout  # no screen clearing when not on a terminal


def test_watch_json_prints_one_document_per_round(make_databases, monkeypatch):
    urls = make_databases(1)
    code, out = in_process(
        ["status", "--json", "--watch", "0.1", "--count", "2"],
        monkeypatch,
        PARTPOOL_PARTITIONS=f"p0={urls[0]}",
    )
    assert code == 0
    documents = [json.loads(line) for line in out.splitlines()]
    assert len(documents) == 2
    assert all(d["ok"] for d in documents)
    assert documents[1]["time"] > documents[0]["time"]


def test_watch_clears_a_terminal_between_rounds(make_databases):
    urls = make_databases(1)
    primary, secondary = pty.openpty()
    try:
        process = subprocess.Popen(
            status_command("--watch", "0.1", "--count", "2"),
            cwd=ROOT,
            env=partitions_env({"p0": urls[0]}),
            stdout=secondary,
            stderr=subprocess.PIPE,
        )
        os.close(secondary)
        chunks = []
        while True:
            ready, _, _ = select.select([primary], [], [], 30)
            assert ready, "no output from the command"
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=30) == 0
    finally:
        os.close(primary)
    output = b"".join(chunks).decode()
    assert output.count("\033[H\033[2J") == 2
    assert output.count("partpool status at ") == 2


def test_ctrl_c_stops_watching_with_exit_0(make_databases):
    urls = make_databases(1)
    process = subprocess.Popen(
        status_command("--watch", "0.2"),
        cwd=ROOT,
        env=partitions_env({"p0": urls[0]}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("partpool status at ")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err


@pytest.mark.parametrize("entry", ["module", "script"])
def test_missing_configuration_exits_2_naming_the_three_ways(entry):
    command = status_command() if entry == "module" else [str(PARTPOOL), "status"]
    done = run(command, env_with())
    assert done.returncode == 2
    assert done.stdout == ""
    for way in ("--config FILE", "PARTPOOL_CONFIG", "PARTPOOL_PARTITIONS"):
        assert way in done.stderr


def test_count_without_watch_is_a_usage_error(make_databases):
    urls = make_databases(1)
    done = run(status_command("--count", "2"), partitions_env({"p0": urls[0]}))
    assert done.returncode == 2
    assert "--count needs --watch" in done.stderr


def test_passwords_never_appear_in_any_output(make_databases, tmp_path):
    urls = make_databases(2)
    config = tmp_path / "partpool.toml"
    config.write_text(
        f'[partitions.p0]\nurl = "{with_password(urls[0])}"\n'
        f'[partitions.p1]\nurl = "{with_password(urls[1])}"\n'
        f'[partitions.gone]\nurl = "postgresql+psycopg2://app:{PASSWORD}@127.0.0.1:1/app"\n'
    )
    outputs = []
    for args in (["--config", str(config)], ["--config", str(config), "--json"]):
        done = run(status_command(*args, "--timeout", "1"), env_with())
        assert done.returncode == 1, done.stderr
        outputs += [done.stdout, done.stderr]
    env = env_with(PARTPOOL_PARTITIONS=f"p0={with_password(urls[0])}")
    done = run(status_command("--watch", "0.1", "--count", "2"), env)
    assert done.returncode == 0, done.stderr
    outputs += [done.stdout, done.stderr]
    assert "p1" in outputs[0]
    assert "***" in outputs[0]
    assert "***" in json.loads(outputs[2])["partitions"]["p0"]["url"]
    for output in outputs:
        assert PASSWORD not in output


def test_an_invalid_configuration_exits_2(tmp_path):
    config = tmp_path / "partpool.toml"
    config.write_text('[partitions.p0]\nurl = "mysql://app@db/app"\n')
    done = run(status_command("--config", str(config)), env_with())
    assert done.returncode == 2
    assert "not a PostgreSQL URL" in done.stderr


@pytest.mark.parametrize(
    ("description", "gist"),
    [
        (
            'OperationalError: connection to server at "127.0.0.1", port 1 failed: '
            "Connection refused",
            "Connection refused",
        ),
        (
            "OperationalError: (psycopg2.OperationalError) connection to server at "
            '"db0" (10.0.0.1), port 5432 failed: FATAL:  password authentication failed',
            "password authentication failed",
        ),
        ("OperationalError: timeout expired", "timeout expired"),
        ("PartitionUnavailable", "PartitionUnavailable"),
        ("TimeoutError: " + "x" * 80, "x" * 45 + "..."),
    ],
)
def test_short_error_keeps_the_gist(description, gist):
    assert status.short_error(description) == gist


def test_format_size_uses_pg_size_pretty_units():
    assert [status.format_size(n) for n in (None, 0, 1023, 1536, 7708007, 14957927)] == [
        "-",
        "0 B",
        "1023 B",
        "1.5 kB",
        "7.4 MB",
        "14 MB",
    ]
