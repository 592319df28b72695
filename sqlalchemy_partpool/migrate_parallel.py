"""Migrating several partitions at once: one worker process per partition.

Alembic's ``op`` and ``context`` are module-level proxies, rebound whenever a
migration context runs, so two partitions migrated by two threads of one
process would send DDL to each other's connections.  Parallel runs therefore
use processes: the *coordinator* (the process running ``env.py`` for
``alembic upgrade`` or ``partpool migrate upgrade``) starts one worker per
partition, at most ``jobs`` at a time, and each worker runs the very same
alembic command with the same configuration, restricted to its partition.
Workers are forked from a launcher process that has imported alembic and
SQLAlchemy once (see :mod:`.migrate_launch`).

How a worker learns the command (:func:`command_spec`), in order:

1. ``config.attributes["partpool.command"]``: ``(name, args, kwargs)`` of an
   :mod:`alembic.command` function, set by programmatic callers;
2. ``config.cmd_opts.cmd``: set by the ``alembic`` command line and by
   ``partpool migrate`` (the function plus the names of its arguments in
   ``cmd_opts``).

Without either (a program calling ``alembic.command.upgrade(config, "head")``
itself), the command cannot be replayed in another process, and
:func:`~sqlalchemy_partpool.migrations.run_migrations` migrates the partitions
one after another in-process instead.

The worker gets a JSON *spec* file: the command, the alembic configuration file,
section and main options, the ``-x`` arguments, the ``config.attributes`` that
JSON can carry (``configure_logger``, say) and the partition to migrate; plus,
when the partitions' configuration was handed to the coordinator as an object
(``config.attributes["partpool.config"]``) rather than read from a file or the
environment, that object pickled.  Both live in a private temporary
directory (mode 0700) removed when the run ends.  The worker writes its
:class:`.PartitionOutcome` as JSON to a result file; its output goes to a log
file that the coordinator relays (plain-log mode) and quotes when a worker dies
without a result.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import site
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .migrate_launch import Launcher, make_launcher
from .migrate_report import FAILED, SKIPPED, PartitionOutcome, Progress

if TYPE_CHECKING:
    from alembic.config import Config

    from .config import ShardedConfig

__all__ = [
    "COMMAND_ATTRIBUTE",
    "CONFIG_ATTRIBUTE",
    "WORKER_ATTRIBUTE",
    "CommandSpec",
    "command_spec",
    "run_workers",
    "worker_main",
    "write_outcome",
]

log = logging.getLogger("sqlalchemy_partpool.migrations")

#: ``config.attributes`` key: ``(name, args, kwargs)`` of the alembic command being run.
COMMAND_ATTRIBUTE = "partpool.command"
#: ``config.attributes`` key: the partitions (a ShardedConfig or ShardedEngine) to migrate.
CONFIG_ATTRIBUTE = "partpool.config"
#: ``config.attributes`` key set in a worker: ``{"partition": name, "result": path}``.
WORKER_ATTRIBUTE = "partpool.worker"

#: Seconds between polls of the running workers.
_POLL_INTERVAL = 0.02
#: Lines of a dead worker's log quoted in its error.
_LOG_TAIL = 3


@dataclass(frozen=True)
class CommandSpec:
    """An :mod:`alembic.command` call that a worker process can replay.

    :param name: the function's name in :mod:`alembic.command` (``upgrade``).
    :param args: its positional arguments after the config (``["head"]``).
    :param kwargs: its keyword arguments (``{"sql": False, "tag": None}``).
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] | None = None

    @property
    def label(self) -> str:
        """The command as typed: ``upgrade head``, ``stamp 0001 0002b``."""
        words = [self.name]
        for arg in self.args:
            if isinstance(arg, (list, tuple)):
                words.extend(str(a) for a in arg)
            elif arg is not None:
                words.append(str(arg))
        return " ".join(words)


