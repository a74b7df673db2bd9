"""``make bench``: sluiceway against a plain single-process pyarrow loop on the
same data and the same work.

Jobs: (1) stateless: parse CSV-like bid lines, filter, project, write
Parquet, with checkpoints on; (2) a keyed running count of bids per auction.
The loop generates the same batches, does the same Arrow work and writes the
same Parquet in one process: that is the ceiling. Reported: events/s for
both, the ratio, and the ratio per core (the engine gets both cores).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sluiceway.jobs import Dataflow, run
from sluiceway.operators.aggregate import Aggregate
from sluiceway.operators.base import OperatorContext
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.sources import GeneratorSource

PARTITIONS = 2
ROWS = int(os.environ.get("BENCH_ROWS_PER_PARTITION", "2000000"))
PER_EPOCH = int(os.environ.get("BENCH_RECORDS_PER_EPOCH", "500000"))
CORES = os.cpu_count() or 2


def bids(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Bid lines ``auction,bidder,price_cents,ts``, as a source would deliver raw text."""
    i = pa.array(range(start, stop), pa.int64())
    parts = [
        pc.remainder(pc.add(pc.multiply(i, 2654435761), partition), 10_000),
        pc.remainder(pc.multiply(i, 40503), 100_000),
        pc.remainder(pc.multiply(i, 7919), 50_000),
        pc.add(i, 1_700_000_000_000),
    ]
    line = pc.binary_join_element_wise(*[pc.cast(p, pa.string()) for p in parts], ",")
    return pa.record_batch({"line": line})


def parse_filter_project(batch: pa.RecordBatch) -> pa.RecordBatch:
    fields = pc.split_pattern(batch["line"], ",")
    auction = pc.cast(pc.list_element(fields, 0), pa.int64())
    price = pc.cast(pc.list_element(fields, 2), pa.int64())
    keep = pc.greater(price, 10_000)
    return pa.record_batch(
        {
            "auction": pc.filter(auction, keep),
            "bidder": pc.filter(pc.cast(pc.list_element(fields, 1), pa.int64()), keep),
            "price_eur": pc.filter(pc.multiply(pc.cast(price, pa.float64()), 0.0092), keep),
        }
    )


def stateless_flow(out: str) -> Dataflow:
    flow = Dataflow("bench_stateless")
    flow.source(GeneratorSource(bids, PARTITIONS, 1e12, ROWS)).map_batches(parse_filter_project).sink(ParquetSink(out))
    return flow


def keyed_flow(out: str) -> Dataflow:
    flow = Dataflow("bench_keyed")
    parsed = flow.source(GeneratorSource(bids, PARTITIONS, 1e12, ROWS)).map_batches(parse_filter_project)
    parsed.key_by("auction").aggregate([([], "count_all")]).sink(ParquetSink(out))
    return flow


def engine_rate(flow: Dataflow, work: str) -> tuple[float, int]:
    events = []
    run(flow, os.path.join(work, "ckpt"), trigger_s=0.0, max_records_per_epoch=PER_EPOCH, checkpoint_every=4,
        max_epochs_in_flight=2, on_event=events.append)
    epochs = [e for e in events if e["type"] == "epoch"]
    first_planned = epochs[0]["at"] - epochs[0]["duration_s"]
    rows = sum(e["rows_in"] for e in epochs)
    return rows / (epochs[-1]["at"] - first_planned), len(epochs)


def loop_rate(keyed: bool) -> float:
    """The ceiling: the same batches, the same work, one process, no engine."""
    agg = Aggregate("auction", [([], "count_all")]).build(OperatorContext("loop", 0, 1, 128), None) if keyed else None
    per_partition = PER_EPOCH // PARTITIONS
    t0 = time.perf_counter()
    rows = 0
    for start in range(0, ROWS, per_partition):
        stop = min(ROWS, start + per_partition)
        for p in range(PARTITIONS):
            out = pa.Table.from_batches([parse_filter_project(bids(p, start, stop))])
            if agg is not None:
                out = agg.process(out)
            buf = io.BytesIO()
            pq.write_table(out, buf)
            rows += stop - start
    return rows / (time.perf_counter() - t0)


def main() -> int:
    from sluiceway.cluster.local import init_embedded

    print(f"sluiceway bench: {PARTITIONS} partitions x {ROWS:,} bids, {PER_EPOCH:,} per epoch, {CORES} cores", flush=True)
    init_embedded(num_cpus=CORES)
    try:
        for name, flow_fn, keyed in (("stateless parse/filter/project", stateless_flow, False),
                                     ("keyed running count", keyed_flow, True)):
            with tempfile.TemporaryDirectory() as work:
                engine, epochs = engine_rate(flow_fn(os.path.join(work, "out")), work)
            ceiling = loop_rate(keyed)
            print(f"{name:32s} sluiceway {engine:>12,.0f} events/s ({epochs} epochs, checkpoints every 4) | "
                  f"pyarrow loop {ceiling:>12,.0f} events/s | ratio {engine / ceiling:.2f} | "
                  f"per core {engine / CORES / ceiling:.2f}", flush=True)
    finally:
        import ray

        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
