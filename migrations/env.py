"""The project's alembic environment: every revision runs on every partition.

The partitions come from -x config=FILE or the PARTPOOL_CONFIG /
PARTPOOL_PARTITIONS environment variables; -x partitions=a,b, -x jobs=N,
-x continue_on_error=1 and -x lock_timeout=SECONDS select and tune.  The work
is done by sqlalchemy_partpool.migrations (see docs/migrations.md).
"""

from logging.config import fileConfig

from alembic import context

from sqlalchemy_partpool.migrations import run_migrations

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

run_migrations(context, target_metadata=None)
