"""Keyed state held per key group: the core that aggregates, windows, joins
and CEP keep their state in.

An epoch reads and writes only the key groups its input touches, so the
work of an epoch follows the epoch's rows and the state of those groups,
not the whole state. The store remembers which groups changed since the
last checkpoint, so a checkpoint writes only those (incremental
checkpoints), and records what each epoch touched, so tests can assert it.

>>> import pyarrow as pa
>>> store = KeyGroupStore()
>>> store.write({7: pa.table({"k": ["a"], "n": [1]})})
>>> store.read({7, 9}).to_pylist(), sorted(store.reads), sorted(store.writes)
([{'k': 'a', 'n': 1}], [7, 9], [7])
>>> changes = store.take_changes()
>>> sorted(changes.changed), changes.removed, store.take_changes().changed
([7], set(), {})
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class StateChanges:
    """What changed since the last checkpoint: new contents of key groups,
    and key groups that became empty."""

    changed: dict[int, pa.Table] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)


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


class KeyGroupStore:
    """Tables of state, one per key group, for one operator in one subtask."""

    def __init__(self, restored: dict[int, pa.Table] | None = None):
        self.groups: dict[int, pa.Table] = {kg: t for kg, t in (restored or {}).items() if t.num_rows}
        self._dirty: set[int] = set()
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

    def write(self, tables: dict[int, pa.Table]) -> None:
        """Replace the state of each given key group; an empty table clears it."""
        for kg, table in tables.items():
            self.writes.add(kg)
            self._dirty.add(kg)
            if table.num_rows:
                self.groups[kg] = table
            else:
                self.groups.pop(kg, None)

    def full(self) -> dict[int, pa.Table]:
        return dict(self.groups)

    def take_changes(self) -> StateChanges:
        """Key groups changed since the last call: what a checkpoint writes."""
        changes = StateChanges()
        for kg in sorted(self._dirty):
            if kg in self.groups:
                changes.changed[kg] = self.groups[kg]
            else:
                changes.removed.add(kg)
        self._dirty = set()
        return changes
