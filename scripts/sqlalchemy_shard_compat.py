#!/usr/bin/env python3
"""Run SQLAlchemy's own horizontal-sharding tests and examples against our ShardedSession.

``sqlalchemy_partpool.ShardedSession`` claims to be a drop-in superset of
:class:`sqlalchemy.ext.horizontal_shard.ShardedSession`.  This script checks the
claim with SQLAlchemy's own material, from the source distribution of the
installed SQLAlchemy version (downloaded once with ``pip download`` and unpacked
under ``.partpool/sqlalchemy-src/``):

* ``test/ext/test_horizontal_shard.py`` and the legacy-chooser tests
  (``test/ext/test_deprecations.py::HorizontalShardTest``), run by pytest with
  SQLAlchemy's own test plugin, from the source root, importing the *installed*
  SQLAlchemy (``python -s`` stops SQLAlchemy's conftest from putting the
  source tree's ``lib/`` first);
* every script in ``examples/sharding/``, each in a fresh working directory.

Each run is a subprocess that loads this file again (as the pytest plugin
``-p sqlalchemy_shard_compat``, or with ``--run-example``) and, before any
test module or example is imported, rebinds
``sqlalchemy.ext.horizontal_shard.ShardedSession`` to ours; the tests and the
examples import the name from there.  The run then checks that every sharded
session built is ours and counts the statements our ``_execute_routed`` handled.

Usage::

    python scripts/sqlalchemy_shard_compat.py               # ours
    python scripts/sqlalchemy_shard_compat.py --with-stock  # ours, then SQLAlchemy's class
    python scripts/sqlalchemy_shard_compat.py -- -k test_get  # extra arguments go to pytest
    python scripts/sqlalchemy_shard_compat.py --threads-on-sqlite  # exercise our threads

SQLAlchemy's tests run on SQLite, where our session runs partitions one after
another; ``--threads-on-sqlite`` lets it use threads on file databases too.
``-- --dburi postgresql+psycopg2://...`` adds the PostgreSQL-only test class
(SQLAlchemy's plugin needs an empty database it may create schemas in).
Full output of every run goes to ``.partpool/sqlalchemy-src/logs/``.

Exit status: 0 when everything passed, 1 on any failure, 3 when SQLAlchemy's
source distribution could not be had (no network, unknown version).
The asyncio example needs ``aiosqlite`` and ``greenlet`` installed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / ".partpool" / "sqlalchemy-src"
PLUGIN = Path(__file__).stem
TEST_TARGETS = (
    "test/ext/test_horizontal_shard.py",
    "test/ext/test_deprecations.py::HorizontalShardTest",
)
EXAMPLES_DIR = "examples/sharding"
OURS = "sqlalchemy_partpool.session.ShardedSession"
MODES = ("partpool", "stock")
MODE_ENV = "PARTPOOL_COMPAT_MODE"
REPORT_ENV = "PARTPOOL_COMPAT_REPORT"
THREADS_ENV = "PARTPOOL_COMPAT_THREADS"

EXIT_FAILED = 1
EXIT_SOURCE_UNAVAILABLE = 3


class SourceUnavailable(Exception):
    """SQLAlchemy's source distribution could not be downloaded or unpacked."""


# -- inside the test or example subprocess --------------------------------------------------


def _is_ours(cls: type) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == OURS for c in cls.__mro__)


