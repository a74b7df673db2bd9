"""A workload over Redis Streams and NATS JetStream, for the runs on Ray.

Sensor readings go into two Redis streams (entry ids ``0-1``, ``0-2``, ...,
so the offsets are known in advance and the job can end there) and two
JetStream streams (sequences 1, 2, ...). Every 97th message is not JSON:
a dead letter. The job keeps per-sensor totals of the Redis readings in
Redis (``RedisSink``) and appends every NATS reading to Parquet; both
outputs are compared with what was produced.
"""

from __future__ import annotations

import asyncio
import json
import time

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.sinks import ParquetSink, RedisSink, read_committed
from sluiceway.operators.sources import NatsJetStreamSource, RedisStreamSource

SCHEMA = pa.schema([("id", pa.int64()), ("sensor", pa.string()), ("value", pa.int64())])
SENSORS = 7


def reading(partition: int, i: int) -> dict:
    n = partition * 1_000_000 + i
    return {"id": n, "sensor": f"s{n % SENSORS}", "value": n % 101}


def payload(partition: int, i: int) -> bytes:
    return b"not json {" if i % 97 == 96 else json.dumps(reading(partition, i)).encode()


def produce_redis(url: str, keys: list[str], rows: int, rate: float = 0.0) -> None:
    """``rows`` entries per stream, ids ``0-1`` .. ``0-rows``, at ``rate`` entries/s per stream (0: at once)."""
    import redis

    client = redis.Redis.from_url(url)
    started = time.time()
    for start in range(0, rows, 200):
        pipe = client.pipeline(transaction=False)
        for p, key in enumerate(keys):
            for i in range(start, min(rows, start + 200)):
                pipe.xadd(key, {"data": payload(p, i)}, id=f"0-{i + 1}")
        pipe.execute()
        if rate:
            time.sleep(max(0.0, started + (start + 200) / rate - time.time()))


def produce_nats(url: str, streams: list[str], rows: int, rate: float = 0.0, create: bool = True,
                 retry: bool = False, first: int = 0) -> None:
    """Messages ``first`` .. ``rows - 1`` of each stream at ``rate`` messages/s per stream (0: at once). With ``retry``, a batch
    the server did not acknowledge (it is down) is published again until it is, each message with a
    ``Nats-Msg-Id`` so that JetStream keeps one copy of a message published twice."""
    import nats

    async def go():
        nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        js = nc.jetstream(timeout=2)
        if create:
            for s in streams:
                await js.add_stream(name=s, subjects=[f"{s.lower()}.readings"])
        started = time.time()
        for start in range(first, rows, 200):
            for p, s in enumerate(streams):
                while True:
                    try:
                        await asyncio.gather(*(js.publish(f"{s.lower()}.readings", payload(p, i),
                                                          headers={"Nats-Msg-Id": f"{s}-{i}"})
                                               for i in range(start, min(rows, start + 200))))
                        break
                    except (nats.errors.Error, asyncio.TimeoutError, OSError):
                        if not retry:
                            raise
                        await asyncio.sleep(0.2)
            if rate:
                await asyncio.sleep(max(0.0, started + (start - first + 200) / rate - time.time()))
        await nc.close()

    asyncio.run(go())


def create_streams(redis_url: str | None, keys: list[str], nats_url: str | None, streams: list[str]) -> None:
    """Empty streams, so the job can start before the producers."""
    if redis_url is not None:
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in keys:
            client.xgroup_create(key, "sluiceway-test", id="0", mkstream=True)

    async def go():
        import nats

        nc = await nats.connect(nats_url)
        for s in streams:
            await nc.jetstream().add_stream(name=s, subjects=[f"{s.lower()}.readings"])
        await nc.close()

    if nats_url is not None:
        asyncio.run(go())


def add_to(flow, redis_url: str, keys: list[str], nats_url: str, streams: list[str], rows: int, out: str,
           prefix: str) -> None:
    """The Redis and NATS branches, added to ``flow``."""
    readings = flow.source(RedisStreamSource(redis_url, keys, SCHEMA, json_field="data", id_column=None,
                                             bounded={p: rows + 1 for p in range(len(keys))}), name="redis_in",
                           parallelism=1)
    totals = readings.key_by("sensor", parallelism=1, name="by_sensor").aggregate([("value", "sum"), ("id", "count")],
                                                                    name="sensor_totals")
    totals.sink(RedisSink(redis_url, key="sensor", prefix=prefix), name="totals_to_redis")
    readings.dead_letters(name="redis_bad").sink(ParquetSink(f"{out}/redis_dead"), name="redis_dead_out")
    nats_in = flow.source(NatsJetStreamSource(nats_url, SCHEMA, streams=streams, sequence_column="seq",
                                              bounded={p: rows for p in range(len(streams))}), name="nats_in",
                            parallelism=1)
    nats_in.sink(ParquetSink(f"{out}/nats_rows"), name="nats_out")
    nats_in.dead_letters(name="nats_bad").sink(ParquetSink(f"{out}/nats_dead"), name="nats_dead_out")


def expected(partitions: int, rows: int) -> pa.Table:
    return pa.Table.from_pylist([reading(p, i) for p in range(partitions) for i in range(rows) if i % 97 != 96],
                                SCHEMA)


