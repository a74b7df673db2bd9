"""Joins: a stream with a table (enrichment) and two streams within a time
bound (window join). Both run in a stage with two inputs, each side hash
partitioned on its join key, and get an epoch of both sides in one call
(:meth:`~sluiceway.operators.base.OperatorLogic.process_inputs`): what they
emit depends only on the epoch's rows, never on the order in which the two
sides' messages came, so a replay emits the same.

Pairs are found with Arrow hash joins over key and row number only, then
the rows are gathered with ``take``: no per-row Python, and any column type
(lists, structs) rides along.

**Output columns.** The left side's columns, then the right side's except
its join key; a right column whose name the left side has already gets
``suffix`` (``"_right"``).
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.base import KeyedLogic, Operator, OperatorContext, OperatorLogic, Outputs
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError, missing_columns
from sluiceway.operators.event_time import micros, split_late
from sluiceway.operators.keys import key_groups
from sluiceway.operators.state import GroupStore, as_struct, rows_of, split_by_key_group
from sluiceway.operators.store import KeyedStore

from sluiceway.operators.tables import (DELETE, INSERT, OP, UPDATE, TableState, changes_by_key, ops_of,
                                        without_meta)
JOIN_KINDS = ("inner", "left", "outer")


def _positions(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int64))


def match(left_keys: pa.Array, right_keys: pa.Array, how: str = "inner") -> tuple[pa.Array, pa.Array]:
    """The row pairs with equal keys, ordered by left row then right row:
    ``(left rows, right rows)``; with ``how="left"`` a left row without a
    match pairs with a null.

    >>> l, r = match(pa.array(["a", "b", "a"]), pa.array(["a", "c", "a"]), "left")
    >>> l.to_pylist(), r.to_pylist()
    ([0, 0, 1, 2, 2], [0, 2, None, 0, 2])
    """
    left = pa.table({"k": left_keys, "__l": _positions(len(left_keys))})
    right = pa.table({"k": right_keys, "__r": _positions(len(right_keys))})
    pairs = left.join(right, "k", join_type="left outer" if how == "left" else "inner", use_threads=False)
    pairs = pairs.sort_by([("__l", "ascending"), ("__r", "ascending")])
    return pairs.column("__l").combine_chunks(), pairs.column("__r").combine_chunks()


def side_by_side(left: pa.Table, right: pa.Table, drop: list[str], suffix: str) -> pa.Table:
    """``left``'s columns then ``right``'s (less ``drop``), renaming clashes."""
    out = left
    for name in right.column_names:
        if name in drop:
            continue
        out = out.append_column(name + suffix if name in out.column_names else name, right.column(name))
    return out


def _check_how(how: str, allowed: tuple[str, ...], what: str) -> None:
    if how not in allowed:
        raise FlowDefinitionError(f"{what}(how=...) is one of {', '.join(map(repr, allowed))}, got {how!r}")


# ------------------------------------------------------------ stream-table
class Enrich(Operator):
    """``stream.enrich(table, on=...)``: each event joined with the table's
    row for its key.

    **The rule within an epoch:** the table's changes of an epoch are applied
    first, then the epoch's events are looked up, so an event sees every
    change planned into the same epoch as itself, and none planned later.
    Epochs are fixed by the offsets log, so a replay gives the same answer.
    ``how="left"`` keeps an event without a row (the table's columns null);
    ``how="inner"`` drops it.

    >>> logic = Enrich("customer", "id").build(OperatorContext("e", 0, 1, 128), None)
    >>> events = pa.table({"customer": [1, 2], "amount": [5, 7]})
    >>> logic.process_inputs([events, pa.table({"id": [1], "name": ["ann"]})]).to_pylist()
    [{'customer': 1, 'amount': 5, 'name': 'ann'}, {'customer': 2, 'amount': 7, 'name': None}]
    """

    kind = "enrich"
    stateful = True

    def __init__(self, on: str, table_key: str, how: str = "left", suffix: str = "_right"):
        _check_how(how, ("inner", "left"), "enrich")
        if not isinstance(on, str) or not on:
            raise FlowDefinitionError(f"enrich needs the stream's column to look up by (on=...), got {on!r}")
        self.on, self.table_key, self.how, self.suffix = on, table_key, how, suffix

    @property
    def state_key(self) -> str:
        return self.table_key

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        return EnrichLogic(self, context, restored)

    def describe(self) -> dict:
        return {"kind": self.kind, "on": self.on, "table_key": self.table_key, "how": self.how}


class EnrichLogic(KeyedLogic):
    def __init__(self, op: Enrich, context: OperatorContext, restored: dict[int, pa.Table] | None):
        self.op, self.context = op, context
        self.table = TableState(op.table_key, context, restored)

    def process_inputs(self, tables: list[pa.Table | None]) -> pa.Table | None:
        events, changes = tables
        if changes is not None and changes.num_rows:
            self.table.apply(changes)
        if events is None or events.num_rows == 0:
            return None
        op = self.op
        if op.on not in events.column_names:
            raise missing_columns(self.context.step, "enrich", [op.on], events.column_names,
                                  f"fix the column name in enrich(on={op.on!r})")
        keys = events.column(op.on).combine_chunks()
        rows = self.table.lookup(pc.unique(keys))
        if rows is None:
            if op.how == "inner":
                return None
            return events
        rows = without_meta(rows)
        # A table has one row per key: a hash lookup per event, in event order, no join and no sort.
        found = pc.index_in(keys, value_set=rows.column(op.table_key).combine_chunks())
        if op.how == "inner":
            hit = pc.is_valid(found)
            events, found = events.filter(hit), found.filter(hit)
        return side_by_side(events, rows.take(found), [op.table_key], op.suffix)

    @property
    def store(self) -> KeyedStore:
        return self.table.store


# ----------------------------------------------------------- window join
SIDE, KEY, TIME, ID, MATCHED = "__side", "__key", "__t", "__id", "__matched"
ROWS = ("__left", "__right")  # each state row holds its side's row as a struct, the other side's is null


class WindowJoin(Operator):
    """``left.join(right, on=..., within=...)``: the pairs of a left and a
    right event with equal keys whose event times are at most ``within``
    apart (both ends included).

    Each side's events are kept until the watermark passes their time plus
    ``within`` (no event to come can pair with them then) and are dropped;
    with ``how="left"`` (or ``"outer"``) a left (or any) event dropped
    without ever pairing is emitted with the other side's columns null.
    State holds about ``within`` plus the out-of-orderness of each side,
    whatever the stream's length. An event whose time is behind the
    watermark when it arrives goes to ``late()``: events it could have
    paired with may be gone. Pairs are emitted in the epoch where the later
    of the two arrives.

    >>> from datetime import datetime, timezone
    >>> t = lambda s: datetime(2026, 1, 1, 0, 0, s, tzinfo=timezone.utc)
    >>> op = WindowJoin("sid", "sid", "ts", "ts", timedelta(seconds=5))
    >>> logic = op.build(OperatorContext("j", 0, 1, 128), None)
    >>> searches = pa.table({"sid": [1, 2], "ts": [t(0), t(0)], "q": ["cats", "dogs"]})
    >>> clicks = pa.table({"sid": [1, 2], "ts": [t(5), t(6)]})
    >>> [(r["q"], r["ts_right"].second) for r in logic.process_inputs([searches, clicks]).to_pylist()]
    [('cats', 5)]
    """

    kind = "window_join"
    stateful = True
    state_key = None  # several rows per key: changed key groups are written whole

    def __init__(self, left_key: str, right_key: str, left_time: str, right_time: str, within: timedelta,
                 how: str = "inner", suffix: str = "_right"):
        _check_how(how, JOIN_KINDS, "join")
        self.keys, self.times = (left_key, right_key), (left_time, right_time)
        self.within = micros(within, "join(within=...)")
        if self.within < 0:
            raise FlowDefinitionError(f"join(within=...) must not be negative, got {within!r}")
        self.how, self.suffix = how, suffix

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        return WindowJoinLogic(self, context, restored)

    def describe(self) -> dict:
        return {"kind": self.kind, "keys": list(self.keys), "times": list(self.times), "within_s": self.within / 1e6,
                "how": self.how}

    def keeps_unmatched(self, side: int) -> bool:
        return self.how == "outer" or (self.how == "left" and side == 0)


class _TwoSided(KeyedLogic):
    """State rows of two sides in one table per key group: each row holds
    its side's row as a struct column (``__left`` or ``__right``), the other
    side's null. ``schemas``: each side's row schema, once seen."""

    schemas: list

    def _restored_schemas(self) -> list[pa.Schema | None]:
        """Each side's row schema as the restored state holds it (``None`` before any state)."""
        first = next(iter(self.store.groups.values()), None)
        return [None if first is None else pa.schema(list(first.schema.field(name).type)) for name in ROWS]

    def _struct_type(self, side: int) -> pa.DataType:
        schema = self.schemas[side]
        return pa.struct(list(schema)) if schema is not None else pa.struct([])

    def _conform(self, rows: pa.Table) -> pa.Table:
        """Rows whose struct columns have the current type of each side (a
        side seen for the first time this epoch fills the other's nulls)."""
        for i, name in enumerate(ROWS):
            want = self._struct_type(i)
            if rows.schema.field(name).type != want:
                column = rows.column(name)
                fixed = [c if c.null_count < len(c) else pa.nulls(len(c), want) for c in column.chunks]
                rows = rows.set_column(rows.schema.get_field_index(name), name, pa.chunked_array(fixed, want))
        return rows


class WindowJoinLogic(_TwoSided):
    """State per key group: one row per kept event: its side, key, time, id,
    whether it has paired, and the event itself (a struct column per side)."""

    def __init__(self, op: WindowJoin, context: OperatorContext, restored: dict[int, pa.Table] | None):
        self.op, self.context = op, context
        self.store = GroupStore(restored, max_key_groups=context.max_key_groups)
        self.watermark = context.watermark
        self.next_id = 1 + max((int(pc.max(t.column(ID)).as_py()) for t in self.store.groups.values()), default=0)
        self.schemas = self._restored_schemas()
        self.due = self._restored_due()

    def _restored_due(self) -> dict[int, int]:
        """Per restored key group, when it next has something to drop."""
        return {kg: int(pc.min(t.column(TIME)).as_py()) + self.op.within for kg, t in self.store.groups.items()}

    def _late_before(self, side: int) -> int | None:
        """Events of ``side`` behind this are late."""
        return self.watermark

    def _new_rows(self, side: int, table: pa.Table | None) -> tuple[pa.Table | None, pa.Table | None]:
        """One side's events of the epoch as state rows, and its late events."""
        if table is None or table.num_rows == 0:
            return None, None
        key, time = self.op.keys[side], self.op.times[side]
        if key not in table.column_names or time not in table.column_names:
            which = "on" if key not in table.column_names else "the event time"
            raise missing_columns(self.context.step, "join", [key, time], table.column_names,
                                  f"fix {which} of the join's {('left', 'right')[side]} side")
        self.schemas[side] = table.schema
        table, t, late = split_late(table, time, self._late_before(side), self.context.step)
        n = table.num_rows
        if n == 0:
            return None, late
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        structs = [as_struct(table), None]
        if side == 1:
            structs.reverse()
        columns = {SIDE: pa.repeat(pa.scalar(side, pa.int8()), n), KEY: table.column(key).combine_chunks(),
                   TIME: pa.array(t, pa.int64()), ID: pa.array(ids), MATCHED: pa.repeat(pa.scalar(False), n)}
        for i, name in enumerate(ROWS):
            columns[name] = structs[i] if structs[i] is not None else pa.nulls(n, self._struct_type(i))
        return pa.table(columns), late


    def process_inputs(self, tables: list[pa.Table | None]) -> pa.Table | Outputs | None:
        self.first_new_id = self.next_id  # rows with an id from here on came this epoch
        new, late = zip(*(self._new_rows(side, table) for side, table in enumerate(tables)))
        new = [n for n in new if n is not None]
        lates = [t for t in late if t is not None]
        out = None
        if new:
            rows = pa.concat_tables(new, promote_options="permissive") if len(new) > 1 else new[0]
            rows = self._conform(rows)
            out = self._join(rows)
        side = {}
        if lates:
            side["late"] = pa.concat_tables(lates, promote_options="permissive") if len(lates) > 1 else lates[0]
        return Outputs(out, side) if side else out


    def _join(self, new: pa.Table) -> pa.Table | None:
        """Pairs of this epoch's events with each other and with kept ones;
        then the new events join the state, and paired rows are marked.

        The touched key groups are laid out one after the other (each its
        kept rows, then its new ones) without copying; pairs are found on
        the light columns (side, key, time, id), and only the paired rows'
        events are gathered. Each group's state is the old chunks plus the
        new: nothing kept is sorted or copied again (chunks are combined
        now and then, so a group never fragments)."""
        op, max_kg = self.op, self.context.max_key_groups
        parts = split_by_key_group(new, key_groups(new.column(KEY), max_kg))
        segments, pieces, start = {}, [], 0
        for kg, part in parts.items():
            old = self.store.scan(kg)
            group = [self._conform(t) for t in ((old, part) if old is not None else (part,))]
            pieces += group
            n = sum(t.num_rows for t in group)
            segments[kg] = (start, n)
            start += n
        both = pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces, promote_options="permissive")
        side = both.column(SIDE).to_numpy()
        t, ids = both.column(TIME).to_numpy(), both.column(ID).to_numpy()
        keys = both.column(KEY).combine_chunks()
        lefts, rights = np.flatnonzero(side == 0), np.flatnonzero(side == 1)
        li, ri = match(keys.take(pa.array(lefts)), keys.take(pa.array(rights)))
        left_rows, right_rows = lefts[li.to_numpy()], rights[ri.to_numpy()]
        keep = (np.abs(t[left_rows] - t[right_rows]) <= op.within) & (
            (ids[left_rows] >= self.first_new_id) | (ids[right_rows] >= self.first_new_id))  # old pairs: emitted
        left_rows, right_rows = left_rows[keep], right_rows[keep]
        out, matched = None, None
        if len(left_rows):
            left = rows_of(both.column(ROWS[0]).take(pa.array(left_rows)))
            right = rows_of(both.column(ROWS[1]).take(pa.array(right_rows)))
            out = side_by_side(left, right, [op.keys[1]] if op.keys[0] == op.keys[1] else [], op.suffix)
            if op.how != "inner":  # only outer joins need to know what never paired
                matched = both.column(MATCHED).to_numpy(zero_copy_only=False).copy()
                matched[left_rows] = True
                matched[right_rows] = True
        writes = {}
        for kg, (first, n) in segments.items():
            group = both.slice(first, n)
            if matched is not None:
                group = group.set_column(group.schema.get_field_index(MATCHED), MATCHED,
                                         pa.array(matched[first:first + n]))
            writes[kg] = group.combine_chunks() if group.column(0).num_chunks > 16 else group
        self.store.write(writes)
        self._due_by(new, KEY, TIME, plus=op.within)
        return out

    def on_epoch_end(self, epoch: int, watermark: int | None) -> pa.Table | None:
        if not self._take_watermark(watermark):
            return None
        op = self.op
        groups = {kg for kg, due in self.due.items() if due < watermark}
        gone, writes = [], {}
        for kg in sorted(groups):
            self.due.pop(kg, None)
            group = self.store.scan(kg)
            if group is None:
                continue
            expired = pc.less(pc.add(group.column(TIME), op.within), watermark)
            gone.append(self._conform(group.filter(expired)))
            writes[kg] = group.filter(pc.invert(expired))
            if writes[kg].num_rows:
                self.due[kg] = int(pc.min(writes[kg].column(TIME)).as_py()) + op.within
        self.store.write(writes)
        if not gone:
            return None
        gone = pa.concat_tables(gone, promote_options="permissive")
        out = []
        drop = [op.keys[1]] if op.keys[0] == op.keys[1] else []
        for side in (0, 1):
            if not op.keeps_unmatched(side):
                continue
            lonely = gone.filter(pc.and_(pc.equal(gone.column(SIDE), side), pc.invert(gone.column(MATCHED))))
            if lonely.num_rows == 0:
                continue
            rows = rows_of(lonely.sort_by([(TIME, "ascending"), (ID, "ascending")]).column(ROWS[side]))
            if side == 0:
                out.append(side_by_side(rows, _blank_like(self.schemas[1], rows.num_rows), drop, op.suffix))
            else:
                joined = side_by_side(_blank_like(self.schemas[0], rows.num_rows), rows, drop, op.suffix)
                if drop:  # the shared key comes from the right row
                    index = joined.schema.get_field_index(op.keys[0])
                    joined = joined.set_column(index, op.keys[0],
                                               rows.column(op.keys[1]).cast(joined.schema.field(index).type))
                out.append(joined)
        if not out:
            return None
        return out[0] if len(out) == 1 else pa.concat_tables(out, promote_options="permissive")


