"""ORM: a ShardedSession that routes by declared shard keys, a drop-in superset of SQLAlchemy's.

:class:`ShardedSession` subclasses :class:`sqlalchemy.ext.horizontal_shard.ShardedSession`
and accepts everything it accepts (``shard_chooser``, ``identity_chooser``,
``execute_chooser``, ``shards``, ``set_shard_id``, the ``shard_id`` and
``identity_token`` options), so SQLAlchemy's own sharding code keeps working.
On top of that:

* ``ShardedSession(sharded_engine)`` builds the three choosers from the
  engine's router and the models' declarations (:mod:`.declarations`);
* a statement for several partitions runs on all of them *at the same time*,
  and its rows are merged correctly (ORDER BY/LIMIT, aggregates, GROUP BY:
  :mod:`.merge`), where SQLAlchemy's runs them one after another and
  concatenates;
* ``session.get()`` only asks the partitions the identity chooser names (in
  parallel when there are several), and a key found on two is an error;
* ORM bulk inserts (``session.execute(insert(Model), rows)``,
  ``bulk_insert_mappings``, ``bulk_save_objects``) are split by shard key and
  stay batched per partition, and a flush groups new objects by partition so
  each partition's INSERTs stay one batch;
* tenant pinning (:meth:`.ShardedEngine.pinned`), reference tables copied to
  every partition, clear errors, and ``twophase=True`` through the Core
  two-phase coordinator.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, event, insert, inspect, update
from sqlalchemy.engine import Connection, Engine, Result
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.ext import horizontal_shard
from sqlalchemy.ext.horizontal_shard import ShardedQuery, set_shard_id
from sqlalchemy.orm import Mapper, ORMExecuteState, Query, Session, object_session
from sqlalchemy.orm.base import instance_state
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import Select

from .declarations import mapper_of, model_routing
from .engine import ShardedEngine
from .errors import (
    DuplicateIdentity,
    PartpoolError,
    RoutingError,
    ShardKeyChanged,
    ShardKeyMissing,
    UnknownPartition,
    UnmergeableStatement,
)
from .merge import SortKey, plan, text_sort_columns
from .pinning import check_pin, current_pin
from .routing.clauses import partitions_for_criteria
from .transactions import MultiPartitionTransaction

if TYPE_CHECKING:
    from sqlalchemy.orm.state import InstanceState

__all__ = ["ShardedQuery", "ShardedSession", "set_shard_id"]

log = logging.getLogger("sqlalchemy_partpool.session")

AnyResult = Result[Any]


class ShardedSession(horizontal_shard.ShardedSession):
    """A Session over a partitioned database.

    Two ways to build one::

        # the easy path: choosers from the ShardedEngine's router and the models
        Session = sessionmaker(class_=ShardedSession, sharded=sharded)
        session = ShardedSession(sharded)

        # SQLAlchemy's way, unchanged (your choosers, your engines)
        session = ShardedSession(shard_chooser=..., identity_chooser=...,
                                 execute_chooser=..., shards={"a": engine_a, ...})

    Choosers you pass always win over the built ones, so the two can be mixed.

    :param shard_chooser: as in SQLAlchemy; or a :class:`.ShardedEngine` as the
      first positional argument, meaning ``sharded=``.
    :param identity_chooser: as in SQLAlchemy.
    :param execute_chooser: as in SQLAlchemy.
    :param shards: ``{name: Engine}``, as in SQLAlchemy; with ``sharded`` the
      partitions' engines are used.
    :param sharded: the :class:`.ShardedEngine` to route with.
    :param twophase: commit transactions that touched several partitions with
      two-phase commit (through :meth:`.ShardedEngine.begin_many`).
    :param concurrent: run multi-partition statements in parallel (default);
      automatically off for SQLite binds, whose connections cannot change threads.
    :param reference_partition: where reference tables are read from (default
      the first partition, or the pinned one).
    :param kwargs: everything :class:`~sqlalchemy.orm.Session` accepts.
    """

    def __init__(
        self,
        shard_chooser: Any = None,
        identity_chooser: Any = None,
        execute_chooser: Any = None,
        shards: dict[str, Any] | None = None,
        query_cls: type[Query[Any]] = ShardedQuery,
        *,
        sharded: ShardedEngine | None = None,
        twophase: bool = False,
        concurrent: bool = True,
        reference_partition: str | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(shard_chooser, ShardedEngine):
            sharded, shard_chooser = shard_chooser, None
        self.sharded = sharded
        self.concurrent = concurrent
        self._partpool_twophase = twophase and sharded is not None
        self._coordinator: MultiPartitionTransaction | None = None
        self._forced_partition: str | None = None
        self._flush_connections: tuple[Any, dict[str, Connection]] | None = None
        if sharded is not None:
            home = reference_partition or next(iter(sharded.partitions))
            if home not in sharded.partitions:
                raise UnknownPartition(home, sharded.partitions)
            self.reference_partition = home
            shard_chooser = shard_chooser or self._choose_for_instance
            if identity_chooser is None and "id_chooser" not in kwargs:
                identity_chooser = self._choose_for_identity
            if execute_chooser is None and "query_chooser" not in kwargs:
                execute_chooser = self._choose_for_statement
        if twophase and sharded is None:
            kwargs["twophase"] = True  # SQLAlchemy's own two-phase sessions
        if (
            "id_chooser" in kwargs
            or "query_chooser" in kwargs
            or None
            in (
                identity_chooser,
                execute_chooser,
            )
        ):
            # SQLAlchemy's deprecated spellings and its errors: its own constructor
            super().__init__(
                shard_chooser, identity_chooser, execute_chooser, shards, query_cls, **kwargs
            )
            event.remove(self, "do_orm_execute", horizontal_shard.execute_and_instances)
        else:
            # What SQLAlchemy's constructor does, less its per-session event
            # listener: ours is registered once on the class (below), and a
            # listener per session costs more than the rest of the constructor.
            Session.__init__(self, query_cls=query_cls, **kwargs)
            self.shard_chooser = shard_chooser
            self.identity_chooser = identity_chooser
            self.execute_chooser = execute_chooser
            self.__shards: dict[str, Any] = {}
            for name, bind in (shards or {}).items():
                self.bind_shard(name, bind)

    # -- the built choosers ------------------------------------------------------------

    def _route(self, key: Any) -> str:
        assert self.sharded is not None
        return self.sharded.partition_for(key)

    def _choose_for_instance(
        self, mapper: Mapper[Any] | None, instance: Any, clause: Any = None, **kw: Any
    ) -> str:
        """shard_chooser: the partition of an object (or of a statement without one)."""
        assert self.sharded is not None
        if instance is not None and mapper is not None:
            routing = model_routing(mapper)
            if routing.kind == "sharded":
                return self._route(routing.key_of(instance))
            if routing.kind == "parent":
                assert routing.parent is not None
                parent = getattr(instance, routing.parent)
                if parent is None:
                    raise ShardKeyMissing(
                        f"{mapper.class_.__name__} object has no {routing.parent!r}, which "
                        "decides its partition; set it before the flush (nothing was written)"
                    )
                return str(self._choose_shard_and_assign(mapper_of(type(parent)), parent))
            if routing.kind == "reference":
                return self._reference_home()
            raise _undeclared(mapper)
        if clause is not None and not isinstance(clause, TextClause):
            found = self._narrow(clause)
            if found is not None and len(found) == 1:
                return next(iter(found))
        if mapper is not None and model_routing(mapper).kind == "reference":
            return self._reference_home()
        raise ShardKeyMissing(
            "cannot tell which partition to use"
            + (f" for {mapper.class_.__name__}" if mapper is not None else "")
            + ": pass bind_arguments={'shard_id': <partition>} (or use the .options("
            "set_shard_id(...)) option), or filter by the shard key"
        )

    def _choose_for_identity(
        self,
        mapper: Mapper[Any],
        primary_key: Any,
        *,
        lazy_loaded_from: InstanceState[Any] | None = None,
        execution_options: Any = None,
        bind_arguments: Any = None,
        **kw: Any,
    ) -> list[str]:
        """identity_chooser: the partitions that can hold this primary key."""
        assert self.sharded is not None
        if lazy_loaded_from is not None:
            token = _token_of(lazy_loaded_from)
            if token is not None:
                return [token]
        for options in (execution_options or {}, bind_arguments or {}):
            for name in ("identity_token", "shard_id", "_sa_shard_id"):
                if options.get(name) is not None:
                    return [options[name]]
        routing = model_routing(mapper)
        if routing.kind == "reference":
            return [self._reference_home()]
        identity = tuple(primary_key) if isinstance(primary_key, (list, tuple)) else (primary_key,)
        key = routing.key_of_identity(identity) if routing.kind == "sharded" else None
        if key is not None:
            return [self._route(key)]
        generator = routing.pk_id_generator
        if generator is not None and len(identity) == 1 and isinstance(identity[0], int):
            return [generator.partition_of(identity[0])]
        return list(self.sharded.partitions)

    def _choose_for_statement(self, orm_context: ORMExecuteState) -> list[str]:
        """execute_chooser: the partitions a statement must go to."""
        assert self.sharded is not None
        if orm_context.is_select and orm_context.lazy_loaded_from is not None:
            token = _token_of(orm_context.lazy_loaded_from)
            if token is not None:
                return [token]
        if orm_context.is_select and orm_context.execution_options.get("identity_token"):
            # a relationship loader (selectinload, ...) of objects from one
            # partition: related rows live on their parent's partition
            return [str(orm_context.execution_options["identity_token"])]
        statement = orm_context.statement
        if isinstance(statement, TextClause):
            raise ShardKeyMissing(
                "a text() statement gives no shard key: pass bind_arguments={'shard_id': "
                "<partition>}, or use sharded.execute_all() to run it on every partition"
            )
        mapper = orm_context.bind_mapper
        if mapper is not None:
            if orm_context.is_select and _only_reference_tables(statement, mapper):
                return [self._reference_home()]
            identity = _primary_key_lookup(orm_context, mapper)
            if identity is not None:
                # the identity chooser in use: ours, or one the user passed
                return list(
                    self.identity_chooser(
                        mapper,
                        identity,
                        lazy_loaded_from=None,
                        execution_options=orm_context.execution_options,
                        bind_arguments=orm_context.bind_arguments,
                    )
                )
        found = self._narrow(statement, orm_context.parameters, mapper)
        if found is not None:
            # nothing can match: ask one partition, for a correctly shaped empty result
            return sorted(found) or [self._reference_home()]
        return list(self.sharded.partitions)

    def _narrow(
        self, statement: Any, params: Any = None, mapper: Mapper[Any] | None = None
    ) -> frozenset[str] | None:
        criteria = getattr(statement, "_where_criteria", None)
        if not criteria:
            return None
        columns: list[Any] = []
        entities = _entities_of(statement)
        if mapper is not None and mapper not in entities:
            entities.append(mapper)  # UPDATE / DELETE name their entity this way
        for entity in entities:
            mapper = mapper_of(entity)
            if mapper is not None:
                routing = model_routing(mapper)
                if routing.kind == "sharded" and len(routing.key_columns) == 1:
                    columns.extend(routing.key_columns)
        table = getattr(statement, "table", None)
        if not columns and table is not None:
            columns = [c for c in getattr(table, "columns", ()) if c.info.get("shard_key")]
        if not columns:
            return None
        return partitions_for_criteria(
            criteria, columns, self._route, params if isinstance(params, dict) else None
        )

    def _reference_home(self) -> str:
        assert self.sharded is not None
        pin = current_pin(self.sharded)
        return pin.partition if pin is not None else self.reference_partition

    # -- binds ---------------------------------------------------------------------------

    def _choose_shard_and_assign(self, mapper: Any, instance: Any, **kw: Any) -> Any:
        shard_id = super()._choose_shard_and_assign(mapper, instance, **kw)
        if shard_id is None:
            what = mapper.class_.__name__ if isinstance(mapper, Mapper) else "this statement"
            raise RoutingError(
                f"the shard_chooser returned no partition for {what}; it must return a "
                "partition name"
            )
        return shard_id

    def get_bind(
        self,
        mapper: Any = None,
        *,
        shard_id: str | None = None,
        instance: Any = None,
        clause: Any = None,
        **kw: Any,
    ) -> Any:
        if shard_id is None and self._forced_partition is not None:
            shard_id = self._forced_partition
        if shard_id is None:
            if mapper is None and instance is None and clause is None:
                raise ShardKeyMissing(
                    "this session spans partitions: say which one, e.g. "
                    "session.connection(bind_arguments={'shard_id': 'p0'})"
                )
            shard_id = self._choose_shard_and_assign(mapper, instance, clause=clause)
        if self.sharded is not None:
            if shard_id not in self.sharded.partitions:
                raise UnknownPartition(shard_id, self.sharded.partitions)
            check_pin(self.sharded, (shard_id,), "this session operation")
            if self._partpool_twophase:
                return self._coordinator_for().connection(partition=shard_id)
            return self.sharded.engine(shard_id)
        try:
            return super().get_bind(mapper, shard_id=shard_id, instance=instance, clause=clause)
        except KeyError:
            raise UnknownPartition(str(shard_id)) from None

    def _coordinator_for(self) -> MultiPartitionTransaction:
        coordinator = self._coordinator
        if coordinator is None or coordinator._done:
            assert self.sharded is not None
            coordinator = self._coordinator = self.sharded.begin_many(twophase=True)
        return coordinator

    def commit(self) -> None:
        super().commit()
        coordinator, self._coordinator = self._coordinator, None
        if coordinator is not None and not coordinator._done:
            coordinator.commit()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            coordinator, self._coordinator = self._coordinator, None
            if coordinator is not None and not coordinator._done:
                coordinator.rollback()

    def close(self) -> None:
        try:
            super().close()
        finally:
            coordinator, self._coordinator = self._coordinator, None
            if coordinator is not None and not coordinator._done:
                coordinator.rollback()

    # -- statement execution ---------------------------------------------------------------

    def _execute_routed(self, orm_context: ORMExecuteState) -> AnyResult | None:
        shard_id = _explicit_shard(orm_context)
        if shard_id is not None:
            if self.sharded is not None:
                check_pin(self.sharded, (shard_id,), "this statement")
            return self._carry_on(orm_context, shard_id)
        if orm_context.is_insert and self.sharded is not None:
            return self._insert_routed(orm_context)
        chosen = list(self.execute_chooser(orm_context))
        if not chosen:
            raise RoutingError(
                "the execute_chooser returned no partition for this statement; it must "
                "return at least one partition name"
            )
        if self.sharded is not None:
            check_pin(self.sharded, chosen, "this statement")
        if len(chosen) == 1:
            return self._carry_on(orm_context, chosen[0])
        if orm_context.is_select and isinstance(orm_context.statement, Select):
            return self._select_many(orm_context, chosen)
        results = self._run_each(orm_context, chosen, orm_context.statement, {})
        return results[0].merge(*results[1:])

    @staticmethod
    def _carry_on(orm_context: ORMExecuteState, shard_id: str) -> None:
        """Bind a statement to one partition and let the session run it itself.

        Returning None from ``do_orm_execute`` continues the session's own
        execution with these bind arguments and identity token: one pass
        through ``Session.execute`` instead of the two of ``invoke_statement``.
        """
        orm_context.bind_arguments["shard_id"] = shard_id
        orm_context.update_execution_options(identity_token=shard_id)

    def _invoke(
        self,
        orm_context: ORMExecuteState,
        shard_id: str,
        statement: Any = None,
        params: Any = None,
        autoflush: bool = True,
    ) -> AnyResult:
        bind_arguments = dict(orm_context.bind_arguments)
        bind_arguments["shard_id"] = shard_id
        options: dict[str, Any] = {"identity_token": shard_id}
        if not autoflush:
            options["autoflush"] = False
        return orm_context.invoke_statement(
            statement=statement,
            params=params,
            bind_arguments=bind_arguments,
            execution_options=options,
        )

    def _run_each(
        self,
        orm_context: ORMExecuteState,
        partitions: Sequence[str],
        statement: Any,
        params: Any,
    ) -> list[AnyResult]:
        """Invoke *statement* on each partition, concurrently when possible."""
        mode = self._concurrency(partitions)
        if mode is None:
            return [self._invoke(orm_context, p, statement, params or None) for p in partitions]
        # The parts of a Session that concurrent calls would share are prepared
        # here: a flush before, and each partition's connection opened first.
        self._autoflush()
        for partition in partitions:
            self.connection(bind_arguments={**orm_context.bind_arguments, "shard_id": partition})

        def invoke(partition: str) -> AnyResult:
            return self._invoke(orm_context, partition, statement, params or None, False)

        if mode == "asyncio":
            # running under AsyncSession: one greenlet per partition on the event loop
            import asyncio

            from sqlalchemy.util import await_only, greenlet_spawn

            async def gather() -> list[AnyResult]:
                return list(await asyncio.gather(*(greenlet_spawn(invoke, p) for p in partitions)))

            return await_only(gather())
        with ThreadPoolExecutor(
            max_workers=min(len(partitions), 32), thread_name_prefix="partpool-orm"
        ) as executor:
            return list(executor.map(invoke, partitions))

    def _concurrency(self, partitions: Sequence[str]) -> str | None:
        """``"threads"``, ``"asyncio"``, or None to run one partition after another."""
        if not self.concurrent or len(partitions) < 2:
            return None
        modes = set()
        for partition in partitions:
            bind = self.get_bind(shard_id=partition)
            engine = bind.engine if isinstance(bind, Connection) else bind
            if not isinstance(engine, Engine) or engine.dialect.name == "sqlite":
                # SQLite connections cannot move between threads
                return None
            modes.add("asyncio" if engine.dialect.is_async else "threads")
        return modes.pop() if len(modes) == 1 else None

    def _select_many(self, orm_context: ORMExecuteState, partitions: list[str]) -> AnyResult:
        statement = orm_context.statement
        assert isinstance(statement, Select)
        merge_plan = plan(statement, extra_sort_columns=True)
        if self.sharded is not None:
            risky = text_sort_columns(merge_plan)
            if risky and not all(self.sharded.sorts_like_python(p) for p in partitions):
                raise UnmergeableStatement(
                    f"ORDER BY {', '.join(str(c) for c in risky)} sorts text (or an enum) "
                    "with the partition's collation, which the merge cannot reproduce; "
                    "sort with column.collate('C'), or use databases created with the C "
                    "collation"
                )
        per_partition = merge_plan.statement
        width = len(statement.column_descriptions)
        sort = merge_plan.sort
        if merge_plan.kind == "ordered":
            # rows may hold objects: carry each ORDER BY value as an extra column
            extra = [c.label(f"_partpool_sort_{i}") for i, c in enumerate(merge_plan.sort_columns)]
            per_partition = per_partition.add_columns(*extra)
            merge_plan.sort = tuple(
                SortKey(width + i, k.descending, k.nulls_first) for i, k in enumerate(sort)
            )
        if merge_plan.kind == "aggregate" and self.sharded is not None:
            engine = self.sharded.engine(partitions[0])
            merge_plan.keys = [
                r.keyname for r in statement.compile(dialect=engine.dialect)._result_columns
            ]
        results = self._run_each(orm_context, partitions, per_partition, orm_context.parameters)
        if (
            merge_plan.kind == "concat"
            and not merge_plan.distinct
            and merge_plan.limit is None
            and not merge_plan.offset
            and not _is_primary_key_lookup(orm_context)
        ):
            # Nothing to merge: SQLAlchemy's own merged result keeps what its
            # ShardedSession gives (yield_per chunks, rows loaded as iterated,
            # the unique() requirement of joined eager collections).
            return results[0].merge(*results[1:])
        fetched = [(p, _fetch_all(r)) for p, r in zip(partitions, results)]
        if merge_plan.kind == "aggregate":
            totals = [row for row, _ in merge_plan.merge(fetched)]
            return IteratorResult(SimpleResultMetaData(merge_plan.keys or []), iter(totals))
        merged = merge_plan.merge(fetched)
        identities = _duplicate_check(orm_context, merged)
        if identities:
            raise identities
        first = results[0]
        metadata = first._metadata
        rows: list[Any]
        if merge_plan.kind == "ordered":
            rows = [row[:width] for row, _ in merged]
            metadata = first.columns(*range(width))._metadata
        else:
            rows = [row for row, _ in merged]
        # decided by the statement, not by the partition results (which carry
        # the extra sort columns when ordered)
        single = _single_entity(orm_context, statement)
        if single:
            # single-entity ORM results carry bare objects, not 1-tuples
            rows = [row[0] for row in rows]
        result: AnyResult = IteratorResult(metadata, iter(rows), _source_supports_scalars=single)
        result._attributes = first._attributes.union({"is_single_entity": single})
        return result

    def _insert_routed(self, orm_context: ORMExecuteState) -> AnyResult:
        """An ORM INSERT: one row routed by its key, many rows split by partition."""
        assert self.sharded is not None
        mapper = orm_context.bind_mapper
        params = orm_context.parameters
        rows: list[Any] = params if isinstance(params, list) else [params] if params else []
        if mapper is None:
            return self._invoke(orm_context, self._choose_for_instance(None, None))
        routing = model_routing(mapper)
        if not rows:
            # INSERT ... VALUES given in the statement itself
            values = _insert_values(orm_context.statement, mapper)
            if values is None:
                raise ShardKeyMissing(
                    f"cannot tell which partition this INSERT into {mapper.class_.__name__} "
                    "belongs to: give the rows as parameters (session.execute(insert(Model), "
                    "rows)) or pass bind_arguments={'shard_id': <partition>}"
                )
            rows = values
            if routing.kind == "sharded" and len(rows) == 1:
                partition = self._route(routing.key_of_mapping(rows[0], 0))
                check_pin(self.sharded, (partition,), "this insert")
                with self._on_partition(partition):
                    return self._invoke(orm_context, partition)
            if routing.kind == "sharded":
                raise ShardKeyMissing(
                    "a multi-row INSERT ... VALUES cannot be split across partitions: pass "
                    "the rows as parameters instead, session.execute(insert(Model), rows)"
                )
        if routing.kind == "parent":
            raise RoutingError(
                f"{mapper.class_.__name__} follows its {routing.parent!r} relationship to "
                "find its partition, so rows given as dicts cannot be routed: add objects "
                "instead, or give the model a shard key column (__shard_key__)"
            )
        if routing.kind == "reference":
            groups = {p: rows for p in self._reference_targets()}
        elif routing.kind == "sharded":
            groups = {}
            for number, row in enumerate(rows):
                partition = self._route(routing.key_of_mapping(row, number))
                groups.setdefault(partition, []).append(row)
            check_pin(self.sharded, groups, "this insert")
        else:
            raise _undeclared(mapper)
        # SQLAlchemy's bulk INSERT refuses per-instance sharding, so each
        # partition's share runs with the bind fixed to that partition.
        if len(groups) == 1:
            (partition,) = groups
            with self._on_partition(partition):
                return self._invoke(orm_context, partition)
        results = []
        for partition, share in groups.items():
            with self._on_partition(partition):
                results.append(
                    self._execute_on(
                        orm_context, partition, share if isinstance(params, list) else share[0]
                    )
                )
        return results[0].merge(*results[1:])

    def _execute_on(self, orm_context: ORMExecuteState, partition: str, params: Any) -> AnyResult:
        # a fresh execute (invoke_statement insists on the original number of
        # parameter sets); the explicit shard_id brings it back here, routed
        return self.execute(
            orm_context.statement,
            params,
            execution_options=orm_context.local_execution_options,
            bind_arguments={**orm_context.bind_arguments, "shard_id": partition},
        )

    def _reference_targets(self) -> list[str]:
        assert self.sharded is not None
        targets = list(self.sharded.partitions)
        check_pin(self.sharded, targets, "a write to a reference table")
        return targets

    # -- flush ---------------------------------------------------------------------------

    def _before_flush(self, session: Any, flush_context: Any, instances: Any) -> None:
        """Check shard keys before any SQL, and group new objects by partition."""
        assert self.sharded is not None
        order = {name: i for i, name in enumerate(self.sharded.partitions)}
        for obj in self.dirty:
            state = inspect(obj)
            routing = model_routing(state.mapper)
            if routing.kind == "sharded" and state.key is not None:
                for attribute in routing.key_attributes:
                    history = state.attrs[attribute].history
                    if history.added and history.deleted and history.added != history.deleted:
                        raise ShardKeyChanged(
                            f"{state.mapper.class_.__name__}.{attribute} of a stored object "
                            f"changed from {history.deleted[0]!r} to {history.added[0]!r}; "
                            "rows do not move between partitions. Delete it and add a new "
                            "one instead (nothing was written)"
                        )
        mappers = {state.mapper for state in (*self._new, *self._deleted)}
        mappers.update(inspect(obj).mapper for obj in self.dirty)
        for mapper in mappers:
            if model_routing(mapper).kind == "reference":
                _replicate_reference_rows(mapper)
        # With the built shard chooser, a single-attribute shard key that is set
        # is routed here directly (what _choose_for_instance would do, at a
        # third of the cost per object); anything else goes the long way.
        route = self.sharded.router.route
        built = self.shard_chooser == self._choose_for_instance
        keys: dict[Mapper[Any], str | None] = {}
        pending = []
        for state in self._new:
            partition: Any = state.identity_token
            if partition is None:
                mapper = state.mapper
                if mapper not in keys:
                    routing = model_routing(mapper)
                    simple = routing.kind == "sharded" and len(routing.key_attributes) == 1
                    keys[mapper] = routing.key_attributes[0] if built and simple else None
                key_attribute = keys[mapper]
                value = getattr(state.obj(), key_attribute, None) if key_attribute else None
                if value is not None:
                    partition = state.identity_token = route(value)
                else:
                    partition = self._choose_shard_and_assign(mapper, state.obj())
            pending.append((order.get(partition, len(order)), state.insert_order, state))
        # SQLAlchemy batches consecutive INSERTs for one connection; with objects
        # alternating between partitions every batch would be one row long.
        pending.sort(key=lambda item: (item[0], item[1]))
        for position, (_, _, state) in enumerate(pending):
            state.insert_order = position
        self._flush_connections = None

    def connection_callable(
        self, mapper: Any = None, instance: Any = None, shard_id: Any = None, **kw: Any
    ) -> Connection:
        """The connection a flush writes an object with: its partition's, looked up once.

        SQLAlchemy calls this for every object of a flush; the lookup behind it
        (chooser, bind, pin check, the transaction's connections) is done once
        per partition and flush.
        """
        if shard_id is None and instance is not None:
            state = instance_state(instance)
            shard_id = state.key[2] if state.key is not None else state.identity_token
        transaction = self.get_transaction()
        if shard_id is None or transaction is None or self.sharded is None:
            return super().connection_callable(mapper, instance, shard_id, **kw)
        cache = self._flush_connections
        if cache is None or cache[0] is not transaction:
            cache = self._flush_connections = (transaction, {})
        connection = cache[1].get(shard_id)
        if connection is None:
            connection = super().connection_callable(mapper, instance, shard_id, **kw)
            cache[1][shard_id] = connection
        return connection

    def _replicate_row(self, kind: str, mapper: Mapper[Any], target: Any) -> None:
        """Copy one reference-table row change from its home partition to the others.

        Runs right after the row's own statement (a mapper event), so that rows
        flushed later in the same flush can refer to it on every partition.
        """
        state = inspect(target)
        home = _token_of(state) or self._reference_home()
        table: Any = mapper.local_table
        values: dict[str, Any] = {
            str(column.key): state.attrs[mapper._columntoproperty[column].key].value
            for column in table.columns
            if column in mapper._columntoproperty
        }
        where = [table.c[c.key] == values[str(c.key)] for c in mapper.primary_key]
        for partition in self._reference_targets():
            if partition == home:
                continue
            conn = self.connection(bind_arguments={"shard_id": partition})
            if kind == "insert":
                conn.execute(insert(table).values(values))
            elif kind == "update":
                conn.execute(update(table).where(*where).values(values))
            else:
                conn.execute(delete(table).where(*where))

    # -- bulk operations ---------------------------------------------------------------

    @contextmanager
    def _on_partition(self, partition: str) -> Iterator[None]:
        """Run SQLAlchemy's single-bind bulk machinery against one partition."""
        self._forced_partition = partition
        # bulk operations refuse per-instance sharding; within this block the
        # bind is fixed, so there is none
        self.connection_callable = None  # type: ignore[assignment,method-assign]
        try:
            yield
        finally:
            del self.connection_callable
            self._forced_partition = None

    def _group_rows(self, mapper: Mapper[Any], rows: Iterable[Any]) -> dict[str, list[Any]]:
        routing = model_routing(mapper)
        if routing.kind == "reference":
            return {p: list(rows) for p in self._reference_targets()}
        if routing.kind != "sharded":
            raise _undeclared(mapper)
        groups: dict[str, list[Any]] = {}
        for number, row in enumerate(rows):
            groups.setdefault(self._route(routing.key_of_mapping(row, number)), []).append(row)
        return groups

    def bulk_insert_mappings(
        self,
        mapper: Any,
        mappings: Iterable[dict[str, Any]],
        return_defaults: bool = False,
        render_nulls: bool = False,
    ) -> None:
        """Insert rows given as dicts, each on its partition, batched per partition."""
        if self.sharded is None:
            super().bulk_insert_mappings(mapper, mappings, return_defaults, render_nulls)
            return
        target = mapper_of(mapper)
        assert target is not None
        groups = self._group_rows(target, list(mappings))
        check_pin(self.sharded, groups, "bulk_insert_mappings()")
        for partition, share in groups.items():
            with self._on_partition(partition):
                super().bulk_insert_mappings(mapper, share, return_defaults, render_nulls)

    def bulk_update_mappings(self, mapper: Any, mappings: Iterable[dict[str, Any]]) -> None:
        """Update rows given as dicts (with their shard key), each on its partition."""
        if self.sharded is None:
            super().bulk_update_mappings(mapper, mappings)
            return
        target = mapper_of(mapper)
        assert target is not None
        groups = self._group_rows(target, list(mappings))
        check_pin(self.sharded, groups, "bulk_update_mappings()")
        for partition, share in groups.items():
            with self._on_partition(partition):
                super().bulk_update_mappings(mapper, share)

    def bulk_save_objects(
        self,
        objects: Iterable[Any],
        return_defaults: bool = False,
        update_changed_only: bool = True,
        preserve_order: bool = True,
    ) -> None:
        """Insert or update objects without the unit of work, batched per partition."""
        if self.sharded is None:
            super().bulk_save_objects(objects, return_defaults, update_changed_only, preserve_order)
            return
        groups: dict[str, list[Any]] = {}
        for obj in objects:
            state = inspect(obj)
            routing = model_routing(state.mapper)
            if routing.kind == "reference":
                for partition in self._reference_targets():
                    groups.setdefault(partition, []).append(obj)
                continue
            partition = _token_of(state) or self._choose_for_instance(state.mapper, obj)
            groups.setdefault(partition, []).append(obj)
        check_pin(self.sharded, groups, "bulk_save_objects()")
        for partition, share in groups.items():
            with self._on_partition(partition):
                super().bulk_save_objects(
                    share, return_defaults, update_changed_only, preserve_order
                )


def _on_execute(orm_context: ORMExecuteState) -> AnyResult | None:
    session = orm_context.session
    assert isinstance(session, ShardedSession)
    return session._execute_routed(orm_context)


def _on_before_flush(session: Any, flush_context: Any, instances: Any) -> None:
    if session.sharded is not None:
        session._before_flush(session, flush_context, instances)


# Our execution handler replaces SQLAlchemy's (concurrent, merging, checked); on the
# class, so that creating a session registers nothing.
event.listen(ShardedSession, "do_orm_execute", _on_execute, retval=True)
event.listen(ShardedSession, "before_flush", _on_before_flush)


# -- helpers ------------------------------------------------------------------------------


def _undeclared(mapper: Mapper[Any]) -> PartpoolError:
    name = mapper.class_.__name__
    return RoutingError(
        f"{name} does not say where its rows live: give it __shard_key__ = '<attribute>' "
        "(or mark the column info={'shard_key': True}), or __reference_table__ = True"
    )


def _token_of(state: Any) -> str | None:
    if state.key is not None and state.key[2] is not None:
        return str(state.key[2])
    token = getattr(state, "identity_token", None)
    return str(token) if token is not None else None


def _explicit_shard(orm_context: ORMExecuteState) -> Any:
    """The partition a statement names itself, as SQLAlchemy's sharding reads it.

    Returned as given, not as a string: SQLAlchemy takes any hashable shard id
    (``shards={1: engine}``, ``set_shard_id(1)``), and its identity tokens keep it.
    The ``identity_token`` that relationship loaders carry is not read here:
    with the user's choosers, SQLAlchemy sends those loads where the
    execute_chooser says (related rows may live on other shards).
    """
    for option in orm_context._non_compile_orm_options:
        if isinstance(option, set_shard_id):
            return option.shard_id
    active: Any = None
    if orm_context.is_select:
        active = orm_context.load_options
    elif orm_context.is_update or orm_context.is_delete:
        active = orm_context.update_delete_options
    if active is not None and active._identity_token is not None:
        return active._identity_token
    if "_sa_shard_id" in orm_context.execution_options:
        return orm_context.execution_options["_sa_shard_id"]
    if "shard_id" in orm_context.bind_arguments:
        return orm_context.bind_arguments["shard_id"]
    return None


def _is_primary_key_lookup(orm_context: ORMExecuteState) -> bool:
    mapper = orm_context.bind_mapper
    return mapper is not None and _primary_key_lookup(orm_context, mapper) is not None


def _single_entity(orm_context: ORMExecuteState, statement: Select[Any]) -> bool:
    """Whether SQLAlchemy hands out each row of *statement* as one object, not a tuple.

    The test of SQLAlchemy's loader (``loading.instances``): one entity that
    supports it (a mapped class, not a column or a plain Bundle), and no
    ``Query.only_return_tuples()``.
    """
    if orm_context.load_options._only_return_tuples:
        return False
    from sqlalchemy.orm import context

    compile_state_cls: Any = getattr(context, "_ORMSelectCompileState", None)
    if compile_state_cls is None:  # SQLAlchemy 2.0 names it without the underscore
        compile_state_cls = context.ORMSelectCompileState  # type: ignore[attr-defined]
    entities = compile_state_cls._create_entities_collection(statement, legacy=False)._entities
    return len(entities) == 1 and bool(entities[0].supports_single_entity)


def _primary_key_lookup(
    orm_context: ORMExecuteState, mapper: Mapper[Any]
) -> tuple[Any, ...] | None:
    """The primary key of a ``session.get()`` / refresh load, or None for other statements."""
    statement = orm_context.statement
    criteria: tuple[Any, ...] = getattr(statement, "_where_criteria", ())
    get_clause, get_params = mapper._get_clause
    if len(criteria) != 1:
        return None
    where = criteria[0]
    # SQLAlchemy 2.1 puts the mapper's clause itself in the statement; 2.0 an
    # annotated copy of it, which keeps the original as its element.
    if where is not get_clause and getattr(where, "_Annotated__element", None) is not get_clause:
        return None
    params = orm_context.parameters
    if not isinstance(params, dict):
        return None
    try:
        return tuple(params[get_params[c].key] for c in mapper.primary_key)
    except KeyError:
        return None


_replicated: set[Mapper[Any]] = set()


def _replicate_reference_rows(mapper: Mapper[Any]) -> None:
    """Make flushes of *mapper*'s rows copy themselves to every partition (once per mapper)."""
    if mapper in _replicated:
        return
    _replicated.add(mapper)

    def listener(kind: str) -> Any:
        def replicate(mapper: Mapper[Any], connection: Connection, target: Any) -> None:
            session = object_session(target)
            if isinstance(session, ShardedSession) and session.sharded is not None:
                session._replicate_row(kind, mapper, target)

        return replicate

    for kind in ("insert", "update", "delete"):
        event.listen(mapper, f"after_{kind}", listener(kind))


def _insert_values(statement: Any, mapper: Mapper[Any]) -> list[dict[str, Any]] | None:
    """The rows of an ``insert().values(...)``, by attribute name, or None if not literal."""
    from sqlalchemy.sql import elements

    multi = getattr(statement, "_multi_values", ())
    single = getattr(statement, "_values", None)
    raw_rows: list[Any] = [dict(row) for row in multi[0]] if multi else []
    if single:
        raw_rows = [dict(single)]
    if not raw_rows:
        return None
    rows = []
    for raw in raw_rows:
        row: dict[str, Any] = {}
        for column, given in raw.items():
            key = column if isinstance(column, str) else getattr(column, "key", None)
            prop = mapper._columntoproperty.get(column) if not isinstance(column, str) else None
            if prop is not None:
                key = prop.key
            value = given
            if isinstance(given, elements.BindParameter):
                value = given.effective_value
            elif isinstance(given, elements.ClauseElement):
                return None
            row[str(key)] = value
        rows.append(row)
    return rows


def _only_reference_tables(statement: Any, mapper: Mapper[Any]) -> bool:
    """True if every table *statement* reads is a reference table (on every partition)."""
    if model_routing(mapper).kind != "reference":
        # the statement's own entity lives on one partition: no need to walk it
        return False
    from sqlalchemy.sql.util import find_tables

    by_table = {m.local_table: m for m in mapper.registry.mappers}
    tables = find_tables(statement, include_joins=True, include_aliases=True)
    found = False
    for table in tables:
        owner = by_table.get(table)
        if owner is None or model_routing(owner).kind != "reference":
            if hasattr(table, "columns") and not hasattr(table, "left"):
                return False
            continue
        found = True
    return found


def _entities_of(statement: Any) -> list[Any]:
    descriptions = getattr(statement, "column_descriptions", None)
    if descriptions is None:
        return []
    entities = []
    for description in descriptions:
        entity = description.get("entity")
        if entity is not None and entity not in entities:
            entities.append(entity)
    return entities


def _fetch_all(result: AnyResult) -> list[tuple[Any, ...]]:
    # Joined eager loads of collections repeat the parent row: SQLAlchemy marks
    # such a result as needing unique(), and refuses plain fetching.
    state = getattr(result, "_unique_filter_state", None)
    if (
        state is not None
        and state[1] is not None
        and getattr(state[1], "__name__", "") == ("require_unique")
    ):
        result = result.unique()
    return [tuple(row) for row in result.all()]


def _duplicate_check(
    orm_context: ORMExecuteState, merged: list[tuple[tuple[Any, ...], str]]
) -> DuplicateIdentity | None:
    """For a primary key lookup: the same key found on several partitions is an error."""
    mapper = orm_context.bind_mapper
    if mapper is None:
        return None
    identity = _primary_key_lookup(orm_context, mapper)
    if identity is None:
        return None
    partitions = {name for _, name in merged}
    if len(partitions) > 1:
        return DuplicateIdentity(
            f"{mapper.class_.__name__} with primary key {identity!r}", partitions
        )
    return None
