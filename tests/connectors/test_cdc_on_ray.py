"""CDC jobs on the session's Ray cluster: one killed (its coordinator actor)
while a writer inserts, updates and deletes, and started again from its
checkpoints; one whose database is stopped for a while mid-run (the job
waits, naming the server, and resumes). Each changelog, applied in order,
equals the table's final contents."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
import ray

from test_cdc import apply_changelog, contents, orders, same  # noqa: F401 - the fixture too
from sluiceway.jobs import Dataflow, run
from sluiceway.jobs.testing import StopWhen
from sluiceway.operators.sinks import ParquetSink, read_committed
from sluiceway.operators.sources import PostgresCDCSource

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(240)]


def test_a_cdc_job_killed_and_started_again_from_storage(postgres_dsn, orders, tmp_path):
    table, slot = orders
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} SELECT i, 'c' || (i % 5), i FROM generate_series(1, 500) i")

    def build():
        flow = Dataflow("cdc_orders")
        flow.source(PostgresCDCSource(postgres_dsn, [table], slot), name="orders", parallelism=1) \
            .sink(ParquetSink(out), name="changelog")
        return flow

    done, halfway = threading.Event(), threading.Event()

    def write():
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            for i in range(501, 1100):
                if i == 800:
                    halfway.set()
                conn.execute(f"INSERT INTO {table} VALUES (%s, 'new', 1)", (i,))
                conn.execute(f"UPDATE {table} SET amount = amount + 1 WHERE id = %s", (i - 500,))
                if i % 3 == 0:
                    conn.execute(f"DELETE FROM {table} WHERE id = %s", (i - 400,))
                time.sleep(0.01)
            conn.execute(f"INSERT INTO {table} VALUES (-1, 'done', 0)")
        done.set()

    coordinators, epochs, killed = [], [], []

    def kill_halfway(event):  # at the first epoch once half the changes are written (while the other half are)
        if event["type"] == "epoch":
            epochs.append(event["epoch"])
            if halfway.is_set() and event["epoch"] >= 2 and not killed:
                killed.append(not done.is_set())
                ray.kill(coordinators[-1], no_restart=True)

    writer = threading.Thread(target=write)
    writer.start()
    with pytest.raises(Exception):  # the job dies with its coordinator
        run(build(), ckpt, until_idle=False, trigger_s=0.3, checkpoint_every=2, on_event=kill_halfway,
            on_started=coordinators.append)
    assert killed == [True], "the job must die while the writer writes"

    # Input without end: stopped once the last write is in the committed output (or after 90 s regardless).
    stopper = StopWhen(lambda: -1 in read_committed(out).column("id").to_pylist(), after=done)
    summary = run(build(), ckpt, until_idle=False, trigger_s=0.3, checkpoint_every=2, force=True,
                  on_started=stopper.started)
    writer.join()
    assert summary["stopped"] == "requested" and stopper.met
    changelog = read_committed(out).to_pylist()
    assert same(apply_changelog(changelog), contents(postgres_dsn, table))
    assert len({(r["_lsn"], r["id"], r["_op"]) for r in changelog}) == len(changelog), "a change came twice"


def test_the_database_stopped_mid_run_the_cdc_job_waits_and_resumes_exactly_once(start_postgres, tmp_path):
    with start_postgres() as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, amount numeric(10,2))")
            conn.execute("INSERT INTO orders SELECT i, 'c', i FROM generate_series(1, 200) i")
        out = str(tmp_path / "out")
        flow = Dataflow("cdc_outage")
        flow.source(PostgresCDCSource(server.dsn, ["orders"], "outage"), name="orders", parallelism=1) \
            .sink(ParquetSink(out), name="changelog")
        done, events, stopped = threading.Event(), [], threading.Event()

        def write():  # before, through (retrying) and after the outage
            i = 201
            while i < 500:
                try:
                    with psycopg.connect(server.dsn, autocommit=True, connect_timeout=2) as conn:
                        while i < 500:
                            # a commit whose reply the outage cut off is tried again: the same row, once
                            conn.execute("INSERT INTO orders VALUES (%s, 'new', 1) ON CONFLICT (id) DO NOTHING", (i,))
                            conn.execute("UPDATE orders SET amount = amount + 1 WHERE id = %s", (i - 150,))
                            i += 1
                            time.sleep(0.01)
                except psycopg.OperationalError:
                    time.sleep(0.2)
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO orders VALUES (-1, 'done', 0)")
            done.set()

        writer = threading.Thread(target=write)

        def outage(event):
            events.append(event)
            if event["type"] == "epoch" and event["epoch"] == 1:
                writer.start()  # the snapshot is read: the changes come while the job runs
            if event["type"] == "epoch" and event["epoch"] == 3 and not stopped.is_set():
                stopped.set()

                def go():
                    server.stop()
                    time.sleep(3.0)
                    server.start()
                threading.Thread(target=go).start()

        stopper = StopWhen(lambda: -1 in read_committed(out).column("id").to_pylist(), after=done)
        summary = run(flow, str(tmp_path / "ckpt"), until_idle=False, trigger_s=0.3, checkpoint_every=2,
                      on_event=outage, on_started=stopper.started)
        writer.join()
        assert summary["stopped"] == "requested" and stopper.met and summary["restarts"] == 0
        waits = [e["error"] for e in events if e["type"] == "storage_waiting"]
        assert any("PostgreSQL at 127.0.0.1" in w for w in waits), [(e["type"], e.get("epoch"), e.get("rows_in"), round(e["at"] % 100, 2), e.get("error")) for e in events]
        changelog = read_committed(out).to_pylist()
        assert same(apply_changelog(changelog), contents(server.dsn, "orders"))