def _blank_like(schema: pa.Schema | None, n: int) -> pa.Table:
    schema = schema or pa.schema([])
    return pa.table({f.name: pa.nulls(n, f.type) for f in schema}, schema=schema)


# ------------------------------------------------------------- table-table
PK = "__pk"


class TableJoin(Operator):
    """``table.join(other, on=...)``: the inner join of two tables,
    maintained as both change, emitted as the changelog of the joined view.

    Each side's changelog is partitioned by its join column, and each task
    keeps, per join value, the rows of both sides that have it. For the
    join values an epoch's changes touch, the task joins the old rows and
    the new rows of both sides and emits the difference, each joined row
    named by the keys of its two rows: ``insert`` for a pair that enters the
    view, ``delete`` (with its last values) for one that leaves it (a row
    deleted, or its join value changed), ``update`` for a pair whose rows
    changed. Work per epoch follows the touched join values and their
    fan-out, not the tables' size. A side joined on a column other than its
    key must come as a retracting changelog (``to_table(key,
    updates="retract")``): an update that moves a row to another join value
    must take it out where it was.

    >>> op = TableJoin("author", "followee", "tweet", "follow")
    >>> logic = op.build(OperatorContext("j", 0, 1, 128), None)
    >>> tweets = pa.table({"tweet": [1], "author": ["ann"], "_op": ["insert"]})
    >>> follows = pa.table({"follow": ["bob>ann"], "follower": ["bob"], "followee": ["ann"], "_op": ["insert"]})
    >>> [(r["tweet"], r["follower"], r["_op"]) for r in logic.process_inputs([tweets, follows]).to_pylist()]
    [(1, 'bob', 'insert')]
    >>> unfollow = follows.set_column(3, "_op", pa.array(["delete"]))
    >>> [(r["tweet"], r["follower"], r["_op"]) for r in logic.process_inputs([None, unfollow]).to_pylist()]
    [(1, 'bob', 'delete')]
    """

    kind = "table_join"
    stateful = True
    state_key = None  # several rows per join value: changed key groups are written whole

    def __init__(self, left_on: str, right_on: str, left_key: str, right_key: str, suffix: str = "_right"):
        self.ons, self.keys, self.suffix = (left_on, right_on), (left_key, right_key), suffix

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        return TableJoinLogic(self, context, restored)

    def describe(self) -> dict:
        return {"kind": self.kind, "on": list(self.ons), "keys": list(self.keys)}


