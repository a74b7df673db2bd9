"""The contract every source keeps, against the real systems: a planned
range read twice gives identical batches; ranges planned with a cap cover
the same records once, in order; the lag counts what is left; releasing what
a checkpoint covers never loses a record not yet processed."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluiceway.checkpoint.storage import JobStorage
from sluiceway.operators.connectors.log import Log, TopicConfig
from sluiceway.operators.sources import (FileSource, ListSource, LogSource, NatsJetStreamSource, RabbitMQSource,
                                        RedisStreamSource)

SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.string())])


def rows(start: int, n: int) -> list[dict]:
    return [{"k": i, "v": f"v{i}"} for i in range(start, start + n)]


class Case:
    """A source over a system, and how to add records to it."""

    def __init__(self, source_factory, produce, partitions_fed: int, per_file: bool = False):
        self.source_factory, self.produce, self.partitions_fed = source_factory, produce, partitions_fed
        self.per_file = per_file  # offsets are files, not records
        self.made = 0

    def add(self, n: int) -> None:
        self.produce(rows(self.made, n))
        self.made += n


def nats_publish(url: str, stream: str, subjects: list[str], batch: list[dict], create: bool = False) -> None:
    import nats

    async def go():
        nc = await nats.connect(url)
        js = nc.jetstream()
        if create:
            await js.add_stream(name=stream, subjects=[f"{stream.lower()}.*"])
        for r in batch:
            await js.publish(subjects[r["k"] % len(subjects)], json.dumps(r).encode())
        await nc.close()

    asyncio.run(go())


CASES = ["log", "files", "redis", "redis-fields", "nats-subjects", "nats-streams", "rabbitmq"]


def rabbit_publish(url: str, queue: str, batch: list[dict]) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.queue_declare(queue, durable=True)
    for r in batch:
        channel.basic_publish("", queue, json.dumps(r).encode(),
                              pika.BasicProperties(message_id=f"m{r['k']}", delivery_mode=2))
    conn.close()


@pytest.fixture(params=CASES)
def case(request, tmp_path) -> Case:
    name = request.param
    if name == "log":
        topic = Log(str(tmp_path / "log")).create_topic(TopicConfig("t", partitions=2, key="k"))
        return Case(lambda: LogSource("t", str(tmp_path / "log")), lambda b: topic.append(pa.Table.from_pylist(b, SCHEMA)), 2)
    if name == "files":
        (tmp_path / "in").mkdir()

        def write(batch):
            path = tmp_path / "in" / f"{uuid.uuid4().hex}.parquet"
            pq.write_table(pa.Table.from_pylist(batch, SCHEMA), str(path))
        def produce(batch):
            for i in range(0, len(batch), 4):
                write(batch[i:i + 4])
        return Case(lambda: FileSource(str(tmp_path / "in"), partitions=2, schema=SCHEMA), produce, 2, per_file=True)
    if name.startswith("redis"):
        import redis

        url = request.getfixturevalue("redis_server").url
        keys = [f"contract-{uuid.uuid4().hex[:8]}-{p}" for p in range(2)]
        client = redis.Redis.from_url(url)
        fields = name == "redis-fields"

        def add(batch):
            for r in batch:
                client.xadd(keys[r["k"] % 2], {"k": r["k"], "v": r["v"]} if fields else {"data": json.dumps(r)})
        add([])
        for key in keys:  # the streams exist before the source looks
            client.xadd(key, {"data": json.dumps({"k": -1, "v": "first"})} if not fields else {"k": -1, "v": "first"})
        return Case(lambda: RedisStreamSource(url, keys, SCHEMA, json_field=None if fields else "data"), add, 2)
    if name == "rabbitmq":
        url = request.getfixturevalue("rabbitmq_server").url
        queue = f"contract-{uuid.uuid4().hex[:8]}"
        rabbit_publish(url, queue, [])
        return Case(lambda: RabbitMQSource(url, queue, SCHEMA, partitions=2), lambda b: rabbit_publish(url, queue, b), 2)
    url = request.getfixturevalue("nats_server").url
    if name == "nats-subjects":
        stream = f"C{uuid.uuid4().hex[:8]}".upper()
        subjects = [f"{stream.lower()}.a", f"{stream.lower()}.b"]
        nats_publish(url, stream, subjects, [], create=True)
        return Case(lambda: NatsJetStreamSource(url, SCHEMA, stream=stream, subjects=subjects, sequence_column="seq"),
                    lambda b: nats_publish(url, stream, subjects, b), 2)
    streams = [f"S{uuid.uuid4().hex[:8]}".upper() for _ in range(2)]
    for s in streams:
        nats_publish(url, s, [f"{s.lower()}.x"], [], create=True)

    def publish(batch):
        for p, s in enumerate(streams):
            nats_publish(url, s, [f"{s.lower()}.x"], [r for r in batch if r["k"] % 2 == p])
    return Case(lambda: NatsJetStreamSource(url, SCHEMA, streams=streams, time_column="t"), publish, 2)


def bound(source, tmp_path):
    storage = JobStorage(str(tmp_path / "ckpt"), "contract")
    source.bind(storage, "src")
    return source


def test_source_contract(case, tmp_path):
    case.add(40)
    source = bound(case.source_factory(), tmp_path)
    now = time.time()
    assert source.partition_count() == case.partitions_fed
    seen = 0
    for p in range(source.partition_count()):
        first, latest = source.readable(p, now, now)
        whole, dead = source.read_batch(p, first, latest)
        assert dead is None or dead.num_rows == 0
        again, _ = bound(case.source_factory(), tmp_path).read_batch(p, first, latest)  # another process, another client
        assert whole.equals(again), "a planned range must read the same records every time"
        assert source.lag(p, first, latest, now).records == (latest - first if case.per_file else whole.num_rows)

        pieces, start = [], first  # an epoch of at most 7 records at a time
        while start < latest:
            stop = source.plan_stop(p, start, latest, 7)
            assert start < stop <= latest
            piece = source.read(p, start, stop)
            assert piece.num_rows <= (7 * 4 if case.per_file else 7)
            pieces.append(piece)
            start = stop
        assert pa.concat_tables(pieces).equals(whole), "capped ranges must cover the same records once, in order"
        seen += sum(1 for k in whole.column("k").to_pylist() if k >= 0)

        mid = source.plan_stop(p, first, latest, 5)  # a checkpoint covers [first, mid): release it
        covered = source.read(p, first, mid).num_rows
        source.checkpointed("contract", {p: mid})
        assert source.read(p, mid, latest).equals(whole.slice(covered)), \
            "releasing what a checkpoint covers must keep every record after it"
    assert seen == 40


def test_list_source_contract():
    source = ListSource(rows(0, 10), partitions=2)
    assert source.read(0, 1, 4).equals(source.read(0, 1, 4))
    assert source.plan_stop(0, 0, 5, 2) == 2 and source.lag(0, 2, 5, 0.0).records == 3
