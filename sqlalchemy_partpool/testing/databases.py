"""Scratch partition databases for examples, the demo and quick experiments.

:func:`scratch_partitions` yields ``{name: url}`` for *n* fresh databases and
removes them afterwards, wherever a PostgreSQL server can be found:

1. ``url=`` or the ``PARTPOOL_URL`` environment variable: the admin URL of an
   existing server, on which the databases are created (and dropped at exit);
2. otherwise an embedded throwaway server started from the local PostgreSQL
   binaries (see :func:`.find_pg_bindir`), stopped and deleted at exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from .postgres import ExistingServer, PostgresServer, Server, unique_name

__all__ = ["URL_ENV", "scratch_partitions"]

log = logging.getLogger("sqlalchemy_partpool.testing")

#: Environment variable with the admin URL of a server to create scratch databases on.
URL_ENV = "PARTPOOL_URL"


@contextlib.contextmanager
def scratch_partitions(
    n: int = 4,
    *,
    url: str | None = None,
    prefix: str = "partpool_scratch",
    announce: bool = False,
) -> Iterator[dict[str, str]]:
    """Create *n* empty databases and yield ``{"p0": url0, ...}``; remove them on exit.

    :param n: how many partitions.
    :param url: admin URL of an existing server; default ``$PARTPOOL_URL``, and
      without either an embedded throwaway server is started.
    :param prefix: prefix of the database names (a unique suffix is added).
    :param announce: print one line saying which server is used.
    :raises HarnessError: if no server can be found or started.
    """
    url = url or os.environ.get(URL_ENV)
    server: Server
    owned: PostgresServer | None = None
    if url:
        server = ExistingServer(url)
        where = f"the PostgreSQL server at {server.sqlalchemy_url()!r}"
    else:
        owned = PostgresServer(max_connections=100)
        owned.start()
        server = owned
        where = f"an embedded throwaway server ({owned.version}, 127.0.0.1:{owned.port})"
    if announce:
        print(f"Creating {n} partition databases on {where}.")
    names: list[str] = []
    try:
        base = unique_name(prefix)
        partitions: dict[str, str] = {}
        for i in range(n):
            names.append(f"{base}_p{i}")
            partitions[f"p{i}"] = server.create_database(names[-1])
        yield partitions
    finally:
        for name in names:
            try:
                server.drop_database(name)
            except Exception:  # leave it rather than mask the real error
                log.warning("could not drop scratch database %s", name, exc_info=True)
        if owned is not None:
            owned.cleanup()