def command_spec(config: Config) -> CommandSpec | None:
    """The command being run, if a worker process can replay it (see the module docs).

    :param config: the alembic configuration of the running command.
    :returns: ``None`` if the command is unknown, is not an :mod:`alembic.command`
      function, or has arguments that JSON cannot carry.
    """
    from alembic import command

    given = config.attributes.get(COMMAND_ATTRIBUTE)
    if isinstance(given, CommandSpec):
        name, args, kwargs = given.name, list(given.args), dict(given.kwargs or {})
    elif given is not None:
        name, args, kwargs = given[0], list(given[1]), dict(given[2])
    else:
        opts = config.cmd_opts
        cmd = getattr(opts, "cmd", None)
        if not cmd:
            return None
        fn, positional, keywords = cmd
        name = getattr(fn, "__name__", "")
        if getattr(command, name, None) is not fn:
            return None  # a custom command: no way to find it by name
        args = [getattr(opts, k, None) for k in positional]
        kwargs = {k: getattr(opts, k, None) for k in keywords}
    if not callable(getattr(command, str(name), None)):
        return None
    try:
        json.dumps([args, kwargs])
    except (TypeError, ValueError):
        return None
    return CommandSpec(str(name), tuple(args), kwargs)


def write_outcome(path: str | os.PathLike[str], outcome: PartitionOutcome) -> None:
    """Write a worker's result file (atomically: the coordinator never reads half of it)."""
    target = Path(path)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(outcome.as_dict()), encoding="utf-8")
    partial.replace(target)


@dataclass
class _Worker:
    name: str
    result: Path
    log_path: Path
    started: float


def run_workers(
    config: Config,
    spec: CommandSpec,
    names: Sequence[str],
    *,
    jobs: int,
    continue_on_error: bool,
    progress: Progress,
    sharded_config: ShardedConfig | None = None,
) -> dict[str, PartitionOutcome]:
    """Migrate each of *names* in a worker process of its own, at most *jobs* at a time.

    After a failure no new worker starts (the rest are reported as
    :data:`.SKIPPED`) unless *continue_on_error*; workers already running are
    left to finish, so that none is cut off half-way through a commit.  On
    Ctrl-C (or any exception here) the running workers get SIGTERM (their
    transactions roll back) and the exception propagates.

    :param config: the coordinator's alembic configuration.
    :param spec: the command every worker replays.
    :param names: the partitions, in the order to start them.
    :param jobs: the most workers alive at once.
    :param continue_on_error: keep starting workers after a failure.
    :param progress: where starts and ends are shown.
    :param sharded_config: the partitions' configuration, to hand to the
      workers pickled; ``None`` when ``env.py`` finds it again by itself.
    :returns: each partition's outcome (before/after as the worker saw them).
    """
    workdir = Path(tempfile.mkdtemp(prefix="partpool-migrate-"))
    pending = list(names)
    running: dict[str, _Worker] = {}
    outcomes: dict[str, PartitionOutcome] = {}
    first_failure: str | None = None
    launcher: Launcher | None = None
    try:
        base = _base_spec(config, spec, workdir, sharded_config)
        launcher = make_launcher(_worker_environment(), workdir / "launcher.log")
        while pending or running:
            while pending and len(running) < jobs and first_failure is None:
                name = pending.pop(0)
                running[name] = _start(launcher, name, base, workdir)
                progress.started(name)
            if first_failure is not None and pending:
                for name in pending:
                    outcome = PartitionOutcome(
                        name,
                        SKIPPED,
                        error=f"not started because {first_failure} failed "
                        "(--continue-on-error / -x continue_on_error=1 goes on after failures)",
                    )
                    outcomes[name] = outcome
                    progress.finished(outcome)
                pending.clear()
            finished = launcher.finished()
            for name, code in finished:
                outcome, lines = _collect(running.pop(name), code, workdir)
                outcomes[name] = outcome
                progress.relay(name, lines, failed=outcome.status == FAILED)
                progress.finished(outcome)
                if outcome.status == FAILED and not continue_on_error and first_failure is None:
                    first_failure = name
            if not finished:
                time.sleep(_POLL_INTERVAL)
        launcher.close()
    except BaseException:
        if launcher is not None:
            launcher.close(terminate=True)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return outcomes


