"""Event time and watermarks.

A stream declares which column says when each event happened
(``stream.with_event_time(column, max_out_of_orderness=...)``), or asks for
ingestion time (``stream.with_ingestion_time()``: the time the coordinator
planned the epoch, which the offsets log keeps, so a replay stamps the same
time). Both are steps chained to a source, in the source's tasks.

Watermarks are integers: microseconds since the Unix epoch (UTC). A
watermark ``W`` says "no event older than ``W`` is expected any more":

- each source partition's watermark is the largest event time read from it
  minus the allowed out-of-orderness; ``None`` (unknown) until it has data;
- a partition that has had nothing to read for ``idle_timeout`` (measured
  between planned epochs, from the times the offsets log records) is idle
  and does not hold the watermark back; a bounded partition read to its end
  counts as infinitely late (:data:`MAX_WATERMARK`), so the last windows fire;
- a source task's watermark is the minimum over its partitions that are
  neither idle nor ended, and never goes back; when all of them are idle the
  task says so on its barriers and downstream tasks leave it out of their
  minimum.

Rows whose event time is null cannot be placed in time: windows send them to
their ``late()`` stream.

>>> import pyarrow as pa
>>> from datetime import datetime, timedelta, timezone
>>> op = EventTime("ts", max_out_of_orderness=timedelta(seconds=2))
>>> logic = op.build(None, None)
>>> t = lambda s: datetime(2026, 1, 1, 0, 0, s, tzinfo=timezone.utc)
>>> logic.partition = 0
>>> _ = logic.process(pa.table({"ts": [t(5), t(9), t(7)]}))
>>> epoch = SourceEpoch(planned_at=100.0, active_at={0: 100.0}, ended=frozenset())
>>> wm, idle = logic.advance(epoch, [0])
>>> format_watermark(wm), idle
('2026-01-01T00:00:07+00:00', False)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.base import Operator, OperatorContext, OperatorLogic
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError, missing_columns

MAX_WATERMARK = 2**63 - 1
"""The watermark of a source read to its end: every window may fire."""

DEFAULT_IDLE_TIMEOUT = timedelta(seconds=30)
TIMESTAMP = pa.timestamp("us", tz="UTC")
_US = timedelta(microseconds=1)


def micros(duration: timedelta, what: str) -> int:
    """A non-negative ``timedelta`` in whole microseconds, or an error naming ``what``.

    >>> micros(timedelta(seconds=1.5), "size")
    1500000
    """
    if not isinstance(duration, timedelta):
        raise FlowDefinitionError(f"{what} must be a datetime.timedelta, got {duration!r}")
    if duration < timedelta(0):
        raise FlowDefinitionError(f"{what} must not be negative, got {duration}")
    return duration // _US


def format_watermark(watermark: int | None) -> str | None:
    """A watermark as ISO 8601 text (``"end"`` for :data:`MAX_WATERMARK`)."""
    if watermark is None:
        return None
    if watermark == MAX_WATERMARK:
        return "end"
    return (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=watermark)).isoformat()


def event_micros(table: pa.Table, column: str, step: str | None = None) -> np.ndarray:
    """The event times of ``table`` as int64 microseconds since the Unix epoch
    (a naive timestamp is read as UTC; nanoseconds are truncated), and a
    mask of the rows that have one.

    >>> t = pa.table({"ts": pa.array([0, 1500, None], pa.timestamp("ms"))})
    >>> us, valid = event_micros(t, "ts")
    >>> us.tolist(), valid.tolist()
    ([0, 1500000, 0], [True, True, False])
    """
    if column not in table.column_names:
        raise missing_columns(step, "event time", [column], table.column_names,
                              f"fix the column name in with_event_time({column!r})")
    values = table.column(column)
    if not pa.types.is_timestamp(values.type):
        raise FlowValidationError(
            step, "event time",
            f"event-time column {column!r} is {values.type}, not a timestamp: cast it in map_batches first "
            "(pyarrow.compute.cast(column, pyarrow.timestamp('ms', tz='UTC')))",
        )
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    as_int = pc.cast(pc.cast(values, pa.timestamp("us", tz=values.type.tz), safe=False), pa.int64())
    valid = np.asarray(as_int.is_valid())
    return as_int.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False), valid


def split_late(table: pa.Table, column: str, watermark: int | None, step: str | None = None
               ) -> tuple[pa.Table, np.ndarray, pa.Table | None]:
    """``table``'s rows whose event time is known and not behind
    ``watermark`` (``None``: nothing is behind it), their times, and the
    other rows (``None`` if there are none): what an operator that drops
    state by the watermark sends to ``late()``.

    >>> t = pa.table({"ts": pa.array([5, None, 1], pa.timestamp("us"))})
    >>> on_time, times, late = split_late(t, "ts", watermark=3)
    >>> times.tolist(), late.num_rows
    ([5], 2)
    """
    t, valid = event_micros(table, column, step)
    late = ~valid if watermark is None else (~valid | (t < watermark))
    if not late.any():
        return table, t, None
    return table.filter(pa.array(~late)), t[~late], table.filter(pa.array(late))


def to_timestamps(values) -> pa.Array:
    """Microseconds since the Unix epoch as a ``timestamp[us, UTC]`` array."""
    return pa.array(np.asarray(values, dtype=np.int64), pa.int64()).cast(TIMESTAMP)


@dataclass(frozen=True)
class SourceEpoch:
    """What a source task knows about an epoch besides its offsets, all from
    the offsets log so that a replay sees the same: when it was planned
    (seconds), when each partition last had something to read, and which
    partitions are read to their end."""

    planned_at: float
    active_at: dict[int, float] = field(default_factory=dict)
    ended: frozenset[int] = frozenset()

    def idle(self, partition: int, timeout_s: float) -> bool:
        return self.planned_at - self.active_at.get(partition, self.planned_at) >= timeout_s


class EventTime(Operator):
    """Declares the event-time column of a source's stream; its logic tracks
    each partition's largest event time and computes the task's watermark.
    ``column=None`` with ``ingestion_column``: stamp each row with the time its
    epoch was planned."""

    kind = "event_time"

    def __init__(self, column: str | None, *, max_out_of_orderness: timedelta = timedelta(0),
                 idle_timeout: timedelta = DEFAULT_IDLE_TIMEOUT, ingestion_column: str | None = None):
        if column is not None and (not isinstance(column, str) or not column):
            raise FlowDefinitionError(f"with_event_time needs a column name, got {column!r}")
        self.column = column or ingestion_column
        self.ingestion = column is None
        self.out_of_orderness_us = micros(max_out_of_orderness, "max_out_of_orderness")
        self.idle_timeout_s = micros(idle_timeout, "idle_timeout") / 1e6
        if self.idle_timeout_s <= 0:
            raise FlowDefinitionError("idle_timeout must be positive: it is how long an empty partition may "
                                      "hold the watermark back")

    def build(self, context: OperatorContext | None, restored) -> "EventTimeLogic":
        return EventTimeLogic(self, None if context is None else context.step, restored)

    def describe(self) -> dict:
        return {"kind": self.kind, "column": self.column, "ingestion": self.ingestion,
                "max_out_of_orderness_s": self.out_of_orderness_us / 1e6, "idle_timeout_s": self.idle_timeout_s}


class EventTimeLogic(OperatorLogic):
    """Per source task: the largest event time per partition and the last
    watermark emitted. ``partition`` is set by the runtime before each
    partition's rows pass; ``restored`` is ``(largest per partition, floor)``
    from the checkpoint."""

    def __init__(self, op: EventTime, step: str | None, restored=None):
        self.op = op
        self.step = step
        largest, floor = restored or ({}, None)
        self.largest: dict[int, int] = dict(largest)
        self.floor: int | None = floor
        self.partition: int | None = None
        self.planned_at: float | None = None

    def process(self, table: pa.Table) -> pa.Table | None:
        if self.op.ingestion:
            stamp = pa.scalar(round(self.planned_at * 1e6), pa.int64()).cast(TIMESTAMP)
            return table.append_column(self.op.column, pa.repeat(stamp, table.num_rows))
        if table.num_rows:
            us, valid = event_micros(table, self.op.column, self.step)
            if valid.any():
                top = int(us[valid].max())
                if self.partition is None:
                    raise RuntimeError("event time: the runtime did not say which partition rows came from")
                self.largest[self.partition] = max(top, self.largest.get(self.partition, top))
        return table

    def advance(self, epoch: SourceEpoch, partitions: list[int]) -> tuple[int | None, bool]:
        """The task's watermark after an epoch, and whether all its partitions
        are idle (then the watermark stays where it was)."""
        live = [p for p in partitions if p not in epoch.ended]
        if not live:
            mark, idle = MAX_WATERMARK, False
        elif self.op.ingestion:
            mark, idle = round(epoch.planned_at * 1e6), False
        else:
            active = [p for p in live if not epoch.idle(p, self.op.idle_timeout_s)]
            idle = not active
            marks = [self.largest.get(p) for p in active]
            if idle or any(m is None for m in marks):
                mark = None
            else:
                mark = min(marks) - self.op.out_of_orderness_us
        if mark is not None and (self.floor is None or mark > self.floor):
            self.floor = mark
        return self.floor, idle

    def marks(self, partitions: list[int]) -> dict:
        """What a checkpoint records: the largest event time of each partition and the floor."""
        return {"partitions": {str(p): self.largest[p] for p in partitions if p in self.largest},
                "floor": self.floor}


def restored_marks(record: dict | None, partitions: list[int], subtask: int, parallelism: int):
    """``(largest per partition, floor)`` for one source task from a
    checkpoint's ``event_time`` record of its step. After a rescale the floor
    is the lowest of the old tasks' floors: never ahead of any of them.

    >>> rec = {"partitions": {"0": 10, "1": 20}, "floors": {"0": 8, "1": 15}, "parallelism": 2}
    >>> restored_marks(rec, [1], 1, 2), restored_marks(rec, [0, 1], 0, 1)
    (({1: 20}, 15), ({0: 10, 1: 20}, 8))
    """
    if not record:
        return {}, None
    largest = {int(p): v for p, v in record.get("partitions", {}).items() if int(p) in partitions}
    floors = record.get("floors", {})
    if record.get("parallelism") == parallelism:
        floor = floors.get(str(subtask))
    else:
        values = list(floors.values())
        floor = None if not values or any(v is None for v in values) else min(values)
    return largest, floor
