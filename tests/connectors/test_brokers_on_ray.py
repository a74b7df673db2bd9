"""Redis Streams and NATS JetStream on the session's Ray cluster: Redis
stopped for a while as a job reads a backlog from both (the job says it
waits for that server, then resumes), output exactly-once; the same for NATS with a
producer that publishes through the outage; an unknown stream is a clear
error at start. (RabbitMQ's and PostgreSQL's outages are in
test_rabbitmq.py and test_cdc_on_ray.py.)"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

import broker_workload as w
from sluiceway.jobs import Dataflow, JobFailedError, run
from sluiceway.jobs.jobfile import ship_by_value
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.sources import NatsJetStreamSource, RedisStreamSource

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(240)]
ship_by_value(w)


def test_redis_stopped_mid_run_the_job_waits_and_resumes_exactly_once(tmp_path):
    from sluiceway.jobs.testing import nats_process, redis_process

    rows, tag = 3000, uuid.uuid4().hex[:6]
    redis_srv, nats_srv = redis_process().start(), nats_process().start()
    try:
        keys, streams = [f"readings-{tag}-{p}" for p in range(2)], [f"R{tag}{p}".upper() for p in range(2)]
        w.produce_redis(redis_srv.url, keys, rows)
        w.produce_nats(nats_srv.url, streams, rows)
        flow = Dataflow(f"brokers-{tag}")
        w.add_to(flow, redis_srv.url, keys, nats_srv.url, streams, rows, str(tmp_path / "out"), f"total-{tag}:")
        events, waited = [], {}

        def outage(server, seconds):
            def go():
                server.stop()
                time.sleep(seconds)
                server.start()
            thread = threading.Thread(target=go)
            thread.start()
            return thread

        def on_event(event):
            # Small epochs make the backlog last about a hundred epochs: Redis goes down once the first one is
            # done, while the job is still reading it, however slow or busy the machine.
            events.append(event)
            if event["type"] == "epoch" and "redis" not in waited:
                waited["redis"] = outage(redis_srv, 3.0)

        summary = run(flow, str(tmp_path / "ckpt"), trigger_s=0.2, max_records_per_epoch=60, parallelism=1,
                      on_event=on_event)
        for thread in waited.values():
            thread.join()
        waits = [e for e in events if e["type"] == "storage_waiting"]
        assert any("Redis at 127.0.0.1" in e["error"] for e in waits), [e.get("error") for e in waits]
        assert any(e["type"] == "storage_resumed" for e in events)
        assert summary["stopped"] == "idle"
        lags = [e["lag"] for e in events if e["type"] == "epoch" and e.get("lag")]
        assert any(lag.get("redis_in", {}).get("records", 0) > 0 for lag in lags), lags[:3]
        result = w.check(redis_srv.url, 2, str(tmp_path / "out"), rows, f"total-{tag}:")
        assert all(v == "ok" for v in result.values()), result
    finally:
        redis_srv.remove()
        nats_srv.remove()


def test_nats_stopped_mid_run_the_job_waits_and_resumes_exactly_once(tmp_path):
    from sluiceway.jobs.testing import StopWhen, nats_process

    rows, tag = 3000, uuid.uuid4().hex[:6]
    server = nats_process().start()
    try:
        streams = [f"N{tag}{p}".upper() for p in range(2)]
        w.create_streams(None, [], server.url, streams)
        out = str(tmp_path / "out")
        flow = Dataflow(f"nats-outage-{tag}")
        readings = flow.source(NatsJetStreamSource(server.url, w.SCHEMA, streams=streams, sequence_column="seq"),
                               name="nats_in", parallelism=1)
        readings.sink(ParquetSink(f"{out}/nats_rows"), name="nats_out")
        readings.dead_letters(name="nats_bad").sink(ParquetSink(f"{out}/nats_dead"), name="nats_dead_out")
        events, produced, restart_failed = [], threading.Event(), []

        def outage():
            try:
                server.stop()
                time.sleep(3.0)
                server.start()
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                restart_failed.append(exc)

        def produce():  # half, then the server stops while the rest is published through the outage
            w.produce_nats(server.url, streams, rows // 2, rate=1500, create=False)
            down = threading.Thread(target=outage)
            down.start()
            w.produce_nats(server.url, streams, rows, rate=1500, create=False, retry=True, first=rows // 2)
            down.join()
            produced.set()

        producer = threading.Thread(target=produce)

        def on_event(event):  # the producer starts once the job runs, so the job reads through the outage
            events.append(event)
            if event["type"] == "started":
                producer.start()

        stopper = StopWhen(lambda: len(w.read_committed(f"{out}/nats_rows")) >= w.expected(2, rows).num_rows,
                           after=produced, deadline_s=60)
        summary = run(flow, str(tmp_path / "ckpt"), until_idle=False, trigger_s=0.2, parallelism=1,
                      on_event=on_event, on_started=stopper.started)
        producer.join()
        assert not restart_failed, restart_failed
        waits = [e for e in events if e["type"] == "storage_waiting"]
        assert any("NATS at nats://127.0.0.1" in e["error"] for e in waits), \
            [(e["type"], e.get("epoch"), e.get("rows_in"), round(e["at"] % 100, 1), e.get("error")) for e in events]
        assert any(e["type"] == "storage_resumed" for e in events)
        assert summary["stopped"] == "requested" and stopper.met and summary["restarts"] == 0
        result = w.check_nats(2, out, rows)
        assert all(v == "ok" for v in result.values()), result
    finally:
        server.remove()


def test_an_unknown_stream_is_a_clear_error_at_start(tmp_path, redis_server, nats_server):
    w.create_streams(redis_server.url, ["known"], nats_server.url, ["KNOWN"])
    for source, words in [
        (RedisStreamSource(redis_server.url, ["known", "missing-stream"], w.SCHEMA), "Redis stream missing-stream "
                                                                                   "does not exist"),
        (NatsJetStreamSource(nats_server.url, w.SCHEMA, streams=["KNOWN", "MISSING"]), "NATS JetStream stream "
                                                                                     "'MISSING' does not exist"),
    ]:
        flow = Dataflow(f"unknown-{source.kind}")
        flow.source(source, name="in").sink(ParquetSink(str(tmp_path / source.kind)), name="out")
        with pytest.raises(JobFailedError) as info:
            run(flow, str(tmp_path / "ckpt"))
        assert words in str(info.value).splitlines()[0], str(info.value)
