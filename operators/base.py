"""The operator contract: config builds logic.

An :class:`Operator` is the picklable part (functions, column names, options)
that travels to a worker. There ``build(restored)`` makes the
:class:`OperatorLogic` holding live state, from the snapshot restored from the
latest checkpoint (or ``None``). ``snapshot()`` returns data: a
``pyarrow.Table`` with a ``__key_group`` column for keyed state, never a live
object.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class OperatorContext:
    """Where a logic instance runs."""

    step: str
    subtask: int
    parallelism: int
    max_key_groups: int


class OperatorLogic:
    """Live state of one operator in one task."""

    def process(self, table: pa.Table) -> pa.Table | None:
        """Transform one epoch's input. Return ``None`` or an empty table for nothing."""
        raise NotImplementedError

    def on_epoch_end(self, epoch: int, watermark: float | None) -> pa.Table | None:
        """Called once per epoch after ``process``; window operators fire here."""
        return None

    def snapshot(self) -> pa.Table | None:
        """State as data, or ``None`` for a stateless operator."""
        return None


class Operator:
    """Picklable operator configuration."""

    kind: str = "operator"
    stateful: bool = False

    def build(self, context: OperatorContext, restored: pa.Table | None) -> OperatorLogic:
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-friendly description for job.json (no functions)."""
        return {"kind": self.kind}
