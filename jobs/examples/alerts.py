"""Example job: real-estate alerts, search on streams.

Users keep standing queries ("a flat in brera, at most 400,000, at least 3
rooms"); every new listing is matched against all of them. The alerts are
a table (a changelog keyed by ``alert``, read from its own source), so
alerts can be added, changed and removed while the job runs; here they are
all there from the start, so every listing meets the same alerts whatever
the epochs. Matches go to ``<output>/matches``: the listing's columns and
the ``alert`` it matched. ``expected_matches`` computes them in plain
pyarrow (hash joins on area, then filters), independently of the index.

Run it: ``sluiceway run jobs/examples/alerts.py --until-idle``
(``$SLUICEWAY_EXAMPLE_ROWS`` listings per partition, default 20,000;
``$SLUICEWAY_EXAMPLE_ALERTS`` alerts, default 10,000).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.sources import GeneratorSource, offsets

PARTITIONS, AREAS = 2, 50
ROWS_PER_PARTITION = int(os.environ.get("SLUICEWAY_EXAMPLE_ROWS", "20000"))
ROWS_PER_SECOND = int(os.environ.get("SLUICEWAY_EXAMPLE_RATE", "20000"))
ALERTS = int(os.environ.get("SLUICEWAY_EXAMPLE_ALERTS", "10000"))
OUTPUT = os.environ.get("SLUICEWAY_EXAMPLE_OUTPUT", ".sluiceway-output")
AREA_NAMES = pa.array([f"area-{i:02d}" for i in range(AREAS)])
KINDS = pa.array(["flat", "house", "loft"])
RANGES = [("price", "<=", "max_price"), ("rooms", ">=", "min_rooms")]


def listings(partition: int, start: int, stop: int) -> pa.RecordBatch:
    lid = np.asarray(pc.add(pc.multiply(offsets(start, stop), PARTITIONS), partition))
    return pa.record_batch({
        "listing": pa.array(lid),
        "area": pc.take(AREA_NAMES, pa.array((lid * 7919) % AREAS)),
        "kind": pc.take(KINDS, pa.array((lid * 31) % 3)),
        "price": pa.array(100_000 + (lid * 104729) % 900_000),
        "rooms": pa.array(1 + (lid * 13) % 6),
    })


def alerts(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Alert ``a = offset``: an area, a kind for two in three (else any), a
    maximum price (none for one in ten), a minimum of rooms (none for one in four)."""
    a = np.asarray(offsets(start, stop))
    price = 150_000 + (a * 7907) % 700_000
    rooms = 1 + (a * 17) % 5
    return pa.record_batch({
        "alert": pa.array(a),
        "area": pc.take(AREA_NAMES, pa.array((a * 37) % AREAS)),
        "kind": pc.if_else(pa.array(a % 3 == 0), pa.scalar(None, pa.string()), pc.take(KINDS, pa.array((a * 11) % 3))),
        "max_price": pc.if_else(pa.array(a % 10 == 0), pa.scalar(None, pa.int64()), pa.array(price)),
        "min_rooms": pc.if_else(pa.array(a % 4 == 0), pa.scalar(None, pa.int64()), pa.array(rooms)),
    })


def build(output: str = OUTPUT, rows_per_partition: int = ROWS_PER_PARTITION,
          rows_per_second: float = ROWS_PER_SECOND, alert_count: int = ALERTS) -> Dataflow:
    flow = Dataflow("alerts")
    add_to(flow, output, rows_per_partition, rows_per_second, alert_count)
    return flow


def add_to(flow: Dataflow, output: str, rows_per_partition: int, rows_per_second: float, alert_count: int = ALERTS,
           prefix: str = "") -> None:
    standing = (flow.source(GeneratorSource(alerts, 1, 1e12, alert_count), name=f"{prefix}alerts")
                .to_table("alert", updates="retract", name=f"{prefix}alert_table"))
    new = flow.source(GeneratorSource(listings, PARTITIONS, rows_per_second, rows_per_partition),
                      name=f"{prefix}listings")
    matches = new.search(standing, equal={"area": "area", "kind": "kind"}, ranges=RANGES, name=f"{prefix}search")
    matches.sink(ParquetSink(f"{output}/matches"), name=f"{prefix}matches_out")


def expected_matches(rows_per_partition: int = ROWS_PER_PARTITION, alert_count: int = ALERTS) -> set[tuple[int, int]]:
    """(listing, alert) pairs, in plain pyarrow: every listing against every
    alert of its area, then the kind and the ranges (a null admits any)."""
    events = pa.Table.from_batches([listings(p, 0, rows_per_partition) for p in range(PARTITIONS)])
    queries = pa.Table.from_batches([alerts(0, 0, alert_count)])
    pairs = events.join(queries, "area", right_suffix="_q", join_type="inner")

    def admits(bound, test):  # a null bound admits any listing
        return pc.or_kleene(pc.is_null(bound), test)

    ok = pc.and_kleene(admits(pairs["kind_q"], pc.equal(pairs["kind"], pairs["kind_q"])),
                       pc.and_kleene(admits(pairs["max_price"], pc.less_equal(pairs["price"], pairs["max_price"])),
                                     admits(pairs["min_rooms"], pc.greater_equal(pairs["rooms"], pairs["min_rooms"]))))
    pairs = pairs.filter(pc.fill_null(ok, False))
    return set(zip(pairs["listing"].to_pylist(), pairs["alert"].to_pylist()))


def found_matches(committed: pa.Table) -> list[tuple[int, int]]:
    return list(zip(committed["listing"].to_pylist(), committed["alert"].to_pylist()))


flow = build()
