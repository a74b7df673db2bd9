"""Nexmark Q1, currency conversion: each bid's price in euros.

``SELECT auction, bidder, 0.908 * price AS price, date_time, extra FROM bid``
"""

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.jobs.nexmark.common import Settings, source
from sluiceway.operators.connectors.nexmark import bids
from sluiceway.operators.sinks import ParquetSink

DOLLARS_TO_EUROS = 0.908


def in_euros(batch) -> pa.Table:
    b = bids(batch)
    return pa.table({"auction": b["auction"], "bidder": b["bidder"],
                     "price": pc.multiply(pc.cast(b["price"], pa.float64()), DOLLARS_TO_EUROS),
                     "date_time": b["date_time"], "extra": b["extra"]})


def build(settings: Settings = Settings.from_env()) -> Dataflow:
    flow = Dataflow("nexmark_q1")
    source(flow, settings).map_batches(in_euros, name="euros").sink(ParquetSink(f"{settings.output}/q1"), name="out")
    return flow


flow = build()
