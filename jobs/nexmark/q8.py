"""Nexmark Q8, monitor new users: the persons who opened an auction in the
same 10-second tumbling window in which they registered.

``SELECT P.id, P.name, P.starttime FROM (SELECT id, name, TUMBLE_START(
date_time, 10 s) AS starttime FROM person GROUP BY ...) P JOIN (SELECT
seller, TUMBLE_START(date_time, 10 s) AS starttime FROM auction GROUP BY
...) A ON P.id = A.seller AND P.starttime = A.starttime``

How it runs: the sellers of each window (a tumbling window per seller,
stamped with the window's last instant as its event time) joined with the
persons within 10 s, keeping the pairs of the same window.
"""

from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.jobs.nexmark.common import Settings, source
from sluiceway.operators.connectors.nexmark import auctions, persons
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.windows import Tumbling

WINDOW = timedelta(seconds=10)
_WINDOW_US = 10_000_000


def _window_start(times) -> pa.Array:
    us = pc.cast(pc.cast(times, pa.timestamp("us", tz="UTC")), pa.int64())
    return pc.cast(pc.multiply(pc.divide(us, _WINDOW_US), _WINDOW_US), pa.timestamp("us", tz="UTC"))


def new_persons(batch) -> pa.Table:
    p = persons(batch)
    return pa.table({"id": p["id"], "name": pc.cast(p["name"], pa.string()), "date_time": p["date_time"],
                     "starttime": _window_start(p["date_time"])})


def sellers(batch) -> pa.Table:
    a = auctions(batch)
    return pa.table({"seller": a["seller"], "date_time": a["date_time"]})


def stamped(batch) -> pa.Table:
    """A seller's window as an event at the window's last instant: not behind the watermark that fired it."""
    t = pa.table(batch)
    last = pc.cast(pc.subtract(pc.cast(t["window_end"], pa.int64()), 1), pa.timestamp("us", tz="UTC"))
    return pa.table({"seller": t["seller"], "starttime": t["window_start"], "date_time": last})


def same_window(batch) -> pa.Table:
    t = pa.table(batch)
    t = t.filter(pc.equal(t["starttime"], t["starttime_right"]))
    return t.select(["id", "name", "starttime"])


def build(settings: Settings = Settings.from_env()) -> Dataflow:
    flow = Dataflow("nexmark_q8")
    events = source(flow, settings)
    registered = events.map_batches(new_persons, name="persons")
    selling = (events.map_batches(sellers, name="sellers").key_by("seller", name="by_seller")
               .window(Tumbling(WINDOW)).aggregate([([], "count_all")], name="seller_windows")
               .map_batches(stamped, name="stamped"))
    joined = registered.join(selling, on="id", right_on="seller", within=WINDOW, name="join")
    joined.map_batches(same_window, name="same_window").sink(ParquetSink(f"{settings.output}/q8"), name="out")
    return flow


flow = build()