def _install(mode: str) -> dict[str, Any]:
    """Put the session class under test in place, and start counting what uses it.

    :param mode: ``"partpool"`` rebinds ``horizontal_shard.ShardedSession`` to
      ours; ``"stock"`` leaves SQLAlchemy's in place.
    :return: the tally that the checks fill in: sessions built per class, statements
      our handler routed, and any session of the wrong class.
    :raises AssertionError: when our class is not a subclass of SQLAlchemy's.
    """
    import sqlalchemy
    from sqlalchemy.ext import horizontal_shard

    stock = horizontal_shard.ShardedSession
    tally: dict[str, Any] = {
        "mode": mode,
        "sqlalchemy": sqlalchemy.__version__,
        "sqlalchemy_path": sqlalchemy.__file__,
        "session_class": f"{stock.__module__}.{stock.__qualname__}",
        "sessions": {"ours": 0, "stock": 0},
        "routed": 0,
        "concurrent": 0,
        "violations": [],
    }
    if mode == "partpool":
        import sqlalchemy_partpool
        from sqlalchemy_partpool import ShardedSession as ours

        tally["partpool_path"] = sqlalchemy_partpool.__file__
        assert issubclass(ours, stock), "our ShardedSession must subclass SQLAlchemy's"
        assert ours is not stock
        horizontal_shard.ShardedSession = ours  # type: ignore[misc]
        tally["session_class"] = OURS
        routed = ours._execute_routed

        @functools.wraps(routed)
        def counted(self: Any, orm_context: Any) -> Any:
            tally["routed"] += 1
            return routed(self, orm_context)

        ours._execute_routed = counted  # type: ignore[method-assign]
        _count_concurrency(ours, tally, force=os.environ.get(THREADS_ENV) == "1")

    # Every sharded session runs one of these __init__s (ours does not always
    # go through the stock one), so both record; a session is counted once.
    def recording(init: Any) -> Any:
        @functools.wraps(init)
        def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
            if not getattr(self, "_compat_counted", False):
                self._compat_counted = True
                ours_in_use = _is_ours(type(self))
                tally["sessions"]["ours" if ours_in_use else "stock"] += 1
                if ours_in_use != (mode == "partpool"):
                    message = f"a {type(self).__mro__} session was built in {mode} mode"
                    tally["violations"].append(message)
                    raise AssertionError(message)
            init(self, *args, **kwargs)

        return recording_init

    stock.__init__ = recording(stock.__init__)  # type: ignore[method-assign]
    if mode == "partpool":
        ours.__init__ = recording(ours.__init__)  # type: ignore[method-assign]
    return tally


def _count_concurrency(ours: Any, tally: dict[str, Any], *, force: bool) -> None:
    """Count the multi-partition statements our session runs concurrently.

    :param force: also run them on threads for file-based SQLite.  Our session
      runs partitions one after another on any SQLite bind, so SQLAlchemy's
      (SQLite) tests alone leave its concurrent path untested.  A file database
      opened by SQLAlchemy has ``check_same_thread=False``, so threads can use
      it; in-memory databases stay sequential.
    """
    from sqlalchemy.engine import Connection

    def file_sqlite(bind: Any) -> bool:
        engine = bind.engine if isinstance(bind, Connection) else bind
        database = engine.url.database or ""
        return (
            engine.dialect.name == "sqlite"
            and database not in ("", ":memory:")
            and "mode=memory" not in database
            and not database.startswith("file::memory:")
        )

    chosen = ours._concurrency

    @functools.wraps(chosen)
    def concurrency(self: Any, partitions: Any) -> str | None:
        mode: str | None = chosen(self, partitions)
        if (
            force
            and mode is None
            and self.concurrent
            and len(partitions) > 1
            and all(file_sqlite(self.get_bind(shard_id=p)) for p in partitions)
        ):
            mode = "threads"
        if mode is not None:
            tally["concurrent"] += 1
        return mode

    ours._concurrency = concurrency


def _check_tally(tally: dict[str, Any]) -> list[str]:
    """What went wrong with the substitution, judged from a finished run's tally."""
    problems = list(tally["violations"])
    expected = "ours" if tally["mode"] == "partpool" else "stock"
    if tally["sessions"][expected] == 0:
        problems.append(f"no {expected} ShardedSession was built: the run proves nothing")
    if tally["mode"] == "partpool" and tally["routed"] == 0:
        problems.append("our _execute_routed handled no statement")
    return problems


