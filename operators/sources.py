"""Sources: partitioned, offset-addressed, replayable.

A source exposes partitions; each partition is a sequence of records
addressed by offsets ``0, 1, 2, ...``. The coordinator asks how far each
partition can be read (``latest_offset``), plans a range per epoch, and the
source task reads exactly that range (``read``), so replaying a plan rebuilds
the same batches.

>>> src = ListSource([{"x": i} for i in range(5)], partitions=2)
>>> src.partition_count(), src.end_offset(0), src.end_offset(1)
(2, 3, 2)
>>> src.read(0, 1, 3).to_pylist()
[{'x': 2}, {'x': 4}]
"""

from __future__ import annotations

import math
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError
from sluiceway.operators.stateless import as_table


_ARANGE = pa.array([], pa.int64())


def offsets(start: int, stop: int) -> pa.Array:
    """The offsets ``[start, stop)`` as an int64 array, built by Arrow kernels
    (``pa.array(range(...))`` is a per-row Python loop): the usual first line
    of a :class:`GeneratorSource` function.

    >>> offsets(5, 9).to_pylist()
    [5, 6, 7, 8]
    """
    global _ARANGE
    n = stop - start
    if n > len(_ARANGE):
        size = max(n, 2 * len(_ARANGE))
        _ARANGE = pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), size)), 1)
    return pc.add(_ARANGE.slice(0, n), start)


class Source:
    """Picklable description of a partitioned, replayable input."""

    kind = "source"

    def partition_count(self) -> int:
        raise NotImplementedError

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        """The offset one past the last record readable now (wall clock ``now``,
        the job first started at ``started_at``)."""
        raise NotImplementedError

    def end_offset(self, partition: int) -> int | None:
        """The last offset plus one of a bounded partition; ``None`` if unbounded."""
        return None

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        """Exactly the records ``[start, stop)`` of ``partition``; the same every time."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "partitions": self.partition_count()}


class GeneratorSource(Source):
    """Records made by ``fn(partition, start, stop) -> RecordBatch``, deterministic
    in its arguments. Each partition's readable offsets grow at
    ``rows_per_second`` from the job's first start, up to ``rows_per_partition``
    (``None``: unbounded).
    """

    kind = "generator"

    def __init__(
        self,
        fn: Callable[[int, int, int], pa.RecordBatch],
        partitions: int,
        rows_per_second: float,
        rows_per_partition: int | None = None,
    ):
        if not callable(fn):
            raise FlowDefinitionError(f"GeneratorSource needs fn(partition, start, stop) -> RecordBatch, got {fn!r}")
        if not isinstance(partitions, int) or partitions < 1:
            raise FlowDefinitionError(f"GeneratorSource partitions must be a positive integer, got {partitions!r}")
        if not rows_per_second or rows_per_second <= 0:
            raise FlowDefinitionError(f"GeneratorSource rows_per_second must be positive, got {rows_per_second!r}")
        if rows_per_partition is not None and rows_per_partition < 0:
            raise FlowDefinitionError(f"rows_per_partition must be >= 0 or None, got {rows_per_partition!r}")
        self.fn = fn
        self.partitions = partitions
        self.rows_per_second = float(rows_per_second)
        self.rows_per_partition = rows_per_partition

    def partition_count(self) -> int:
        return self.partitions

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        elapsed = max(0.0, now - started_at)
        if self.rows_per_partition is not None and elapsed * self.rows_per_second >= self.rows_per_partition:
            return self.rows_per_partition
        return math.floor(elapsed * self.rows_per_second)

    def end_offset(self, partition: int) -> int | None:
        return self.rows_per_partition

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        table = as_table(self.fn(partition, start, stop), "GeneratorSource")
        if table.num_rows != stop - start:
            raise FlowValidationError(
                None,
                "source",
                f"GeneratorSource fn {getattr(self.fn, '__qualname__', self.fn)!r} returned {table.num_rows} rows for "
                f"partition {partition} offsets [{start}, {stop}); it must return exactly one row per offset "
                f"({stop - start})",
            )
        return table

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "partitions": self.partitions,
            "rows_per_second": self.rows_per_second,
            "rows_per_partition": self.rows_per_partition,
        }


class ListSource(Source):
    """A bounded source over rows given up front (dicts or a table); row ``i``
    goes to partition ``i % partitions``. For tests and examples."""

    kind = "list"

    def __init__(self, rows: list[dict] | pa.Table, partitions: int = 1):
        if not isinstance(partitions, int) or partitions < 1:
            raise FlowDefinitionError(f"ListSource partitions must be a positive integer, got {partitions!r}")
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
        n = table.num_rows
        self.parts = [table.take(pa.array(range(p, n, partitions), pa.int64())) for p in range(partitions)]

    def partition_count(self) -> int:
        return len(self.parts)

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        return self.parts[partition].num_rows

    def end_offset(self, partition: int) -> int | None:
        return self.parts[partition].num_rows

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        return self.parts[partition].slice(start, stop - start)


def __getattr__(name: str):
    """Connectors' sources, re-exported here (imported on first use)."""
    if name == "ParquetFilesSource":
        from sluiceway.operators.connectors.files import ParquetFilesSource

        return ParquetFilesSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
