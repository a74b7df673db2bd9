"""A windowed job whose late events do not depend on where epochs are cut,
for recovery tests, and its answer computed in batch with plain pyarrow.

Two partitions of events paced by wall clock; event time advances 2 ms per
offset (as fast as the events arrive), each event is up to 1 s behind that
(within the 2 s the job allows), and every 97th event from offset 3000 on is
a minute behind: late whatever the epochs, since a window closes 5 s after
its start plus 2 s. The job counts and sums per key in 5-second tumbling
windows and writes late events to their own sink.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.sources import GeneratorSource, offsets
from sluiceway.operators.windows import Tumbling

BASE_US = int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp() * 1_000_000)
PARTITIONS, KEYS, WINDOW_US = 2, 7, 5_000_000


def readings(partition: int, start: int, stop: int) -> pa.RecordBatch:
    o = np.asarray(offsets(start, stop))
    jitter = (o * 7919 + partition * 104729) % 1_000_000
    late = (o >= 3000) & (o % 97 == 0)
    t = BASE_US + o * 2000 - jitter - np.where(late, 60_000_000, 0)
    return pa.record_batch({
        "id": o * PARTITIONS + partition,
        "sensor": (o + partition) % KEYS,
        "value": (o * 31 + partition) % 100,
        "ts": pa.array(t, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
    })


def build(output: str, rows_per_partition: int, rate: float) -> Dataflow:
    flow = Dataflow("windowed")
    windows = (flow.source(GeneratorSource(readings, PARTITIONS, rate, rows_per_partition), name="readings")
               .with_event_time("ts", max_out_of_orderness=timedelta(seconds=2))
               .key_by("sensor", name="by_sensor")
               .window(Tumbling(timedelta(microseconds=WINDOW_US)))
               .aggregate([([], "count_all"), ("value", "sum")], name="windows"))
    windows.sink(ParquetSink(f"{output}/windows"), name="windows_out")
    windows.late().sink(ParquetSink(f"{output}/late"), name="late_out")
    return flow


def expected(rows_per_partition: int) -> tuple[pa.Table, pa.Table]:
    """(windows, late events) in batch."""
    events = pa.Table.from_batches([readings(p, 0, rows_per_partition) for p in range(PARTITIONS)])
    o = pc.divide(events["id"], PARTITIONS)
    is_late = pc.and_(pc.greater_equal(o, 3000), pc.equal(pc.remainder(o, 97), 0))
    on_time = events.filter(pc.invert(is_late))
    start = pc.multiply(pc.divide(pc.cast(on_time["ts"], pa.int64()), WINDOW_US), WINDOW_US)
    grouped = pa.table({"sensor": on_time["sensor"], "s": start, "value": on_time["value"]}).group_by(
        ["sensor", "s"]).aggregate([([], "count_all"), ("value", "sum")])
    ts = pa.timestamp("us", tz="UTC")
    windows = pa.table({"sensor": grouped["sensor"], "window_start": pc.cast(grouped["s"], ts),
                        "window_end": pc.cast(pc.add(grouped["s"], WINDOW_US), ts),
                        "count_all": grouped["count_all"], "value_sum": grouped["value_sum"]})
    return windows, events.filter(is_late)


def sorted_rows(table: pa.Table, columns: list[str]) -> list[dict]:
    return table.select(columns).sort_by([(c, "ascending") for c in columns]).to_pylist()
