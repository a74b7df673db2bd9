"""Keyed state held per key group: the core that aggregates, windows, joins
and CEP keep their state in.

An epoch reads and writes only the key groups its input touches, so the
work of an epoch follows the epoch's rows and the state of those groups,
not the whole state. The store remembers which keys changed since the last
checkpoint, so a checkpoint can write just those rows (a *delta*) instead
of whole key groups, and records what each epoch touched, so tests can
assert it.

State rows are identified by one key column (``key``). A delta holds the
current rows of the keys that changed, plus a tombstone (``__deleted``) for
each changed key that is gone; :func:`apply_chain` rebuilds a key group from
a full base and the deltas written after it.

>>> import pyarrow as pa
>>> store = KeyGroupStore(key="k")
>>> store.write({7: pa.table({"k": ["a", "b"], "n": [1, 2]})})
>>> store.read({7, 9}).num_rows, sorted(store.reads), sorted(store.writes)
(2, [7, 9], [7])
>>> _ = store.take_changes()
>>> store.write({7: pa.table({"k": ["a", "b"], "n": [1, 3]})}, changed={7: pa.array(["b"])})
>>> store.take_changes().delta[7].to_pylist()
[{'k': 'b', 'n': 3}]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc


DELETED_COLUMN = "__deleted"


@dataclass
class StateChanges:
    """What changed since the last checkpoint, per key group: the group's
    full contents, its delta (the rows of the keys that changed, with
    tombstones; ``None`` when every row may have changed), and the key
    groups that became empty."""

    full: dict[int, pa.Table] = field(default_factory=dict)
    delta: dict[int, pa.Table | None] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)


def apply_chain(tables: list[pa.Table], key: str | None) -> pa.Table:
    """A key group's state from its full base and the deltas after it, in
    order: each delta's rows replace the rows with the same key, and its
    tombstones delete them.

    >>> base = pa.table({"k": [1, 2, 3], "n": [10, 20, 30]})
    >>> delta = pa.table({"k": [2, 4, 3], "n": [21, 40, None], "__deleted": [False, False, True]})
    >>> apply_chain([base, delta], "k").sort_by("k").to_pylist()
    [{'k': 1, 'n': 10}, {'k': 2, 'n': 21}, {'k': 4, 'n': 40}]
    """
    result = _live_rows(tables[0])
    for delta in tables[1:]:
        replaced = pc.is_in(result.column(key), value_set=delta.column(key).combine_chunks())
        result = pa.concat_tables(
            [result.filter(pc.invert(replaced)), _live_rows(delta).select(result.column_names)],
            promote_options="permissive",
        )
    return result


def _live_rows(table: pa.Table) -> pa.Table:
    if DELETED_COLUMN not in table.column_names:
        return table
    deleted = pc.fill_null(table.column(DELETED_COLUMN), False)
    return table.filter(pc.invert(deleted)).drop_columns([DELETED_COLUMN])


def _empty(table: pa.Table | None) -> pa.Table:
    return pa.table({}) if table is None else table.slice(0, 0)


def split_by_key_group(table: pa.Table, key_groups: pa.Array) -> dict[int, pa.Table]:
    """Rows of ``table`` per key group (``key_groups`` has one int32 per row),
    with one sort and one slice per group: no per-row Python.

    >>> t = pa.table({"k": ["a", "b", "c"]})
    >>> {kg: part.column("k").to_pylist() for kg, part in split_by_key_group(t, pa.array([5, 2, 5], pa.int32())).items()}
    {2: ['b'], 5: ['a', 'c']}
    """
    if table.num_rows == 0:
        return {}
    order = pc.sort_indices(key_groups)
    table, sorted_groups = table.take(order), pc.take(key_groups, order)
    runs = pc.run_end_encode(sorted_groups)
    out, start = {}, 0
    for kg, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist()):
        out[int(kg)] = table.slice(start, end - start)
        start = end
    return out


def as_struct(table: pa.Table) -> pa.StructArray:
    """Each row of ``table`` as one struct value: how state of two kinds of
    rows (a join's two sides, any event) keeps a row of any schema in one column.

    >>> rows_of(as_struct(pa.table({"a": [1], "b": ["x"]}))).to_pylist()
    [{'a': 1, 'b': 'x'}]
    """
    table = table.combine_chunks()
    return pa.StructArray.from_arrays([c.chunk(0) if c.num_chunks else pa.array([], c.type) for c in table.columns],
                                      names=table.column_names)


def rows_of(column) -> pa.Table:
    """The rows kept by :func:`as_struct`, as a table again."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pa.Table.from_struct_array(array)


def earliest_per_group(table: pa.Table, key_column: str, time_column: str, max_key_groups: int) -> dict[int, int]:
    """The smallest ``time_column`` value in each key group of ``table``'s
    rows (by ``key_column``): when each group next has something to do.

    >>> earliest_per_group(pa.table({"k": ["a", "b", "a"], "t": [5, 3, 2]}), "k", "t", 128)
    {67: 2, 121: 3}
    """
    from sluiceway.operators.keys import key_groups

    if table.num_rows == 0:
        return {}
    groups = key_groups(table.column(key_column), max_key_groups)
    firsts = pa.table({"kg": groups, "t": table.column(time_column)}).group_by("kg", use_threads=False) \
        .aggregate([("t", "min")]).sort_by("kg")
    return dict(zip(firsts.column("kg").to_pylist(), firsts.column("t_min").to_pylist()))


class KeyGroupStore:
    """Tables of state, one per key group, for one operator in one subtask.
    ``key`` names the column that identifies a state row (``None``: no
    deltas, a checkpoint writes changed key groups whole)."""

    def __init__(self, restored: dict[int, pa.Table] | None = None, key: str | None = None):
        self.key = key
        self.groups: dict[int, pa.Table] = {kg: t for kg, t in (restored or {}).items() if t.num_rows}
        self._dirty: set[int] = set()
        self._changed_keys: dict[int, list[pa.Array] | None] = {}
        self.reads: set[int] = set()  # key groups read since reset_touched()
        self.writes: set[int] = set()  # key groups written since reset_touched()

    def __len__(self) -> int:
        return sum(t.num_rows for t in self.groups.values())

    def reset_touched(self) -> None:
        self.reads, self.writes = set(), set()

    def read(self, key_groups) -> pa.Table | None:
        """The state of ``key_groups`` as one table (``None`` if all are empty)."""
        self.reads.update(key_groups)
        parts = [self.groups[kg] for kg in sorted(key_groups) if kg in self.groups]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")

    def write(self, tables: dict[int, pa.Table], changed: dict[int, pa.Array] | None = None) -> None:
        """Replace the state of each given key group (an empty table clears
        it). ``changed`` names, per key group, the keys whose rows changed;
        without it every row of the group counts as changed."""
        for kg, table in tables.items():
            self.writes.add(kg)
            self._dirty.add(kg)
            keys = (changed or {}).get(kg)
            so_far = self._changed_keys.get(kg, [])
            self._changed_keys[kg] = None if keys is None or so_far is None or self.key is None else so_far + [keys]
            if table.num_rows:
                self.groups[kg] = table
            else:
                self.groups.pop(kg, None)

    def rewrite(self, groups, table: pa.Table | None, key_column: str, max_key_groups: int,
                changed: pa.Array | None = None) -> None:
        """Replace the state of ``groups`` with ``table``'s rows, split by the
        key group of ``key_column`` (one sort for all of them); a group with
        no rows left is cleared. ``changed``: the keys whose rows changed
        (``None``: every row of the groups counts as changed).

        >>> store = KeyGroupStore(key="k")
        >>> store.rewrite({67, 121}, pa.table({"k": ["a", "b"]}), "k", 128)
        >>> sorted(store.groups), len(store)
        ([67, 121], 2)
        """
        from sluiceway.operators.keys import key_groups

        parts = {} if table is None or table.num_rows == 0 else split_by_key_group(
            table, key_groups(table.column(key_column), max_key_groups))
        writes = {kg: parts.get(kg, _empty(table)) for kg in groups}
        writes.update({kg: part for kg, part in parts.items() if kg not in writes})
        if changed is None:
            self.write(writes)
            return
        changed_parts = split_by_key_group(pa.table({"k": changed}), key_groups(changed, max_key_groups)) \
            if len(changed) else {}
        self.write(writes, {kg: changed_parts[kg].column("k").combine_chunks() if kg in changed_parts
                            else pa.array([], changed.type) for kg in writes})

    def full(self) -> dict[int, pa.Table]:
        return dict(self.groups)

    def take_changes(self) -> StateChanges:
        """Key groups changed since the last call: what a checkpoint writes."""
        changes = StateChanges()
        for kg in sorted(self._dirty):
            if kg not in self.groups:
                changes.removed.add(kg)
                continue
            table = changes.full[kg] = self.groups[kg]
            keys = self._changed_keys.get(kg)
            changes.delta[kg] = None if keys is None else self._delta(table, keys)
        self._dirty, self._changed_keys = set(), {}
        return changes

    def _delta(self, table: pa.Table, keys: list[pa.Array]) -> pa.Table:
        changed = pc.unique(pa.chunked_array(keys).combine_chunks())
        rows = table.filter(pc.is_in(table.column(self.key), value_set=changed))
        gone = pc.filter(changed, pc.invert(pc.is_in(changed, value_set=rows.column(self.key).combine_chunks())))
        if len(gone) == 0:
            return rows
        tombstones = pa.table({self.key: gone, DELETED_COLUMN: pa.repeat(True, len(gone))})
        live = rows.append_column(DELETED_COLUMN, pa.repeat(pa.scalar(False), rows.num_rows))
        return pa.concat_tables([live, tombstones], promote_options="permissive")
