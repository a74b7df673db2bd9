"""Search on streams: standing queries matched against every event.

The queries are a table (a changelog keyed by query id, so users add,
change and remove them while the job runs). A query constrains events by
*equality* (``event.area == query.area``) and by *ranges*
(``event.price <= query.max_price``, ``event.rooms >= query.min_rooms``); a
null in a query's column means "any". Each epoch emits one row per match:
the event's columns and the query's id (``<id>_query`` if the event has a
column of that name).

**Distribution.** Events and queries are hash partitioned on the first
equality attribute, so an event meets only the queries of its value of it
(every query must set it).

**Index.** Per task, the queries are grouped by which equality attributes
they set; within a group, sorted by (equality values, the first range's
bound). An event finds its bucket (its equality values) by hash lookup, and
in it, by binary search, the slice of queries whose first range admits it;
only those are checked against the other ranges. With ``Q`` queries, ``E``
events in an epoch, ``g`` groups (at most 2 to the number of equality
attributes less one) and ``C`` candidates (queries that pass equality and
the first range), an epoch costs ``O(g·E·log Q + C)``, against ``O(E·Q)``
for testing every query; the index is rebuilt (``O(Q log Q)``) only in
epochs that change queries. All of it is Arrow and numpy over arrays: no
Python per event or per query.

The rule within an epoch is enrich's: query changes apply first, then the
epoch's events are matched, so a replay gives the same matches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.base import KeyedLogic, Operator, OperatorContext, OperatorLogic
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError, missing_columns
from sluiceway.operators.state import GroupStore
from sluiceway.operators.keys import key_groups

from sluiceway.operators.tables import changes_by_key, combined_key, without_meta

OPS = {"<=": "less_equal", "<": "less", ">=": "greater_equal", ">": "greater"}


@dataclass(frozen=True)
class Range:
    """``event_column <op> query_column``, ``op`` one of ``<=``, ``<``, ``>=``, ``>``."""

    event_column: str
    op: str
    query_column: str


def _check_columns(event_column, query_column, what: str) -> None:
    for name in (event_column, query_column):
        if not isinstance(name, str) or not name:
            raise FlowDefinitionError(f"search {what} needs column names, got {event_column!r}: {query_column!r}")


class Search(Operator):
    """``stream.search(queries, id=..., equal=..., ranges=...)``: see the module's text.

    >>> op = Search("alert", {"area": "area"}, [Range("price", "<=", "max_price")])
    >>> logic = op.build(OperatorContext("s", 0, 1, 128), None)
    >>> queries = pa.table({"alert": [1, 2], "area": ["soho", "soho"], "max_price": [500, None]})
    >>> events = pa.table({"listing": [10, 11], "area": ["soho", "soho"], "price": [400, 900]})
    >>> sorted((r["listing"], r["alert"]) for r in logic.process_inputs([events, queries]).to_pylist())
    [(10, 1), (10, 2), (11, 2)]
    """

    kind = "search"
    stateful = True
    state_key = None  # the queries of a key group are written whole

    def __init__(self, query_id: str, equal: dict[str, str], ranges: list[Range]):
        if not isinstance(query_id, str) or not query_id:
            raise FlowDefinitionError(f"search needs the queries' id column (id=...), got {query_id!r}")
        if not equal:
            raise FlowDefinitionError("search needs at least one equality attribute (equal={'event column': "
                                      "'query column'}): events and queries are partitioned by the first")
        for event_column, query_column in equal.items():
            _check_columns(event_column, query_column, "equal=")
        for r in ranges:
            if not isinstance(r, Range) or r.op not in OPS:
                raise FlowDefinitionError(f"search ranges are Range(event_column, op, query_column) with op one of "
                                          f"{', '.join(OPS)}; got {r!r}")
            _check_columns(r.event_column, r.query_column, "ranges=")
        self.query_id, self.equal, self.ranges = query_id, dict(equal), list(ranges)
        self.partition = next(iter(self.equal.items()))  # (event column, query column)

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        return SearchLogic(self, context, restored)

    def describe(self) -> dict:
        return {"kind": self.kind, "id": self.query_id, "equal": self.equal,
                "ranges": [[r.event_column, r.op, r.query_column] for r in self.ranges]}


class _Group:
    """The index of the queries that set the same equality attributes:
    bucket ids per distinct equality values, and the queries sorted by
    (bucket, rank of the first range's bound)."""

    def __init__(self, columns: list[str], queries: pa.Table, first: Range | None, values: np.ndarray | None):
        self.columns = columns  # the equality attributes these queries set (query columns)
        keys = combined_key(queries, columns)
        self.buckets = pc.unique(keys)
        bucket = np.asarray(pc.index_in(keys, value_set=self.buckets))
        self.first, self.values = first, values  # ``values``: the sorted distinct bounds of the first range
        rank = np.zeros(len(bucket), dtype=np.int64) if first is None else _bound_ranks(queries, first, values)
        self.base = (len(values) + 2) if values is not None else 1
        composite = bucket.astype(np.int64) * self.base + rank
        order = np.argsort(composite, kind="stable")
        self.queries = queries.take(pa.array(order))
        self.composite = composite[order]
        counts = np.bincount(bucket, minlength=len(self.buckets))
        self.ends = np.cumsum(counts)
        self.starts = self.ends - counts

    def candidates(self, events: pa.Table, equal: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
        """(event rows, query positions) of the pairs that pass equality and the first range."""
        event_columns = [e for e, q in equal.items() if q in self.columns]
        keys = combined_key(events, event_columns)
        if keys.type != self.buckets.type:  # one equality column of another type on each side
            keys = keys.cast(self.buckets.type)
        bucket = pc.index_in(keys, value_set=self.buckets)
        found = np.asarray(pc.is_valid(bucket))
        rows = np.flatnonzero(found)
        b = np.asarray(bucket.filter(pa.array(found))).astype(np.int64)
        start, end = self.starts[b], self.ends[b]
        if self.first is not None:
            value = events.column(self.first.event_column).take(pa.array(rows))
            low, high = _event_bounds(value, self.first, self.values)
            start = np.maximum(start, np.searchsorted(self.composite, b * self.base + low, side="left"))
            end = np.minimum(end, np.searchsorted(self.composite, b * self.base + high, side="left"))
        counts = np.maximum(end - start, 0)
        event_rows = np.repeat(rows, counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return event_rows, np.repeat(start, counts) + offsets


def _bound_ranks(queries: pa.Table, first: Range, values: np.ndarray) -> np.ndarray:
    """Each query's bound as a rank among ``values`` (1 .. n), null as -inf
    (0) for ``>=``/``>`` and +inf (n + 1) for ``<=``/``<``."""
    bound = queries.column(first.query_column)
    valid = np.asarray(pc.is_valid(bound))
    filled = pc.fill_null(bound, pc.min(bound) if pc.min(bound).is_valid else 0).to_numpy(zero_copy_only=False)
    rank = np.searchsorted(values, filled, side="left") + 1
    null_rank = 0 if first.op in (">=", ">") else len(values) + 1
    return np.where(valid, rank, null_rank).astype(np.int64)


def _event_bounds(value, first: Range, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ranks of the bounds that admit each event value, as ``[low, high)``
    (an event without a value is admitted by null bounds only)."""
    valid = np.asarray(pc.is_valid(value))
    v = pc.fill_null(value, values[0]).to_numpy(zero_copy_only=False) if not valid.all() else \
        value.to_numpy(zero_copy_only=False)
    n = len(values)
    below = np.searchsorted(values, v, side="left") + 1  # the rank of the first bound >= v
    above = np.searchsorted(values, v, side="right") + 1  # the rank of the first bound > v
    if first.op in ("<=", "<"):  # v <= bound, v < bound: a slice up to the null bounds (n + 1)
        low = np.where(valid, below if first.op == "<=" else above, n + 1)
        return low, np.full(len(v), n + 2)
    high = np.where(valid, above if first.op == ">=" else below, 1)  # v >= bound, v > bound: from null (0)
    return np.zeros(len(v), dtype=np.int64), high


class SearchLogic(KeyedLogic):
    """State per key group (of the first equality attribute): the queries."""

    def __init__(self, op: Search, context: OperatorContext, restored: dict[int, pa.Table] | None):
        self.op, self.context = op, context
        self.store = GroupStore(restored, max_key_groups=context.max_key_groups)
        self.groups: list[_Group] | None = None  # the index, rebuilt after query changes

    def _apply(self, changes: pa.Table) -> None:
        op, max_kg = self.op, self.context.max_key_groups
        partition = op.partition[1]
        wanted = [op.query_id] + list(op.equal.values()) + [r.query_column for r in op.ranges]
        if any(c not in changes.column_names for c in wanted):
            raise missing_columns(self.context.step, "search", wanted, changes.column_names,
                                  "fix the query columns in search(...)")
        named = changes.column(partition)
        if named.null_count:
            raise FlowValidationError(self.context.step, "search",
                                      f"a query has no {partition!r}: every query must set the first equality "
                                      f"attribute (events and queries are partitioned by it)")
        last, deleted = changes_by_key(changes, op.query_id, self.context.step)
        last = without_meta(last)
        groups = set(pc.unique(key_groups(named.combine_chunks(), max_kg)).to_pylist())
        old = self.store.read(groups)
        ids = last.column(op.query_id).combine_chunks()
        live = last.filter(pc.invert(deleted))
        if old is not None:
            kept = old.filter(pc.invert(pc.is_in(old.column(op.query_id), value_set=ids)))
            live = pa.concat_tables([kept, live], promote_options="permissive") if kept.num_rows else live
        self.store.rewrite(groups, live.combine_chunks(), partition, max_kg)
        self.groups = None

    def _index(self) -> list[_Group]:
        if self.groups is not None:
            return self.groups
        op = self.op
        parts = [t for t in self.store.groups.values() if t.num_rows]
        self.groups = []
        if not parts:
            return self.groups
        queries = pa.concat_tables(parts, promote_options="permissive").combine_chunks()
        first = op.ranges[0] if op.ranges else None
        values = None
        if first is not None:
            bound = queries.column(first.query_column).drop_null()
            values = np.unique(bound.to_numpy(zero_copy_only=False)) if len(bound) else np.asarray([0])
        equal = list(op.equal.values())
        set_mask = np.stack([np.asarray(pc.is_valid(queries.column(c))) for c in equal], axis=1)
        patterns, which = np.unique(set_mask, axis=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            members = queries.filter(pa.array(which.reshape(-1) == p))
            self.groups.append(_Group([c for c, on in zip(equal, pattern) if on], members, first, values))
        return self.groups

    def process_inputs(self, tables: list[pa.Table | None]) -> pa.Table | None:
        events, changes = tables
        if changes is not None and changes.num_rows:
            self._apply(changes)
        if events is None or events.num_rows == 0 or not self.store.key_groups():
            return None
        op = self.op
        wanted = list(op.equal) + [r.event_column for r in op.ranges]
        if any(c not in events.column_names for c in wanted):
            raise missing_columns(self.context.step, "search", wanted, events.column_names,
                                  "fix the event columns in search(...)")
        events = events.combine_chunks()
        out = []
        for group in self._index():
            try:
                rows, positions = group.candidates(events, op.equal)
            except (TypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise FlowValidationError(
                    self.context.step, "search",
                    f"events cannot be compared with the queries ({exc}): the event columns "
                    f"{', '.join(wanted)} and their query columns must have comparable types; cast them first",
                ) from None
            if len(rows) == 0:
                continue
            keep = np.ones(len(rows), dtype=bool)
            for r in op.ranges[1:]:
                value = events.column(r.event_column).take(pa.array(rows))
                bound = group.queries.column(r.query_column).take(pa.array(positions))
                ok = pc.fill_null(getattr(pc, OPS[r.op])(value, bound), False)
                keep &= np.asarray(pc.or_(ok, pc.is_null(bound)))  # a null bound admits every event
            rows, positions = rows[keep], positions[keep]
            if len(rows):
                matched = events.take(pa.array(rows))
                ids = group.queries.column(op.query_id).take(pa.array(positions))
                name = op.query_id if op.query_id not in matched.column_names else f"{op.query_id}_query"
                out.append((rows, matched.append_column(name, ids)))
        if not out:
            return None
        order = np.argsort(np.concatenate([r for r, _ in out]), kind="stable")  # in event order
        table = pa.concat_tables([t for _, t in out], promote_options="permissive")
        return table.take(pa.array(order))

    def query_count(self) -> int:
        return len(self.store)