class TableJoinLogic(_TwoSided):
    """State per key group: one row per table row: its side, join value,
    key (as text) and the row itself (a struct column per side)."""

    def __init__(self, op: TableJoin, context: OperatorContext, restored: dict[int, pa.Table] | None):
        self.op, self.context = op, context
        self.store = GroupStore(restored, max_key_groups=context.max_key_groups)
        self.schemas = self._restored_schemas()
        self.key_type: pa.DataType | None = next((t.schema.field(KEY).type for t in self.store.groups.values()), None)

    def _changes(self, side: int, table: pa.Table | None) -> tuple[pa.Table | None, pa.Array | None, pa.Array | None]:
        """One side's epoch of changes as state rows (the last per row key),
        which of them are deletes, and every join value the changes name
        (a row's earlier changes in the epoch may have had another)."""
        if table is None or table.num_rows == 0:
            return None, None, None
        on, key = self.op.ons[side], self.op.keys[side]
        if on not in table.column_names:
            raise missing_columns(self.context.step, "join", [on], table.column_names,
                                  f"fix the join column of the {('left', 'right')[side]} table")
        last, deleted = changes_by_key(table, key, self.context.step)
        rows = without_meta(last)
        self.schemas[side] = rows.schema
        values = rows.column(on).combine_chunks()
        if self.key_type is None:
            self.key_type = values.type
        values = values.cast(self.key_type)
        named = table.column(on).combine_chunks().cast(self.key_type)
        n = rows.num_rows
        structs = [as_struct(rows), None]
        if side == 1:
            structs.reverse()
        columns = {SIDE: pa.repeat(pa.scalar(side, pa.int8()), n), KEY: values,
                   PK: pc.cast(rows.column(key), pa.string()).combine_chunks()}
        for i, name in enumerate(ROWS):
            columns[name] = structs[i] if structs[i] is not None else pa.nulls(n, self._struct_type(i))
        return pa.table(columns), deleted, named



    def process_inputs(self, tables: list[pa.Table | None]) -> pa.Table | None:
        changes = [self._changes(side, table) for side, table in enumerate(tables)]
        if all(c is None for c, _, _ in changes):
            return None
        max_kg = self.context.max_key_groups
        touched = pc.unique(pa.concat_arrays([named for _, _, named in changes if named is not None]))
        groups = set(pc.unique(key_groups(touched, max_kg)).to_pylist())
        state = self.store.read(groups)
        state = None if state is None else self._conform(state).combine_chunks()
        if state is not None:
            hit = pc.is_in(state.column(KEY), value_set=touched)
            old, rest = state.filter(hit), state.filter(pc.invert(hit))
        else:
            old = rest = None
        old_sides = [None if old is None else old.filter(pc.equal(old.column(SIDE), s)) for s in (0, 1)]
        new_sides, changed = [], []
        for side, (rows, deleted, _) in enumerate(changes):
            before = old_sides[side]
            if rows is None:
                new_sides.append(before)
                changed.append(pa.array([], pa.string()))
                continue
            rows = self._conform(rows)
            pks = rows.column(PK).combine_chunks()
            kept = None if before is None else self._conform(before.filter(pc.invert(pc.is_in(before.column(PK),
                                                                                              value_set=pks))))
            live = rows.filter(pc.invert(deleted))
            parts = [t for t in (kept, live) if t is not None and t.num_rows]
            new_sides.append(pa.concat_tables(parts).combine_chunks() if parts else None)
            changed.append(live.column(PK).combine_chunks())
        old_sides = [None if t is None else self._conform(t) for t in old_sides]
        parts = [self._conform(t) for t in [rest] + new_sides if t is not None and t.num_rows]
        self.store.rewrite(groups, pa.concat_tables(parts).combine_chunks() if parts else None, KEY, max_kg)
        return self._difference(self._pairs(*old_sides), self._pairs(*new_sides), changed)

    def _pairs(self, left: pa.Table | None, right: pa.Table | None) -> pa.Table | None:
        if left is None or right is None or left.num_rows == 0 or right.num_rows == 0:
            return None
        li, ri = match(left.column(KEY).combine_chunks(), right.column(KEY).combine_chunks())
        if len(li) == 0:
            return None
        lpk, rpk = pc.take(left.column(PK), li), pc.take(right.column(PK), ri)
        return pa.table({"__pair": pc.binary_join_element_wise(lpk, rpk, "\x1f"), "__lpk": lpk, "__rpk": rpk,
                         ROWS[0]: pc.take(left.column(ROWS[0]), li), ROWS[1]: pc.take(right.column(ROWS[1]), ri)})

    def _difference(self, old: pa.Table | None, new: pa.Table | None, changed: list[pa.Array]) -> pa.Table | None:
        out = []
        old_ids = None if old is None else old.column("__pair").combine_chunks()
        new_ids = None if new is None else new.column("__pair").combine_chunks()
        if old is not None:
            gone = old if new_ids is None else old.filter(pc.invert(pc.is_in(old_ids, value_set=new_ids)))
            out.append((gone, DELETE))
        if new is not None:
            stayed = pa.repeat(pa.scalar(False), new.num_rows) if old_ids is None else pc.is_in(new_ids,
                                                                                              value_set=old_ids)
            out.append((new.filter(pc.invert(stayed)), INSERT))
            moved = pc.or_(pc.is_in(new.column("__lpk"), value_set=changed[0]),
                           pc.is_in(new.column("__rpk"), value_set=changed[1]))
            out.append((new.filter(pc.and_(stayed, moved)), UPDATE))
        tables = []
        drop = [self.op.ons[1]] if self.op.ons[0] == self.op.ons[1] else []
        for pairs, op_name in out:
            if pairs.num_rows == 0:
                continue
            joined = side_by_side(rows_of(pairs.column(ROWS[0])), rows_of(pairs.column(ROWS[1])), drop,
                                  self.op.suffix)
            tables.append(joined.append_column(OP, pa.repeat(pa.scalar(op_name), joined.num_rows)))
        if not tables:
            return None
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")


