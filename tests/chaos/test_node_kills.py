"""Worker nodes of head + 2 workers clusters SIGKILLed mid-run, three runs
side by side (each its own process on its own cluster; all mostly wait on
rate-limited input and recoveries, so they share the two cores well):

- a windowed job, killed seven times in one run with the default restart
  policy: the job keeps running, a checkpoint completes after the last kill,
  and the final windows and the late events are exactly those of the
  uninterrupted job (computed in batch). The input (30 s of it) is read
  while the first kills happen; the job runs on until the last kill is
  recovered, however slow the machine (``kill_nodes_during``);
- the log example end to end into real systems, killed once: a producer
  appending to a log topic while the job reads it, per-user totals upserted
  into PostgreSQL, every kept click appended to Delta Lake, with the log, the
  checkpoints and the Delta table on an S3-protocol server, compared with an
  independent computation (the same job on local disk through a task kill:
  tests/connectors/test_log_end_to_end.py). The same job reads Redis
  Streams, NATS JetStream, a RabbitMQ queue and the changes of a PostgreSQL
  table too, all fed while it runs (broker_workload.py): per-sensor totals
  kept in Redis, every NATS reading and every task in Parquet, per-customer
  order totals kept in Redis from change data capture, each compared with
  what was produced; the queue and the changes never end, so the harness
  stops the job once every output is complete;
- the examples of tables and joins as one job (tests/tables_workload.py),
  killed once: each compared with its answer computed in plain Python or
  pyarrow: search/clicks (dedupe, a window join, a table of rates per
  query), fraud (complex event processing), alerts (search on streams),
  timelines (a table-table join with retractions) and the shop's two views
  (a changelog table with deletes and hourly windows).

The CLI's node kills are in test_operations.py. A process already connected
to the session's Ray cluster would silently stay on it (RAY_NOTES.md): hence
the subprocesses."""

import json
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = 7  # within the suite's time budget; `sluiceway chaos JOB --kill-every S` kills as often as asked

WINDOWS = """
import json, sys, tempfile
sys.path.insert(0, {tests!r})
import windowed_workload as w
from sluiceway.jobs.demo import kill_nodes_during
from sluiceway.jobs.jobfile import ship_by_value
from sluiceway.operators.sinks import read_committed
ship_by_value(w)
work = tempfile.mkdtemp()
rows = {rows}
flow = w.build(work + "/out", rows, rate={rate})
r = kill_nodes_during(flow, work + "/ckpt", kill_after_epoch=3, log=lambda l: print(l, file=sys.stderr),
                      kills={kills}, checkpoint_every=1, trigger_s=0.5, parallelism=1)
if "error" not in r:
    windows, late = w.expected(rows)
    cols = ["sensor", "window_start", "window_end", "count_all", "value_sum"]
    r["windows_equal"] = w.sorted_rows(read_committed(work + "/out/windows"), cols) == w.sorted_rows(windows, cols)
    r["late_equal"] = w.sorted_rows(read_committed(work + "/out/late"), ["id"]) == w.sorted_rows(late, ["id"])
    r["expected_late"] = late.num_rows
print(json.dumps(r, default=str))
"""


