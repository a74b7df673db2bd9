"""The broker and CDC examples under jobs/examples/, loaded as `sluiceway run`
loads them, on the session's Ray cluster, against real servers; each output
compared with a computation of its own."""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from datetime import timedelta

import psycopg
import pytest
import redis

from sluiceway.jobs import run
from sluiceway.jobs.jobfile import load_flow
from sluiceway.jobs.testing import StopWhen
from sluiceway.operators.sinks import read_committed

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(240)]
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs",
                        "examples")


def test_nats_sensors_rolling_means(nats_server, tmp_path, monkeypatch):
    from sluiceway.jobs.examples import nats_sensors as example

    count, sites = 6000, ["north", "south"]
    example.produce(nats_server.url, count, sites)
    monkeypatch.setenv("SLUICEWAY_EXAMPLE_NATS", nats_server.url)
    monkeypatch.setenv("SLUICEWAY_EXAMPLE_OUTPUT", str(tmp_path))
    monkeypatch.setenv("SLUICEWAY_EXAMPLE_BOUNDED", "1")
    summary = run(load_flow(os.path.join(EXAMPLES, "nats_sensors.py")), str(tmp_path / "ckpt"), trigger_s=0.2)
    assert summary["stopped"] == "idle" and summary["rows_in"] == count and summary["late"] == 0
    windows = defaultdict(list)  # (sensor, window start) -> values: hopping windows of 60 s every 10 s
    for i in range(count):
        _, doc = example.reading(i, sites)
        at = example.EPOCH + timedelta(milliseconds=10 * i - (1500 if i % 50 == 7 else 0))
        seconds = int((at - example.EPOCH.replace(minute=0)).total_seconds() // 10) * 10
        for start in range(seconds - 50, seconds + 1, 10):
            windows[(doc["sensor"], start)].append(doc["value"])
    got = read_committed(str(tmp_path / "sensor_means")).to_pylist()
    base = example.EPOCH.replace(minute=0)
    mine = {(r["sensor"], int((r["window_start"].replace(tzinfo=None) - base).total_seconds())): r["value_mean"]
            for r in got}
    want = {k: sum(v) / len(v) for k, v in windows.items()}
    assert mine.keys() == want.keys() and all(abs(mine[k] - want[k]) < 1e-9 for k in want)
    assert read_committed(str(tmp_path / "sensor_dead_letters")).num_rows == 0


def test_cdc_orders_keep_per_customer_totals_in_redis(postgres_dsn, redis_server, tmp_path, monkeypatch):
    table, slot, prefix = "orders", "sluiceway_orders", "customer_total:"  # the example's own names
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, customer text, amount numeric(10,2))")
        conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
        conn.execute(f"INSERT INTO {table} SELECT i, 'c' || (i % 7), i / 4.0 FROM generate_series(1, 300) i")
    monkeypatch.setenv("SLUICEWAY_EXAMPLE_PG", postgres_dsn)
    monkeypatch.setenv("SLUICEWAY_EXAMPLE_REDIS", redis_server.url)
    flow = load_flow(os.path.join(EXAMPLES, "cdc_orders.py"))
    done = threading.Event()

    def write():  # orders placed, changed (amount and customer), cancelled while the job runs
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            for i in range(301, 500):
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (i, f"c{i % 5}", i / 8))
                conn.execute(f"UPDATE {table} SET amount = amount + 1, customer = 'c9' WHERE id = %s", (i - 250,))
                if i % 4 == 0:
                    conn.execute(f"DELETE FROM {table} WHERE id = %s", (i - 200,))
                time.sleep(0.003)
        done.set()

    client = redis.Redis.from_url(redis_server.url)

    def in_redis() -> dict:
        got = {}
        for key in client.scan_iter(f"{prefix}*"):
            h = client.hgetall(key)
            if int(h[b"sign_sum"]):
                got[key.decode()[len(prefix):]] = (round(float(h[b"signed_amount_sum"]), 6), int(h[b"sign_sum"]))
        return got

    def in_postgres() -> dict:
        with psycopg.connect(postgres_dsn) as conn:
            return {c: (round(float(t), 6), n) for c, t, n in conn.execute(
                f"SELECT customer, sum(amount), count(*) FROM {table} GROUP BY customer").fetchall()}

    # Input without end: the job is stopped once Redis agrees with the table (or after 90 s regardless).
    stopper = StopWhen(lambda: in_redis() == in_postgres(), after=done)
    writer = threading.Thread(target=write)
    writer.start()
    try:
        summary = run(flow, str(tmp_path / "ckpt"), until_idle=False, trigger_s=0.3, checkpoint_every=1,
                      on_started=stopper.started)
    finally:
        writer.join()
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    assert summary["stopped"] == "requested"
    assert in_redis() == in_postgres()
    assert stopper.met
