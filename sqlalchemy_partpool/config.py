"""Partition and pool settings: what they mean, how they are validated, where they come from.

A *partition* is a name, an SQLAlchemy URL and pool settings.  Settings left
unset on a partition inherit the defaults given for all partitions.  Everything
is validated up front: a bad name, size, URL or option raises
:class:`.ConfigurationError` naming the partition and saying what to fix, before
any connection is opened.

Configuration comes from Python (:class:`Partition` objects or plain dicts),
from a TOML file (:meth:`ShardedConfig.from_toml`) or from environment
variables (:meth:`ShardedConfig.from_env`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeAlias

from sqlalchemy.engine import URL, make_url

from .errors import ConfigurationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ENV_CONFIG",
    "ENV_PARTITIONS",
    "Partition",
    "PoolSettings",
    "ShardedConfig",
    "mask_url",
]

#: Environment variable naming a TOML configuration file.
ENV_CONFIG = "PARTPOOL_CONFIG"
#: Environment variable listing partitions inline: ``name=url`` pairs separated by
#: whitespace or ``;``.
ENV_PARTITIONS = "PARTPOOL_PARTITIONS"
#: Prefix of environment variables that set pool defaults, e.g.
#: ``PARTPOOL_MAX_CONNECTIONS=20``.
ENV_PREFIX = "PARTPOOL_"

# Partition names end up in thread names, log lines, metric labels, alembic
# ``-x partitions=a,b`` lists and file names, so they are kept to a safe alphabet.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")

# Engine options that would fight with the partition pool.  Each maps to the
# setting that replaces it, named in the error message.
_POOL_OWNED_OPTIONS = {
    "pool": "min_connections/max_connections",
    "poolclass": "min_connections/max_connections",
    "pool_size": "max_connections (and min_connections)",
    "max_overflow": "max_connections",
    "pool_timeout": "timeout",
    "pool_recycle": "max_lifetime",
    "pool_pre_ping": "pre_ping",
    "pool_use_lifo": "use_lifo",
}


def mask_url(url: URL | str) -> str:
    """Render *url* with its password replaced by ``***``.

    :param url: an SQLAlchemy :class:`~sqlalchemy.engine.URL` or URL string.
    """
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        # An unparseable string may still hold a secret; never echo it back.
        return "<unparseable URL>"


@dataclass(frozen=True)
class PoolSettings:
    """Pool settings of one partition (or the defaults for all of them).

    The two numbers of the psycopg2 recipe become:

    * ``min_connections`` -- connections opened when the engine starts (unless
      ``lazy``) and never closed for being idle.
    * ``max_connections`` -- a hard ceiling on connections to the partition,
      checked out plus idle.  A caller that finds all of them busy *waits* up to
      ``timeout`` (psycopg2's pools raise at once instead).

    On a :class:`~sqlalchemy.pool.QueuePool` this is ``pool_size=max_connections,
    max_overflow=0``, plus warm-up to ``min_connections`` and idle reaping down to
    it, which QueuePool lacks.

    :param min_connections: connections kept open; default 1 (the recipe's ``minconn``).
    :param max_connections: ceiling on open connections; default 10 (``maxconn``).
    :param timeout: seconds a checkout waits for a free connection before
      raising :class:`.PoolTimeout`; default 30 (QueuePool's ``pool_timeout``).
    :param max_idle: seconds after which an idle connection above the minimum is
      closed; default 600, ``None`` never closes idle connections (psycopg_pool's
      ``max_idle``).
    :param max_lifetime: seconds after which a connection is replaced, checked
      on checkout and by the background maintenance, never while checked out;
      default 3600, ``None`` keeps connections forever (QueuePool's ``pool_recycle``).
    :param lifetime_jitter: fraction of ``max_lifetime`` by which each
      connection's lifetime is shortened at random, so that connections opened
      together do not all expire together; default 0.1.
    :param pre_ping: test a connection with a ping before handing it out
      (QueuePool's ``pool_pre_ping``); default True.
    :param ping_skip_window: seconds; a connection returned to the pool less than
      this long ago is handed out without a ping, so the hot path stays one round
      trip (HikariCP uses 500 ms); default 0.5.
    :param use_lifo: reuse the most recently returned connection first, which
      lets idle reaping shrink the pool after a burst (QueuePool's
      ``pool_use_lifo``); default True.
    :param max_waiting: how many callers may wait for a connection at once;
      one more raises :class:`.PoolExhausted` at once.  0 (default) means no limit.
    :param connect_timeout: seconds a new connection may take to open
      (libpq ``connect_timeout``, whole seconds, at least 1); default 10.
      ``None`` leaves the driver's default (wait forever).
    :param statement_timeout: server-side limit on each statement, set on
      every connection (PostgreSQL ``statement_timeout``); default ``None``.
    :param query_timeout: client-side limit on each statement, commit and
      rollback: past it the connection's socket is shut down, so even a hung
      server cannot block a caller; default ``None``.  Set it a little above
      ``statement_timeout`` so the server normally cancels first.
    :param ping_timeout: client-side limit on a pre-ping or keepalive ping; default 5.
    :param keepalive_time: seconds after which an idle connection is pinged in
      the background, so a firewall that silently dropped it is noticed before
      a caller gets it (HikariCP's ``keepaliveTime``); default 120, ``None`` never.
    :param leak_threshold: seconds a connection may stay checked out before it
      is reported as a suspected leak, with the stack that took it; default
      ``None`` (off: capturing the stack costs a few microseconds per checkout).
    :param down_after: consecutive failed connection attempts that mark a
      partition down (checkouts then fail fast); default 3.
    :param probe_max_interval: longest pause between the prober's attempts to
      reach a partition that is down; default 1.0 s.
    """

    min_connections: int = 1
    max_connections: int = 10
    timeout: float = 30.0
    max_idle: float | None = 600.0
    max_lifetime: float | None = 3600.0
    lifetime_jitter: float = 0.1
    pre_ping: bool = True
    ping_skip_window: float = 0.5
    use_lifo: bool = True
    max_waiting: int = 0
    connect_timeout: float | None = 10.0
    statement_timeout: float | None = None
    query_timeout: float | None = None
    ping_timeout: float = 5.0
    keepalive_time: float | None = 120.0
    leak_threshold: float | None = None
    down_after: int = 3
    probe_max_interval: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Names of every pool option, in declaration order."""
        return tuple(f.name for f in fields(cls))

    def replace(self, **changes: Any) -> PoolSettings:
        """Return a copy with *changes* applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def validate(self, partition: str | None = None) -> None:
        """Check every value; raise :class:`.ConfigurationError` naming the first problem.

        :param partition: partition name to mention in the error.
        """

        def fail(option: str, message: str) -> ConfigurationError:
            return ConfigurationError(f"{option} {message}", partition=partition, option=option)

        for name in ("min_connections", "max_connections", "max_waiting", "down_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail(name, f"must be a whole number, got {value!r}")
            if value < 0:
                raise fail(name, f"must not be negative, got {value}")
        if self.max_connections < 1:
            raise fail("max_connections", "must be at least 1")
        if self.down_after < 1:
            raise fail("down_after", "must be at least 1")
        if self.min_connections > self.max_connections:
            raise fail(
                "min_connections",
                f"({self.min_connections}) is greater than max_connections "
                f"({self.max_connections}); lower min_connections or raise max_connections",
            )
        for name, allow_none in (
            ("timeout", False),
            ("max_idle", True),
            ("max_lifetime", True),
            ("ping_skip_window", False),
            ("lifetime_jitter", False),
            ("connect_timeout", True),
            ("statement_timeout", True),
            ("query_timeout", True),
            ("ping_timeout", False),
            ("keepalive_time", True),
            ("leak_threshold", True),
            ("probe_max_interval", False),
        ):
            value = getattr(self, name)
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise fail(name, f"must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise fail(name, f"must be a finite, non-negative number, got {value!r}")
        if self.timeout <= 0:
            raise fail("timeout", "must be greater than 0 (seconds to wait for a connection)")
        for name in (
            "max_idle",
            "max_lifetime",
            "connect_timeout",
            "statement_timeout",
            "query_timeout",
            "keepalive_time",
            "leak_threshold",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise fail(name, "must be greater than 0, or None to disable it")
        for name in ("ping_timeout", "probe_max_interval"):
            if getattr(self, name) <= 0:
                raise fail(name, "must be greater than 0")
        if self.lifetime_jitter >= 1:
            raise fail("lifetime_jitter", "must be a fraction below 1 (0.1 = up to 10% shorter)")
        for name in ("pre_ping", "use_lifo"):
            if not isinstance(getattr(self, name), bool):
                raise fail(name, f"must be true or false, got {getattr(self, name)!r}")


_POOL_OPTIONS = PoolSettings.option_names()


@dataclass(frozen=True, repr=False)
class Partition:
    """One partition: a name, where it is, and pool settings that override the defaults.

    :param name: a short identifier (letters, digits, ``_``, ``.``, ``-``; at most
      63 characters).  It appears in logs, metrics and error messages.
    :param url: an SQLAlchemy URL (``postgresql+psycopg2://user:pw@host/db``), a
      :class:`~sqlalchemy.engine.URL`, or a libpq keyword string
      (``host=... dbname=...``).
    :param engine_options: extra :func:`~sqlalchemy.create_engine` keywords for
      this partition only (``connect_args``, ``echo``, ...).
    :param pool: pool settings for this partition alone; options left out
      inherit the defaults.  Pass them as keywords to :meth:`Partition.create`.
    """

    name: str
    url: URL
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    pool: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        name: str,
        url: URL | str,
        *,
        engine_options: Mapping[str, Any] | None = None,
        **pool_options: Any,
    ) -> Partition:
        """Build and validate a partition.

        :param name: the partition name.
        :param url: where the partition lives.
        :param engine_options: extra ``create_engine`` keywords for this partition.
        :param pool_options: any :class:`PoolSettings` option, overriding the default.
        :raises ConfigurationError: on any invalid value.
        """
        return cls(
            name=name,
            url=_parse_url(name, url),
            engine_options=dict(engine_options or {}),
            pool=dict(pool_options),
        )

    def __post_init__(self) -> None:
        _check_name(self.name)
        url: object = self.url  # a str is accepted too, and parsed here
        if not isinstance(url, URL):
            object.__setattr__(self, "url", _parse_url(self.name, url))
        _check_engine_options(self.engine_options, self.name)
        _check_option_names(self.pool, _POOL_OPTIONS, self.name, "pool option")

    def settings(self, defaults: PoolSettings) -> PoolSettings:
        """The effective pool settings: *defaults* overridden by this partition's own.

        :raises ConfigurationError: if the combination is invalid (e.g. a
          partition's ``min_connections`` above the default ``max_connections``).
        """
        try:
            merged = dataclasses.replace(defaults, **self.pool) if self.pool else defaults
        except ConfigurationError as exc:
            raise ConfigurationError(str(exc), partition=self.name, option=exc.option) from None
        merged.validate(self.name)
        return merged

    @property
    def safe_url(self) -> str:
        """The URL with its password masked, safe for logs and messages."""
        return mask_url(self.url)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.pool.items())
        return f"Partition({self.name!r}, {self.safe_url!r}{extra})"


#: One partition's description: a Partition, a URL, or a dict with ``url`` and options.
PartitionSpec: TypeAlias = "Partition | URL | str | Mapping[str, Any]"
#: ``{name: PartitionSpec}`` or a list of Partitions / dicts with a ``name``.
PartitionsSpec: TypeAlias = "Mapping[str, PartitionSpec] | Sequence[Partition | Mapping[str, Any]]"


@dataclass(frozen=True, repr=False)
class ShardedConfig:
    """Everything :func:`.create_sharded_engine` needs, validated.

    :param partitions: the partitions, in order (the order routers see).
    :param pool: default pool settings for every partition.
    :param router: a router specification (see :func:`.make_router`): ``None``
      or ``"hash"``, ``"pg_hash"``, a dict with ``strategy``, a Router or a callable.
    :param engine_options: extra ``create_engine`` keywords for every partition.
    :param lazy: open no connection until first use (skip the warm-up to
      ``min_connections``).
    :param fanout_workers: threads that run statements on many partitions at
      once (:meth:`.ShardedEngine.execute_all`); default twice the number of
      partitions, between 4 and 32.
    """

    partitions: tuple[Partition, ...]
    pool: PoolSettings = field(default_factory=PoolSettings)
    router: Any = None
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    lazy: bool = False
    fanout_workers: int | None = None

    def __post_init__(self) -> None:
        if not self.partitions:
            raise ConfigurationError(
                "no partitions configured; give at least one name -> URL", option="partitions"
            )
        seen: set[str] = set()
        for p in self.partitions:
            if p.name in seen:
                raise ConfigurationError(
                    "duplicate partition name; every partition needs its own name",
                    partition=p.name,
                    option="name",
                )
            seen.add(p.name)
            p.settings(self.pool)  # validates the merged settings now, not at first use
        _check_engine_options(self.engine_options, None)
        lazy: object = self.lazy
        if not isinstance(lazy, bool):
            raise ConfigurationError(f"lazy must be true or false, got {lazy!r}")
        workers: object = self.fanout_workers
        if workers is not None and (
            isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
        ):
            raise ConfigurationError(
                f"fanout_workers must be a whole number of at least 1, got {workers!r}",
                option="fanout_workers",
            )

    @property
    def workers(self) -> int:
        """The fan-out worker count: ``fanout_workers``, or 2 per partition within 4..32."""
        if self.fanout_workers is not None:
            return self.fanout_workers
        return max(4, min(32, 2 * len(self.partitions)))

    @property
    def names(self) -> tuple[str, ...]:
        """Partition names in configuration order."""
        return tuple(p.name for p in self.partitions)

    def __repr__(self) -> str:
        return (
            f"ShardedConfig(partitions={list(self.partitions)!r}, pool={self.pool!r}, "
            f"router={self.router!r}, lazy={self.lazy!r})"
        )

    @classmethod
    def build(
        cls,
        partitions: PartitionsSpec | ShardedConfig,
        *,
        router: Any = None,
        engine_options: Mapping[str, Any] | None = None,
        lazy: bool = False,
        fanout_workers: int | None = None,
        **pool_options: Any,
    ) -> ShardedConfig:
        """Build a configuration from Python values.

        :param partitions: ``{name: url}``, ``{name: {"url": ..., <pool options>}}``,
          or a sequence of :class:`Partition` objects or dicts with a ``name`` key.
          A finished :class:`ShardedConfig` is returned as it is, and then no
          other setting may be given.
        :param router: the router specification.
        :param engine_options: ``create_engine`` keywords for every partition.
        :param lazy: skip the warm-up.
        :param fanout_workers: see :class:`ShardedConfig`.
        :param pool_options: default :class:`PoolSettings` options.
        :raises ConfigurationError: on any invalid value.
        """
        if isinstance(partitions, ShardedConfig):
            if router is not None or engine_options or pool_options or lazy or fanout_workers:
                raise ConfigurationError(
                    "pass either a ShardedConfig or keyword settings, not both"
                )
            return partitions
        _check_option_names(pool_options, _POOL_OPTIONS, None, "option")
        return cls(
            partitions=_parse_partitions(partitions),
            pool=_build_settings(pool_options, None),
            router=router,
            engine_options=dict(engine_options or {}),
            lazy=lazy,
            fanout_workers=fanout_workers,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardedConfig:
        """Build a configuration from a dict shaped like the TOML file.

        Recognised keys: ``partitions`` (required), ``pool`` (defaults),
        ``router``, ``engine_options``, ``lazy``, ``fanout_workers``.

        :raises ConfigurationError: on unknown keys or invalid values.
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"configuration must be a table/dict, got {type(data)!r}")
        _check_option_names(
            data,
            ("partitions", "pool", "router", "engine_options", "lazy", "fanout_workers"),
            None,
            "key",
        )
        if "partitions" not in data:
            raise ConfigurationError(
                "missing [partitions] table; add one entry per partition with its url",
                option="partitions",
            )
        pool = data.get("pool", {})
        if not isinstance(pool, Mapping):
            raise ConfigurationError("[pool] must be a table of pool options", option="pool")
        return cls.build(
            data["partitions"],
            router=data.get("router"),
            engine_options=data.get("engine_options"),
            lazy=data.get("lazy", False),
            fanout_workers=data.get("fanout_workers"),
            **pool,
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> ShardedConfig:
        """Read a TOML configuration file.

        Example::

            [pool]
            min_connections = 1
            max_connections = 10

            [router]
            strategy = "hash"
            buckets = 1024

            [partitions.p0]
            url = "postgresql+psycopg2://app@db0/app"

            [partitions.p1]
            url = "postgresql+psycopg2://app@db1/app"
            max_connections = 20

        A partition's ``password_env`` key names an environment variable holding
        its password, so the file itself need not contain one.

        :raises ConfigurationError: if the file is missing, not valid TOML, or invalid.
        """
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigurationError(f"configuration file {str(p)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(
                f"configuration file {str(p)!r} is not valid TOML: {exc}"
            ) from None
        return cls.from_dict(data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ShardedConfig:
        """Build a configuration from environment variables.

        ``PARTPOOL_CONFIG`` names a TOML file; otherwise ``PARTPOOL_PARTITIONS``
        lists ``name=url`` pairs separated by whitespace or ``;``.  Pool defaults
        come from ``PARTPOOL_<OPTION>`` (``PARTPOOL_MAX_CONNECTIONS=20``) and the
        router from ``PARTPOOL_ROUTER`` (``hash`` or ``pg_hash``); with a TOML
        file they override its ``[pool]`` values.

        :param environ: the environment to read; ``os.environ`` by default.
        :raises ConfigurationError: if neither variable is set or a value is invalid.
        """
        env = os.environ if environ is None else environ
        overrides = _pool_options_from_env(env)
        router = env.get(ENV_PREFIX + "ROUTER") or None
        if env.get(ENV_CONFIG):
            base = cls.from_toml(env[ENV_CONFIG])
            return dataclasses.replace(
                base,
                pool=base.pool.replace(**overrides) if overrides else base.pool,
                router=router or base.router,
            )
        raw = env.get(ENV_PARTITIONS, "").strip()
        if not raw:
            raise ConfigurationError(
                f"set {ENV_CONFIG} to a TOML file, or {ENV_PARTITIONS} to "
                "'name=url name=url ...', to describe the partitions"
            )
        partitions: dict[str, str] = {}
        for item in re.split(r"[;\s]+", raw):
            if not item:
                continue
            name, sep, url = item.partition("=")
            if not sep or not url:
                raise ConfigurationError(
                    f"{ENV_PARTITIONS} entry {name!r} is not of the form name=url"
                )
            if name in partitions:
                raise ConfigurationError(
                    "duplicate partition name in " + ENV_PARTITIONS, partition=name, option="name"
                )
            partitions[name] = url
        return cls.build(partitions, router=router, **overrides)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        shown = repr(name) if isinstance(name, str) else f"of type {type(name).__name__}"
        raise ConfigurationError(
            f"partition name {shown} is not allowed: use 1-63 letters, digits, '_', '.' "
            "or '-', starting with a letter, digit or '_'",
            option="name",
        )


def _parse_url(name: str, url: Any) -> URL:
    if isinstance(url, URL):
        parsed = url
    elif isinstance(url, str):
        text = url.strip()
        if "://" not in text and "=" in text:
            parsed = _url_from_libpq_dsn(name, text)
        else:
            try:
                parsed = make_url(text)
            except Exception:
                raise ConfigurationError(
                    "url is not a valid SQLAlchemy URL; expected "
                    "'postgresql+psycopg2://user:password@host:port/database'",
                    partition=name,
                    option="url",
                ) from None
    else:
        raise ConfigurationError(
            f"url must be a string or sqlalchemy.engine.URL, got {type(url).__name__}",
            partition=name,
            option="url",
        )
    if parsed.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"url {mask_url(parsed)!r} is not a PostgreSQL URL; sqlalchemy-partpool "
            "works with postgresql:// URLs (postgresql+psycopg2, or +asyncpg / +psycopg "
            "for the asyncio engine)",
            partition=name,
            option="url",
        )
    return parsed


def _url_from_libpq_dsn(name: str, dsn: str) -> URL:
    from psycopg2.extensions import parse_dsn

    try:
        params = parse_dsn(dsn)
    except Exception:
        raise ConfigurationError(
            "url looks like a libpq 'key=value' string but could not be parsed",
            partition=name,
            option="url",
        ) from None
    port = params.pop("port", None)
    try:
        port_number = int(port) if port is not None else None
    except ValueError:
        raise ConfigurationError(
            f"port {port!r} is not a number", partition=name, option="url"
        ) from None
    return URL.create(
        "postgresql+psycopg2",
        username=params.pop("user", None),
        password=params.pop("password", None),
        host=params.pop("host", None),
        port=port_number,
        database=params.pop("dbname", None),
        query=params,
    )


def _check_option_names(
    given: Iterable[str], valid: Sequence[str], partition: str | None, what: str
) -> None:
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigurationError(
                f"unknown {what} {key!r}; {hint}valid ones are {', '.join(valid)}",
                partition=partition,
                option=key,
            )


def _check_engine_options(options: Any, partition: str | None) -> None:
    if not isinstance(options, Mapping):
        raise ConfigurationError(
            "engine_options must be a dict of create_engine keywords",
            partition=partition,
            option="engine_options",
        )
    for key in options:
        if key in _POOL_OWNED_OPTIONS:
            raise ConfigurationError(
                f"engine option {key!r} is managed by the partition pool; "
                f"set {_POOL_OWNED_OPTIONS[key]} instead",
                partition=partition,
                option=key,
            )


def _build_settings(options: Mapping[str, Any], partition: str | None) -> PoolSettings:
    try:
        return PoolSettings(**options)
    except ConfigurationError as exc:
        raise ConfigurationError(
            str(exc).split(": ", 1)[-1] if partition else str(exc),
            partition=partition,
            option=exc.option,
        ) from None


def _parse_partition_entry(name: str, spec: Any) -> Partition:
    if isinstance(spec, Partition):
        if spec.name != name:
            raise ConfigurationError(
                f"listed under {name!r} but named {spec.name!r}", partition=name, option="name"
            )
        return spec
    if isinstance(spec, (str, URL)):
        return Partition.create(name, spec)
    if isinstance(spec, Mapping):
        entry = dict(spec)
        entry.pop("name", None)
        if "url" not in entry:
            raise ConfigurationError("missing url", partition=name, option="url")
        url = entry.pop("url")
        password_env = entry.pop("password_env", None)
        engine_options = entry.pop("engine_options", None)
        _check_option_names(entry, _POOL_OPTIONS, name, "partition option")
        partition = Partition.create(name, url, engine_options=engine_options, **entry)
        if password_env is not None:
            secret = os.environ.get(str(password_env))
            if secret is None:
                raise ConfigurationError(
                    f"password_env names {password_env!r}, which is not set in the environment",
                    partition=name,
                    option="password_env",
                )
            partition = dataclasses.replace(partition, url=partition.url.set(password=secret))
        return partition
    raise ConfigurationError(
        f"expected a URL string or a table with a url, got {type(spec).__name__}",
        partition=name,
    )


def _parse_partitions(spec: Any) -> tuple[Partition, ...]:
    if isinstance(spec, Mapping):
        items = list(spec.items())
        for name, _ in items:
            _check_name(name)
        return tuple(_parse_partition_entry(name, value) for name, value in items)
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ConfigurationError(
            "partitions must be a mapping of name -> url or a list of partitions",
            option="partitions",
        )
    result = []
    for item in spec:
        if isinstance(item, Partition):
            result.append(item)
        elif isinstance(item, Mapping) and "name" in item:
            _check_name(item["name"])
            result.append(_parse_partition_entry(item["name"], item))
        else:
            raise ConfigurationError(
                "each entry of a partitions list must be a Partition or a dict with "
                "'name' and 'url'",
                option="partitions",
            )
    return tuple(result)


def _pool_options_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    defaults = PoolSettings()
    for name in _POOL_OPTIONS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        default = getattr(defaults, name)
        value: Any
        try:
            if isinstance(default, bool):
                lowered = raw.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value = lowered in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                value = int(raw)
            elif raw.strip().lower() in ("", "none", "off"):
                value = None
            else:
                value = float(raw)
        except ValueError:
            raise ConfigurationError(
                f"environment variable {ENV_PREFIX + name.upper()}={raw!r} is not a valid "
                f"value for {name}",
                option=name,
            ) from None
        options[name] = value
    return options
