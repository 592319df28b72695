"""Pool metrics for monitoring systems: Prometheus and OpenTelemetry.

Each backend lives in its own module and needs its own optional dependency,
so importing this package imports neither:

``sqlalchemy_partpool.metrics.prometheus``
    A ``prometheus_client`` collector that reads :meth:`.ShardedEngine.health`
    at scrape time (``pip install 'sqlalchemy-partpool[prometheus]'``)::

        from sqlalchemy_partpool.metrics import prometheus

        prometheus.register(sharded)

``sqlalchemy_partpool.metrics.opentelemetry``
    OpenTelemetry instruments named after the semantic conventions for
    database connection pools (``pip install 'sqlalchemy-partpool[opentelemetry]'``)::

        from sqlalchemy_partpool.metrics import opentelemetry

        handle = opentelemetry.instrument(sharded)

See ``docs/metrics.md`` for every metric, its labels and what it costs.
"""

from __future__ import annotations

# The backends are imported by name only, so that neither optional dependency is
# needed to import this package.
__all__: list[str] = []