# ------------------------------------------------------- versioned lookups
class VersionedEnrich(Operator):
    """``stream.enrich(table, on=..., version=column)``: each event joined
    with the table's row *as it was at the event's time*: of the key's
    versions (each row valid from its ``version`` time until the key's next
    version; a delete's version ends the row), the latest that starts at or
    before the event.

    The answer does not depend on epochs: an event waits in state until the
    watermark (the lower of the stream's and the table's) passes its time,
    when every version that can apply to it has arrived, then is joined and
    emitted. A key keeps the versions the watermark has not passed and the
    newest one it has, so state is bounded by the out-of-orderness. Events
    behind the watermark when they arrive go to ``late()``.

    >>> from datetime import datetime, timezone
    >>> t = lambda s: datetime(2026, 1, 1, 0, 0, s, tzinfo=timezone.utc)
    >>> op = VersionedEnrich("sku", "sku", "since", "ts")
    >>> logic = op.build(OperatorContext("v", 0, 1, 128), None)
    >>> prices = pa.table({"sku": [1, 1], "price": [10, 12], "since": [t(0), t(30)]})
    >>> logic.process_inputs([pa.table({"sku": [1, 1], "ts": [t(20), t(40)]}), prices])
    >>> [(r["ts"].second, r["price"]) for r in logic.on_epoch_end(1, 2**62).to_pylist()]
    [(20, 10), (40, 12)]
    """

    kind = "versioned_enrich"
    stateful = True
    state_key = None

    def __init__(self, on: str, table_key: str, version: str, time_column: str, how: str = "left",
                 suffix: str = "_right"):
        _check_how(how, ("inner", "left"), "enrich")
        self.on, self.table_key, self.version, self.time_column = on, table_key, version, time_column
        self.how, self.suffix = how, suffix
        self.keys, self.times = (on, table_key), (time_column, version)

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        return VersionedEnrichLogic(self, context, restored)

    def describe(self) -> dict:
        return {"kind": self.kind, "on": self.on, "table_key": self.table_key, "version": self.version,
                "how": self.how}


