"""Changelog streams, tables, and deduplication.

A *changelog* is a stream of row changes: each row carries ``_op``, one of
``insert``, ``update`` and ``delete`` (what change data capture emits); a
row without ``_op`` (or with a null one) is an *upsert*, so the output of a
keyed aggregate, one row per key it touched, is a changelog too. A *table*
is the latest row per key of a changelog, a delete removing it.

:class:`ToTable` materializes a table as keyed state in the key-group store
and emits its own changelog, one row per key an epoch changed: ``insert``
for a new key, ``update`` with the new values for a changed one, ``delete``
with the last values for a removed one (or, with ``updates="retract"``, an
update as the old row's ``delete`` then the new row's ``insert``: what a
join on another column, or a sum, needs to take the old row back). Within
one epoch the changes of a key are applied in the order they came (the
order of the key's source partition), so only the last one shows: a key
inserted and deleted in one epoch emits nothing.

>>> import pyarrow as pa
>>> from sluiceway.operators.base import OperatorContext
>>> logic = ToTable("id").build(OperatorContext("t", 0, 1, 128), None)
>>> logic.process(pa.table({"id": [1, 2, 1], "v": ["a", "b", "c"]})).to_pylist()
[{'id': 2, 'v': 'b', '_op': 'insert'}, {'id': 1, 'v': 'c', '_op': 'insert'}]
>>> logic.process(pa.table({"id": [1, 2], "v": ["d", None], "_op": ["update", "delete"]})).to_pylist()
[{'id': 1, 'v': 'd', '_op': 'update'}, {'id': 2, 'v': 'b', '_op': 'delete'}]
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.base import KeyedLogic, Operator, OperatorContext, OperatorLogic, Outputs
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError, missing_columns
from sluiceway.operators.event_time import micros, split_late
from sluiceway.operators.state import earliest_per_group
from sluiceway.operators.store import KeyedStore

OP = "_op"
INSERT, UPDATE, DELETE = "insert", "update", "delete"
OPS = (INSERT, UPDATE, DELETE)
CHANGELOG_META = (OP, "_lsn", "_table")  # what a changelog row carries besides the table's columns
_INDEX = "__i"


def without_meta(table: pa.Table) -> pa.Table:
    """A changelog's rows as the table's rows: without ``_op``, ``_lsn``, ``_table``.

    >>> without_meta(pa.table({"id": [1], "_op": ["insert"], "_lsn": ["0/0"]})).column_names
    ['id']
    """
    return table.drop_columns([c for c in CHANGELOG_META if c in table.column_names])


def _indexed(table: pa.Table) -> pa.Table:
    return table.append_column(_INDEX, pa.array(np.arange(table.num_rows, dtype=np.int64)))


def last_per_key(table: pa.Table, key: str) -> pa.Table:
    """The last row of each key, in the order of those last rows.

    >>> last_per_key(pa.table({"k": ["a", "b", "a"], "v": [1, 2, 3]}), "k").to_pylist()
    [{'k': 'b', 'v': 2}, {'k': 'a', 'v': 3}]
    """
    indexed = _indexed(table)
    last = indexed.group_by(key, use_threads=False).aggregate([(_INDEX, "max")]).column(f"{_INDEX}_max")
    return table.take(last.take(pc.sort_indices(last)))


def ops_of(table: pa.Table, step: str | None = None) -> pa.Array:
    """Each row's change, ``upsert`` where ``_op`` is missing or null;
    raises :class:`FlowValidationError` on any other value.

    >>> ops_of(pa.table({"_op": ["insert", None, "delete"]})).to_pylist()
    ['insert', 'upsert', 'delete']
    """
    if OP not in table.column_names:
        return pa.repeat(pa.scalar("upsert"), table.num_rows)
    ops = pc.fill_null(table.column(OP).combine_chunks(), "upsert")
    bad = pc.invert(pc.is_in(ops, value_set=pa.array(OPS + ("upsert",))))
    if pc.any(bad).as_py():
        values = pc.unique(ops.filter(bad)).to_pylist()[:3]
        raise FlowValidationError(
            step, "changelog",
            f"changelog column {OP!r} has {values!r}; each change must be 'insert', 'update' or 'delete' "
            f"(or null for an upsert): map the source's operation names onto these in map_batches first",
        )
    return ops


def changes_by_key(table: pa.Table, key: str, step: str | None) -> tuple[pa.Table, pa.Array]:
    """The last change of each key in ``table`` (rows without ``_op``) and
    whether it is a delete."""
    if key not in table.column_names:
        raise missing_columns(step, "table", [key], table.column_names, f"fix the key column in to_table(key={key!r})")
    ops = ops_of(table, step)
    rows = table.drop_columns([OP]) if OP in table.column_names else table
    last = last_per_key(rows.append_column(OP, ops), key)
    return last.drop_columns([OP]), pc.equal(last.column(OP), DELETE)


def split_changes(table: pa.Table, keys: list[str], step: str | None = None) -> tuple[pa.Table, pa.Table]:
    """What a sink keeping a copy of a table does with one epoch of its
    changelog: the last change of each key (``keys``: the columns that
    identify a row), as the rows to upsert (without ``_op``) and the keys to
    delete.

    >>> rows = pa.table({"id": [1, 2, 1, 3], "v": ["a", "b", None, "c"], "_op": ["insert", "insert", "delete", None]})
    >>> upsert, delete = split_changes(rows, ["id"])
    >>> upsert.to_pylist(), delete.to_pylist()
    ([{'id': 2, 'v': 'b'}, {'id': 3, 'v': 'c'}], [{'id': 1}])
    """
    ops = ops_of(table, step)
    rows = table.drop_columns([OP]) if OP in table.column_names else table
    ident = combined_key(rows, keys)
    last = last_per_key(pa.table({"__k": ident, OP: ops, "__row": pa.array(np.arange(len(ident), dtype=np.int64))}),
                        "__k")
    gone = pc.equal(last.column(OP), DELETE)
    upsert = rows.take(last.column("__row").filter(pc.invert(gone)))
    delete = rows.select(keys).take(last.column("__row").filter(gone))
    return upsert, delete


class TableState:
    """The latest row per key, in key groups: applies a changelog and says
    what each key was before and is after. Shared by :class:`ToTable` and the
    joins that keep a table side."""

    def __init__(self, key: str, context: OperatorContext, restored: dict[int, pa.Table] | None):
        self.key, self.context = key, context
        self.store = KeyedStore(restored, key=key, max_key_groups=context.max_key_groups,
                                budget_bytes=context.state_budget_bytes)

    def lookup(self, keys: pa.Array) -> pa.Table | None:
        """The current rows of ``keys`` (reading only their key groups)."""
        if len(keys) == 0:
            return None
        return self.store.get(keys)

    def apply(self, table: pa.Table) -> tuple[pa.Table | None, pa.Table, pa.Array]:
        """Apply one epoch's changes. Returns the rows the changed keys had
        before (``None`` if none existed), the last change of each changed
        key (rows), and whether that change is a delete."""
        key = self.key
        last, deleted = changes_by_key(table, key, self.context.step)
        keys = last.column(key).combine_chunks()
        before = self.store.get(keys)
        self.store.put(last.filter(pc.invert(deleted)), keys)  # a deleted key keeps a tombstone only
        return before, last, deleted


def changelog_out(before: pa.Table | None, last: pa.Table, deleted: pa.Array, key: str,
                  retract: bool = False) -> pa.Table | None:
    """The changelog rows for one epoch's changes (see the module's text),
    each key's rows at the place of its last change, a retraction before
    the row that replaces it."""
    n = last.num_rows
    position = pa.array(np.arange(n, dtype=np.int64))
    if before is None or before.num_rows == 0:
        existed, old_at = pa.repeat(pa.scalar(False), n), None
    else:
        old_at = pc.index_in(last.column(key), value_set=before.column(key).combine_chunks())
        existed = pc.is_valid(old_at)
    parts = []
    if old_at is not None:
        leaving = pc.and_(existed, pc.or_(deleted, pa.scalar(retract)))
        old = before.take(old_at.filter(leaving))
        parts.append(old.append_column(OP, pa.repeat(pa.scalar(DELETE), old.num_rows))
                     .append_column("__p", position.filter(leaving))
                     .append_column("__s", pa.repeat(pa.scalar(0, pa.int8()), old.num_rows)))
    live = pc.invert(deleted)
    new = last.filter(live)
    op = pc.if_else(existed.filter(live), pa.scalar(INSERT if retract else UPDATE), pa.scalar(INSERT))
    parts.append(new.append_column(OP, op).append_column("__p", position.filter(live))
                 .append_column("__s", pa.repeat(pa.scalar(1, pa.int8()), new.num_rows)))
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return None
    out = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")
    return out.sort_by([("__p", "ascending"), ("__s", "ascending")]).drop_columns(["__p", "__s"])


class ToTable(Operator):
    """``stream.to_table(key)``: the latest row per key, emitted as a changelog."""

    kind = "table"
    stateful = True

    def __init__(self, key: str, updates: str = "upsert"):
        if not isinstance(key, str) or not key:
            raise FlowDefinitionError(f"to_table needs a key column name, got {key!r}")
        if updates not in ("upsert", "retract"):
            raise FlowDefinitionError(f"to_table(updates=...) is 'upsert' or 'retract', got {updates!r}")
        self.key, self.updates = key, updates

    @property
    def state_key(self) -> str:
        return self.key

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        return ToTableLogic(self, context, restored)

    def describe(self) -> dict:
        return {"kind": self.kind, "key": self.key, "updates": self.updates}


class ToTableLogic(KeyedLogic):
    def __init__(self, op: ToTable, context: OperatorContext, restored: dict[int, pa.Table] | None):
        self.op = op
        self.table = TableState(op.key, context, restored)

    @property
    def store(self) -> KeyedStore:
        return self.table.store

    def process(self, table: pa.Table) -> pa.Table | None:
        if table.num_rows == 0:
            return None
        before, last, deleted = self.table.apply(table)
        return changelog_out(before, last, deleted, self.op.key, retract=self.op.updates == "retract")


# ------------------------------------------------------------- deduplication
FIRST_SEEN = "__seen"  # dedupe state: the event time of the kept event of an id


def combined_key(table: pa.Table, columns: list[str]) -> pa.Array:
    """One value identifying each row's ``columns``: the column itself for
    one, else the values as text joined by a unit separator.

    >>> combined_key(pa.table({"a": [1, None], "b": ["x", "y"]}), ["a", "b"]).to_pylist()
    ['1\\x1fx', '\\x00\\x1fy']
    """
    if len(columns) == 1:
        return table.column(columns[0]).combine_chunks()
    parts = [pc.fill_null(pc.cast(table.column(c), pa.string()), "\x00") for c in columns]
    joined = pc.binary_join_element_wise(*parts, "\x1f")
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


class Dedupe(Operator):
    """``stream.dedupe(columns, within)``: drop repeats of an id.

    Each id is remembered with the time ``t`` of its latest kept event. An
    event is dropped when its id's remembered time is within ``within`` of
    its own (either side, both ends included); otherwise it is kept, and
    remembered if it is later. An id is forgotten once the watermark passes
    ``t + within``: no event to come can be within ``within`` of it then.
    State: the ids kept in the last ``within`` (plus the out-of-orderness),
    whatever the stream's length. An event behind the watermark when it
    arrives goes to ``late()``: its id may have been forgotten, so it can be
    neither kept nor dropped with certainty. Events of one id in one epoch
    are taken in the order they came. (Spark's ``dropDuplicatesWithinWatermark``
    keeps the first and drops every repeat until the id expires, however
    far apart they are.)

    >>> from datetime import datetime, timezone
    >>> t = [datetime(2026, 1, 1, 0, 0, s, tzinfo=timezone.utc) for s in (1, 2, 3)]
    >>> logic = Dedupe(["id"], "ts", timedelta(seconds=5)).build(OperatorContext("d", 0, 1, 128), None)
    >>> logic.process(pa.table({"id": ["a", "b", "a"], "ts": t})).column("id").to_pylist()
    ['a', 'b']
    >>> logic.process(pa.table({"id": ["a"], "ts": t[2:]})) is None
    True
    """

    kind = "dedupe"
    stateful = True
    state_key = "__id"

    def __init__(self, columns, time_column: str, within: timedelta):
        columns = [columns] if isinstance(columns, str) else list(columns)
        if not columns or not all(isinstance(c, str) and c for c in columns):
            raise FlowDefinitionError(f"dedupe needs the id column name(s), got {columns!r}")
        self.columns, self.time_column = columns, time_column
        self.within = micros(within, "dedupe(within=...)")

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        return DedupeLogic(self, context, restored)

    def describe(self) -> dict:
        return {"kind": self.kind, "columns": self.columns, "time_column": self.time_column,
                "within_s": self.within / 1e6}


class DedupeLogic(KeyedLogic):
    """State per key group: ``__id`` and the kept event's time; per key group
    the earliest time an id expires, so an epoch opens only groups with
    something to forget."""

    def __init__(self, op: Dedupe, context: OperatorContext, restored: dict[int, pa.Table] | None):
        self.op, self.context = op, context
        self.store = KeyedStore(restored, key="__id", max_key_groups=context.max_key_groups,
                                budget_bytes=context.state_budget_bytes)
        self.watermark = context.watermark
        self.due: dict[int, int] = {}
        for table in self.store.groups.values():
            self._update_due(table)

    def process(self, table: pa.Table) -> pa.Table | Outputs | None:
        if table.num_rows == 0:
            return None
        op = self.op
        wanted = op.columns + [op.time_column]
        if any(c not in table.column_names for c in wanted):
            raise missing_columns(self.context.step, "dedupe", wanted, table.column_names,
                                  "fix the column names in dedupe(...) or with_event_time(...)")
        table, t, late = split_late(table, op.time_column, self.watermark, self.context.step)
        kept = None
        if table.num_rows:
            ids = combined_key(table, op.columns)
            keep, remember = self._decide(ids, t)
            kept = table.filter(pa.array(keep))
            self._remember(ids.filter(pa.array(remember)), pa.array(t[remember], pa.int64()))
        side = {"late": late} if late is not None else {}
        if side:
            return Outputs(kept, side)
        return kept if kept is not None and kept.num_rows else None

    def _decide(self, ids: pa.Array, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which events to keep, and which of them to remember. An id seen
        once this epoch is decided with Arrow kernels against the state; the
        events of an id repeated within the epoch, one after another."""
        within = self.op.within
        state = self.store.get(ids)
        if state is not None:
            at = pc.index_in(ids, value_set=state.column("__id").combine_chunks())
            known = np.asarray(pc.is_valid(at))
            seen = pc.take(state.column(FIRST_SEEN), pc.fill_null(at, 0)).to_numpy().astype(np.int64)
        else:
            known, seen = np.zeros(len(ids), dtype=bool), np.zeros(len(ids), dtype=np.int64)
        keep = ~known | (np.abs(t - seen) > within)
        remember = keep & (~known | (t > seen))
        counts = pc.value_counts(ids)
        repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        if len(repeated):
            rows = np.flatnonzero(np.asarray(pc.is_in(ids, value_set=repeated)))
            latest: dict = {}  # id -> (time, row) of its latest kept event so far
            for i, key in zip(rows.tolist(), ids.take(pa.array(rows)).to_pylist()):
                last = latest[key][0] if key in latest else (int(seen[i]) if known[i] else None)
                keep[i] = last is None or abs(int(t[i]) - last) > within
                remember[i] = False
                if keep[i] and (last is None or t[i] > last):
                    latest[key] = (int(t[i]), i)
            for _, row in latest.values():  # one state row per id: its latest kept event's time
                remember[row] = True
        return keep, remember

    def _remember(self, ids: pa.Array, t: pa.Array) -> None:
        """Remember each id's kept time, replacing what it had."""
        if len(ids) == 0:
            return
        rows = pa.table({"__id": ids, FIRST_SEEN: t})
        self.store.put(rows)
        self._update_due(rows, earliest=True)

    def _update_due(self, rows: pa.Table, earliest: bool = False) -> None:
        """Each group's next expiry from its ``rows`` (all of them; ``earliest``:
        some of them, so only ever brought forward)."""
        if rows.num_rows == 0:
            return
        for group, first in earliest_per_group(rows, "__id", FIRST_SEEN, self.context.max_key_groups).items():
            due = first + self.op.within
            self.due[group] = min(self.due.get(group, due), due) if earliest else due

    def on_epoch_end(self, epoch: int, watermark: int | None) -> None:
        if not self._take_watermark(watermark):
            return None
        groups = {kg for kg, due in self.due.items() if due < watermark}
        table = self.store.read(groups) if groups else None
        for kg in groups:
            self.due.pop(kg, None)
        if table is None:
            return None
        expired = pc.less(pc.add(table.column(FIRST_SEEN), self.op.within), watermark)
        gone = table.column("__id").filter(expired).combine_chunks()
        table = table.filter(pc.invert(expired))
        self.store.rewrite(groups, table, "__id", self.context.max_key_groups, changed=gone)
        self._update_due(table)
        return None