def check(redis_url: str, partitions: int, out: str, rows: int, prefix: str) -> dict:
    """What each output holds against what was produced: a line each, "ok" when exact."""
    import redis

    want = expected(partitions, rows)
    totals = want.group_by("sensor").aggregate([("value", "sum"), ("id", "count")])
    want_totals = {s: (v, c) for s, v, c in zip(*(totals.column(n).to_pylist()
                                                   for n in ("sensor", "value_sum", "id_count")))}
    client = redis.Redis.from_url(redis_url)
    got_totals = {}
    for key in client.scan_iter(f"{prefix}*"):
        h = client.hgetall(key)
        got_totals[key.decode()[len(prefix):]] = (int(h[b"value_sum"]), int(h[b"id_count"]))
    return {"redis_totals": "ok" if got_totals == want_totals else f"differ: {got_totals} != {want_totals}",
            **check_nats(partitions, out, rows), "redis_dead": dead_letters(partitions, out, rows, "redis_dead")}


def check_nats(partitions: int, out: str, rows: int) -> dict:
    """The NATS rows and dead letters against what was produced: a line each, "ok" when exact."""
    want = expected(partitions, rows)
    got = read_committed(f"{out}/nats_rows")
    ids = got.column("id")
    dup = len(ids) - len(pc.unique(ids))
    same = sorted(ids.to_pylist()) == sorted(want.column("id").to_pylist())
    return {"nats_rows": "ok" if same and dup == 0 else f"{len(ids)} rows, {dup} duplicates, want {want.num_rows}",
            "nats_dead": dead_letters(partitions, out, rows, "nats_dead")}


def dead_letters(partitions: int, out: str, rows: int, name: str) -> str:
    bad = partitions * (rows // 97)
    dead = read_committed(f"{out}/{name}")
    offsets = dead.column("start_offset").to_pylist()
    return "ok" if len(dead) == bad and len(set(zip(dead.column("partition").to_pylist(), offsets))) == bad \
        else f"{len(dead)} dead letters, want {bad}"


def create_orders(dsn: str, table: str, rows: int = 300) -> None:
    """A table of orders (``REPLICA IDENTITY FULL``, for retractions) with ``rows`` orders in it."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, customer text, amount numeric(10,2))")
        conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
        conn.execute(f"INSERT INTO {table} SELECT i, 'c' || (i %% 7), i / 4.0 FROM generate_series(1, %s) i", (rows,))


def change_orders(dsn: str, table: str, first: int = 301, count: int = 600, pause_s: float = 0.005) -> None:
    """Orders placed, changed (amount and customer) and cancelled, a transaction each."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(first, first + count):
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (i, f"c{i % 5}", i / 8))
            conn.execute(f"UPDATE {table} SET amount = amount + 1, customer = 'c9' WHERE id = %s", (i - 250,))
            if i % 4 == 0:
                conn.execute(f"DELETE FROM {table} WHERE id = %s", (i - 200,))
            time.sleep(pause_s)


def publish_tasks(url: str, queue: str, n: int, rate: float = 0.0) -> None:
    """``n`` tasks on a durable queue, each with a message id, every 97th not JSON."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.queue_declare(queue, durable=True)
    started = time.time()
    for i in range(n):
        body = b"{oops" if i % 97 == 96 else json.dumps({"task": i, "weight": i % 13}).encode()
        channel.basic_publish("", queue, body, pika.BasicProperties(message_id=f"t{i}", delivery_mode=2))
        if rate and i % 100 == 99:
            time.sleep(max(0.0, started + (i + 1) / rate - time.time()))
    conn.close()


def add_queue_and_cdc(flow, amqp_url: str, queue: str, dsn: str, table: str, slot: str, redis_url: str, out: str,
                      prefix: str) -> None:
    """The RabbitMQ work queue (jobs/examples/rabbitmq_work.py) and the CDC totals
    (jobs/examples/cdc_orders.py) as branches of ``flow``."""
    from sluiceway.jobs.examples import cdc_orders, rabbitmq_work
    from sluiceway.operators.sources import PostgresCDCSource, RabbitMQSource

    tasks = flow.source(RabbitMQSource(amqp_url, queue, rabbitmq_work.SCHEMA, partitions=2, id_column="message_id"),
                        name="tasks", parallelism=1)
    tasks.map_batches(rabbitmq_work.enrich, name="enrich").sink(ParquetSink(f"{out}/tasks"), name="tasks_out")
    changes = flow.source(PostgresCDCSource(dsn, [table], slot, updates="retract"), name="orders", parallelism=1)
    totals = changes.map_batches(cdc_orders.signed, name="signed").key_by("customer", parallelism=1,
                                                                           name="by_customer")
    totals.aggregate([("signed_amount", "sum"), ("sign", "sum")], name="customer_totals") \
        .sink(RedisSink(redis_url, key="customer", prefix=prefix), name="customer_totals_to_redis")


def cdc_totals(dsn: str, table: str, redis_url: str, prefix: str) -> tuple[dict, dict]:
    """Per-customer (total, orders) in Redis and in the table."""
    import psycopg
    import redis

    client = redis.Redis.from_url(redis_url)
    got = {}
    for key in client.scan_iter(f"{prefix}*"):
        h = client.hgetall(key)
        if int(h[b"sign_sum"]):
            got[key.decode()[len(prefix):]] = (round(float(h[b"signed_amount_sum"]), 6), int(h[b"sign_sum"]))
    with psycopg.connect(dsn) as conn:
        want = {c: (round(float(t), 6), n) for c, t, n in conn.execute(
            f"SELECT customer, sum(amount), count(*) FROM {table} GROUP BY customer").fetchall()}
    return got, want


def tasks_done(out: str, n: int) -> str:
    """"ok" when every task that is JSON is in the output once."""
    want = {f"t{i}" for i in range(n) if i % 97 != 96}
    try:
        ids = read_committed(f"{out}/tasks").column("message_id").to_pylist()
    except Exception:  # noqa: BLE001 - nothing committed yet
        return "no output yet"
    return "ok" if len(ids) == len(set(ids)) and set(ids) == want else f"{len(ids)} tasks ({len(set(ids))} distinct), want {len(want)}"
