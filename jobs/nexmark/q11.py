"""Nexmark Q11, user sessions: how many bids each bidder made in each of
their sessions (a session closes after 10 seconds without a bid).

``SELECT bidder, COUNT(*), SESSION_START(date_time, 10 s), SESSION_END(...)
FROM bid GROUP BY bidder, SESSION(date_time, INTERVAL '10' SECOND)``
"""

from datetime import timedelta

from sluiceway.jobs import Dataflow
from sluiceway.jobs.nexmark.common import Settings, source
from sluiceway.operators.connectors.nexmark import bids
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.windows import Session

GAP = timedelta(seconds=10)


def build(settings: Settings = Settings.from_env()) -> Dataflow:
    flow = Dataflow("nexmark_q11")
    sessions = (source(flow, settings).map_batches(bids, name="bids").key_by("bidder", name="by_bidder")
                .window(Session(GAP)).aggregate([([], "count_all")], name="sessions"))
    sessions.sink(ParquetSink(f"{settings.output}/q11"), name="out")
    return flow


flow = build()
