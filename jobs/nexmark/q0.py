"""Nexmark Q0, pass-through: every bid, flattened, as it came. It measures
what reading, moving and writing events costs.

``SELECT auction, bidder, price, channel, url, date_time, extra FROM bid``
"""

from sluiceway.jobs import Dataflow
from sluiceway.jobs.nexmark.common import Settings, source
from sluiceway.operators.connectors.nexmark import bids
from sluiceway.operators.sinks import ParquetSink


def build(settings: Settings = Settings.from_env()) -> Dataflow:
    flow = Dataflow("nexmark_q0")
    source(flow, settings).map_batches(bids, name="bids").sink(ParquetSink(f"{settings.output}/q0"), name="out")
    return flow


flow = build()
