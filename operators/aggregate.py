"""Keyed running aggregation, emitting an upsert changelog.

Each epoch, the rows of the epoch are aggregated per key with Arrow's
group-by (partial aggregates); from each key group they touch, the state
rows of the epoch's keys are merged with them (a second group-by over the
epoch's keys only), and the updated rows are emitted, one per key the
epoch touched (in no promised order): key first, then one column per ``(column, function)`` pair named as
``pyarrow.TableGroupBy`` names them (``value_sum``). No per-row Python
anywhere; state is kept per key group in a
:class:`~sluiceway.operators.state.KeyedStore`.

>>> import pyarrow as pa
>>> from sluiceway.operators.base import OperatorContext
>>> op = Aggregate("user", [("amount", "sum"), ("amount", "count")])
>>> logic = op.build(OperatorContext("agg", 0, 1, 128), None)
>>> logic.process(pa.table({"user": ["a", "b", "a"], "amount": [1, 2, 3]})).to_pylist()
[{'user': 'a', 'amount_sum': 4, 'amount_count': 2}, {'user': 'b', 'amount_sum': 2, 'amount_count': 1}]
>>> logic.process(pa.table({"user": ["b"], "amount": [10]})).to_pylist()
[{'user': 'b', 'amount_sum': 12, 'amount_count': 2}]
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.base import KeyedLogic, Operator, OperatorContext, OperatorLogic
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError, missing_columns
from sluiceway.operators.sink_guard import promoted
from sluiceway.operators.store import KeyedStore

SUPPORTED_FUNCTIONS = ("count", "count_all", "sum", "min", "max", "mean")


def _probe_keys_first() -> bool:
    """Whether this pyarrow puts group keys before aggregates (it changed across releases)."""
    probe = pa.table({"k": [1], "v": [1]}).group_by("k", use_threads=False).aggregate([("v", "sum")])
    return probe.column_names[0] == "k"


_KEYS_FIRST = _probe_keys_first()


def _group(table: pa.Table, keys: str | list[str], specs: list, names: list[str]) -> pa.Table:
    """Group-by with output columns named ``keys + names``, whatever pyarrow's order."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    out = table.group_by(keys, use_threads=False).aggregate(specs)
    return out.rename_columns(keys + names if _KEYS_FIRST else names + keys)


@dataclass(frozen=True)
class _Accumulator:
    """One state column: how to build it from rows and how to merge two of it."""

    name: str
    column: str | None
    partial: str  # pyarrow hash aggregate over input rows
    merge: str  # pyarrow hash aggregate over accumulators


def _accumulators(index: int, column: str | None, function: str) -> list[_Accumulator]:
    if function == "mean":
        return [
            _Accumulator(f"__acc{index}_sum", column, "sum", "sum"),
            _Accumulator(f"__acc{index}_n", column, "count", "sum"),
        ]
    merge = {"count": "sum", "count_all": "sum", "sum": "sum", "min": "min", "max": "max"}[function]
    return [_Accumulator(f"__acc{index}", column, function, merge)]


def _normalize_pairs(pairs) -> list[tuple[str | None, str]]:
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[1], str):
        pairs = [pairs]
    out = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise FlowDefinitionError(
                f"aggregate takes (column, function) pairs like [('amount', 'sum')], got {pair!r}"
            )
        column, function = pair
        if function not in SUPPORTED_FUNCTIONS:
            raise FlowDefinitionError(
                f"aggregate function {function!r} is not supported; use one of {', '.join(SUPPORTED_FUNCTIONS)}"
            )
        if function == "count_all":
            if column not in ([], (), None):
                raise FlowDefinitionError("count_all counts rows: write it as ([], 'count_all')")
            column = None
        elif not isinstance(column, str):
            raise FlowDefinitionError(f"aggregate column must be a column name, got {column!r} for {function!r}")
        out.append((column, function))
    if not out:
        raise FlowDefinitionError("aggregate needs at least one (column, function) pair")
    return out


