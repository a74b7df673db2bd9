"""Event time on the shared Ray cluster: the Nexmark jobs as a user runs
them, each against its batch oracle; a windowed job whose window task is
killed mid-run gives exactly the uninterrupted answer, late events included;
watermarks in checkpoints; an idle partition does not stall windows."""

import json
import os
import sys
from datetime import timedelta

import pyarrow as pa
import pytest

from sluiceway.checkpoint import CheckpointHistory, JobStorage
from sluiceway.jobs import Dataflow, run
from sluiceway.jobs.cli import main as cli
from sluiceway.jobs.jobfile import ship_by_value
from sluiceway.jobs.nexmark.common import Settings
from sluiceway.jobs.testing import TaskKiller
from sluiceway.operators.sinks import ParquetSink, read_committed
from sluiceway.operators.sources import Source
from sluiceway.operators.windows import Tumbling

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import nexmark_oracle as oracle  # noqa: E402
import windowed_workload as workload  # noqa: E402

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(240)]
ship_by_value(workload)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def nexmark_bids():
    settings = Settings(events=24_000, partitions=2, event_rate=400)
    return settings, oracle.all_bids(settings)


@pytest.mark.parametrize("query", ["q0", "q1", "q2", "q3", "q4", "q5", "q7", "q8", "q11"])
def test_nexmark_query_as_a_user_runs_it_matches_the_batch_oracle(query, nexmark_bids, tmp_path, monkeypatch):
    settings, bids = nexmark_bids
    monkeypatch.setenv("SLUICEWAY_NEXMARK_EVENTS", str(settings.events))
    monkeypatch.setenv("SLUICEWAY_NEXMARK_EVENT_RATE", str(settings.event_rate))
    monkeypatch.setenv("SLUICEWAY_NEXMARK_RATE", "20000")  # about a second of input: several epochs
    monkeypatch.setenv("SLUICEWAY_NEXMARK_OUTPUT", str(tmp_path / "out"))
    job = os.path.join(REPO, "jobs", "nexmark", f"{query}.py")
    ckpt = str(tmp_path / "ckpt")
    # One task per step: the query, not the actor start-up of a wide job, is what is under test here.
    assert cli(["run", job, "--checkpoint-dir", ckpt, "--trigger", "0.25", "--until-idle", "--parallelism", "1"]) == 0
    got = read_committed(str(tmp_path / "out" / query))
    got = oracle.COMMITTED.get(query, lambda t: t)(got)
    if query in oracle.JOIN_QUERIES:
        expected = oracle.JOIN_QUERIES[query](oracle.all_events(settings))
    else:
        expected = oracle.QUERIES[query](bids)
    ok, why = oracle.same_rows(got, expected)
    assert ok, why
    epochs = CheckpointHistory(JobStorage(ckpt, f"nexmark_{query}")).list()
    assert epochs and epochs[-1].status == "complete"


def test_killed_window_task_gives_the_uninterrupted_windows_and_late_events(tmp_path, capsys):
    rows = 6000
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    killer = TaskKiller("by_sensor[1]", after_epoch=4)
    summary = run(workload.build(out, rows, rate=1000), ckpt, trigger_s=0.5, checkpoint_every=2,
                  on_event=killer, until_idle=True, parallelism=2)
    assert killer.killed.is_set() and summary["restarts"] == 1
    assert summary["late"] > 0
    windows, late = workload.expected(rows)
    cols = ["sensor", "window_start", "window_end", "count_all", "value_sum"]
    assert workload.sorted_rows(read_committed(f"{out}/windows"), cols) == workload.sorted_rows(windows, cols)
    assert workload.sorted_rows(read_committed(f"{out}/late"), ["id"]) == workload.sorted_rows(late, ["id"])
    assert summary["late"] == late.num_rows
    # The watermarks are in the checkpoint: per source partition, and per window task.
    storage = JobStorage(ckpt, "windowed")
    last = max(c.epoch for c in CheckpointHistory(storage).list() if c.status == "complete")
    manifest = storage.read_manifest(last)
    (event_time_step, marks), = manifest["event_time"].items()  # the flow's one with_event_time step
    assert set(marks["partitions"]) == {"0", "1"} and set(marks["floors"]) == {"0", "1"}
    assert manifest["watermarks"]["by_sensor[0]"] == manifest["watermarks"]["by_sensor[1]"] is not None
    capsys.readouterr()
    assert cli(["checkpoints", "show", "windowed", str(last), "--checkpoint-dir", ckpt]) == 0
    shown = capsys.readouterr().out
    assert "watermarks: by_sensor[0] end" in shown  # the source was read to its end
    assert f"event time of {event_time_step}: largest per partition {{0: 2026-01-01T00:00:" in shown


class QuietPartition(Source):
    """Partition 0 produces events paced by wall clock, partition 1 never does."""

    kind = "quiet"

    def __init__(self, rows: int, rate: float):
        self.rows, self.rate = rows, rate

    def partition_count(self) -> int:
        return 2

    def latest_offset(self, partition, now, started_at):
        return 0 if partition == 1 else min(self.rows, int((now - started_at) * self.rate))

    def end_offset(self, partition):
        return None  # neither partition ever ends: only idleness lets the watermark move

    def read(self, partition, start, stop):
        return pa.Table.from_batches([workload.readings(0, start, stop)])


def test_an_idle_partition_stops_holding_the_watermark_back(tmp_path):
    out = str(tmp_path / "out")
    flow = Dataflow("idle_partition")
    # Input for far longer than the test may run (600 s at 1000/s), so each of the 8 epochs finds new rows: with
    # 3000 rows (3 s at a 0.5 s trigger) 6 to 8 epochs had input, by timing, and the job then waited for more.
    (flow.source(QuietPartition(600_000, rate=1000), name="readings")
         .with_event_time("ts", max_out_of_orderness=timedelta(seconds=2), idle_timeout=timedelta(seconds=1))
         .key_by("sensor").window(Tumbling(timedelta(seconds=1))).aggregate([([], "count_all")])
         .sink(ParquetSink(out)))
    summary = run(flow, str(tmp_path / "ckpt"), trigger_s=0.5, epochs=8, parallelism=1)
    assert summary["epochs"] == 8
    fired = read_committed(out)
    assert fired.num_rows > 0, "windows never fired: the empty partition held the watermark back"
    assert json.dumps(summary)  # the summary stays JSON
