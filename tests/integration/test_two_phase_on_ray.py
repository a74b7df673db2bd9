"""Two-phase commit in the runtime: the commit log records an epoch and its
sinks' handles before the sinks commit it, so a commit that fails is done
again from the log after the recovery, and a replay never pre-commits an
epoch the log already holds."""

import os

import pytest

from sluiceway.checkpoint import JobStorage
from sluiceway.checkpoint.timeline import RecordKind, history
from sluiceway.jobs import run
from sluiceway.jobs.examples import clicks as example
from sluiceway.jobs.testing import TaskKiller, compare_exactly_once
from sluiceway.operators.sinks import ParquetSink, read_committed

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]


class CommitFailsOnce(ParquetSink):
    """A ParquetSink whose commit of one epoch fails the first time, after the
    coordinator wrote the epoch to its commit log (a warehouse that hung up)."""

    def __init__(self, url: str, epoch: int, flag: str):
        super().__init__(url)
        self.epoch, self.flag = epoch, flag

    def commit(self, epoch, handles):
        if epoch == self.epoch and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            raise ConnectionError("the warehouse hung up")
        super().commit(epoch, handles)


def test_a_failed_sink_commit_is_committed_again_from_the_log_exactly_once(tmp_path):
    rows = 6000
    out, ckpt = tmp_path / "out", str(tmp_path / "ckpt")
    flow = example.build(output=str(out), rows_per_partition=rows, rows_per_second=1e9)
    flow.graph.steps["clicks_out"].sink = CommitFailsOnce(str(out / "clicks"), 3, str(tmp_path / "failed-once"))
    summary = run(flow, ckpt, trigger_s=0, max_records_per_epoch=2000, checkpoint_every=2)
    assert summary["restarts"] == 1 and summary["stopped"] == "idle"
    recovery = history(ckpt, "clicks").of_kind(RecordKind.RECOVERY)
    assert recovery[0]["failure"] == ("sink 'clicks_out' (CommitFailsOnce) could not commit epoch 3: "
                                      "ConnectionError: the warehouse hung up")
    storage = JobStorage(ckpt, "clicks")
    assert set(storage.read_commit(3)["sinks"]) == {"clicks_out", "totals_out"}  # the handles, in the log
    clicks = compare_exactly_once(read_committed(str(out / "clicks")), example.expected_clicks(rows))
    assert clicks.exactly_once, clicks.line()
    totals = compare_exactly_once(example.final_totals(read_committed(str(out / "totals"))),
                                  example.expected_totals(rows))
    assert totals.exactly_once, totals.line()


def test_delta_sink_through_a_task_kill_is_exactly_once(tmp_path):
    import deltalake
    from sluiceway.operators.sinks import DeltaSink

    rows = 6000
    out, ckpt = tmp_path / "out", str(tmp_path / "ckpt")
    flow = example.build(output=str(out), rows_per_partition=rows, rows_per_second=2000)
    flow.graph.steps["clicks_out"].sink = DeltaSink(str(out / "clicks_delta"))
    killer = TaskKiller("events[0]", after_epoch=3)
    summary = run(flow, ckpt, trigger_s=0.5, checkpoint_every=2, on_event=killer)
    assert killer.killed.is_set() and summary["restarts"] == 1
    table = deltalake.DeltaTable(str(out / "clicks_delta"))
    clicks = compare_exactly_once(table.to_pyarrow_table(), example.expected_clicks(rows))
    assert clicks.exactly_once, clicks.line()
    assert 1 <= table.transaction_version("sluiceway/clicks/clicks_out") <= summary["last_epoch"]