class Accumulators:
    """The state columns behind ``(column, function)`` pairs and the three
    things done with them, all as Arrow group-bys: aggregate rows
    (:meth:`partial`), combine accumulators (:meth:`merge`), and turn them into
    the output columns (:meth:`finalize`). The keyed aggregate and the
    windows share it.

    >>> acc = Accumulators([("v", "sum"), ("v", "mean")])
    >>> part = acc.partial(pa.table({"k": ["a", "a", "b"], "v": [1, 2, 4]}), ["k"])
    >>> acc.finalize(acc.merge(pa.concat_tables([part, part]), ["k"]), ["k"]).to_pylist()
    [{'k': 'a', 'v_sum': 6, 'v_mean': 1.5}, {'k': 'b', 'v_sum': 8, 'v_mean': 4.0}]
    """

    def __init__(self, pairs):
        self.pairs = _normalize_pairs(pairs)
        self.output_names = [fn if col is None else f"{col}_{fn}" for col, fn in self.pairs]
        if len(set(self.output_names)) != len(self.output_names):
            raise FlowDefinitionError(f"aggregate pairs repeat an output column: {self.output_names}")
        self.columns = [a for i, (c, f) in enumerate(self.pairs) for a in _accumulators(i, c, f)]
        self.names = [a.name for a in self.columns]

    @property
    def inputs(self) -> list[str]:
        """The input columns the pairs read."""
        return list(dict.fromkeys(c for c, _ in self.pairs if c is not None))

    def wanted(self, *keys: str) -> list[str]:
        """``keys`` then the input columns, each once: a key may be aggregated
        too (``key_by("a").aggregate([("a", "count")])``), as in pyarrow."""
        return list(dict.fromkeys([*keys, *self.inputs]))

    def partial(self, table: pa.Table, keys: list[str]) -> pa.Table:
        """One row of accumulators per distinct ``keys`` in ``table``."""
        specs = [([], "count_all") if a.partial == "count_all" else (a.column, a.partial) for a in self.columns]
        return _group(table, keys, specs, self.names)

    def merge(self, table: pa.Table, keys: list[str], extra: list | None = None) -> pa.Table:
        """Accumulator rows combined per distinct ``keys`` (``extra``: more
        ``(column, function, name)`` aggregations to carry along)."""
        extra = extra or []
        specs = [(a.name, a.merge) for a in self.columns] + [(c, f) for c, f, _ in extra]
        return _group(table, keys, specs, self.names + [n for _, _, n in extra])

    def per_row(self, table: pa.Table) -> dict[str, pa.Array]:
        """Accumulators of each row on its own (what :meth:`partial` gives a
        group of one row), as columns: for windows that merge rows later."""
        out = {}
        for a in self.columns:
            if a.partial == "count_all":
                out[a.name] = pa.repeat(pa.scalar(1, pa.int64()), table.num_rows)
                continue
            values = table.column(a.column)
            if a.partial == "count":
                out[a.name] = pc.cast(pc.is_valid(values), pa.int64())
            elif a.partial == "sum" and pa.types.is_integer(values.type):
                out[a.name] = pc.cast(values, pa.uint64() if pa.types.is_unsigned_integer(values.type) else pa.int64())
            elif a.partial == "sum" and pa.types.is_floating(values.type):
                out[a.name] = pc.cast(values, pa.float64())
            else:
                out[a.name] = values
        return out

    def finalize(self, merged: pa.Table, keys: list[str]) -> pa.Table:
        """``keys`` then one column per pair, named as pyarrow names it."""
        columns = {k: merged.column(k) for k in keys}
        for i, ((_, function), name) in enumerate(zip(self.pairs, self.output_names)):
            if function == "mean":
                total = pc.cast(merged.column(f"__acc{i}_sum"), pa.float64())
                n = merged.column(f"__acc{i}_n")
                columns[name] = pc.if_else(pc.equal(n, 0), pa.scalar(None, pa.float64()), pc.divide(total, n))
            else:
                columns[name] = merged.column(f"__acc{i}")
        return pa.table(columns)


class Aggregate(Operator):
    kind = "aggregate"
    stateful = True

    def __init__(self, key: str, pairs):
        self.key = key
        self.acc = Accumulators(pairs)
        self.pairs = self.acc.pairs
        self.output_names = self.acc.output_names
        if key in self.output_names:
            raise FlowDefinitionError(f"aggregate output column {key!r} collides with the key column")

    @property
    def state_key(self) -> str:
        return self.key

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        return AggregateLogic(self, context, restored)

    def describe(self) -> dict:
        return {"kind": self.kind, "key": self.key, "pairs": [[c, f] for c, f in self.pairs]}


class AggregateLogic(KeyedLogic):
    def __init__(self, op: Aggregate, context: OperatorContext, restored: dict[int, pa.Table] | None):
        self.op = op
        self.context = context
        self.store = KeyedStore(restored, key=op.key, max_key_groups=context.max_key_groups,
                                budget_bytes=context.state_budget_bytes)

    def _partial(self, table: pa.Table) -> pa.Table:
        op = self.op
        wanted = op.acc.wanted(op.key)
        if any(c not in table.column_names for c in wanted):
            raise missing_columns(
                self.context.step, "aggregate", wanted, table.column_names, "fix the column names in aggregate(...)"
            )
        return op.acc.partial(table, [op.key])

    def process(self, table: pa.Table) -> pa.Table | None:
        if table.num_rows == 0:
            return None
        op = self.op
        key = op.key
        partial = self._partial(table)  # one row per key of this epoch
        # The state rows of this epoch's keys only (a search per run, not a
        # read of whole key groups), merged with the epoch's partial
        # aggregates in one group-by, and written back as the keys' new rows.
        old = self.store.get(partial.column(key))
        if old is not None:
            if not set(partial.column_names).issubset(old.column_names):
                old = _with_new_pairs(old, partial.schema)
            try:
                combined = pa.concat_tables([partial, old.select(partial.column_names)], promote_options="permissive")
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                raise self._state_type_error(partial, old) from None
            merged = op.acc.merge(combined, [key])
        else:
            merged = partial
        self.store.put(merged)
        return op.acc.finalize(merged, [key])

    def _state_type_error(self, partial: pa.Table, old: pa.Table) -> FlowValidationError:
        """A pair whose values this epoch cannot merge with what its state holds (a column changed type)."""
        for i, (column, function) in enumerate(self.op.pairs):
            for name in (f"__acc{i}", f"__acc{i}_sum"):
                if name in partial.column_names and name in old.column_names:
                    now, before = partial.schema.field(name).type, old.schema.field(name).type
                    if promoted(now, before) is None:
                        return FlowValidationError(
                            self.context.step, "aggregate",
                            f"{function}({column}) gets {now} values now, and its state holds {before} (from "
                            f"earlier epochs or the restored checkpoint); cast {column!r} in the job to keep the "
                            f"state, or name the step anew to start it empty")
        return FlowValidationError(self.context.step, "aggregate", "this epoch's values cannot be merged with the "
                                   "types its state holds; cast the aggregated columns in the job")


def _with_new_pairs(old: pa.Table, schema: pa.Schema) -> pa.Table:
    """State restored from before pairs were added at the end of the
    aggregate: their accumulators start empty (nulls, which the merge skips),
    so they count from the restore on."""
    for field in schema:
        if field.name not in old.column_names:
            old = old.append_column(field, pa.nulls(old.num_rows, field.type))
    return old