SYSTEMS = """
import json, sys, tempfile, threading
sys.path.insert(0, {tests!r})
import deltalake, psycopg, pyarrow as pa
import broker_workload as w
from sluiceway.jobs.demo import kill_nodes_during
from sluiceway.jobs.examples import clicks, log_clicks, produce_clicks
from sluiceway.jobs.jobfile import ship_by_value
from sluiceway.jobs.testing import compare_exactly_once

ship_by_value(w)
root, dsn, rows = {root!r}, {dsn!r}, {rows}
redis_url, nats_url, amqp_url, broker_rows = {redis_url!r}, {nats_url!r}, {amqp_url!r}, {broker_rows}
log_dir, ckpt, output = root + "/log", root + "/ckpt", root + "/out"
keys, streams, local = ["kills-0", "kills-1"], ["KILLS0", "KILLS1"], tempfile.mkdtemp()
produce_clicks.topic(log_dir)
w.create_streams(redis_url, keys, nats_url, streams)
w.create_orders(dsn, "kills_orders")
w.publish_tasks(amqp_url, "kills_tasks", 0)  # the queue, empty: the job checks it exists when it starts
producers = [threading.Thread(target=produce_clicks.produce, args=(log_dir, rows, 2000.0, 500)),
             threading.Thread(target=w.produce_redis, args=(redis_url, keys, broker_rows, 700.0)),
             threading.Thread(target=w.produce_nats, args=(nats_url, streams, broker_rows, 700.0, False)),
             threading.Thread(target=w.publish_tasks, args=(amqp_url, "kills_tasks", broker_rows, 700.0)),
             threading.Thread(target=w.change_orders, args=(dsn, "kills_orders"))]
def start(event):
    if event["type"] == "started" and not producers[0].is_alive():
        for p in producers:
            p.start()
def totals():
    with psycopg.connect(dsn) as conn:
        got = conn.execute("SELECT user_id, event_id_count, cents_sum FROM user_totals").fetchall()
    return pa.table({{c: [row[i] for row in got] for i, c in enumerate(["user_id", "event_id_count", "cents_sum"])}})
def everything_done():  # the queue and the change capture never end: the harness stops the job once all is in
    if any(p.is_alive() for p in producers):
        return False
    got, want = w.cdc_totals(dsn, "kills_orders", redis_url, "kills_total:")
    return (got == want and w.tasks_done(local, broker_rows) == "ok"
            and all(v == "ok" for v in w.check(redis_url, 2, local, broker_rows, "kills:").values())
            and compare_exactly_once(totals(), clicks.expected_totals(rows)).exactly_once)
flow = log_clicks.build(log_dir, dsn, output, rows, name={name!r})
w.add_to(flow, redis_url, keys, nats_url, streams, broker_rows, local, "kills:")
w.add_queue_and_cdc(flow, amqp_url, "kills_tasks", dsn, "kills_orders", "kills_orders_slot", redis_url, local,
                    "kills_total:")
r = kill_nodes_during(flow, ckpt, kill_after_epoch=3, checkpoint_every=2, trigger_s=0.5, on_event=start,
                      until=everything_done, log=lambda l: print(l, file=sys.stderr))
for p in producers:
    if p.ident is not None:  # started with the job
        p.join()
if "error" not in r:
    r["brokers"] = w.check(redis_url, 2, local, broker_rows, "kills:")
    r["tasks"] = w.tasks_done(local, broker_rows)
    got, want = w.cdc_totals(dsn, "kills_orders", redis_url, "kills_total:")
    r["cdc"] = "ok" if got == want else f"differ: {{got}} != {{want}}"
    with psycopg.connect(dsn) as conn:
        r["prepared"] = [g for (g,) in conn.execute("SELECT gid FROM pg_prepared_xacts")]
    r["totals"] = compare_exactly_once(totals(), clicks.expected_totals(rows)).line()
    raw = deltalake.DeltaTable(output + "/clicks_delta").to_pyarrow_table()
    r["clicks"] = compare_exactly_once(raw, clicks.expected_clicks(rows)).line()
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                 "WHERE slot_name = 'kills_orders_slot'")
print(json.dumps(r))
"""


EXAMPLES = """
import json, sys, tempfile
sys.path.insert(0, {tests!r})
import tables_workload as examples
from sluiceway.jobs import Dataflow
from sluiceway.jobs.demo import kill_nodes_during
from sluiceway.jobs.jobfile import ship_by_value
ship_by_value(examples)
work = tempfile.mkdtemp()
flow = Dataflow("tables_and_joins")
examples.add_to(flow, work + "/out")
r = kill_nodes_during(flow, work + "/ckpt", kill_after_epoch=3, log=lambda l: print(l, file=sys.stderr),
                      checkpoint_every=2, trigger_s=0.5, parallelism=1)
if "error" not in r:
    r["examples"] = examples.verdicts(work + "/out")
print(json.dumps(r, default=str))
"""


