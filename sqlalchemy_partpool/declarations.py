"""How an ORM model says where its rows live.

Declare it on the class::

    class Order(Base):
        __tablename__ = "orders"
        __shard_key__ = "customer_id"          # a column attribute (or a tuple of them)
        ...

    class OrderLine(Base):
        __tablename__ = "order_lines"
        __shard_key__ = "order"                # a many-to-one relationship: the parent's partition
        ...

    class Country(Base):
        __tablename__ = "countries"
        __reference_table__ = True             # no shard key: copied to every partition
        ...

or mark the column: ``mapped_column(info={"shard_key": True})``.

:func:`model_routing` reads the declaration of a mapper once and caches it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, RelationshipProperty

from .errors import ConfigurationError, ShardKeyMissing
from .ids import ID_GENERATOR_INFO, IdGenerator

__all__ = ["REFERENCE_ATTRIBUTE", "SHARD_KEY_ATTRIBUTE", "ModelRouting", "model_routing"]

#: Class attribute naming a model's shard key attribute(s) or parent relationship.
SHARD_KEY_ATTRIBUTE = "__shard_key__"
#: Class attribute marking a model as a reference table, copied to every partition.
REFERENCE_ATTRIBUTE = "__reference_table__"

Kind = Literal["sharded", "parent", "reference", "undeclared"]


@dataclass(frozen=True)
class ModelRouting:
    """What a mapped class declares about where its rows live.

    :ivar kind: ``sharded`` (a shard key), ``parent`` (follows a many-to-one
      relationship), ``reference`` (on every partition) or ``undeclared``.
    :ivar key_attributes: the shard key's attribute names (``sharded``).
    :ivar key_columns: the table columns holding them (``sharded``).
    :ivar parent: the relationship to follow (``parent``).
    :ivar pk_key_positions: where the shard key sits in the primary key, if
      it is part of it (then ``session.get()`` routes by the key).
    :ivar pk_id_generator: the :class:`.IdGenerator` whose ids the primary key
      holds, if any (then ``session.get()`` routes by the id's bucket).
    """

    mapper: Mapper[Any]
    kind: Kind
    key_attributes: tuple[str, ...] = ()
    key_columns: tuple[Any, ...] = ()
    parent: str | None = None
    pk_key_positions: tuple[int, ...] | None = None
    pk_id_generator: IdGenerator | None = None

    def key_of(self, instance: Any) -> Any:
        """The shard key value of *instance* (a tuple for composite keys).

        A key column that a many-to-one relationship fills at flush time
        (``Order(customer=c)``) is read from the related object.

        :raises ShardKeyMissing: if it, or any part of it, is ``None``.
        """
        values = tuple(
            self._value(instance, position, attribute)
            for position, attribute in enumerate(self.key_attributes)
        )
        if any(v is None for v in values):
            raise ShardKeyMissing(
                f"{self.mapper.class_.__name__} object has no shard key: set "
                f"{', '.join(self.key_attributes)} before it is flushed (nothing was written)"
            )
        return values[0] if len(values) == 1 else values

    def _value(self, instance: Any, position: int, attribute: str) -> Any:
        return _resolved(instance, attribute, depth=4)

    def key_of_mapping(self, row: Any, number: int) -> Any:
        """The shard key value of a row given as a dict of attribute values."""
        try:
            values = tuple(row[a] for a in self.key_attributes)
        except (KeyError, TypeError):
            values = (None,)
        if any(v is None for v in values):
            raise ShardKeyMissing(
                f"row {number} for {self.mapper.class_.__name__} has no "
                f"{', '.join(self.key_attributes)} (its shard key); nothing was written"
            )
        return values[0] if len(values) == 1 else values

    def key_of_identity(self, primary_key: tuple[Any, ...]) -> Any:
        """The shard key taken from a primary key identity, or ``None`` if not in it."""
        if self.pk_key_positions is None:
            return None
        values = tuple(primary_key[i] for i in self.pk_key_positions)
        if any(v is None for v in values):
            return None
        return values[0] if len(values) == 1 else values


_cache: dict[Mapper[Any], ModelRouting] = {}
_lock = threading.Lock()


def model_routing(mapper: Mapper[Any]) -> ModelRouting:
    """The routing declaration of *mapper* (cached).

    :raises ConfigurationError: for a declaration that names no attribute of the model.
    """
    found = _cache.get(mapper)
    if found is None:
        found = _read(mapper)
        with _lock:
            _cache[mapper] = found
    return found


def _read(mapper: Mapper[Any]) -> ModelRouting:
    cls = mapper.class_
    pk_columns = list(mapper.primary_key)
    generator = next(
        (
            c.info[ID_GENERATOR_INFO]
            for c in pk_columns
            if isinstance(c.info.get(ID_GENERATOR_INFO), IdGenerator)
        ),
        None,
    )
    if getattr(cls, REFERENCE_ATTRIBUTE, False):
        return ModelRouting(mapper=mapper, kind="reference")
    declared = getattr(cls, SHARD_KEY_ATTRIBUTE, None)
    if declared is None:
        marked = [c for c in mapper.columns if getattr(c, "info", {}).get("shard_key")]
        if not marked:
            return ModelRouting(mapper=mapper, kind="undeclared", pk_id_generator=generator)
        declared = tuple(mapper.get_property_by_column(c).key for c in marked)
    names = (declared,) if isinstance(declared, str) else tuple(declared)
    if len(names) == 1 and isinstance(
        mapper.attrs.get(names[0]) if names[0] in mapper.attrs else None, RelationshipProperty
    ):
        relationship = mapper.attrs[names[0]]
        if relationship.uselist:
            raise ConfigurationError(
                f"{cls.__name__}.{SHARD_KEY_ATTRIBUTE} names {names[0]!r}, a one-to-many "
                "relationship; name a many-to-one relationship (the parent) or a column"
            )
        return ModelRouting(
            mapper=mapper, kind="parent", parent=names[0], pk_id_generator=generator
        )
    columns = []
    for name in names:
        prop = mapper.attrs.get(name) if name in mapper.attrs else None
        if prop is None or not hasattr(prop, "columns"):
            raise ConfigurationError(
                f"{cls.__name__}.{SHARD_KEY_ATTRIBUTE} names {name!r}, which is not a column "
                f"attribute of {cls.__name__}"
            )
        columns.append(prop.columns[0])
    positions: tuple[int, ...] | None = None
    pk_ids = [id(c) for c in pk_columns]
    if all(id(c) in pk_ids for c in columns):
        positions = tuple(pk_ids.index(id(c)) for c in columns)
    return ModelRouting(
        mapper=mapper,
        kind="sharded",
        key_attributes=names,
        key_columns=tuple(columns),
        pk_key_positions=positions,
        pk_id_generator=generator,
    )


def _resolved(instance: Any, attribute: str, depth: int) -> Any:
    """The value of *attribute*, or, while a flush has yet to copy it in from a
    many-to-one relationship (``Order(customer=c)``), the related object's value
    (followed a few levels deep: ``Task(project=p)`` with ``Project(tenant=t)``)."""
    value = getattr(instance, attribute, None)
    if value is not None or depth == 0:
        return value
    mapper = inspect(instance).mapper
    prop = mapper.attrs.get(attribute) if attribute in mapper.attrs else None
    columns = getattr(prop, "columns", None)
    if not columns:
        return None
    for relationship in mapper.relationships:
        if relationship.uselist:
            continue
        for local, remote in relationship.local_remote_pairs or ():
            remote_prop = relationship.mapper._columntoproperty.get(remote)
            if local is not columns[0] or remote_prop is None:
                continue
            related = getattr(instance, relationship.key, None)
            if related is not None:
                value = _resolved(related, remote_prop.key, depth - 1)
                if value is not None:
                    return value
    return None


def mapper_of(entity: Any) -> Mapper[Any] | None:
    """The mapper of a class, mapper or aliased class, or ``None``."""
    try:
        info = inspect(entity, raiseerr=False)
    except Exception:
        return None
    return getattr(info, "mapper", None)
