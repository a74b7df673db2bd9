"""Nexmark Q3, local item suggestion: the auctions of category 10 whose
seller lives in Oregon, Idaho or California, with the seller's name, city
and state: a join of two tables (persons by id, auctions by seller), kept
up to date as both grow, whatever order their events come in.

``SELECT P.name, P.city, P.state, A.id FROM auction A, person P
WHERE A.seller = P.id AND P.state IN ('OR', 'ID', 'CA') AND A.category = 10``

The output is the joined view's changelog (``_op``; only inserts here,
since persons and auctions never change).
"""

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.jobs.nexmark.common import Settings, source
from sluiceway.operators.connectors.nexmark import auctions, persons
from sluiceway.operators.sinks import ParquetSink

STATES = ["OR", "ID", "CA"]


def local_sellers(batch) -> pa.Table:
    p = persons(batch)
    p = p.filter(pc.is_in(pc.cast(p["state"], pa.string()), value_set=pa.array(STATES)))
    return pa.table({"id": p["id"], "name": pc.cast(p["name"], pa.string()), "city": pc.cast(p["city"], pa.string()),
                     "state": pc.cast(p["state"], pa.string())})


def category_ten(batch) -> pa.Table:
    a = auctions(batch)
    a = a.filter(pc.equal(a["category"], 10))
    return pa.table({"auction": a["id"], "seller": a["seller"]})


def build(settings: Settings = Settings.from_env()) -> Dataflow:
    flow = Dataflow("nexmark_q3")
    events = source(flow, settings)
    sellers = events.map_batches(local_sellers, name="local_sellers").to_table("id", name="persons")
    items = events.map_batches(category_ten, name="category_ten").to_table("auction", updates="retract",
                                                                          name="auctions")
    joined = items.join(sellers, on="seller", right_on="id", name="join")
    joined.map_batches(lambda b: b.select(["name", "city", "state", "auction", "_op"]), name="project") \
        .sink(ParquetSink(f"{settings.output}/q3"), name="out")
    return flow


flow = build()