STATE = """
import json, sys
import pyarrow as pa, pyarrow.compute as pc
from sluiceway.jobs import Dataflow, run
from sluiceway.jobs.demo import kill_nodes_during
from sluiceway.jobs.testing import compare_exactly_once
from sluiceway.operators.sinks import ParquetSink, read_committed
from sluiceway.operators.tables import last_per_key
from sluiceway.operators.sources import GeneratorSource
work, keys = {work!r}, 150_000
def readings(partition, start, stop):
    offset = pa.array(range(start, stop), pa.int64())
    return pa.record_batch({{"sensor": pc.add(pc.remainder(offset, keys), partition * 1_000_000),
                            "value": pc.remainder(offset, 7)}})
def flow(parallelism):
    f = Dataflow("big_state", state_budget_mb=1)
    f.source(GeneratorSource(readings, 2, 20_000, 2 * keys)).key_by("sensor", parallelism=parallelism) \\
        .aggregate([("value", "sum"), ("value", "count")], name="totals").sink(ParquetSink(work + "/out"))
    return f
r = kill_nodes_during(flow(2), work + "/ckpt", kill_after_epoch=4, checkpoint_every=2, trigger_s=0.5,
                      log=lambda l: print(l, file=sys.stderr))
if "error" not in r:
    from sluiceway.checkpoint.timeline import history
    memory = [t.get("state_memory", {{}}).get("totals") for c in history(work + "/ckpt", "big_state").records
              if c["kind"] == "checkpoint" for t in c.get("tasks", [])]
    r["mapped"] = max((m["mapped_bytes"] for m in memory if m), default=0)
    r["rescaled"] = run(flow(3), work + "/ckpt", trigger_s=0, until_idle=True, max_records_per_epoch=60_000)
    table = pa.Table.from_batches([readings(p, 0, 2 * keys) for p in range(2)])
    want = table.group_by("sensor").aggregate([("value", "sum"), ("value", "count")]).select(
        ["sensor", "value_sum", "value_count"])
    got = last_per_key(read_committed(work + "/out"), "sensor").select(["sensor", "value_sum", "value_count"])
    r["verdict"] = compare_exactly_once(got, want).line()
    r["exactly_once"] = compare_exactly_once(got, want).exactly_once
print(json.dumps(r, default=str))
"""


MANY = """
import json, sys
import pyarrow as pa, pyarrow.compute as pc
from sluiceway.jobs import Dataflow, run
from sluiceway.jobs.demo import kill_nodes_during
from sluiceway.jobs.testing import compare_exactly_once
from sluiceway.operators.sinks import ParquetSink, read_committed
from sluiceway.operators.tables import last_per_key
from sluiceway.operators.sources import GeneratorSource
work, partitions, per_partition, keys = {work!r}, 8, 9_000, 5000
def clicks(partition, start, stop):
    offset = pa.array(range(start, stop), pa.int64())
    return pa.record_batch({{"user": pc.remainder(pc.add(offset, partition * 7), keys), "n": pc.remainder(offset, 5)}})
def flow(parallelism):
    f = Dataflow("many_tasks")
    f.source(GeneratorSource(clicks, partitions, 100, per_partition), parallelism=parallelism) \\
        .key_by("user", parallelism=parallelism).aggregate([("n", "sum"), ("n", "count")], name="totals") \\
        .sink(ParquetSink(work + "/out"))
    return f
# The input arrives over 90 s from the first run's start, so the third run finds some left however slowly the
# second one (a cluster started, a node killed, a recovery) goes on a loaded machine.
ckpt, r = work + "/ckpt", {{}}
r["first"] = run(flow(4), ckpt, epochs=3, trigger_s=0.5, checkpoint_every=1)  # 4 + 4 tasks, embedded
events = []
# 8 source + 8 aggregate tasks on 2 nodes of 2 CPUs (4 executors); one node killed; stopped with a savepoint
# once the recovery is checkpointed.
r.update(kill_nodes_during(flow(8), ckpt, kill_after_epoch=6, checkpoint_every=2, trigger_s=0.5,
                           until=lambda: True, on_event=events.append, log=lambda l: print(l, file=sys.stderr)))
if "error" not in r:
    started = [e for e in events if e["type"] == "started"][0]
    r["tasks"], r["executors"] = len(started["tasks"]), started["executors"]
    recovered = [e for e in events if e["type"] == "recovered"]
    r["onto_running"] = bool(recovered) and set(recovered[0]["actor_names"].values()) <= set(
        started["actor_names"].values())
    r["last"] = run(flow(2), ckpt, trigger_s=0, until_idle=True)  # 2 + 2 tasks, embedded
    table = pa.Table.from_batches([clicks(p, 0, per_partition) for p in range(partitions)])
    want = table.group_by("user").aggregate([("n", "sum"), ("n", "count")]).select(["user", "n_sum", "n_count"])
    got = last_per_key(read_committed(work + "/out"), "user").select(["user", "n_sum", "n_count"])
    r["verdict"] = compare_exactly_once(got, want).line()
    r["exactly_once"] = compare_exactly_once(got, want).exactly_once
print(json.dumps(r, default=str))
"""


