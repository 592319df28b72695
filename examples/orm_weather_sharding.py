"""SQLAlchemy's sharding example, ported: weather reports sharded by continent.

    python examples/orm_weather_sharding.py

SQLAlchemy's ``examples/sharding/separate_databases.py`` puts cities in one
of four SQLite databases by continent, with their weather reports beside
them.  It hand-writes a ``shard_chooser``, an ``identity_chooser``, an
``execute_chooser`` (which walks the WHERE clause looking for ``continent``
comparisons) and an id generator table.  Here the models declare their shard
key and partpool's :class:`ShardedSession` builds all of that; the queries
are the original's, with the original's assertions, plus a few lines showing
which partitions each one asked.

Creates four scratch databases (named after the original's shards) on the
server named by PARTPOOL_URL (an admin URL such as
postgresql://postgres@127.0.0.1/postgres), or on an embedded throwaway server
when PARTPOOL_URL is not set, and removes them at the end.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from sqlalchemy import ForeignKey, event, func, inspect, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from sqlalchemy_partpool import (
    DuplicateIdentity,
    ShardedEngine,
    ShardedSession,
    create_sharded_engine,
    set_shard_id,
)
from sqlalchemy_partpool.testing import scratch_partitions

SHARDS = ["north_america", "asia", "europe", "south_america"]

# The original's ``shard_lookup`` dict, as a router: continent -> partition.
# Its shard_chooser and execute_chooser both translate through that dict by
# hand; the router is the one place that does it now.
ROUTER = {
    "strategy": "lookup",
    "mapping": {
        "North America": "north_america",
        "Asia": "asia",
        "Europe": "europe",
        "South America": "south_america",
    },
}


class Base(DeclarativeBase):
    pass


class WeatherLocation(Base):
    __tablename__ = "weather_locations"
    # Replaces the original's shard_chooser branch for WeatherLocation
    # (``shard_lookup[instance.continent]``) and its whole execute_chooser:
    # SELECTs filtered by ``continent == x``, ``continent.in_([...])``, or
    # AND/OR of those, go only to the partitions of those continents.
    __shard_key__ = "continent"

    # The ids must be unique across partitions, or session.get() could find
    # one id on two partitions (DuplicateIdentity).  The original numbers
    # locations from a one-row table in db1 locked with SELECT ... FOR UPDATE
    # for every new row: a round trip to one database per location, and all
    # writers queueing on that lock.  partpool's IdGenerator makes unique ids
    # that carry their hash bucket, so get() can route by id alone, but it
    # needs hash routing and continents are routed by a lookup table.  A
    # random UUID is unique everywhere with no coordination at all; get()
    # then asks the four partitions, at the same time, where the original
    # asks its four shards one after another.
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    continent: Mapped[str]
    city: Mapped[str]

    reports: Mapped[list[Report]] = relationship(back_populates="location")

    def __init__(self, continent: str, city: str) -> None:
        self.continent = continent
        self.city = city


class Report(Base):
    __tablename__ = "weather_reports"
    # Replaces the original's ``shard_chooser(mapper, instance.location)``:
    # a report lives on its location's partition.
    __shard_key__ = "location"

    # Numbered by each partition's own sequence, as in the original: ids
    # repeat across partitions, and the identity token tells them apart.
    id: Mapped[int] = mapped_column(primary_key=True)
    location_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("weather_locations.id"))
    temperature: Mapped[float]
    report_time: Mapped[datetime.datetime] = mapped_column(default=datetime.datetime.now)

    location: Mapped[WeatherLocation] = relationship(back_populates="reports")

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature


class StatementLog:
    """Which partitions received SQL: the original shows it with echo=True."""

    def __init__(self, sharded: ShardedEngine) -> None:
        self.seen: set[str] = set()
        for name, engine in sharded.engines():
            event.listen(engine, "before_cursor_execute", self._listener(name))

    def _listener(self, name: str) -> Any:
        def record(*args: Any) -> None:
            self.seen.add(name)

        return record

    def take(self) -> list[str]:
        """The partitions that received statements since the last call."""
        seen = sorted(self.seen, key=SHARDS.index)
        self.seen.clear()
        return seen


def main(partitions: dict[str, str]) -> None:
    with create_sharded_engine(
        partitions, router=ROUTER, min_connections=1, max_connections=4
    ) as sharded:
        for _, engine in sharded.engines():
            Base.metadata.create_all(engine)
        log = StatementLog(sharded)

        # The original: sessionmaker(class_=ShardedSession, shards={...}), then
        # Session.configure(shard_chooser=..., identity_chooser=..., execute_chooser=...).
        Session = sessionmaker(class_=ShardedSession, sharded=sharded)

        tokyo = WeatherLocation("Asia", "Tokyo")
        newyork = WeatherLocation("North America", "New York")
        toronto = WeatherLocation("North America", "Toronto")
        london = WeatherLocation("Europe", "London")
        dublin = WeatherLocation("Europe", "Dublin")
        brasilia = WeatherLocation("South America", "Brasila")
        quito = WeatherLocation("South America", "Quito")

        tokyo.reports.append(Report(80.0))
        newyork.reports.append(Report(75))
        quito.reports.append(Report(85))

        with Session() as sess:
            sess.add_all([tokyo, newyork, toronto, london, dublin, brasilia, quito])
            sess.commit()
            for city in (tokyo, newyork, toronto, london, dublin, brasilia, quito):
                print(f"{city.city:<9} -> {inspect(city).identity_token}")
            log.take()

            t = sess.get(WeatherLocation, tokyo.id)
            assert t is not None
            assert t.city == tokyo.city
            log.take()
            # The lazy load stays on Tokyo's partition: the original's
            # identity_chooser needed a ``lazy_loaded_from`` branch for this.
            assert t.reports[0].temperature == 80.0
            print(f"\nTokyo's reports (lazy load) asked {log.take()}")

            north_american_cities = sess.execute(
                select(WeatherLocation).filter(WeatherLocation.continent == "North America")
            ).scalars()
            assert {c.city for c in north_american_cities} == {"New York", "Toronto"}
            print(f"continent == 'North America' asked {log.take()}")

            # select across shards
            asia_and_europe = sess.execute(
                select(WeatherLocation).filter(WeatherLocation.continent.in_(["Europe", "Asia"]))
            ).scalars()
            assert {c.city for c in asia_and_europe} == {"Tokyo", "London", "Dublin"}
            print(f"continent IN ('Europe', 'Asia') asked {log.take()}")

            # optionally set a shard id for the query and all related loaders
            north_american_cities_w_t = sess.execute(
                select(WeatherLocation)
                .filter(WeatherLocation.city.startswith("T"))
                .options(set_shard_id("north_america"))
            ).scalars()
            # Tokyo not included since not in the north_america shard
            assert {c.city for c in north_american_cities_w_t} == {"Toronto"}
            print(f"set_shard_id('north_america') asked {log.take()}")

            # the Report class uses a simple integer primary key.  So across two
            # databases, a primary key will be repeated.  The "identity_token"
            # tracks in memory that these two identical primary keys are local to
            # different shards.
            newyork_report = newyork.reports[0]
            tokyo_report = tokyo.reports[0]

            assert inspect(newyork_report).identity_key == (Report, (1,), "north_america")
            assert inspect(tokyo_report).identity_key == (Report, (1,), "asia")

            # the token representing the originating shard is also available
            # directly
            assert inspect(newyork_report).identity_token == "north_america"  # noqa: S105
            assert inspect(tokyo_report).identity_token == "asia"  # noqa: S105
            print(
                f"\nReport id 1 twice: New York's on {inspect(newyork_report).identity_token}, "
                f"Tokyo's on {inspect(tokyo_report).identity_token}"
            )

        # Beyond the original.
        with Session() as sess:
            # A fresh session: the id says nothing about the continent, so the
            # four partitions are asked at once and one answers.
            t = sess.get(WeatherLocation, tokyo.id)
            assert t is not None
            assert t.city == "Tokyo"
            print(f"\nget(WeatherLocation, <Tokyo's id>) asked {log.take()}")

            # A repeated id is an error rather than an arbitrary pick ...
            try:
                sess.get(Report, 1)
            except DuplicateIdentity as exc:
                print(f"get(Report, 1): DuplicateIdentity on {', '.join(exc.partitions)}")
            else:
                raise AssertionError("Report 1 is on three partitions")
            # ... and identity_token says which one is meant.
            report = sess.get(Report, 1, identity_token="south_america")  # noqa: S106
            assert report is not None
            assert report.location.city == "Quito"
            print(f"get(Report, 1, identity_token='south_america'): Quito, {report.temperature}")
            log.take()

            # Aggregates over several partitions are combined, not concatenated.
            stmt = select(WeatherLocation.continent, func.count()).group_by(
                WeatherLocation.continent
            )
            per_continent = dict(sess.execute(stmt.order_by(WeatherLocation.continent)).all())
            mean = sess.scalar(select(func.avg(Report.temperature)))
            print(f"cities per continent {per_continent}; mean temperature {mean:.1f}")
            assert per_continent == {
                "Asia": 1,
                "Europe": 2,
                "North America": 2,
                "South America": 2,
            }
            assert mean == 80.0


if __name__ == "__main__":
    with scratch_partitions(4, prefix="partpool_weather", announce=True) as urls:
        main(dict(zip(SHARDS, urls.values())))
