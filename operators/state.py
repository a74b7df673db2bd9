"""Pieces of keyed state shared by the store and the operators: key groups,
deltas and the rows kept as structs.

State rows are identified by one key column (``key``). A delta holds the
current rows of the keys that changed, plus a tombstone (``__deleted``) for
each changed key that is gone; :func:`apply_chain` rebuilds a key group from
a full base and the deltas written after it. The store itself is
:class:`sluiceway.operators.store.KeyedStore`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc


DELETED_COLUMN = "__deleted"


@dataclass
class StateChanges:
    """What a checkpoint writes for one step in one task: one table per key
    group (a store's new run, or a key group whole), one per key group whose
    oldest run compaction rewrote (``compacted``: a file of its own), and the
    key groups whose state is gone. The store is told where they went
    (``written``) and then names every key group's chain (``chains``)."""

    runs: dict[int, pa.Table] = field(default_factory=dict)
    compacted: dict[int, pa.Table] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)


@dataclass
class RestoredState:
    """State to restore lazily: per key group the chain of ``[file, batch]``
    references the manifest names (oldest first), and a function that fetches
    one reference as a table (checked against the manifest's size and sha256
    by whoever provides it)."""

    chains: dict[int, list]
    load: Callable[[list], pa.Table]
    fetched: list = field(default_factory=list)  # references fetched so far, for tests and status


def apply_chain(tables: list[pa.Table], key: str | None) -> pa.Table:
    """A key group's state from its full base and the deltas after it, in
    order: each delta's rows replace the rows with the same key, and its
    tombstones delete them.

    >>> base = pa.table({"k": [1, 2, 3], "n": [10, 20, 30]})
    >>> delta = pa.table({"k": [2, 4, 3], "n": [21, 40, None], "__deleted": [False, False, True]})
    >>> apply_chain([base, delta], "k").sort_by("k").to_pylist()
    [{'k': 1, 'n': 10}, {'k': 2, 'n': 21}, {'k': 4, 'n': 40}]
    """
    result = live_rows(tables[0])
    for delta in tables[1:]:
        replaced = pc.is_in(result.column(key), value_set=delta.column(key).combine_chunks())
        result = pa.concat_tables(
            [result.filter(pc.invert(replaced)), live_rows(delta).select(result.column_names)],
            promote_options="permissive",
        )
    return result


def live_rows(table: pa.Table) -> pa.Table:
    """``table`` without its tombstones (and without the ``__deleted`` column)."""
    if DELETED_COLUMN not in table.column_names:
        return table
    deleted = pc.fill_null(table.column(DELETED_COLUMN), False)
    return table.filter(pc.invert(deleted)).drop_columns([DELETED_COLUMN])


def concat(tables: list) -> pa.Table | None:
    """The non-empty ``tables`` as one (``None`` if there are none), columns a table lacks as nulls."""
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")


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


class GroupStore:
    """State kept and replaced a key group at a time, for operators whose
    rows have no key of their own (joins, CEP, search): a checkpoint writes
    each changed key group whole. A restored group is fetched the first time
    it is read.

    >>> store = GroupStore()
    >>> store.write({7: pa.table({"k": ["a", "b"]})})
    >>> store.read({7, 9}).num_rows, sorted(store.reads), sorted(store.writes)
    (2, [7, 9], [7])
    >>> list(store.take_changes().runs)
    [7]
    """

    def __init__(self, restored: RestoredState | dict[int, pa.Table] | None = None, max_key_groups: int = 128):
        self.max_key_groups = max_key_groups
        self._groups: dict[int, pa.Table] = {}
        self._restored = restored if isinstance(restored, RestoredState) else None
        self._pending: dict[int, list] = {}
        self._chains: dict[int, list] = {}
        self._dirty: set[int] = set()
        if self._restored is not None:
            self._pending = {int(kg): list(chain) for kg, chain in self._restored.chains.items() if chain}
            self._chains = dict(self._pending)
        elif restored:
            self._groups = {kg: t for kg, t in restored.items() if t.num_rows}
            self._dirty = set(self._groups)  # not in any file yet
        self.reads: set[int] = set()
        self.writes: set[int] = set()

    def reset_touched(self) -> None:
        self.reads, self.writes = set(), set()

    def _fetch(self, kg: int) -> None:
        chain = self._pending.pop(kg, None)
        if chain is None:
            return
        parts = [self._restored.load(ref) for ref in chain]
        self._restored.fetched.extend(chain)
        table = apply_chain(parts, None) if len(parts) > 1 else parts[0]
        if table.num_rows:
            self._groups[kg] = table

    def scan(self, kg: int) -> pa.Table | None:
        """Key group ``kg``'s state (``None`` if it has none)."""
        self.reads.add(kg)
        self._fetch(kg)
        return self._groups.get(kg)

    def read(self, key_groups) -> pa.Table | None:
        """The state of ``key_groups`` as one table (``None`` if all are empty)."""
        parts = [t for t in (self.scan(kg) for kg in sorted(key_groups)) if t is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")

    def write(self, tables: dict[int, pa.Table]) -> None:
        """Replace the state of each given key group (an empty table clears it)."""
        for kg, table in tables.items():
            self._pending.pop(kg, None)
            self.writes.add(kg)
            self._dirty.add(kg)
            if table.num_rows:
                self._groups[kg] = table
            else:
                self._groups.pop(kg, None)

    def rewrite(self, groups, table: pa.Table | None, key_column: str, max_key_groups: int) -> None:
        """Replace the state of ``groups`` with ``table``'s rows, split by the
        key group of ``key_column`` (one sort for all of them); a group with
        no rows left is cleared."""
        from sluiceway.operators.keys import key_groups

        parts = {} if table is None or table.num_rows == 0 else split_by_key_group(
            table, key_groups(table.column(key_column), max_key_groups))
        empty = pa.table({}) if table is None else table.slice(0, 0)
        writes = {kg: parts.get(kg, empty) for kg in groups}
        writes.update({kg: part for kg, part in parts.items() if kg not in writes})
        self.write(writes)

    def key_groups(self) -> list[int]:
        return sorted(set(self._groups) | set(self._pending))

    @property
    def groups(self) -> dict[int, pa.Table]:
        """Every key group's state (fetches what a restore has not yet)."""
        for kg in list(self._pending):
            self._fetch(kg)
        return self._groups

    def full(self) -> dict[int, pa.Table]:
        return dict(self.groups)

    def __len__(self) -> int:
        return sum(t.num_rows for t in self.groups.values())

    def take_changes(self, whole: bool = False) -> StateChanges:
        """The key groups changed since the last call, whole (``whole``: every one)."""
        groups = self.key_groups() if whole else sorted(self._dirty)
        changes = StateChanges()
        for kg in groups:
            table = self.scan(kg)
            if table is None:
                if self._chains.pop(kg, None) is not None:
                    changes.removed.add(kg)
            else:
                changes.runs[kg] = table
        self._dirty = set()
        return changes

    def memory(self) -> dict:
        """Bytes of state held in memory (all of it: a group store maps nothing)."""
        return {"resident_bytes": sum(t.nbytes for t in self._groups.values()), "mapped_bytes": 0}

    def written(self, path: str, batches: dict, compacted: bool = False) -> None:
        for kg, batch in batches.items():
            self._chains[int(kg)] = [[path, batch]]

    def chains(self) -> dict[int, list]:
        return dict(self._chains)
