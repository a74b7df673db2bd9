"""Nexmark Q2, selection: the bids on every 123rd auction.

``SELECT auction, price FROM bid WHERE MOD(auction, 123) = 0``
"""

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.jobs.nexmark.common import Settings, source
from sluiceway.operators.connectors.nexmark import bids
from sluiceway.operators.sinks import ParquetSink


def selected(batch) -> pa.Table:
    b = bids(batch)
    return b.filter(pc.equal(pc.remainder(b["auction"], 123), 0)).select(["auction", "price"])


def build(settings: Settings = Settings.from_env()) -> Dataflow:
    flow = Dataflow("nexmark_q2")
    source(flow, settings).map_batches(selected, name="selected").sink(ParquetSink(f"{settings.output}/q2"),
                                                                         name="out")
    return flow


flow = build()
