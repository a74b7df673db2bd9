"""The log source on Ray: records produced while the job runs, a task
killed mid-run, exactly-once output; the job's position recorded in the log."""

import threading
import time

import pytest

import pyarrow.compute as pc

from sluiceway.jobs import Dataflow, run
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import TaskKiller, compare_exactly_once
from sluiceway.operators.connectors.log import Log, LogSource, TopicConfig
from sluiceway.operators.sinks import ParquetSink, read_committed

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]


def produce(url: str, rows: int, batch: int) -> None:
    """The example's click events, appended in batches to their partition."""
    topic = Log(url).topic("clicks")
    for start in range(0, rows, batch):
        for p in range(example.PARTITIONS):
            topic.append_partition(p, example.clicks(p, start, min(rows, start + batch)))
        time.sleep(0.1)


def test_log_to_keyed_totals_through_a_task_kill_while_producing(tmp_path):
    rows = 8000
    url, out, ckpt = str(tmp_path / "log"), tmp_path / "out", str(tmp_path / "ckpt")
    Log(url).create_topic(TopicConfig("clicks", partitions=example.PARTITIONS))
    producer = threading.Thread(target=produce, args=(url, rows, 500))
    producer.start()
    flow = Dataflow("clicks_from_log")
    events = flow.source(LogSource("clicks", url, bounded={p: rows for p in range(example.PARTITIONS)}),
                         name="events")
    kept = events.filter(pc.field("cents") >= 5).map_batches(example.with_dollars)
    kept.sink(ParquetSink(str(out / "clicks")), name="clicks_out")
    kept.key_by("user_id").aggregate([("event_id", "count"), ("cents", "sum")]).sink(
        ParquetSink(str(out / "totals")), name="totals_out")
    killer = TaskKiller("events[0]", after_epoch=3)
    summary = run(flow, ckpt, trigger_s=0.2, checkpoint_every=2, max_records_per_epoch=1000, on_event=killer)
    producer.join()
    assert killer.killed.is_set() and summary["restarts"] == 1 and summary["stopped"] == "idle"
    clicks = compare_exactly_once(read_committed(str(out / "clicks")), example.expected_clicks(rows))
    assert clicks.exactly_once, clicks.line()
    totals = compare_exactly_once(example.final_totals(read_committed(str(out / "totals"))),
                                  example.expected_totals(rows))
    assert totals.exactly_once, totals.line()
    consumer = Log(url).topic("clicks").describe()["consumers"]["clicks_from_log"]
    assert consumer["offsets"] == {p: rows for p in range(example.PARTITIONS)} and consumer["total_lag"] == 0