def _base_spec(
    config: Config, spec: CommandSpec, workdir: Path, sharded_config: ShardedConfig | None
) -> dict[str, Any]:
    pickled: str | None = None
    if sharded_config is not None:
        path = workdir / "partitions.pickle"
        # private directory (0700); the file holds the partitions' URLs
        path.write_bytes(pickle.dumps(sharded_config))
        pickled = str(path)
    cmd_opts = {
        key: value
        for key, value in vars(config.cmd_opts or Namespace()).items()
        if key != "cmd" and _jsonable(value)
    }
    section = config.config_ini_section
    return {
        "command": spec.name,
        "args": list(spec.args),
        "kwargs": dict(spec.kwargs or {}),
        "config_file": config.config_file_name,
        "toml_file": getattr(config, "toml_file_name", None),
        "ini_section": section,
        "main_options": dict(config.get_section(section) or {}),
        "cmd_opts": cmd_opts,
        "attributes": {
            key: value
            for key, value in config.attributes.items()
            if not key.startswith("partpool.") and _jsonable(value)
        },
        "config_pickle": pickled,
    }


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _worker_environment() -> dict[str, str]:
    """The environment of a worker: ours, with our ``sys.path`` importable.

    ``env.py`` may import models that this process found through a path added
    at run time (alembic's ``prepend_sys_path``, a test's ``sys.path`` entry).
    """
    environ = dict(os.environ)
    # the standard library and site-packages are on every interpreter's path
    given = {*site.getsitepackages(), site.getusersitepackages()}
    paths = [
        p
        for p in sys.path
        if p and os.path.isdir(p) and p not in given and not p.startswith(sys.base_prefix)
    ]
    if environ.get("PYTHONPATH"):
        paths.append(environ["PYTHONPATH"])
    environ["PYTHONPATH"] = os.pathsep.join(paths)
    return environ


def _start(launcher: Launcher, name: str, base: dict[str, Any], workdir: Path) -> _Worker:
    result = workdir / f"{name}.result.json"
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(
        json.dumps({**base, "partition": name, "result": str(result)}), encoding="utf-8"
    )
    log_path = workdir / f"{name}.log"
    launcher.start(name, spec_path, log_path)
    log.debug("partition %s: worker started", name)
    return _Worker(name, result, log_path, time.monotonic())


def _collect(worker: _Worker, code: int, workdir: Path) -> tuple[PartitionOutcome, list[str]]:
    """The outcome a finished worker reported, and its log lines."""
    lines = _read_lines(worker.log_path)
    try:
        data = json.loads(worker.result.read_text(encoding="utf-8"))
        return PartitionOutcome.from_dict(data), lines
    except (OSError, ValueError, KeyError):
        # no result: the worker died early, or the launcher did (see its log)
        tail_lines = lines or _read_lines(workdir / "launcher.log")
        tail = " / ".join(line.strip() for line in tail_lines[-_LOG_TAIL:] if line.strip())
        error = f"worker process exited with status {code} without a result" + (
            f": {tail}" if tail else ""
        )
        duration = time.monotonic() - worker.started
        return PartitionOutcome(worker.name, FAILED, error=error, duration=duration), lines


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def worker_main(argv: Sequence[str]) -> int:
    """Entry point of a worker process: replay the command for one partition.

    :param argv: one element, the path of the spec file written by the coordinator.
    :returns: the process exit status: 0 if the partition's run committed.
    """
    from alembic import command
    from alembic.config import Config

    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    name, result = spec["partition"], spec["result"]
    extra: dict[str, Any] = {"toml_file": spec["toml_file"]} if spec.get("toml_file") else {}
    config = Config(
        file_=spec["config_file"],
        ini_section=spec["ini_section"],
        cmd_opts=Namespace(**spec["cmd_opts"]),
        **extra,
    )
    for key, value in spec["main_options"].items():
        config.set_main_option(key, value.replace("%", "%%"))
    config.attributes.update(spec["attributes"])
    config.attributes[WORKER_ATTRIBUTE] = {"partition": name, "result": result}
    if spec["config_pickle"]:
        # written by our own coordinator into a private directory a moment ago
        config.attributes[CONFIG_ATTRIBUTE] = pickle.loads(  # noqa: S301
            Path(spec["config_pickle"]).read_bytes()
        )
    started = time.monotonic()
    try:
        getattr(command, spec["command"])(config, *spec["args"], **spec["kwargs"])
    except Exception as exc:
        if not Path(result).exists():
            traceback.print_exc()
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            write_outcome(
                result,
                PartitionOutcome(
                    name,
                    FAILED,
                    error=f"{type(exc).__name__}: {text}".rstrip(": "),
                    duration=time.monotonic() - started,
                ),
            )
        return 1
    if not Path(result).exists():
        write_outcome(
            result,
            PartitionOutcome(
                name,
                FAILED,
                error="env.py did not call sqlalchemy_partpool.migrations.run_migrations()",
            ),
        )
        return 1
    return 0
