"""The log source on Ray, on local disk (the same on an S3-protocol server,
through a node kill: tests/chaos/test_node_kills.py): a producer appends
while the job reads; a task killed mid-run; every kept click
appended to Delta Lake and per-user totals to Parquet, exactly once; the
job's position recorded in the log."""

import pyarrow.compute as pc
import pytest

from sluiceway.jobs import Dataflow, run
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.examples.produce_clicks import produce, topic
from sluiceway.jobs.testing import TaskKiller, compare_exactly_once
from sluiceway.operators.connectors.log import Log, LogSource
from sluiceway.operators.sinks import DeltaSink, ParquetSink, read_committed

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(240)]


def test_log_to_delta_and_totals_through_a_task_kill_while_producing(tmp_path):
    import threading

    import deltalake

    rows = 6000
    root = str(tmp_path)
    log_url, out, ckpt = f"{root}/log", f"{root}/out", f"{root}/ckpt"
    topic(log_url)
    # Six seconds of input: the kill after epoch 3 lands while the job still reads (at 6000 events/s the job
    # could read and commit everything before the kill was made, and finish without noticing it).
    producer = threading.Thread(target=produce, args=(log_url, rows, 2000.0, 500, 0, lambda line: None))
    producer.start()
    flow = Dataflow("clicks_from_log")
    events = flow.source(LogSource("clicks", log_url, bounded={p: rows for p in range(example.PARTITIONS)}),
                         name="events")
    kept = events.filter(pc.field("cents") >= 5).map_batches(example.with_dollars)
    kept.sink(DeltaSink(f"{out}/clicks_delta"), name="clicks_out")
    kept.key_by("user_id").aggregate([("event_id", "count"), ("cents", "sum")]).sink(
        ParquetSink(f"{out}/totals"), name="totals_out")
    killer = TaskKiller("events[0]", after_epoch=3)
    summary = run(flow, ckpt, trigger_s=0.2, checkpoint_every=2, max_records_per_epoch=1000, on_event=killer)
    producer.join()
    assert killer.killed.is_set() and summary["restarts"] == 1, summary["failures"]
    assert summary["stopped"] == "idle"
    clicks = compare_exactly_once(deltalake.DeltaTable(f"{out}/clicks_delta").to_pyarrow_table(),
                                  example.expected_clicks(rows))
    assert clicks.exactly_once, clicks.line()
    totals = compare_exactly_once(example.final_totals(read_committed(f"{out}/totals")),
                                  example.expected_totals(rows))
    assert totals.exactly_once, totals.line()
    consumer = Log(log_url).topic("clicks").describe()["consumers"]["clicks_from_log"]
    assert consumer["offsets"] == {p: rows for p in range(example.PARTITIONS)} and consumer["total_lag"] == 0