GONE = "__gone"


class VersionedEnrichLogic(WindowJoinLogic):
    """State per key group, as the window join keeps it: waiting events
    (side 0) and versions (side 1, ``__gone`` for a delete's), with their
    key, time and arrival number."""

    def _restored_due(self) -> dict[int, int]:
        """Per restored key group, the earliest waiting event (and its versions are pruned then)."""
        due = {}
        for kg, table in self.store.groups.items():
            waiting = table.filter(pc.equal(table.column(SIDE), 0))
            if waiting.num_rows:
                due[kg] = int(pc.min(waiting.column(TIME)).as_py())
        return due

    def _late_before(self, side: int) -> int | None:
        # A version behind the watermark is kept: it may still be the newest one an event can see.
        return self.watermark if side == 0 else None

    def _new_rows(self, side: int, table: pa.Table | None):
        if side == 1 and table is not None and table.num_rows:
            op = self.op
            if op.version in table.column_names and table.column(op.version).null_count:
                raise FlowValidationError(self.context.step, "enrich",
                                          f"a table change has no {op.version!r}: each change (deletes too) must "
                                          f"say from when it holds; fill it in map_batches before to_table")
            gone = pc.equal(ops_of(table, self.context.step), DELETE)
            table = without_meta(table).append_column(GONE, gone)
        return super()._new_rows(side, table)

    def process_inputs(self, tables: list[pa.Table | None]) -> Outputs | None:
        self.first_new_id = self.next_id
        new, late = zip(*(self._new_rows(side, table) for side, table in enumerate(tables)))
        new = [n for n in new if n is not None]
        if new:
            rows = self._conform(pa.concat_tables(new, promote_options="permissive") if len(new) > 1 else new[0])
            max_kg = self.context.max_key_groups
            groups = set(pc.unique(key_groups(rows.column(KEY), max_kg)).to_pylist())
            old = self.store.read(groups)
            both = rows if old is None else pa.concat_tables([self._conform(old), rows], promote_options="permissive")
            self.store.rewrite(groups, self._conform(both).combine_chunks(), KEY, max_kg)
            waiting = rows.filter(pc.equal(rows.column(SIDE), 0))
            self._due_by(waiting, KEY, TIME)
            for kg in groups:  # new versions: prune there at the next watermark
                self.due.setdefault(kg, -2**62)
        lates = [t for t in late if t is not None]
        if lates:
            return Outputs(None, {"late": pa.concat_tables(lates, promote_options="permissive")})
        return None

    def on_epoch_end(self, epoch: int, watermark: int | None) -> pa.Table | None:
        if not self._take_watermark(watermark):
            return None
        max_kg = self.context.max_key_groups
        groups = {kg for kg, due in self.due.items() if due <= watermark}
        for kg in groups:
            self.due.pop(kg, None)
        state = self.store.read(groups) if groups else None
        if state is None:
            return None
        state = self._conform(state).combine_chunks()
        is_event = pc.equal(state.column(SIDE), 0)
        ready = pc.and_(is_event, pc.less_equal(state.column(TIME), watermark))
        events, versions = state.filter(ready), state.filter(pc.invert(is_event))
        out = self._lookup(events, versions) if events.num_rows else None
        # Keep: waiting events not yet passed; versions the watermark has not passed, and per key the newest it has.
        passed = pc.and_(pc.invert(is_event), pc.less_equal(state.column(TIME), watermark))
        newest = _newest_per_key(state.filter(passed))
        keep = pc.or_(pc.and_(is_event, pc.invert(ready)),
                      pc.or_(pc.and_(pc.invert(is_event), pc.invert(passed)), pc.is_in(state.column(ID), value_set=newest)))
        kept = state.filter(keep)
        self.store.rewrite(groups, kept, KEY, max_kg)
        waiting = kept.filter(pc.equal(kept.column(SIDE), 0))
        self._due_by(waiting, KEY, TIME)
        pending_versions = kept.filter(pc.and_(pc.equal(kept.column(SIDE), 1), pc.greater(kept.column(TIME), watermark)))
        self._due_by(pending_versions, KEY, TIME)
        return out

    def _lookup(self, events: pa.Table, versions: pa.Table) -> pa.Table | None:
        op = self.op
        events = events.sort_by([(TIME, "ascending"), (ID, "ascending")])
        ei, vi = match(events.column(KEY).combine_chunks(), versions.column(KEY).combine_chunks(), "left")
        vt = pc.take(versions.column(TIME), vi)
        applies = pc.fill_null(pc.less_equal(vt, pc.take(events.column(TIME), ei)), False)
        pairs = pa.table({"e": ei, "t": vt, "id": pc.take(versions.column(ID), vi), "v": vi}).filter(applies)
        # Per event, the version with the latest start (the later arrival on a tie).
        best = pairs.sort_by([("e", "ascending"), ("t", "descending"), ("id", "descending")])
        e = best.column("e").to_numpy()
        head = np.ones(len(e), dtype=bool)
        head[1:] = e[1:] != e[:-1]
        best = best.filter(pa.array(head))
        at = np.full(events.num_rows, -1, dtype=np.int64)
        at[best.column("e").to_numpy()] = best.column("v").to_numpy()
        rows = rows_of(events.column(ROWS[0]))
        found = pa.array(at, mask=at < 0)
        table_rows = rows_of(versions.column(ROWS[1])).take(found) if versions.num_rows else None
        if table_rows is None:
            matched = np.zeros(events.num_rows, dtype=bool)
        else:
            matched = ~np.asarray(pc.fill_null(table_rows.column(GONE), True))
            table_rows = table_rows.drop_columns([GONE])
        if op.how == "inner":
            rows = rows.filter(pa.array(matched))
            table_rows = None if table_rows is None else table_rows.filter(pa.array(matched))
        if rows.num_rows == 0:
            return None
        if table_rows is None:
            return rows
        gone_mask = pa.array(~matched[matched] if op.how == "inner" else ~matched)
        blank = {name: pc.if_else(gone_mask, pa.scalar(None, table_rows.column(name).type), table_rows.column(name))
                 for name in table_rows.column_names}
        table_rows = pa.table(blank)
        return side_by_side(rows, table_rows, [op.table_key], op.suffix)


def _newest_per_key(versions: pa.Table) -> pa.Array:
    """The ids of each key's newest version (latest time, then latest arrival)."""
    if versions.num_rows == 0:
        return pa.array([], pa.int64())
    ordered = versions.select([KEY, TIME, ID]).sort_by([(KEY, "ascending"), (TIME, "descending"), (ID, "descending")])
    keys = ordered.column(KEY).combine_chunks()
    head = np.ones(len(keys), dtype=bool)
    if len(keys) > 1:
        head[1:] = np.asarray(pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)).fill_null(True))
    return ordered.column(ID).filter(pa.array(head)).combine_chunks()