class _PytestPlugin:
    """Swaps the class before collection, checks the tests' bindings, writes a report."""

    def __init__(self, mode: str, report_path: str) -> None:
        self.mode = mode
        self.report_path = report_path
        self.tally: dict[str, Any] = {}
        self.outcomes: dict[str, str] = {}
        self.failures: dict[str, str] = {}
        self.bindings: dict[str, str] = {}

    def pytest_sessionstart(self, session: Any) -> None:
        # After SQLAlchemy's plugin has configured itself, before test modules import.
        self.tally = _install(self.mode)

    def pytest_collection_finish(self, session: Any) -> None:
        from sqlalchemy.ext import horizontal_shard

        expected = horizontal_shard.ShardedSession
        for item in session.items:
            module = getattr(item, "module", None)
            bound = vars(module).get("ShardedSession") if module is not None else None
            if bound is None or module.__name__ in self.bindings:
                continue
            self.bindings[module.__name__] = f"{bound.__module__}.{bound.__qualname__}"
            if bound is not expected:
                message = f"{module.__name__} uses {bound!r}, not {expected!r}"
                self.tally["violations"].append(message)
                raise AssertionError(message)

    def pytest_runtest_logreport(self, report: Any) -> None:
        nodeid = report.nodeid
        previous = self.outcomes.get(nodeid)
        if report.failed:
            if previous not in ("failed", "error"):
                self.outcomes[nodeid] = "failed" if report.when == "call" else "error"
            self.failures[nodeid] = (
                self.failures.get(nodeid, "") + f"[{report.when}]\n{report.longreprtext}\n"
            )
        elif report.skipped and previous is None:
            self.outcomes[nodeid] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.passed and report.when == "call" and previous is None:
            self.outcomes[nodeid] = "xpassed" if hasattr(report, "wasxfail") else "passed"

    def pytest_sessionfinish(self, session: Any, exitstatus: int) -> None:
        document = {
            "exitstatus": int(exitstatus),
            "tally": self.tally,
            "outcomes": self.outcomes,
            "failures": self.failures,
            "bindings": self.bindings,
        }
        Path(self.report_path).write_text(json.dumps(document, indent=1))


def pytest_configure(config: Any) -> None:
    """Entry point when pytest loads this file with ``-p sqlalchemy_shard_compat``."""
    mode = os.environ.get(MODE_ENV)
    report = os.environ.get(REPORT_ENV)
    if mode in MODES and report:
        config.pluginmanager.register(_PytestPlugin(mode, report), "partpool-compat")


def _run_example(path: str, mode: str, report_path: str) -> int:
    """Run one example script as ``__main__`` with the class under test in place."""
    import runpy

    tally = _install(mode)
    sys.argv = [path]
    runpy.run_path(path, run_name="__main__")
    problems = _check_tally(tally)
    Path(report_path).write_text(json.dumps({"tally": tally, "problems": problems}, indent=1))
    for problem in problems:
        print(f"substitution check failed: {problem}", file=sys.stderr)
    return EXIT_FAILED if problems else 0


# -- the driver -------------------------------------------------------------------------


def sqlalchemy_version() -> str:
    return metadata.version("sqlalchemy")


