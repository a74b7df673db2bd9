"""Two-phase commit in the runtime: the commit log records an epoch and its
sinks' handles before the sinks commit it, so a commit that fails is done
again from the log after the recovery, and a replay never pre-commits an
epoch the log already holds; a coordinator that dies between a checkpoint's
manifest and its sinks' commit leaves nothing uncommitted."""

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


class CoordinatorDiesAtCommit(ParquetSink):
    """A ParquetSink whose first commit of one epoch kills the coordinator's
    process: after the checkpoint's manifest and its commit log entry, or
    (``before_log``) with the entry not written yet."""

    def __init__(self, url: str, epoch: int, flag: str, commit_record: str | None):
        super().__init__(url)
        self.epoch, self.flag, self.commit_record = epoch, flag, commit_record

    def commit(self, epoch, handles):
        if epoch == self.epoch and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            if self.commit_record:
                os.remove(self.commit_record)
            os._exit(1)
        super().commit(epoch, handles)


@pytest.mark.parametrize("before_log", [False, True], ids=["after-commit-log", "before-commit-log"])
def test_a_coordinator_killed_before_a_checkpoints_sinks_commit_loses_nothing(tmp_path, before_log):
    rows = 4000
    out, ckpt = tmp_path / "out", str(tmp_path / "ckpt")

    def build():
        flow = example.build(output=str(out), rows_per_partition=rows, rows_per_second=1e9)
        record = os.path.join(ckpt, "clicks", "commits", "0000000004.json") if before_log else None
        flow.graph.steps["clicks_out"].sink = CoordinatorDiesAtCommit(str(out / "clicks"), 4,
                                                                      str(tmp_path / "died-once"), record)
        return flow

    options = dict(trigger_s=0, max_records_per_epoch=1000, checkpoint_every=2)
    with pytest.raises(Exception):
        run(build(), ckpt, **options)
    storage = JobStorage(ckpt, "clicks")
    assert storage.read_manifest(4) is not None and (storage.read_commit(4) is None) == before_log
    summary = run(build(), ckpt, force=True, **options)
    assert summary["stopped"] == "idle"
    started = history(ckpt, "clicks").of_kind(RecordKind.RUN_STARTED)[-1]
    assert started["restored_checkpoint"] == 4
    assert storage.read_commit(4)["sinks"]["clicks_out"]  # rebuilt from the manifest when it was missing
    clicks = compare_exactly_once(read_committed(str(out / "clicks")), example.expected_clicks(rows))
    assert clicks.exactly_once, clicks.line()
    totals = compare_exactly_once(example.final_totals(read_committed(str(out / "totals"))),
                                  example.expected_totals(rows))
    assert totals.exactly_once, totals.line()


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
