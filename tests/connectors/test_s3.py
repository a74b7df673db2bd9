"""Everything on an S3-protocol server (moto's server mode, started by the
tests): the log, the checkpoints, Parquet and Delta sinks, through a task
kill; and a wrong endpoint named in the first line of the error."""

import threading
import time

import pyarrow.compute as pc
import pytest

from sluiceway.checkpoint.errors import StorageError
from sluiceway.jobs import Dataflow, run
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import TaskKiller, compare_exactly_once
from sluiceway.operators.connectors.log import Log, LogSource, TopicConfig
from sluiceway.operators.sinks import DeltaSink, ParquetSink, read_committed


def produce(url: str, rows: int, batch: int) -> None:
    topic = Log(url).topic("clicks")
    for start in range(0, rows, batch):
        for p in range(example.PARTITIONS):
            topic.append_partition(p, example.clicks(p, start, min(rows, start + batch)))
        time.sleep(0.1)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.timeout(240)
def test_log_checkpoints_and_sinks_on_s3_through_a_task_kill(s3_bucket):
    import deltalake

    rows = 6000
    log_url, out, ckpt = f"{s3_bucket}/log", f"{s3_bucket}/out", f"{s3_bucket}/ckpt"
    Log(log_url).create_topic(TopicConfig("clicks", partitions=example.PARTITIONS))
    producer = threading.Thread(target=produce, args=(log_url, rows, 500))
    producer.start()
    flow = Dataflow("clicks_on_s3")
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
    clicks = compare_exactly_once(deltalake.DeltaTable(f"{out}/clicks_delta").to_pyarrow_table(),
                                  example.expected_clicks(rows))
    assert clicks.exactly_once, clicks.line()
    totals = compare_exactly_once(example.final_totals(read_committed(f"{out}/totals")),
                                  example.expected_totals(rows))
    assert totals.exactly_once, totals.line()
    assert Log(log_url).topic("clicks").describe()["consumers"]["clicks_on_s3"]["total_lag"] == 0


def test_a_wrong_s3_endpoint_is_named_in_the_first_line(s3_endpoint, monkeypatch, capsys):
    import s3fs

    from sluiceway.jobs.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        flow = example.build(output="s3://nowhere/out", rows_per_partition=10)
        started = time.time()
        with pytest.raises(StorageError) as err:
            run(flow, "s3://nowhere/ckpt")
        first = str(err.value).splitlines()[0]
        assert first.startswith("checkpoint dir 's3://nowhere/ckpt' is not usable: cannot write s3://nowhere/ckpt/")
        assert 'Could not connect to the endpoint URL: "http://127.0.0.1:9/' in first, first
        assert time.time() - started < 60
        assert main(["log", "topics", "--log-dir", "s3://nowhere/log"]) == 1
        assert "127.0.0.1:9" in capsys.readouterr().err.splitlines()[0]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