def ensure_source(cache: Path, version: str) -> Path:
    """The unpacked source distribution of SQLAlchemy *version*, downloading it if needed.

    :param cache: where the sdist and its unpacked tree are kept.
    :param version: the SQLAlchemy version, which must be the installed one.
    :raises SourceUnavailable: when pip cannot download it or the archive is unusable.
    """
    tree = cache / f"sqlalchemy-{version}"
    if (tree / ".unpacked").exists():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    archives = sorted(cache.glob(f"sqlalchemy-{version}.tar.gz"))
    if not archives:
        # --no-binary for SQLAlchemy alone: its build requirements may come as
        # wheels, which pip needs only to read the sdist's metadata.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-binary",
                "sqlalchemy",
                f"sqlalchemy=={version}",
                "--dest",
                str(cache),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        archives = sorted(cache.glob(f"sqlalchemy-{version}.tar.gz"))
        if done.returncode != 0 or not archives:
            raise SourceUnavailable(
                f"pip could not download the sdist of sqlalchemy=={version} into {cache}:\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
    staging = Path(tempfile.mkdtemp(prefix="unpack-", dir=cache))
    try:
        with tarfile.open(archives[0]) as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(staging, filter="data")
            else:  # Python without extraction filters: the archive comes from PyPI
                archive.extractall(staging)  # noqa: S202
        unpacked = staging / f"sqlalchemy-{version}"
        if not (unpacked / "test" / "conftest.py").exists():
            raise SourceUnavailable(f"{archives[0]} has no test/conftest.py")
        (unpacked / ".unpacked").touch()
        if not (tree / ".unpacked").exists():
            shutil.rmtree(tree, ignore_errors=True)
            unpacked.rename(tree)
    except (OSError, tarfile.TarError) as error:
        raise SourceUnavailable(f"cannot unpack {archives[0]}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


@contextlib.contextmanager
def exclusive(cache: Path) -> Iterator[None]:
    """One run at a time per cache: the tests write SQLite files into the source root."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@dataclass
class Settings:
    """What every subprocess of one invocation shares."""

    source: Path
    logs: Path
    timeout: float
    threads_on_sqlite: bool = False
    pytest_args: list[str] = field(default_factory=list)

    def env(self, mode: str, report: Path) -> dict[str, str]:
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        env[MODE_ENV] = mode
        env[REPORT_ENV] = str(report)
        env.pop(THREADS_ENV, None)
        if self.threads_on_sqlite:
            env[THREADS_ENV] = "1"
        env.pop("PYTEST_ADDOPTS", None)  # the caller's options are for the caller's pytest
        return env


def _run_logged(
    command: list[str], cwd: Path | str, env: dict[str, str], log: Path, timeout: float
) -> int:
    """Run *command* with its output in *log*; its exit status, or -1 on timeout."""
    with log.open("w") as out:
        out.write(" ".join(command) + f"\n(cwd {cwd})\n\n")
        out.flush()
        try:
            return subprocess.run(
                command,
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n\nTimeoutError: still running after {timeout:.0f}s; stopped\n")
            return -1


def run_tests(settings: Settings, mode: str) -> dict[str, Any]:
    """Run SQLAlchemy's sharding tests with its own plugin; what our plugin reported."""
    report = settings.logs / f"{mode}-tests.json"
    report.unlink(missing_ok=True)
    log = settings.logs / f"{mode}-tests.log"
    command = [
        sys.executable,
        "-s",  # SQLAlchemy's conftest then leaves the source tree's lib/ off sys.path
        "-m",
        "pytest",
        *TEST_TARGETS,
        "-p",
        PLUGIN,
        "-p",
        "no:cacheprovider",
        *settings.pytest_args,
    ]
    started = time.monotonic()
    # From the source root: SQLAlchemy's plugin reads setup.cfg there and imports
    # its requirements from the test package.
    returncode = _run_logged(
        command, settings.source, settings.env(mode, report), log, settings.timeout
    )
    result: dict[str, Any] = {
        "returncode": returncode,
        "seconds": time.monotonic() - started,
        "log": str(log),
    }
    if report.exists():
        result.update(json.loads(report.read_text()))
        result["problems"] = _check_tally(result["tally"])
        if str(settings.source) in result["tally"]["sqlalchemy_path"]:
            result["problems"].append("the source tree's SQLAlchemy was imported")
    else:
        result.update(outcomes={}, failures={}, tally={}, problems=["pytest wrote no report"])
    return result


def run_example(settings: Settings, example: Path, mode: str) -> dict[str, Any]:
    """Run one example in a fresh directory (they write SQLite files into it)."""
    report = settings.logs / f"{mode}-{example.stem}.json"
    report.unlink(missing_ok=True)
    log = settings.logs / f"{mode}-{example.stem}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--run-example", str(example)]
    command += ["--mode", mode]
    with tempfile.TemporaryDirectory(prefix="shard-example-") as workdir:
        returncode = _run_logged(
            command, workdir, settings.env(mode, report), log, settings.timeout
        )
    return {
        "ok": returncode == 0,
        "log": str(log),
        "tally": json.loads(report.read_text())["tally"] if report.exists() else {},
        "error": _last_error(log.read_text(errors="replace")) if returncode else "",
    }


def _last_error(output: str) -> str:
    """The last line of a traceback (the exception), or the output's last line."""
    lines = [line for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith((" ", "\t")) and ("Error" in line or "Exception" in line):
            return line.strip()
    return lines[-1].strip() if lines else "(no output)"


def count(outcomes: dict[str, str]) -> dict[str, int]:
    totals = dict.fromkeys(("passed", "failed", "error", "skipped", "xfailed", "xpassed"), 0)
    for outcome in outcomes.values():
        totals[outcome] += 1
    return totals


def print_mode(mode: str, tests: dict[str, Any], examples: dict[str, dict[str, Any]]) -> bool:
    """Print one mode's results; True when all of it passed."""
    totals = count(tests["outcomes"])
    tally = tests["tally"]
    print(f"\n== {mode}: session class {tally.get('session_class', '?')}")
    for nodeid, outcome in sorted(tests["outcomes"].items()):
        if outcome in ("failed", "error"):
            print(f"   {outcome.upper():6} {nodeid}")
            print(f"          {_last_error(tests['failures'].get(nodeid, ''))}")
    for problem in tests["problems"]:
        print(f"   PROBLEM {problem}")
    sessions = tally.get("sessions", {})
    checks = f"sessions built: {sessions.get('ours', 0)} ours, {sessions.get('stock', 0)} stock"
    if mode == "partpool":
        checks += f"; statements routed by ours: {tally.get('routed', 0)}"
        checks += f" ({tally.get('concurrent', 0)} of them concurrently)"
    print(f"   pytest exit {tests['returncode']} in {tests['seconds']:.1f}s; {checks}")
    print(f"   log: {tests['log']}")
    print(
        f"tests[{mode}]: {totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['error']} errors, {totals['skipped']} skipped"
    )
    ok = (
        tests["returncode"] == 0
        and not tests["problems"]
        and totals["failed"] + totals["error"] == 0
        and totals["passed"] > 0
    )
    for name, example in examples.items():
        state = "ok" if example["ok"] else f"FAILED: {example['error']}"
        routed = example["tally"].get("routed", 0)
        extra = f" ({routed} statements routed by ours)" if mode == "partpool" else ""
        print(f"example[{mode}] {name}: {state}{extra}")
        if not example["ok"]:
            print(f"   log: {example['log']}")
        ok = ok and example["ok"]
    return ok


def compare(ours: dict[str, Any], stock: dict[str, Any]) -> None:
    """Print the tests whose outcome differs between our class and SQLAlchemy's."""
    differing = {
        nodeid: (ours["outcomes"].get(nodeid, "-"), stock["outcomes"].get(nodeid, "-"))
        for nodeid in set(ours["outcomes"]) | set(stock["outcomes"])
        if ours["outcomes"].get(nodeid) != stock["outcomes"].get(nodeid)
    }
    print(f"\n== tests whose outcome differs between ours and stock: {len(differing)}")
    for nodeid, (mine, theirs) in sorted(differing.items()):
        print(f"   ours {mine:7} stock {theirs:7} {nodeid}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run SQLAlchemy's own horizontal-sharding tests and examples against "
        "sqlalchemy_partpool.ShardedSession.",
        epilog="Arguments after -- go to pytest (e.g. -- -k test_get -x, or -- --dburi URL "
        "to add the PostgreSQL-only tests).  Exit status: 0 all passed, 1 failures, "
        "3 SQLAlchemy's source distribution could not be had.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--with-stock",
        action="store_true",
        help="also run everything against SQLAlchemy's unmodified class, and compare",
    )
    which.add_argument(
        "--stock-only", action="store_true", help="run only against SQLAlchemy's class"
    )
    parser.add_argument("--no-examples", action="store_true", help="skip examples/sharding")
    parser.add_argument(
        "--threads-on-sqlite",
        action="store_true",
        help="run our multi-partition statements on threads for file-based SQLite too "
        "(normally one after another on SQLite), so the tests exercise the concurrent path",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the SQLAlchemy sdist is kept (default: .partpool/sqlalchemy-src)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds allowed per subprocess (default 900)"
    )
    parser.add_argument("--run-example", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="partpool", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    pytest_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, pytest_args = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)

    if args.run_example:
        return _run_example(args.run_example, args.mode, os.environ[REPORT_ENV])

    version = sqlalchemy_version()
    cache = args.cache_dir.resolve()
    try:
        with exclusive(cache):
            source = ensure_source(cache, version)
    except SourceUnavailable as error:
        print(f"SQLAlchemy source unavailable: {error}", file=sys.stderr)
        return EXIT_SOURCE_UNAVAILABLE
    settings = Settings(
        source=source,
        logs=cache / "logs",
        timeout=args.timeout,
        threads_on_sqlite=args.threads_on_sqlite,
        pytest_args=pytest_args,
    )
    settings.logs.mkdir(exist_ok=True)
    print(f"SQLAlchemy {version} (installed); its tests and examples from {source}")

    if args.stock_only:
        modes = ["stock"]
    elif args.with_stock:
        modes = ["partpool", "stock"]
    else:
        modes = ["partpool"]
    examples = []
    if not args.no_examples:
        examples = sorted((source / EXAMPLES_DIR).glob("*.py"))
        examples = [p for p in examples if p.name != "__init__.py"]
    results: dict[str, dict[str, Any]] = {}
    all_ok = True
    with exclusive(cache):
        for mode in modes:
            results[mode] = run_tests(settings, mode)
            ran = {p.name: run_example(settings, p, mode) for p in examples}
            all_ok = print_mode(mode, results[mode], ran) and all_ok
    if len(modes) == 2:
        compare(results["partpool"], results["stock"])
    print("\nresult:", "all passed" if all_ok else "FAILURES (see above)")
    return 0 if all_ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
