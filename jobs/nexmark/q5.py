"""Nexmark Q5, hot items, as this project's benchmark defines it: the number
of bids per auction in 10-second tumbling windows of event time, each
window's final result once the watermark passes its end. (Nexmark's own Q5
then keeps, per hopping window, the auctions with the most bids.)

``SELECT auction, TUMBLE_START(date_time, 10 s), TUMBLE_END(...), COUNT(*)
FROM bid GROUP BY auction, TUMBLE(date_time, INTERVAL '10' SECOND)``
"""

from datetime import timedelta

from sluiceway.jobs import Dataflow
from sluiceway.jobs.nexmark.common import Settings, source
from sluiceway.operators.connectors.nexmark import bids
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.windows import Tumbling

WINDOW = timedelta(seconds=10)


def build(settings: Settings = Settings.from_env()) -> Dataflow:
    flow = Dataflow("nexmark_q5")
    windows = (source(flow, settings).map_batches(bids, name="bids").key_by("auction", name="by_auction")
               .window(Tumbling(WINDOW)).aggregate([([], "count_all")], name="bids_per_window"))
    windows.sink(ParquetSink(f"{settings.output}/q5"), name="out")
    windows.late().sink(ParquetSink(f"{settings.output}/q5_late"), name="late_out")
    return flow


flow = build()
