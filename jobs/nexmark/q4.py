"""Nexmark Q4, average price per category: the winning bid of each auction
(its highest bid made before the auction expires), averaged per category.

``SELECT Q.category, AVG(Q.final) FROM (SELECT MAX(B.price) AS final,
A.category FROM auction A, bid B WHERE A.id = B.auction AND B.date_time <
A.expires GROUP BY A.id, A.category) Q GROUP BY Q.category``

How it runs: a window join pairs each bid with its auction (an auction
expires at most 60 s after it opens, so a bid within 60 s of it is all
that can count); the highest price per auction is a table; its changelog,
updates retracted, feeds a sum and a count per category, so the average
follows each auction's winning bid as it rises. The output is an upsert
changelog per category; its last row per category is the answer.
"""

from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.jobs.nexmark.common import Settings, source
from sluiceway.operators.connectors.nexmark import auctions, bids
from sluiceway.operators.sinks import ParquetSink

LONGEST = timedelta(seconds=60)  # the generator's auctions expire 10 to 60 s after they open


def auction_terms(batch) -> pa.Table:
    a = auctions(batch)
    return pa.table({"auction": a["id"], "category": a["category"], "expires": a["expires"],
                     "date_time": a["date_time"]})


def bid_prices(batch) -> pa.Table:
    b = bids(batch)
    return pa.table({"auction": b["auction"], "price": b["price"], "date_time": b["date_time"]})


def before_expiry(batch) -> pa.Table:
    t = pa.table(batch)
    return t.filter(pc.less(t["date_time_right"], t["expires"])).select(["auction", "category", "price"])


def signed(batch) -> pa.Table:
    """A winning price entering (+1) or leaving (-1) its category's average."""
    t = pa.table(batch)
    sign = pc.if_else(pc.equal(t["_op"], "delete"), -1, 1)
    return pa.table({"category": t["category_max"], "price": pc.multiply(t["price_max"], sign), "n": sign})


def average(batch) -> pa.Table:
    t = pa.table(batch)
    return pa.table({"category": t["category"], "average": pc.divide(pc.cast(t["price_sum"], pa.float64()),
                                                                     pc.cast(t["n_sum"], pa.float64()))})


def build(settings: Settings = Settings.from_env()) -> Dataflow:
    flow = Dataflow("nexmark_q4")
    events = source(flow, settings)
    opened = events.map_batches(auction_terms, name="auctions")
    offered = events.map_batches(bid_prices, name="bids")
    winning = (opened.join(offered, on="auction", within=LONGEST, name="bids_of_auction")
               .map_batches(before_expiry, name="before_expiry")
               .key_by("auction", name="by_auction").aggregate([("price", "max"), ("category", "max")], name="best")
               .to_table("auction", updates="retract", name="winning"))
    per_category = (winning.map_batches(signed, name="signed").key_by("category", name="by_category")
                    .aggregate([("price", "sum"), ("n", "sum")], name="sums").map_batches(average, name="average"))
    per_category.sink(ParquetSink(f"{settings.output}/q4"), name="out")
    return flow


flow = build()
