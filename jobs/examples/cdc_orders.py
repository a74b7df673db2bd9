"""Example job: PostgreSQL orders, captured as changes, kept as per-customer
totals in Redis: a cache that stays in sync with the database without the
application writing to both.

The table ``orders (id int primary key, customer text, amount numeric(10,2))``
is read by change data capture: a consistent snapshot, then every insert,
update and delete (``PostgresCDCSource``, slot ``sluiceway_orders``). With
``updates="retract"`` an update arrives as the old row (``_op`` =
``delete``) and the new one (``insert``), so each change becomes a signed
amount: a customer's total is the sum of the signs times the amounts, its
order count the sum of the signs. Each customer's total and count go to the
Redis hash ``customer_total:<customer>`` (``RedisSink``: one transaction per
epoch and task, a replay writes nothing new).

Settings (environment):

- ``SLUICEWAY_EXAMPLE_PG``: PostgreSQL DSN (default ``host=127.0.0.1 user=postgres dbname=postgres``);
  the server needs ``wal_level=logical`` and wal2json;
- ``SLUICEWAY_EXAMPLE_REDIS``: Redis URL (default ``redis://127.0.0.1:6379/0``).

Run it::

    psql -c "CREATE TABLE orders (id int PRIMARY KEY, customer text, amount numeric(10,2))"
    psql -c "ALTER TABLE orders REPLICA IDENTITY FULL"
    sluiceway run jobs/examples/cdc_orders.py
    psql -c "INSERT INTO orders VALUES (1, 'ada', 12.50)"    # then: redis-cli hgetall customer_total:ada

The job keeps the slot between runs; ``sluiceway cdc drop-slot sluiceway_orders``
frees it when the job is gone for good.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.jobs.examples import flow_on_demand
from sluiceway.operators.sinks import RedisSink
from sluiceway.operators.sources import PostgresCDCSource

DSN = os.environ.get("SLUICEWAY_EXAMPLE_PG", "host=127.0.0.1 user=postgres dbname=postgres")
REDIS = os.environ.get("SLUICEWAY_EXAMPLE_REDIS", "redis://127.0.0.1:6379/0")


def signed(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Each change as a signed amount: +amount for a row that came in, -amount for one that went out."""
    sign = pc.if_else(pc.equal(batch.column("_op"), "delete"), -1, 1)
    amount = pc.multiply(pc.cast(batch.column("amount"), pa.float64()), pc.cast(sign, pa.float64()))
    return pa.RecordBatch.from_arrays([batch.column("customer"), amount, sign],
                                      names=["customer", "signed_amount", "sign"])


def build(dsn: str = DSN, redis_url: str = REDIS, table: str = "orders", slot: str = "sluiceway_orders",
          prefix: str = "customer_total:", name: str = "cdc_orders") -> Dataflow:
    flow = Dataflow(name)
    changes = flow.source(PostgresCDCSource(dsn, [table], slot, updates="retract"), name="orders", parallelism=1)
    totals = changes.map_batches(signed, name="signed").key_by("customer", name="by_customer") \
        .aggregate([("signed_amount", "sum"), ("sign", "sum")], name="totals")
    totals.sink(RedisSink(redis_url, key="customer", prefix=prefix), name="totals_to_redis")
    return flow


__getattr__ = flow_on_demand(__name__, build)
