"""How worker processes start: forked from a preloaded launcher, or spawned afresh.

A new Python interpreter spends about half a second of CPU importing alembic,
SQLAlchemy and psycopg2 before it migrates anything; sixteen of them on a
two-core machine cost several seconds, more than the migrations themselves.
So on POSIX the coordinator starts one *launcher* process
(:class:`ForkLauncher`) that imports those modules once and then forks a worker
per partition; a fork starts in milliseconds with everything imported.  The
launcher is a fresh interpreter with no threads and no connections, so forking
it is safe (forking the coordinator itself would not be: it may run threads,
hold connections, or be a user's program).

Where ``os.fork`` does not exist (Windows), :class:`SpawnLauncher` starts a
fresh interpreter per worker instead.

Either way a worker runs :func:`.migrate_parallel.worker_main` with its spec
file, its standard output and error going to its log file; the launcher reports
``(partition, exit status)`` as workers end.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Protocol

__all__ = ["ForkLauncher", "Launcher", "SpawnLauncher", "launcher_main", "make_launcher"]

#: Modules the fork launcher imports before forking: what every worker needs.
PRELOAD = (
    "alembic.command",
    "alembic.config",
    "alembic.autogenerate",
    "sqlalchemy.dialects.postgresql",
    "psycopg2",
    "psycopg2.extras",
    "sqlalchemy_partpool.migrations",
)

#: Seconds between the launcher's checks for commands and ended workers.
_POLL_INTERVAL = 0.01
#: Seconds a worker gets to exit after SIGTERM before SIGKILL.
_TERMINATE_WAIT = 10.0

_WORKER_CODE = (
    "import sys; from sqlalchemy_partpool.migrate_parallel import worker_main; "
    "sys.exit(worker_main(sys.argv[1:]))"
)
_LAUNCHER_CODE = (
    "import sys; from sqlalchemy_partpool.migrate_launch import launcher_main; "
    "sys.exit(launcher_main())"
)


class Launcher(Protocol):
    """Starts worker processes and says when they end."""

    def start(self, name: str, spec: Path, log: Path) -> None:
        """Start the worker of partition *name* with spec file *spec*, output to *log*."""

    def finished(self) -> list[tuple[str, int]]:
        """The workers that ended since the last call, with their exit statuses (no wait)."""

    def close(self, *, terminate: bool = False) -> None:
        """Stop the launcher; with *terminate*, stop running workers too (SIGTERM)."""


def make_launcher(environ: dict[str, str], log: Path) -> Launcher:
    """A :class:`ForkLauncher` where ``os.fork`` exists, else a :class:`SpawnLauncher`.

    :param environ: the workers' environment.
    :param log: where the launcher itself writes (import errors, say).
    """
    if hasattr(os, "fork"):
        return ForkLauncher(environ, log)
    return SpawnLauncher(environ)


class SpawnLauncher:
    """A fresh interpreter per worker (where ``os.fork`` does not exist)."""

    def __init__(self, environ: dict[str, str]) -> None:
        self.environ = environ
        self.running: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}

    def start(self, name: str, spec: Path, log: Path) -> None:
        """Start a worker interpreter."""
        log_file = log.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(spec)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=self.environ,
        )
        self.running[name] = (process, log_file)

    def finished(self) -> list[tuple[str, int]]:
        """Workers whose process ended."""
        ended = []
        for name, (process, log_file) in list(self.running.items()):
            code = process.poll()
            if code is not None:
                log_file.close()
                del self.running[name]
                ended.append((name, code))
        return ended

    def close(self, *, terminate: bool = False) -> None:
        """Terminate (if asked) and reap the remaining workers."""
        processes = [process for process, _ in self.running.values()]
        if terminate:
            for process in processes:
                if process.poll() is None:
                    process.terminate()
        _reap(processes)
        for _, log_file in self.running.values():
            log_file.close()
        self.running.clear()


class ForkLauncher:
    """One preloaded launcher process that forks a worker per partition.

    Commands go to the launcher's standard input (``name TAB spec TAB log``),
    ends come back on its standard output (``exit TAB name TAB status``).
    """

    def __init__(self, environ: dict[str, str], log: Path) -> None:
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=environ,
        )
        self._pending = b""
        self._started: set[str] = set()

    def start(self, name: str, spec: Path, log: Path) -> None:
        """Ask the launcher to fork the worker of partition *name*."""
        assert self.process.stdin is not None
        self._started.add(name)
        try:
            self.process.stdin.write(f"{name}\t{spec}\t{log}\n".encode())
            self.process.stdin.flush()
        except OSError:  # the launcher died: finished() reports the worker as failed
            pass

    def finished(self) -> list[tuple[str, int]]:
        """Workers the launcher saw end; all started ones (status -1) if the launcher died."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        ended: list[tuple[str, int]] = []
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            kind, name, code = line.decode().split("\t")
            if kind == "exit" and name in self._started:
                self._started.discard(name)
                ended.append((name, int(code)))
        if self.process.poll() is not None and not select.select([fd], [], [], 0)[0]:
            ended += [(name, -1) for name in sorted(self._started)]
            self._started.clear()
        return ended

    def close(self, *, terminate: bool = False) -> None:
        """End the launcher: at once with *terminate* (its workers get SIGTERM), else when
        its workers have ended."""
        if terminate and self.process.poll() is None:
            self.process.terminate()
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        _reap([self.process])
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


def _reap(processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + _TERMINATE_WAIT
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launcher_main() -> int:
    """Entry point of the fork launcher: preload, then fork a worker per command.

    Ends when its standard input closes and every worker has ended.  SIGTERM
    is passed on to the running workers (their transactions roll back).
    """
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(module)
    children: dict[int, str] = {}

    def stop(signum: int, frame: object) -> None:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        for pid in list(children):
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    pending, reading = b"", True
    while reading or children:
        if reading and select.select([0], [], [], _POLL_INTERVAL)[0]:
            chunk = os.read(0, 65536)
            reading = bool(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                name, spec, log = line.decode().split("\t")
                children[_fork(spec, log)] = name
        elif not reading:
            time.sleep(_POLL_INTERVAL)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            name = children.pop(pid)
            os.write(1, f"exit\t{name}\t{os.waitstatus_to_exitcode(status)}\n".encode())
    return 0


def _fork(spec: str, log: str) -> int:
    """Fork a worker for *spec*, its output going to *log*; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        from .migrate_parallel import worker_main

        code = worker_main([spec])
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
