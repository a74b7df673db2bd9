"""Example job: event sourcing (CQRS). One log of a shop's cart commands,
two views maintained from it, and a replay into fresh views that ends
identical.

The log (topic ``carts``, 2 partitions) holds commands: ``add`` and
``remove`` (an item, its quantity and price), then ``checkout`` (with the
amount paid) or ``abandon``. A cart's commands come from one partition, in
order. The views:

- **current carts**, a table in PostgreSQL (``carts``: cart, items, value,
  status ``open``/``paid``): a keyed aggregate of each cart's commands,
  emitted as a changelog whose ``_op`` is ``delete`` for an abandoned cart,
  upserted per epoch exactly once (``PostgresSink(mode="upsert")``);
- **revenue per hour**, in Delta Lake (``<output>/revenue``): the checkout
  amounts in one-hour tumbling event-time windows.

Replaying the log from offset 0 into a fresh table and a fresh Delta path
(``build(..., name="shop_replay", table="carts_replay")``) rebuilds both
views exactly: the log is the truth, the views are caches of it.
``expected_carts`` and ``expected_revenue`` compute the views in plain
pyarrow from the commands.

Settings: ``$SLUICEWAY_EXAMPLE_PG`` (DSN, default
``host=127.0.0.1 user=postgres dbname=postgres``), ``$SLUICEWAY_LOG_DIR``
(the log), ``$SLUICEWAY_EXAMPLE_OUTPUT``. Run it::

    python -m sluiceway.jobs.examples.shop produce    # writes the commands to the log
    sluiceway run jobs/examples/shop.py --until-idle
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.jobs.examples import flow_on_demand
from sluiceway.operators.sources import GeneratorSource, offsets
from sluiceway.operators.windows import Tumbling

PARTITIONS, TOPIC = 2, "carts"
ROWS_PER_PARTITION = int(os.environ.get("SLUICEWAY_EXAMPLE_ROWS", "20000"))
OUTPUT = os.environ.get("SLUICEWAY_EXAMPLE_OUTPUT", ".sluiceway-output")
DSN = os.environ.get("SLUICEWAY_EXAMPLE_PG", "host=127.0.0.1 user=postgres dbname=postgres")
T0_US = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp() * 1_000_000)
KINDS = np.asarray(["add", "add", "add", "remove", "add", "add", "remove", "checkout"])
CART_SIZE = len(KINDS)  # commands per cart: its 8th checks out, or abandons one cart in four


def _value(o: np.ndarray, partition: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantity and price (cents) of command ``o``."""
    return 1 + (o * 7 + partition) % 3, 100 * (1 + (o * 31 + partition * 7) % 50)


