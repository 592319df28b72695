"""A one-round-trip fast path for routed Core reads.

``sharded.execute(select(...), key=k)`` is the hot path of a partitioned
application: a point read by key.  Through :meth:`Connection.execute` it
costs SQLAlchemy's full execution machinery (a Connection, an execution
context, a CursorResult, then buffering it) around one round trip.  For the
common case this module runs the *same* compiled SQL (from the engine's own
compiled cache) straight on the pooled DBAPI connection, applies the same
bind and result processors, and returns an ordinary SQLAlchemy ``Result``.

It is used only when nothing could observe the difference; otherwise the
caller takes the full path:

* a Core ``SELECT`` (not ORM), with a dict of parameters or none;
* no engine events on execution (``before_execute``, ``before_cursor_execute``,
  ``handle_error`` ...) or on the dialect's ``do_execute``, no engine-level
  execution options, no SQL echo;
* a plain compiled form: named (pyformat) parameters, nothing rendered at
  execution time (expanding ``IN``, ``literal_execute``), no escaped names.

Errors are wrapped exactly as SQLAlchemy wraps them (``sqlalchemy.exc.DBAPIError``
subclasses), and a connection found disconnected is invalidated.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.sql import compiler
from sqlalchemy.sql.selectable import Select

if TYPE_CHECKING:
    from .fanout import AnyResult

__all__ = ["fast_read"]

_Processors = tuple[list[str], list[Callable[[Any], Any] | None]]
# compiled statement -> driver type codes -> (result keys, result processors)
_result_shapes: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], _Processors]] = (
    weakref.WeakKeyDictionary()
)


def _observed(engine: Engine) -> bool:
    dispatch = engine.dispatch
    return bool(
        dispatch.before_execute
        or dispatch.after_execute
        or dispatch.before_cursor_execute
        or dispatch.after_cursor_execute
        or dispatch.engine_connect
        or engine.dialect.dispatch.handle_error
        or engine.dialect.dispatch.do_execute
        or engine._execution_options
        or engine._should_log_info()
    )


def fast_read(engine: Engine, statement: Any, params: Any) -> AnyResult | None:
    """Run a plain Core SELECT on *engine* in one round trip, or return None to decline.

    :raises sqlalchemy.exc.DBAPIError: as :meth:`Connection.execute` would.
    """
    if (
        not isinstance(statement, Select)
        or statement._propagate_attrs.get("compile_state_plugin") == "orm"
        or (params is not None and not isinstance(params, dict))
        or _observed(engine)
    ):
        return None
    dialect = engine.dialect
    # SQLAlchemy 2.0 returns three values here and 2.1 four; the first two
    # (compiled form, extracted parameters) are the same in both.
    outcome = statement._compile_w_cache(
        dialect,
        compiled_cache=engine._compiled_cache,
        column_keys=sorted(params) if params else [],
        for_executemany=False,
        schema_translate_map=None,
        linting=dialect.compiler_linting | compiler.WARN_LINTING,
    )
    compiled: Any = outcome[0]
    extracted = outcome[1]
    if (
        compiled.positional
        or compiled.literal_execute_params
        or compiled.post_compile_params
        or getattr(compiled, "escaped_bind_names", None)
    ):
        return None
    arguments = compiled.construct_params(
        params, extracted_parameters=extracted, escape_names=False
    )
    assert arguments is not None
    processors = compiled._bind_processors
    if processors:
        for name, value in arguments.items():
            processor = processors.get(name)
            if processor is not None:
                arguments[name] = processor(value)
    sql = compiled.string
    fairy = engine.raw_connection()
    dbapi: Any = fairy.dbapi_connection
    try:
        # one statement is its own transaction: no BEGIN, no ROLLBACK at check-in
        dbapi.autocommit = True
        cursor = dbapi.cursor()
        try:
            cursor.execute(sql, arguments)
            rows = cursor.fetchall()
            description = cursor.description or ()
        finally:
            cursor.close()
    except dialect.loaded_dbapi.Error as error:
        disconnect = dialect.is_disconnect(error, dbapi, None)
        if disconnect:
            fairy.invalidate(error)
        raise sa_exc.DBAPIError.instance(
            sql,
            arguments,
            error,
            dialect.loaded_dbapi.Error,
            hide_parameters=engine.hide_parameters,
            dialect=dialect,
            connection_invalidated=disconnect,
        ) from error
    finally:
        if fairy.dbapi_connection is not None and not getattr(dbapi, "closed", False):
            dbapi.autocommit = False
        fairy.close()
    keys, result_processors = _shape(compiled, dialect, description)
    if any(p is not None for p in result_processors):
        rows = [
            tuple(value if p is None else p(value) for p, value in zip(result_processors, row))
            for row in rows
        ]
    result: AnyResult = IteratorResult(SimpleResultMetaData(keys), iter(rows))
    return result


def _shape(compiled: Any, dialect: Any, description: Any) -> _Processors:
    # Processors depend on the types the driver reports (e.g. NUMERIC vs FLOAT
    # for a Numeric column), as in SQLAlchemy's own cursor result metadata.
    codes = tuple(d[1] for d in description)
    shapes = _result_shapes.get(compiled)
    if shapes is None:
        shapes = _result_shapes[compiled] = {}
    shape = shapes.get(codes)
    if shape is None:
        columns = compiled._result_columns
        if len(columns) == len(description):
            keys = [entry.keyname for entry in columns]
            processors = [
                entry.type._cached_result_processor(dialect, code)
                for entry, code in zip(columns, codes)
            ]
        else:  # no typed shape: the driver's names and values
            keys = [d[0] for d in description]
            processors = [None] * len(description)
        shape = shapes[codes] = (keys, processors)
    return shape
