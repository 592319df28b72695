"""``partpool migrate init DIR``: a ready alembic environment for partitions.

Writes what ``alembic init`` writes (an ini file, ``env.py``,
``script.py.mako``, ``README``, ``versions/``), except that ``env.py`` hands
its work to :func:`sqlalchemy_partpool.migrations.run_migrations`, so that every
alembic command applies to every partition.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigurationError

__all__ = ["write_environment"]

_INI = """\
# Alembic configuration written by `partpool migrate init`: every revision runs on
# every partition of a sqlalchemy-partpool configuration.

[alembic]
script_location = {script_location}
prepend_sys_path = .
path_separator = os

# The partitions: a TOML file as for `partpool --config`.  Without it, they come
# from `-x config=FILE`, or the PARTPOOL_CONFIG / PARTPOOL_PARTITIONS variables.
# partpool_config = %(here)s/partpool.toml

[loggers]
keys = root,sqlalchemy,alembic,partpool

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console
qualname =

[logger_sqlalchemy]
level = WARNING
handlers =
qualname = sqlalchemy.engine

[logger_alembic]
level = INFO
handlers =
qualname = alembic

[logger_partpool]
level = INFO
handlers =
qualname = sqlalchemy_partpool.migrations

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
datefmt = %H:%M:%S
"""

ENV_PY = '''\
"""Alembic environment: every revision runs on every partition.

Written by `partpool migrate init`.  The partitions come from -x config=FILE,
the partpool_config option of the ini file, or the PARTPOOL_CONFIG /
PARTPOOL_PARTITIONS environment variables (or pass a ShardedConfig as the
second argument of run_migrations).  -x partitions=a,b, -x jobs=N,
-x continue_on_error=1 and -x lock_timeout=SECONDS select and tune.
"""

from logging.config import fileConfig

from alembic import context

from sqlalchemy_partpool.migrations import run_migrations

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# Your models' MetaData, for `partpool migrate revision --autogenerate`, e.g.
#     from myapp.models import Base
#     target_metadata = Base.metadata
target_metadata = None

run_migrations(context, target_metadata=target_metadata)
'''

SCRIPT_MAKO = '''\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Runs on every partition, each in a transaction of its own;
sqlalchemy_partpool.migrations.current_partition() names the one being migrated.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    """Upgrade schema."""
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    """Downgrade schema."""
    ${downgrades if downgrades else "pass"}
'''

_README = """\
Alembic environment for a partitioned database (sqlalchemy-partpool).

Every alembic command applies to every partition, each with its own
alembic_version table:

    partpool migrate upgrade head            # or: alembic upgrade head
    partpool migrate status                  # revisions and drift
    partpool migrate upgrade head --partitions p0,p1 --jobs 4
    alembic -x partitions=p0,p1 -x jobs=4 upgrade head
"""


def write_environment(directory: str | os.PathLike[str], ini: str | os.PathLike[str]) -> list[Path]:
    """Create an alembic environment in *directory* and its configuration file *ini*.

    The ini file's ``script_location`` is relative to the file itself
    (``%(here)s/...``), so the pair can move together.

    :param directory: the environment's directory; created, or must be empty.
    :param ini: the alembic configuration file to write; must not exist.
    :returns: the files written.
    :raises ConfigurationError: if *directory* is not empty or *ini* exists.
    """
    target = Path(directory)
    ini_path = Path(ini)
    if target.exists() and any(target.iterdir()):
        raise ConfigurationError(
            f"directory {str(target)!r} is not empty; choose a new directory for the environment"
        )
    if ini_path.exists():
        raise ConfigurationError(
            f"{str(ini_path)!r} exists; pass -c/--alembic-config with another file name"
        )
    try:
        relative = os.path.relpath(target.resolve(), ini_path.resolve().parent)
        location = "%(here)s/" + Path(relative).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        location = target.resolve().as_posix()
    (target / "versions").mkdir(parents=True, exist_ok=True)
    ini_path.parent.mkdir(parents=True, exist_ok=True)
    files = {
        ini_path: _INI.format(script_location=location),
        target / "env.py": ENV_PY,
        target / "script.py.mako": SCRIPT_MAKO,
        target / "README": _README,
    }
    for path, content in files.items():
        path.write_text(content, encoding="utf-8")
    return [*files, target / "versions"]
