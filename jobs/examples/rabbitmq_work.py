"""Example job: a RabbitMQ work queue, each task enriched, into Parquet.

Producers put tasks ``{"task": 17, "weight": 5}`` on the durable queue
``work`` (with a ``message_id`` each, so that a message RabbitMQ delivers
again is recognised). The job takes them through ``RabbitMQSource``: a
write-ahead copy in the job's checkpoint storage, acknowledged to RabbitMQ
only after the checkpoint that covers it, so nothing is lost and nothing is
done twice, whatever is killed. Each task gets a ``priority`` (``high`` for a
weight of 10 or more) and a ``cost`` (weight times 1.5), computed with Arrow
on the whole batch, and lands in Parquet; bodies that are not JSON go to
dead letters.

Settings (environment):

- ``SLUICEWAY_EXAMPLE_AMQP``: the server (default ``amqp://guest:guest@127.0.0.1:5672/%2F``);
- ``SLUICEWAY_EXAMPLE_OUTPUT``: where the tasks go (default ``./.sluiceway-output``).

Run it::

    sluiceway run jobs/examples/rabbitmq_work.py --parallelism 2
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.jobs.examples import flow_on_demand
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.sources import RabbitMQSource

URL = os.environ.get("SLUICEWAY_EXAMPLE_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
OUTPUT = os.environ.get("SLUICEWAY_EXAMPLE_OUTPUT", ".sluiceway-output")
SCHEMA = pa.schema([("task", pa.int64()), ("weight", pa.int64())])


def enrich(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``priority`` and ``cost`` for every task of the batch at once."""
    weight = batch.column("weight")
    priority = pc.if_else(pc.greater_equal(weight, 10), "high", "normal")
    cost = pc.multiply(pc.cast(weight, pa.float64()), 1.5)
    return pa.RecordBatch.from_arrays([*batch.columns, priority, cost],
                                      names=[*batch.schema.names, "priority", "cost"])


def build(url: str = URL, queue: str = "work", output: str = OUTPUT, partitions: int = 2,
          name: str = "rabbitmq_work") -> Dataflow:
    flow = Dataflow(name)
    tasks = flow.source(RabbitMQSource(url, queue, SCHEMA, partitions=partitions, id_column="message_id"),
                        name="tasks")
    tasks.map_batches(enrich, name="enrich").sink(ParquetSink(f"{output}/tasks"), name="tasks_out")
    tasks.dead_letters(name="bad_tasks").sink(ParquetSink(f"{output}/task_dead_letters"), name="bad_out")
    return flow


__getattr__ = flow_on_demand(__name__, build)
