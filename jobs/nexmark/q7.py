"""Nexmark Q7, highest bid: in each 10-second tumbling window, the bid(s)
with the highest price.

``SELECT auction, price, bidder, date_time FROM bid B JOIN (SELECT MAX(price)
AS maxprice, window_end FROM bid GROUP BY TUMBLE(date_time, 10 s)) B1 ON
B.price = B1.maxprice AND B.date_time in the window``
"""

from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.jobs.nexmark.common import Settings, source
from sluiceway.operators.connectors.nexmark import bids
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.windows import Tumbling

WINDOW = timedelta(seconds=10)


def one_group(batch) -> pa.Table:
    """Bids with a constant key: the highest bid is one group per window."""
    b = bids(batch).select(["auction", "price", "bidder", "date_time"])
    return b.append_column("all", pa.repeat(pa.scalar(0, pa.int8()), b.num_rows))


def highest(rows: pa.Table) -> pa.Table:
    """The window's bids at its highest price (vectorized over the window)."""
    top = rows.filter(pc.equal(rows["price"], pc.max(rows["price"])))
    return top.select(["auction", "price", "bidder", "date_time"])


def build(settings: Settings = Settings.from_env()) -> Dataflow:
    flow = Dataflow("nexmark_q7")
    top = (source(flow, settings).map_batches(one_group, name="bids").key_by("all", name="one_group")
           .window(Tumbling(WINDOW)).reduce(highest, name="highest"))
    top.sink(ParquetSink(f"{settings.output}/q7"), name="out")
    return flow


flow = build()
