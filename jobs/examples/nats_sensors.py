"""Example job: sensor readings from NATS JetStream, rolling averages to Parquet.

Readings ``{"sensor": "s3", "value": 21.5, "at": "2026-11-23T10:00:00.250"}``
are published on the subjects ``sensors.<site>`` of the JetStream stream
``SENSORS``; each subject is a partition. The job reads them in event time
(``at``, up to 5 s out of order), and every 10 s writes each sensor's mean
over the last minute (a hopping window) to Parquet. Readings that are not
JSON of that shape go to dead letters, with their stream sequence.

Settings (environment):

- ``SLUICEWAY_EXAMPLE_NATS``: the server (default ``nats://127.0.0.1:4222``);
- ``SLUICEWAY_EXAMPLE_SITES``: the sites, comma-separated (default ``north,south``);
- ``SLUICEWAY_EXAMPLE_OUTPUT``: where the averages go (default ``./.sluiceway-output``);
- ``SLUICEWAY_EXAMPLE_BOUNDED=1``: read what the stream holds at start, then end
  (for ``sluiceway run ... --until-idle``).

Run it::

    nats-server -js &
    python -m sluiceway.jobs.examples.nats_sensors --produce 20000   # creates SENSORS, publishes
    sluiceway run jobs/examples/nats_sensors.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from datetime import datetime, timedelta

import pyarrow as pa

from sluiceway.jobs import Dataflow
from sluiceway.jobs.examples import flow_on_demand
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.sources import NatsJetStreamSource

URL = os.environ.get("SLUICEWAY_EXAMPLE_NATS", "nats://127.0.0.1:4222")
SITES = os.environ.get("SLUICEWAY_EXAMPLE_SITES", "north,south").split(",")
OUTPUT = os.environ.get("SLUICEWAY_EXAMPLE_OUTPUT", ".sluiceway-output")
BOUNDED = os.environ.get("SLUICEWAY_EXAMPLE_BOUNDED", "") == "1"
STREAM = "SENSORS"
SCHEMA = pa.schema([("sensor", pa.string()), ("value", pa.float64()), ("at", pa.timestamp("ms"))])
EPOCH = datetime(2026, 11, 23, 10, 0, 0)


def build(url: str = URL, sites: list[str] = SITES, output: str = OUTPUT, bounded: bool | dict = BOUNDED,
          name: str = "nats_sensors") -> Dataflow:
    flow = Dataflow(name)
    readings = flow.source(NatsJetStreamSource(url, SCHEMA, stream=STREAM, subjects=[f"sensors.{s}" for s in sites],
                                               bounded=bounded), name="readings")
    means = readings.with_event_time("at", max_out_of_orderness=timedelta(seconds=5)) \
        .key_by("sensor", name="by_sensor") \
        .rolling_mean("value", size=timedelta(minutes=1), hop=timedelta(seconds=10), name="rolling_mean")
    means.sink(ParquetSink(f"{output}/sensor_means"), name="means_out")
    readings.dead_letters(name="bad_readings").sink(ParquetSink(f"{output}/sensor_dead_letters"), name="bad_out")
    return flow


def reading(i: int, sites: list[str]) -> tuple[str, dict]:
    """The ``i``-th reading: a reading every 10 ms of event time, 20 sensors, a few out of order."""
    at = EPOCH + timedelta(milliseconds=10 * i - (1500 if i % 50 == 7 else 0))
    return f"sensors.{sites[i % len(sites)]}", {"sensor": f"s{i % 20}", "value": float(i % 37),
                                                "at": at.isoformat(timespec="milliseconds")}


def produce(url: str, count: int, sites: list[str] = SITES) -> None:
    """Create the stream when missing and publish ``count`` readings."""
    import nats

    async def go():
        nc = await nats.connect(url)
        js = nc.jetstream()
        try:
            await js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            await js.add_stream(name=STREAM, subjects=["sensors.*"])
        for start in range(0, count, 500):
            await asyncio.gather(*(js.publish(subject, json.dumps(doc).encode())
                                   for subject, doc in (reading(i, sites) for i in range(start, min(count, start + 500)))))
        await nc.close()

    asyncio.run(go())


__getattr__ = flow_on_demand(__name__, build)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="publish sensor readings to NATS JetStream")
    parser.add_argument("--produce", type=int, required=True, metavar="N", help="readings to publish")
    parser.add_argument("--url", default=URL)
    args = parser.parse_args()
    produce(args.url, args.produce)
