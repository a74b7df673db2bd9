"""Sources: partitioned, offset-addressed, replayable.

A source exposes partitions; each partition is a sequence of records
addressed by offsets ``0, 1, 2, ...``. The protocol:

- ``readable(partition, now, started_at)``: on the coordinator, when it
  plans an epoch: the oldest offset still readable and the offset one past
  the newest (``latest_offset`` alone, for sources that keep everything);
- ``read(partition, start, stop)``: on the source task, exactly the records
  ``[start, stop)``, the same on every replay (``read_batch`` also returns
  **dead letters**: records or files the source could not decode, with the
  reason, which ``stream.dead_letters()`` delivers like any stream);
- ``end_offset(partition)``: where a bounded partition ends;
- ``bind(storage, step)``: where the source runs, the job's storage, for
  sources that record what they found (a file source's list of files);
- ``checkpointed(job, next_offsets)``: after a checkpoint completes, the
  offsets it covers (a log records the job's position there);
- ``skip_gap(partition, expected, first)``: the next offset to plan is no
  longer readable (retention deleted it): raise, or say where to continue;
- ``plan_stop(partition, start, latest, cap)``: where an epoch that may
  read ``cap`` records from ``start`` stops (``start + cap`` where offsets
  count records; a broker whose offsets are ids finds the ``cap``-th one);
- ``lag(partition, start, latest, now)``: how far behind the job is, for
  the epoch's metrics: records not yet planned and the age of the oldest.

docs/sources.md is the protocol written for connector authors.

>>> src = ListSource([{"x": i} for i in range(5)], partitions=2)
>>> src.partition_count(), src.end_offset(0), src.end_offset(1)
(2, 3, 2)
>>> src.read(0, 1, 3).to_pylist()
[{'x': 2}, {'x': 4}]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.connectors import lazy_exports
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError, SourceError
from sluiceway.operators.stateless import as_table

DEAD_LETTER_SCHEMA = pa.schema([
    ("source", pa.string()),        # what could not be read: "log:<topic>", "files:<url>"
    ("partition", pa.int64()),
    ("start_offset", pa.int64()),   # the offsets the bad input covered: [start, stop)
    ("stop_offset", pa.int64()),
    ("location", pa.string()),      # the file or segment holding it
    ("reason", pa.string()),        # why it could not be read, first line of the error
    ("payload", pa.binary()),       # the raw bytes when they are small enough to carry; else null
])


def dead_letter(source: str, partition: int, start: int, stop: int, location: str, reason: str,
                payload: bytes | None = None) -> pa.Table:
    """One dead letter, as a one-row table of :data:`DEAD_LETTER_SCHEMA`.

    >>> dead_letter("files:/in", 0, 3, 4, "/in/b.csv", "CSV parse error: expected 2 columns").column("reason")[0]
    <pyarrow.StringScalar: 'CSV parse error: expected 2 columns'>
    """
    return pa.table([[source], [partition], [start], [stop], [location], [reason], [payload]],
                    schema=DEAD_LETTER_SCHEMA)


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


@dataclass(frozen=True)
class Lag:
    """How far a job is behind on one partition: ``records`` readable and not
    yet planned, and ``oldest_s``, the age in seconds of the oldest of them
    (``None`` when the source cannot tell or nothing is behind).

    >>> Lag(3, 1.5) + Lag(2, None)
    Lag(records=5, oldest_s=1.5)
    """

    records: int = 0
    oldest_s: float | None = None

    def __add__(self, other: "Lag") -> "Lag":
        ages = [a for a in (self.oldest_s, other.oldest_s) if a is not None]
        return Lag(self.records + other.records, max(ages) if ages else None)


class Source:
    """Picklable description of a partitioned, replayable input."""

    kind = "source"
    max_offsets_per_epoch: int | None = None  # a source's own cap on what one epoch reads per partition
    # A backlog read in order: each source task reads one partition at a time, its lowest unfinished one, so an
    # epoch touches at most one partition per task however many there are (many files: few open at a time).
    reads_in_order: bool = False

    def bind(self, storage, step: str) -> None:
        """Called where the source runs (coordinator and source tasks) with the
        job's :class:`~sluiceway.checkpoint.storage.JobStorage`, for sources
        that keep bookkeeping there (``storage.source_path(step, ...)``)."""

    def partition_count(self) -> int:
        raise NotImplementedError

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        """The offset one past the last record readable now (wall clock ``now``,
        the job first started at ``started_at``)."""
        raise NotImplementedError

    def readable(self, partition: int, now: float, started_at: float) -> tuple[int, int]:
        """``(oldest readable offset, latest_offset)``: sources whose old records
        may be deleted (a log with retention) override this."""
        return 0, self.latest_offset(partition, now, started_at)

    def skip_gap(self, partition: int, expected: int, first: int) -> int:
        """The offset to continue from when ``expected`` (the next one to read)
        is older than the oldest readable ``first``; by default an error."""
        raise SourceError(f"{self.kind} source partition {partition}: offsets {expected}..{first - 1} are no longer "
                          "readable, and this source cannot skip them")

    def end_offset(self, partition: int) -> int | None:
        """The last offset plus one of a bounded partition; ``None`` if unbounded."""
        return None

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        """Exactly the records ``[start, stop)`` of ``partition``; the same every time."""
        raise NotImplementedError

    def read_batch(self, partition: int, start: int, stop: int) -> tuple[pa.Table, pa.Table | None]:
        """The records ``[start, stop)`` and the dead letters of those that
        could not be decoded (a table of :data:`DEAD_LETTER_SCHEMA`, or ``None``)."""
        return self.read(partition, start, stop), None

    def plan_stop(self, partition: int, start: int, latest: int, cap: int) -> int:
        """Where an epoch reading at most ``cap`` records from ``start`` stops
        (``start <= result <= latest``). Offsets here count records; a source
        whose offsets are ids (Redis entry ids, sparse sequences) overrides it."""
        return min(latest, start + cap)

    def lag(self, partition: int, start: int, latest: int, now: float) -> Lag:
        """How far the job is behind on ``partition``: records in ``[start,
        latest)`` and the age of the oldest of them, when the source knows it."""
        return Lag(max(0, latest - start))

    def checkpointed(self, job: str, next_offsets: dict[int, int]) -> None:
        """A checkpoint of ``job`` completed; it covers everything before
        ``next_offsets`` (partition -> offset): the source may release it
        (acknowledge it to a broker, advance a replication slot). Called on
        the coordinator; called again with the same offsets after a failure."""

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
        table = rows if isinstance(rows, pa.Table) else _rows_table(rows)
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


def _rows_table(rows) -> pa.Table:
    """ListSource's rows as a table, or a line saying which row is not a record and why.

    >>> _rows_table([{"x": 1}, 2])
    Traceback (most recent call last):
    ...
    sluiceway.operators.errors.FlowDefinitionError: ListSource rows are dicts of column -> value (or one pyarrow Table); row 1 is an int: 2
    >>> _rows_table([{"x": 1}, {"x": "a"}])
    Traceback (most recent call last):
    ...
    sluiceway.operators.errors.FlowDefinitionError: ListSource rows do not fit one table: Could not convert 'a' with type str: tried to convert to int64
    """
    if isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__iter__"):
        raise FlowDefinitionError(f"ListSource takes a list of rows (dicts of column -> value) or a pyarrow Table, "
                                  f"got {type(rows).__name__}")
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise FlowDefinitionError(f"ListSource rows are dicts of column -> value (or one pyarrow Table); row {i} "
                                      f"is {'an' if type(row).__name__[0] in 'aeiou' else 'a'} "
                                      f"{type(row).__name__}: {row!r:.60}")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise FlowDefinitionError(f"ListSource rows do not fit one table: {str(exc).splitlines()[0]}") from None


__getattr__ = lazy_exports(__name__, {
    "ParquetFilesSource": "sluiceway.operators.connectors.files",
    "FileSource": "sluiceway.operators.connectors.files",
    "LogSource": "sluiceway.operators.connectors.log",
    "NexmarkSource": "sluiceway.operators.connectors.nexmark",
    "RedisStreamSource": "sluiceway.operators.connectors.redis_streams",
    "NatsJetStreamSource": "sluiceway.operators.connectors.nats_jetstream",
    "PostgresCDCSource": "sluiceway.operators.connectors.postgres_cdc",
    "RabbitMQSource": "sluiceway.operators.connectors.rabbitmq",
})
