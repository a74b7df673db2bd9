"""Example job: click events from a log topic, exactly-once into PostgreSQL
and Delta Lake.

A producer (``python -m sluiceway.jobs.examples.produce_clicks``) appends the
click events of :mod:`sluiceway.jobs.examples.clicks` to the topic
``clicks`` of the log. This job reads the topic, keeps clicks worth at least
5 cents, appends every kept click to a Delta table (``DeltaSink``, append)
and keeps each user's click count and total in the PostgreSQL table
``user_totals`` (``PostgresSink``, upsert by ``user_id``). Records the log
cannot decode go to a Parquet folder of dead letters.

Settings (environment):

- ``SLUICEWAY_LOG_DIR``: the log (default ``./.sluiceway-log``);
- ``SLUICEWAY_EXAMPLE_PG``: PostgreSQL DSN (default
  ``host=127.0.0.1 user=postgres dbname=postgres``);
- ``SLUICEWAY_EXAMPLE_OUTPUT``: where the Delta table and the dead letters
  go (default ``./.sluiceway-output``);
- ``SLUICEWAY_EXAMPLE_ROWS``: records per partition the job reads, then it
  ends (default 20000, what the producer writes by default; ``0``: never end).

Run it::

    sluiceway log create clicks --partitions 2
    python -m sluiceway.jobs.examples.produce_clicks &
    sluiceway run jobs/examples/log_clicks.py --until-idle
"""

from __future__ import annotations

import os

import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.jobs.examples import flow_on_demand
from sluiceway.jobs.examples.clicks import PARTITIONS, with_dollars
from sluiceway.operators.sinks import DeltaSink, ParquetSink, PostgresSink
from sluiceway.operators.sources import LogSource

TOPIC = "clicks"
DSN = os.environ.get("SLUICEWAY_EXAMPLE_PG", "host=127.0.0.1 user=postgres dbname=postgres")
OUTPUT = os.environ.get("SLUICEWAY_EXAMPLE_OUTPUT", ".sluiceway-output")
ROWS = int(os.environ.get("SLUICEWAY_EXAMPLE_ROWS", "20000"))


def build(log_dir: str | None = None, dsn: str = DSN, output: str = OUTPUT, rows_per_partition: int = ROWS,
          name: str = "log_clicks") -> Dataflow:
    flow = Dataflow(name)
    bounded = {p: rows_per_partition for p in range(PARTITIONS)} if rows_per_partition else False
    events = flow.source(LogSource(TOPIC, log_dir, bounded=bounded), name="events")
    kept = events.filter(pc.field("cents") >= 5, name="worth_it").map_batches(with_dollars, name="dollars")
    kept.sink(DeltaSink(f"{output}/clicks_delta"), name="clicks_to_delta")
    totals = kept.key_by("user_id", name="by_user").aggregate([("event_id", "count"), ("cents", "sum")],
                                                               name="totals")
    totals.sink(PostgresSink(dsn, "user_totals", mode="upsert", key=["user_id"], create_table=True),
                name="totals_to_postgres")
    events.dead_letters(name="undecodable").sink(ParquetSink(f"{output}/dead_letters"), name="dead_out")
    return flow


__getattr__ = flow_on_demand(__name__, build)
