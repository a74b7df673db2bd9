"""Example job: click events, cleaned and counted per user.

Events come from a deterministic generator (2 partitions). The job keeps
clicks worth at least 5 cents, adds a dollar column, writes every kept click
to ``<output>/clicks`` and a running count and total per user (an upsert
changelog) to ``<output>/totals``. ``expected_clicks`` and ``expected_totals``
compute what the output must be, independently, in plain pyarrow.

Run it: ``sluiceway run jobs/examples/clicks.py --until-idle``
(output under ``$SLUICEWAY_EXAMPLE_OUTPUT``, default ``./.sluiceway-output``).
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.sources import GeneratorSource, offsets

PARTITIONS = 2
ROWS_PER_SECOND = int(os.environ.get("SLUICEWAY_EXAMPLE_RATE", "4000"))
ROWS_PER_PARTITION = int(os.environ.get("SLUICEWAY_EXAMPLE_ROWS", "20000"))
OUTPUT = os.environ.get("SLUICEWAY_EXAMPLE_OUTPUT", ".sluiceway-output")
USERS = 500


def clicks(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Events ``[start, stop)`` of ``partition``: the same every time."""
    offset = offsets(start, stop)
    mixed = pc.add(pc.multiply(offset, 7919), partition * 104729)
    return pa.record_batch(
        {
            "event_id": pc.add(offset, partition * 1_000_000_000),
            "user_id": pc.remainder(mixed, USERS),
            "cents": pc.remainder(pc.multiply(offset, 31 + partition), 100),
        }
    )


def with_dollars(batch: pa.RecordBatch) -> pa.RecordBatch:
    return batch.append_column("dollars", pc.divide(pc.cast(batch["cents"], pa.float64()), 100.0))


def build(output: str = OUTPUT, rows_per_partition: int = ROWS_PER_PARTITION, rows_per_second: float = ROWS_PER_SECOND) -> Dataflow:
    flow = Dataflow("clicks")
    events = flow.source(GeneratorSource(clicks, PARTITIONS, rows_per_second, rows_per_partition), name="events")
    kept = events.filter(pc.field("cents") >= 5, name="worth_it").map_batches(with_dollars, name="dollars")
    kept.sink(ParquetSink(f"{output}/clicks"), name="clicks_out")
    totals = kept.key_by("user_id", name="by_user").aggregate(
        [("event_id", "count"), ("cents", "sum")], name="totals"
    )
    totals.sink(ParquetSink(f"{output}/totals"), name="totals_out")
    return flow


def _all_events(rows_per_partition: int) -> pa.Table:
    return pa.Table.from_batches([clicks(p, 0, rows_per_partition) for p in range(PARTITIONS)])


def expected_clicks(rows_per_partition: int = ROWS_PER_PARTITION) -> pa.Table:
    events = _all_events(rows_per_partition)
    kept = events.filter(pc.greater_equal(events["cents"], 5))
    return kept.append_column("dollars", pc.divide(pc.cast(kept["cents"], pa.float64()), 100.0))


def expected_totals(rows_per_partition: int = ROWS_PER_PARTITION) -> pa.Table:
    kept = expected_clicks(rows_per_partition)
    out = kept.group_by("user_id").aggregate([("event_id", "count"), ("cents", "sum")])
    return out.select(["user_id", "event_id_count", "cents_sum"])


def final_totals(changelog: pa.Table) -> pa.Table:
    """The last upsert per user of a committed changelog (rows are in epoch order)."""
    if changelog.num_rows == 0:
        return changelog
    indexed = changelog.append_column("__row", pa.array(range(changelog.num_rows), pa.int64()))
    last = indexed.group_by("user_id").aggregate([("__row", "max")])
    return changelog.take(last["__row_max"]).select(["user_id", "event_id_count", "cents_sum"])


flow = build()
