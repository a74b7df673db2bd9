"""Stateless operators: map_batches, filter, map."""

from __future__ import annotations

from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.base import Operator, OperatorContext, OperatorLogic
import re

from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError, missing_columns

_FIELD_REF = re.compile(r"No match for FieldRef\.Name\((?P<name>[^)]*)\)")


def as_table(result, step: str) -> pa.Table:
    if isinstance(result, pa.Table):
        return result
    if isinstance(result, pa.RecordBatch):
        return pa.Table.from_batches([result])
    raise TypeError(
        f"step {step!r} returned {type(result).__name__}; it must return a pyarrow.RecordBatch or pyarrow.Table"
    )


def _function_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


class _Stateless(OperatorLogic):
    def __init__(self, fn: Callable[[pa.Table], pa.Table | None]):
        self.process = fn  # type: ignore[method-assign]


class MapBatches(Operator):
    """Apply ``fn(RecordBatch) -> RecordBatch`` to every batch (the fast path)."""

    kind = "map_batches"

    def __init__(self, fn: Callable[[pa.RecordBatch], pa.RecordBatch]):
        if not callable(fn):
            raise FlowDefinitionError(f"map_batches needs a function RecordBatch -> RecordBatch, got {fn!r}")
        self.fn = fn

    def build(self, context: OperatorContext, restored: pa.Table | None) -> OperatorLogic:
        fn, step = self.fn, context.step

        def process(table: pa.Table) -> pa.Table:
            batches = table.to_batches() or [pa.RecordBatch.from_pylist([], schema=table.schema)]
            return pa.concat_tables([as_table(fn(b), step) for b in batches])

        return _Stateless(process)

    def describe(self) -> dict:
        return {"kind": self.kind, "fn": _function_name(self.fn)}


class Filter(Operator):
    """Keep rows where a pyarrow compute expression, or ``fn(batch) -> bool array``, is true."""

    kind = "filter"

    def __init__(self, predicate):
        if not (isinstance(predicate, pc.Expression) or callable(predicate)):
            raise FlowDefinitionError(
                f"filter needs a pyarrow.compute expression such as pc.field('x') > 0, "
                f"or a function batch -> boolean array; got {predicate!r}"
            )
        self.predicate = predicate

    def build(self, context: OperatorContext, restored: pa.Table | None) -> OperatorLogic:
        predicate = self.predicate
        if isinstance(predicate, pc.Expression):
            return _Stateless(lambda table: _filter_by_expression(table, predicate))

        def process(table: pa.Table) -> pa.Table:
            return pa.concat_tables(
                [pa.Table.from_batches([b.filter(predicate(b))], schema=table.schema) for b in table.to_batches()]
                or [table]
            )

        return _Stateless(process)

    def describe(self) -> dict:
        p = self.predicate
        return {"kind": self.kind, "predicate": str(p) if isinstance(p, pc.Expression) else _function_name(p)}


def _filter_by_expression(table: pa.Table, predicate: pc.Expression) -> pa.Table:
    try:
        return table.filter(predicate)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        match = _FIELD_REF.search(str(exc))
        if match:
            raise missing_columns(
                None, "filter", [match["name"]], table.column_names, f"fix the column name in the expression {predicate}"
            ) from None
        first = str(exc).splitlines()[0]
        raise FlowValidationError(None, "filter", f"the expression {predicate} cannot be evaluated: {first}") from None


class MapRecords(Operator):
    """Apply ``fn(dict) -> dict | None`` to every record: convenient, and the slow path."""

    kind = "map"

    def __init__(self, fn: Callable[[dict], dict | None]):
        if not callable(fn):
            raise FlowDefinitionError(f"map needs a function dict -> dict, got {fn!r}")
        self.fn = fn

    def build(self, context: OperatorContext, restored: pa.Table | None) -> OperatorLogic:
        fn = self.fn

        def process(table: pa.Table) -> pa.Table | None:
            rows = [r for r in (fn(rec) for rec in table.to_pylist()) if r is not None]
            return pa.Table.from_pylist(rows) if rows else None

        return _Stateless(process)

    def describe(self) -> dict:
        return {"kind": self.kind, "fn": _function_name(self.fn)}


class Identity(Operator):
    """The input of a stage that starts at a source or an exchange."""

    kind = "identity"

    def build(self, context: OperatorContext, restored: pa.Table | None) -> OperatorLogic:
        return _Stateless(lambda table: table)
