"""The operator contract: config builds logic.

An :class:`Operator` is the picklable part (functions, column names, options)
that travels to a worker. There ``build(restored)`` makes the
:class:`OperatorLogic` holding live state, from the state restored from the
latest checkpoint: ``{key_group: pyarrow.Table}`` for the key groups the
subtask owns (or ``None``). Keyed state lives in a
:class:`~sluiceway.operators.store.KeyedStore`; ``snapshot_changes()``
returns what changed since the last checkpoint, as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from sluiceway.operators.state import StateChanges, earliest_per_group
from sluiceway.operators.store import DEFAULT_BUDGET_BYTES


@dataclass(frozen=True)
class OperatorContext:
    """Where a logic instance runs. ``watermark``: the event-time watermark
    (microseconds since the Unix epoch) in force when it was built, restored
    from the checkpoint; ``None`` before any."""

    step: str
    subtask: int
    parallelism: int
    max_key_groups: int
    watermark: int | None = None
    state_budget_bytes: int = DEFAULT_BUDGET_BYTES  # state kept in memory; the rest on local disk


@dataclass
class Outputs:
    """What one call of an operator emits: rows on its main stream and on
    named side streams (``late``: events that came after their window closed)."""

    main: pa.Table | None
    side: dict[str, pa.Table] = field(default_factory=dict)


class OperatorLogic:
    """Live state of one operator in one task."""

    def process(self, table: pa.Table) -> pa.Table | Outputs | None:
        """Transform one epoch's input. Return ``None`` or an empty table for
        nothing, :class:`Outputs` to emit on side streams too."""
        raise NotImplementedError

    def process_inputs(self, tables: list[pa.Table | None]) -> pa.Table | Outputs | None:
        """An operator with two inputs (a join): one epoch's rows of each, in
        input order (``None``: none this epoch), in one call, so what it
        emits never depends on the order in which the inputs' rows came."""
        raise NotImplementedError

    def on_epoch_end(self, epoch: int, watermark: int | None) -> pa.Table | Outputs | None:
        """Called once per epoch after ``process`` with the epoch's watermark
        (microseconds since the Unix epoch, ``None`` while unknown); window
        operators fire here."""
        return None

    def snapshot(self) -> dict[int, pa.Table] | None:
        """All state as ``{key_group: table}``, or ``None`` for a stateless operator."""
        return None

    def snapshot_changes(self, whole: bool = False) -> StateChanges | None:
        """What changed since the last call (what an incremental checkpoint
        writes; ``whole``: all of it, for a savepoint), or ``None`` for a
        stateless operator."""
        return None

    def state_written(self, path: str, batches: dict, compacted: bool = False) -> None:
        """The last :meth:`snapshot_changes` went to ``path`` (``compacted``:
        its compacted part), key group ``kg`` as batch ``batches[kg]``."""

    def state_chains(self) -> dict[int, list]:
        """Per key group, the ``[file, batch]`` references that rebuild its state."""
        return {}

    def state_memory(self) -> dict:
        """Bytes of state in memory and mapped from local disk."""
        return {"resident_bytes": 0, "mapped_bytes": 0}


class KeyedLogic(OperatorLogic):
    """Live state of an operator that keeps it in one
    :class:`~sluiceway.operators.store.KeyedStore` (``self.store``):
    checkpoints take it from there."""

    store = None  # a KeyedStore or a GroupStore, set by the subclass
    watermark: int | None = None  # the watermark in force (operators that expire state by it)

    def _due_by(self, rows: pa.Table, key_column: str, time_column: str, plus: int = 0) -> None:
        """Bring each key group's next work (``self.due``: key group -> time)
        forward to the earliest ``time_column`` of its ``rows``, plus ``plus``."""
        for kg, first in earliest_per_group(rows, key_column, time_column, self.context.max_key_groups).items():
            self.due[kg] = min(self.due.get(kg, 2**63 - 1), first + plus)

    def _take_watermark(self, watermark: int | None) -> bool:
        """Take an epoch's watermark if it is known and past the one in
        force; False when there is nothing new to expire or fire."""
        if watermark is None or (self.watermark is not None and watermark <= self.watermark):
            return False
        self.watermark = watermark
        return True

    def snapshot(self) -> dict[int, pa.Table]:
        return self.store.full()

    def snapshot_changes(self, whole: bool = False) -> StateChanges:
        return self.store.take_changes(whole)

    def state_written(self, path: str, batches: dict, compacted: bool = False) -> None:
        self.store.written(path, batches, compacted)

    def state_chains(self) -> dict[int, list]:
        return self.store.chains()

    def state_memory(self) -> dict:
        """Bytes of state in memory and mapped from local disk (for the history and status)."""
        return self.store.memory()

    def state_rows(self) -> int:
        """Rows of state this task holds (for tests and metrics)."""
        return len(self.store)


class Operator:
    """Picklable operator configuration."""

    kind: str = "operator"
    stateful: bool = False
    state_key: str | None = None  # the column identifying a state row: checkpoints can then write deltas

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-friendly description for job.json (no functions)."""
        return {"kind": self.kind}
