"""RabbitMQ: queues that cannot replay, made exactly-once by a write-ahead
copy. On the session's Ray cluster, the example job (jobs/examples/rabbitmq_work.py) killed between processing and
acknowledgement (its messages are delivered again, none twice in the
output), then its server stopped and started again mid-run (the job waits,
resumes, drops what is delivered again); and without Ray: fan-out to the
queues of two jobs, and bad input."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pika
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray

from sluiceway.checkpoint.storage import JobStorage
from sluiceway.jobs import run
from sluiceway.jobs.examples import rabbitmq_work as example
from sluiceway.jobs.testing import StopWhen
from sluiceway.operators.errors import SourceError
from sluiceway.operators.sinks import read_committed
from sluiceway.operators.sources import RabbitMQSource

SCHEMA = pa.schema([("task", pa.int64()), ("weight", pa.int64())])


def publish(url: str, n: int, queue: str = "", exchange: str = "", bad_every: int = 0) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    if queue:
        channel.queue_declare(queue, durable=True)
    for i in range(n):
        body = b"{oops" if bad_every and i % bad_every == bad_every - 1 else json.dumps({"task": i, "weight": i % 13}).encode()
        channel.basic_publish(exchange, queue, body, pika.BasicProperties(message_id=f"t{i}", delivery_mode=2))
    conn.close()


def drain(url: str, queue: str) -> list[str]:
    """Take what the queue holds: the message ids."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel, ids = conn.channel(), []
    while True:
        method, props, _ = channel.basic_get(queue, auto_ack=True)
        if method is None:
            conn.close()
            return ids
        ids.append(props.message_id)


def depth(url: str, queue: str) -> tuple[int, int]:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    q = conn.channel().queue_declare(queue, passive=True).method
    conn.close()
    return q.message_count, q.consumer_count


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.timeout(420)
def test_killed_between_processing_and_ack_then_the_server_restarted_exactly_once(rabbitmq_server, tmp_path):
    n, queue, server = 2000, f"work-{uuid.uuid4().hex[:6]}", rabbitmq_server  # restarted mid-run, back after
    publish(server.url, n, queue, bad_every=97)
    out, ckpt = str(tmp_path / "tasks"), str(tmp_path / "ckpt")

    def build():  # the example job: jobs/examples/rabbitmq_work.py
        return example.build(server.url, queue, str(tmp_path))

    coordinators = []

    def kill_after_epoch_4(event):  # epoch 4 is committed, not checkpointed: its messages are not acknowledged
        if event["type"] == "epoch" and event["epoch"] == 4:
            ray.kill(coordinators[-1], no_restart=True)

    with pytest.raises(Exception):
        run(build(), ckpt, until_idle=False, trigger_s=0.2, checkpoint_every=3, max_records_per_epoch=300,
            on_event=kill_after_epoch_4, on_started=coordinators.append)
    assert read_committed(out).num_rows > 0

    events, outage, back, restart_failed = [], threading.Event(), threading.Event(), []

    def restart_server(event):
        events.append(event)
        if event["type"] == "epoch" and not outage.is_set():
            outage.set()

            def go():
                try:
                    server.stop()
                    time.sleep(1.0)
                    server.start(timeout_s=150)
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    restart_failed.append(exc)
                finally:
                    back.set()
            threading.Thread(target=go, daemon=True).start()

    want = {f"t{i}" for i in range(n) if i % 97 != 96}

    def seen() -> set:
        return set(read_committed(out).column("message_id").to_pylist())

    stopper = StopWhen(lambda: seen() >= want, after=back, deadline_s=120)  # the deadline counts from the restart
    summary = run(build(), ckpt, until_idle=False, trigger_s=0.2, checkpoint_every=3, max_records_per_epoch=300,
                  force=True, on_event=restart_server, on_started=lambda c: (coordinators.append(c),
                                                                              stopper.started(c)))
    assert not restart_failed, restart_failed
    assert summary["stopped"] == "requested" and stopper.met, (
        f"{len(want - seen())} messages not done; queue (ready, consumers) {depth(server.url, queue)}; "
        f"last events {[(e['type'], e.get('epoch'), e.get('lag'), e.get('error')) for e in events[-5:]]}")
    done = read_committed(out)
    ids = done.column("message_id")
    assert len(ids) == len(pc.unique(ids)) == len(want), "a message was processed twice or lost"
    assert set(ids.to_pylist()) == want
    assert done.column("priority").to_pylist() == ["high" if w >= 10 else "normal"
                                                   for w in done.column("weight").to_pylist()]
    dead = read_committed(str(tmp_path / "task_dead_letters"))
    assert dead.num_rows == n // 97 and all(r.startswith("cannot decode as JSON") for r in
                                            dead.column("reason").to_pylist())
    waits = [e for e in events if e["type"] == "storage_waiting"]
    assert any("RabbitMQ at 127.0.0.1" in e["error"] for e in waits), [e.get("error") for e in waits]
    # What RabbitMQ still holds was delivered again after the server restart and not taken yet when the job
    # stopped: each is done already (a next run acknowledges it and drops it); none is a task not done.
    assert depth(server.url, queue)[1] == 0
    left = drain(server.url, queue)
    assert set(left) <= set(ids.to_pylist()) | {f"t{i}" for i in range(n) if i % 97 == 96}, left


def test_two_jobs_queues_on_one_exchange_each_get_every_message(rabbitmq_server, tmp_path):
    exchange = f"orders-{uuid.uuid4().hex[:6]}"
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_server.url))
    conn.channel().exchange_declare(exchange, exchange_type="fanout", durable=True)
    conn.close()
    sources = []
    for job in ("billing", "shipping"):
        source = RabbitMQSource(rabbitmq_server.url, f"{exchange}-{job}", SCHEMA, exchange=exchange)
        source.bind(JobStorage(str(tmp_path / job), job), "orders")
        sources.append(source)
    publish(rabbitmq_server.url, 50, exchange=exchange)
    for source in sources:
        _, latest = source.readable(0, time.time(), 0.0)
        assert sorted(source.read(0, 0, latest).column("task").to_pylist()) == list(range(50))
        source.checkpointed("job", {0: latest})
        assert depth(rabbitmq_server.url, source.queue)[0] == 0


def test_an_unknown_queue_or_exchange_is_a_clear_error_at_start(rabbitmq_server, tmp_path):
    storage = JobStorage(str(tmp_path), "j")
    with pytest.raises(SourceError, match="RabbitMQ queue 'no-such-queue' does not exist at RabbitMQ at 127.0.0.1"):
        RabbitMQSource(rabbitmq_server.url, "no-such-queue", SCHEMA).bind(storage, "in")
    with pytest.raises(SourceError, match="RabbitMQ exchange 'no-such-exchange' does not exist"):
        RabbitMQSource(rabbitmq_server.url, "q", SCHEMA, exchange="no-such-exchange").bind(storage, "in")