def commands(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Commands ``[start, stop)`` of ``partition``: cart ``(o // 8) * 2 + partition``."""
    o = np.asarray(offsets(start, stop))
    cart = (o // CART_SIZE) * PARTITIONS + partition
    kind = KINDS[o % CART_SIZE].astype(object)
    kind[(o % CART_SIZE == CART_SIZE - 1) & (cart % 4 == 3)] = "abandon"
    qty, price = _value(o, partition)
    # A checkout pays what the cart holds: its seven earlier commands, signed.
    first = (o // CART_SIZE) * CART_SIZE
    earlier = first[:, None] + np.arange(CART_SIZE - 1)[None, :]
    e_qty, e_price = _value(earlier, partition)
    sign = np.where(KINDS[earlier % CART_SIZE] == "remove", -1, 1)
    paid = np.maximum((sign * e_qty * e_price).sum(axis=1), 0)
    checkout = kind == "checkout"
    return pa.record_batch({
        "cart": pa.array(cart),
        "kind": pa.array(kind.tolist(), pa.string()),
        "qty": pa.array(np.where(np.isin(kind, ["add", "remove"]), qty, 0)),
        "price": pa.array(np.where(np.isin(kind, ["add", "remove"]), price, 0)),
        "amount": pa.array(np.where(checkout, paid, 0)),
        "ts": pa.array(T0_US + (o * PARTITIONS + partition) * 2_000_000).cast(pa.timestamp("us", tz="UTC")),
    })


def signed(batch: pa.RecordBatch) -> pa.RecordBatch:
    """What each command does to its cart: items and value (signed), and a
    state code (1 paid, 2 abandoned)."""
    sign = pc.if_else(pc.equal(batch["kind"], "remove"), -1, 1)
    state = pc.if_else(pc.equal(batch["kind"], "checkout"), 1, pc.if_else(pc.equal(batch["kind"], "abandon"), 2, 0))
    return pa.record_batch({"cart": batch["cart"], "items": pc.multiply(sign, batch["qty"]),
                            "value": pc.multiply(sign, pc.multiply(batch["qty"], batch["price"])),
                            "state": pc.cast(state, pa.int64())})


def as_changelog(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The aggregate's rows as the carts table's changes: an abandoned cart is deleted."""
    state = batch["state_max"]
    return pa.record_batch({
        "cart": batch["cart"], "items": batch["items_sum"], "value": batch["value_sum"],
        "status": pc.if_else(pc.equal(state, 1), "paid", "open"),
        "_op": pc.if_else(pc.equal(state, 2), "delete", "update"),
    })


def topic(log_dir: str | None = None):
    from sluiceway.operators.connectors.log import Log, TopicConfig
    from sluiceway.operators.errors import SourceError

    log = Log(log_dir)
    try:
        return log.topic(TOPIC)
    except SourceError:
        return log.create_topic(TopicConfig(TOPIC, partitions=PARTITIONS))


def produce(log_dir: str | None = None, rows_per_partition: int = ROWS_PER_PARTITION, batch: int = 2000) -> None:
    """Append every command to the log (once: a topic that has them is left as it is)."""
    t = topic(log_dir)
    for p in range(PARTITIONS):
        for first in range(t.offsets(p)[1], rows_per_partition, batch):
            t.append_partition(p, commands(p, first, min(rows_per_partition, first + batch)))


def build(log_dir: str | None = None, dsn: str = DSN, output: str = OUTPUT,
          rows_per_partition: int = ROWS_PER_PARTITION, name: str = "shop", table: str = "carts",
          rate: float | None = None) -> Dataflow:
    """The job. ``rate``: read the commands from a generator at that rate
    instead of from the log (the same commands)."""
    from sluiceway.operators.connectors.delta import DeltaSink
    from sluiceway.operators.connectors.log import LogSource
    from sluiceway.operators.connectors.postgres import PostgresSink

    flow = Dataflow(name)
    if rate is None:
        source = LogSource(TOPIC, log_dir, bounded={p: rows_per_partition for p in range(PARTITIONS)})
    else:
        source = GeneratorSource(commands, PARTITIONS, rate, rows_per_partition)
    add_to(flow, source, PostgresSink(dsn, table, mode="upsert", key=["cart"], create_table=True),
           DeltaSink(f"{output}/revenue"))
    return flow


def add_to(flow: Dataflow, source, carts_sink, revenue_sink, prefix: str = "") -> None:
    log = flow.source(source, name=f"{prefix}commands").with_event_time("ts", max_out_of_orderness=timedelta(seconds=5))
    carts = (log.map_batches(signed, name=f"{prefix}signed").key_by("cart", name=f"{prefix}by_cart")
             .aggregate([("items", "sum"), ("value", "sum"), ("state", "max")], name=f"{prefix}cart_totals")
             .map_batches(as_changelog, name=f"{prefix}cart_changes"))
    carts.sink(carts_sink, name=f"{prefix}carts_out")
    revenue = (log.filter(pc.field("kind") == "checkout", name=f"{prefix}checkouts")
               .map_batches(lambda b: b.append_column("shop", pa.array(["shop"] * b.num_rows)), name=f"{prefix}shop")
               .key_by("shop", name=f"{prefix}one_shop")
               .window(Tumbling(timedelta(hours=1))).aggregate([("amount", "sum"), ([], "count_all")],
                                                               name=f"{prefix}revenue"))
    revenue.sink(revenue_sink, name=f"{prefix}revenue_out")


def _all(rows_per_partition: int) -> pa.Table:
    return pa.Table.from_batches([commands(p, 0, rows_per_partition) for p in range(PARTITIONS)])


def expected_carts(rows_per_partition: int = ROWS_PER_PARTITION) -> set[tuple]:
    """(cart, items, value, status) of every cart not abandoned."""
    s = pa.Table.from_batches([signed(b) for b in _all(rows_per_partition).to_batches()])
    g = s.group_by("cart").aggregate([("items", "sum"), ("value", "sum"), ("state", "max")])
    g = g.filter(pc.not_equal(g["state_max"], 2))
    status = pc.if_else(pc.equal(g["state_max"], 1), "paid", "open")
    return set(zip(g["cart"].to_pylist(), g["items_sum"].to_pylist(), g["value_sum"].to_pylist(), status.to_pylist()))


def expected_revenue(rows_per_partition: int = ROWS_PER_PARTITION) -> set[tuple]:
    """(window_start, amount_sum, count_all) per hour of checkouts."""
    c = _all(rows_per_partition)
    c = c.filter(pc.equal(c["kind"], "checkout"))
    hour = 3600 * 1_000_000
    start = pc.multiply(pc.divide(pc.cast(c["ts"], pa.int64()), hour), hour)
    g = pa.table({"s": start, "amount": c["amount"]}).group_by("s").aggregate([("amount", "sum"), ([], "count_all")])
    starts = pc.cast(g["s"], pa.timestamp("us", tz="UTC")).to_pylist()
    return set(zip(starts, g["amount_sum"].to_pylist(), g["count_all"].to_pylist()))


def revenue_rows(table: pa.Table) -> set[tuple]:
    return set(zip(table["window_start"].to_pylist(), table["amount_sum"].to_pylist(), table["count_all"].to_pylist()))


__getattr__ = flow_on_demand(__name__, build)

if __name__ == "__main__" and sys.argv[1:] == ["produce"]:
    produce()