@pytest.fixture(scope="module")
def runs(postgres_dsn, s3_endpoint, redis_server, nats_server, rabbitmq_server, tmp_path_factory):
    """The four runs, started together."""
    from sluiceway.checkpoint.storage import open_filesystem

    s3_bucket = "s3://sluiceway-node-kills"
    open_filesystem(s3_bucket)[0].mkdir(s3_bucket[5:])
    with __import__("psycopg").connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS user_totals")
    scripts = {
        "windows": WINDOWS.format(tests=TESTS, rows=30_000, rate=1000, kills=KILLS),
        "systems": SYSTEMS.format(tests=TESTS, root=s3_bucket, dsn=postgres_dsn, rows=12_000, name="log_clicks_s3",
                                  redis_url=redis_server.url, nats_url=nats_server.url,
                                  amqp_url=rabbitmq_server.url, broker_rows=4000),
        "examples": EXAMPLES.format(tests=TESTS),
        "state": STATE.format(work=str(tmp_path_factory.mktemp("big_state"))),
        "many": MANY.format(work=str(tmp_path_factory.mktemp("many_tasks"))),
    }
    procs = {name: subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, script in scripts.items()}
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _result(proc) -> dict:
    out, err = proc.communicate(timeout=280)
    assert proc.returncode == 0, err[-3000:]
    r = json.loads(out.strip().splitlines()[-1])
    assert "error" not in r, r.get("error")
    return r


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_seven_node_kills_in_one_run_give_the_uninterrupted_windows(runs):
    r = _result(runs["windows"])
    assert len(r["kills"]) == KILLS, f"only {len(r['kills'])} kills happened before the job ended"
    assert r["summary"]["restarts"] >= KILLS
    assert r["summary"]["stopped"] == "requested"  # by the harness, once every kill was recovered
    assert r["windows_equal"], "windows differ from the uninterrupted job's"
    assert r["late_equal"] and r["summary"]["late"] == r["expected_late"] > 0
    after = [c for c in r["checkpoints"] if c["status"] == "complete" and c["started_at"] > r["kills"][-1]]
    assert after, f"no complete checkpoint newer than the last kill: {r['checkpoints']}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_log_brokers_and_cdc_to_postgres_delta_and_redis_through_a_node_kill(runs):
    r = _result(runs["systems"])
    assert all(v == "ok" for v in r["brokers"].values()), r["brokers"]
    assert r["tasks"] == "ok" and r["cdc"] == "ok", (r["tasks"], r["cdc"])
    assert len(r["kills"]) == 1 and r["summary"]["restarts"] >= 1
    assert r["summary"]["stopped"] == "requested"  # by the harness, once every output was complete
    assert r["totals"].startswith("exactly-once: yes"), r["totals"]
    assert r["clicks"].startswith("exactly-once: yes"), r["clicks"]
    assert r["prepared"] == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_examples_of_tables_and_joins_through_a_node_kill(runs):
    r = _result(runs["examples"])
    assert len(r["kills"]) == 1 and r["summary"]["restarts"] >= 1
    assert all(r["examples"].values()), f"examples that differ from their answer: {r['examples']}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_state_several_times_its_budget_through_a_node_kill_and_a_rescale(runs):
    r = _result(runs["state"])
    assert len(r["kills"]) == 1 and r["summary"]["restarts"] >= 1
    assert r["mapped"] > 2**20, r["mapped"]  # state beyond the 1 MiB budget lived on local disk
    assert r["rescaled"]["stopped"] == "idle"
    assert r["exactly_once"], r["verdict"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sixteen_tasks_on_two_nodes_through_a_node_kill_and_rescales_8_16_4_tasks(runs):
    r = _result(runs["many"])
    assert r["first"]["epochs"] == 3 and r["tasks"] == 16 and r["executors"] == 4, (r["tasks"], r["executors"])
    assert len(r["kills"]) == 1 and r["summary"]["restarts"] >= 1 and r["onto_running"]
    assert r["last"]["stopped"] == "idle" and r["last"]["rows_in"] > 0  # input was left for the third run
    assert r["exactly_once"], r["verdict"]
