"""The job controller, one protocol step at a time: ``handle(event) ->
instructions``, without Ray, storage or threads."""

import pytest

from sluiceway.checkpoint.errors import CorruptCheckpointError, IncompatibleJobError
from sluiceway.checkpoint.manifest import Manifest
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster import protocol as p
from sluiceway.cluster.controller import JobController
from sluiceway.cluster.epochs import EpochPlan, Planned, TaskAck
from sluiceway.cluster.options import RunOptions
from sluiceway.cluster.restart import Failure, FailureKind
from sluiceway.cluster.simulation import SimSink, sim_plan
from sluiceway.operators.sources import Lag

SRC, CNT = TaskId("src", 0), TaskId("counts", 0)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def checkpoint_manifest(epoch, **fields):
    """A manifest of checkpoint ``epoch`` of the test flow."""
    defaults = dict(job="sim", id=epoch, epoch=epoch, started_at=0.5, completed_at=1.0, offsets={}, watermarks={},
                    parallelism={}, max_key_groups=16, tasks=[], state={}, files={}, sink_handles={})
    return Manifest(**{**defaults, **fields})


def make(**options):
    clock = Clock()
    plan = sim_plan(SimSink(None), partitions=1, source_parallelism=1, parallelism=1, records=1000, rate=100.0)
    defaults = {"checkpoint_every": 2, "epoch_timeout_s": 30.0}
    return JobController(plan, RunOptions(**{**defaults, **options}), fencing=3, clock=clock), clock


def kinds(instructions):
    return [type(i).__name__ for i in instructions]


def running(**options):
    """A controller past its start on an empty checkpoint dir."""
    c, clock = make(**options)
    assert kinds(c.handle(p.Start())) == ["ReadRestorePoint"]
    out = c.handle(p.RestorePoint(None, [], {}, 0))
    assert kinds(out) == ["StartTasks", "ResetTasks"]
    assert out[0].tasks == (SRC, CNT) and out[-1] == p.ResetTasks(0, None, 1, 0)
    out = c.handle(p.TasksReset())  # pre-commits above the high water go once no task runs old work
    assert kinds(out) == ["AbortSinks", "Started", "ProbeSources"] and out[0] == p.AbortSinks(0)
    assert c.handle(p.SourcesProbed(Planned(None))) == []  # nothing to read yet
    return c, clock


def tick(c, silent=None):
    """A tick, the sources answering that nothing new is readable."""
    out = c.handle(p.Tick(silent or {}))
    if out and isinstance(out[-1], p.ProbeSources):
        out = out[:-1] + c.handle(p.SourcesProbed(Planned(None)))
    return out


def planned(start, stop, waiting=0):
    return Planned({"src": {0: (start, stop)}}, {"src": Lag(waiting)} if waiting else {})


def plan_epoch(c, start, stop):
    """At the next trigger: probe, write and dispatch one epoch; returns its plan."""
    if not c.busy:
        c.clock.now += 1.0
        assert kinds(c.handle(p.Tick())) == ["ProbeSources"]
    out = c.handle(p.SourcesProbed(planned(start, stop)))
    assert kinds(out) == ["WriteOffsets"]
    plan = out[0].plan
    out = c.handle(p.OffsetsWritten(plan))
    assert out == [p.RunEpoch(plan, c.generation)]
    return plan


def acks(c, epoch, state=False, generation=None):
    g = c.generation if generation is None else generation
    src = TaskAck(SRC, g, epoch, rows_in=10)
    cnt = TaskAck(CNT, g, epoch, rows_out=10, sink_handles={"out": {"subtask": 0, "key": f"k{epoch}"}})
    if state:
        f = {"path": f"checkpoints/{epoch}/state/counts/0.arrow", "checkpoint": epoch, "size_bytes": 5,
             "sha256": "x", "rows": 1}
        cnt.state_files, cnt.state = [f], {"counts": {"3": [[f["path"], 0]]}}
    return p.Acked((src, cnt))


def test_an_epoch_is_planned_written_then_run():
    c, _ = running()
    plan = plan_epoch(c, 0, 10)
    assert plan.epoch == 1 and plan.ranges == {"src": {0: (0, 10)}} and not plan.checkpoint
    assert c.book.in_flight == 1 and c.next_offsets == {"src": {0: 10}}


def test_the_commit_record_comes_before_the_sink_commit_and_the_epoch_event_after_it():
    c, _ = running()
    plan_epoch(c, 0, 10)
    out = c.handle(acks(c, 1))
    assert kinds(out) == ["WriteCommit", "CommitSinks"]
    assert out[0].record["rows_in"] == 10 and out[0].record["fencing"] == 3
    assert out[1].handles == {"out": [{"subtask": 0, "key": "k1"}]}
    out = c.handle(p.SinksCommitted(1))
    assert kinds(out)[0] == "Emit" and out[0].event["type"] == "epoch" and out[0].event["rows_in"] == 10
    assert c.last_completed == 1 and c.stats["epochs"] == 1 and c.stats["rows_in"] == 10


def test_one_task_acknowledging_completes_nothing():
    c, _ = running()
    plan_epoch(c, 0, 10)
    assert c.handle(p.Acked(acks(c, 1).acks[:1])) == []


def test_acks_of_an_earlier_generation_are_stale():
    c, _ = running()
    plan_epoch(c, 0, 10)
    assert c.handle(acks(c, 1, generation=c.generation - 1)) == [] and c.book.stale_acks == 2


def test_a_checkpoint_epoch_writes_its_manifest_first_then_commits_then_applies_retention():
    c, _ = running()
    plan_epoch(c, 0, 10)
    c.handle(acks(c, 1))
    c.handle(p.SinksCommitted(1))
    plan = plan_epoch(c, 10, 20)
    assert plan.checkpoint  # every second epoch
    out = c.handle(acks(c, 2, state=True))
    assert kinds(out) == ["WriteManifest", "WriteHistory", "NotifySources", "WriteCommit", "CommitSinks"]
    manifest = out[0].manifest
    assert manifest.epoch == 2 and manifest.state == {"counts": {"3": [["checkpoints/2/state/counts/0.arrow", 0]]}}
    assert manifest.offsets == {"src": {"0": 20}} and manifest.fencing == 3
    assert kinds(c.handle(p.SinksCommitted(2))) == ["ApplyRetention"]
    out = c.handle(p.RetentionApplied(2, [1]))
    assert out[0].event["deleted_checkpoints"] == [1] and out[0].event["checkpoint"] == 2
    assert c.last_checkpoint == 2


def test_an_answer_that_nobody_asked_for_is_refused():
    c, _ = running()
    with pytest.raises(RuntimeError, match="SinksCommitted came while waiting for nothing"):
        c.handle(p.SinksCommitted(1))


def test_a_task_failure_halts_then_finds_the_dead_and_restores():
    c, clock = running()
    plan = plan_epoch(c, 0, 10)
    assert c.handle(p.TaskFailed(SRC, 0, Failure(FailureKind.INTERNAL, "boom", task="src[0]"))) == []
    out = tick(c)
    assert kinds(out) == ["Emit", "FindDead"] and out[0].event["type"] == "failure"
    assert c.generation == 1 and c.book.in_flight == 0
    assert kinds(c.handle(p.DeadFound(frozenset({SRC})))) == ["ReadRestorePoint"]
    out = c.handle(p.RestorePoint(None, [plan], {}, 0))
    assert kinds(out) == ["StartTasks", "ResetTasks"] and out[0].tasks == (SRC,)
    out = c.handle(p.TasksReset())
    assert kinds(out)[:3] == ["AbortSinks", "Recovered", "RunEpoch"] and out[2] == p.RunEpoch(plan, 1)  # as logged
    assert out[1].restarted == (SRC,)


def test_a_second_failure_waits_out_the_restart_delay():
    c, clock = running()
    c.handle(p.TaskLost(SRC))
    tick(c)
    c.handle(p.DeadFound(frozenset()))
    c.handle(p.RestorePoint(None, [], {}, 0))
    c.handle(p.TasksReset())
    out = c.handle(p.SourcesProbed(Planned(None)))  # idle input: an empty epoch checkpoints the recovered state
    assert kinds(out) == ["WriteOffsets"] and out[0].plan.checkpoint and out[0].plan.rows == 0
    c.handle(p.OffsetsWritten(out[0].plan))
    c.handle(p.TaskLost(CNT))
    out = tick(c)  # the empty checkpoint in flight is recorded as failed
    assert kinds(out) == ["Emit", "WriteHistory"] and out[0].event["delay_s"] == 1.0
    assert tick(c) == []
    clock.now += 1.0
    assert kinds(tick(c)) == ["FindDead"]


def test_restore_settles_the_sinks_from_the_checkpoint_epoch_on():
    c, _ = make()
    c.handle(p.Start())
    manifest = checkpoint_manifest(4, offsets={"src": {"0": 40}})
    logged = {4: {"sinks": {"out": [{"key": "a"}]}}, 5: {"sinks": {"out": [{"key": "b"}]}}}
    plans = [EpochPlan(5, {"src": {0: (40, 50)}}, False, 1.0), EpochPlan(6, {"src": {0: (50, 60)}}, False, 2.0)]
    out = c.handle(p.RestorePoint(manifest, plans, logged, 5))
    assert kinds(out) == ["StartTasks", "CommitSinks"] and out[-1] == p.CommitSinks(4, {"out": [{"key": "a"}]})
    assert c.handle(p.SinksCommitted(4)) == [p.CommitSinks(5, {"out": [{"key": "b"}]})]
    assert c.handle(p.SinksCommitted(5)) == [p.ResetTasks(0, manifest, 5, 5)]
    assert c.handle(p.TasksReset())[0] == p.AbortSinks(5)
    assert c.next_epoch == 7 and c.next_offsets == {"src": {0: 60}}


def test_a_checkpoint_without_its_commit_record_gets_one_rebuilt_from_its_manifest():
    c, _ = make()
    c.handle(p.Start())
    manifest = checkpoint_manifest(4, offsets={"src": {"0": 40}}, tasks=[{"task": "counts[0]", "rows_out": 3}],
                                   sink_handles={"counts[0]": {"out": {"key": "a"}}})
    out = c.handle(p.RestorePoint(manifest, [], {}, 3))
    assert kinds(out) == ["StartTasks", "WriteCommit", "CommitSinks"]
    assert out[1].record["rebuilt_from_manifest"] and out[2] == p.CommitSinks(4, {"out": [{"key": "a"}]})
    assert c.high_water == 4


def test_a_gap_in_the_offsets_log_and_a_checkpoint_of_another_shape_are_refused():
    c, _ = make()
    c.handle(p.Start())
    with pytest.raises(CorruptCheckpointError, match="cannot resume: it has no complete checkpoint, and the offsets log has no entry for epoch 1"):
        c.handle(p.RestorePoint(None, [EpochPlan(2, {}, False, 0.0)], {}, 0))
    c, _ = make()
    c.handle(p.Start())
    with pytest.raises(IncompatibleJobError, match="max_key_groups is fixed"):
        c.handle(p.RestorePoint(checkpoint_manifest(1, max_key_groups=128), [], {}, 1))


def test_a_corrupt_state_file_falls_back_to_the_checkpoint_before():
    c, _ = make()
    c.handle(p.Start())
    manifest = checkpoint_manifest(4)
    c.handle(p.RestorePoint(manifest, [], {4: {"sinks": {}}}, 4))
    out = c.handle(p.ResetFailed("state file x fails its checksum"))
    assert kinds(out) == ["Emit", "ReadRestorePoint"] and out[1].skip == frozenset({4})


def test_an_epoch_in_flight_long_is_reported_then_failed_as_stuck_naming_the_tasks():
    c, clock = running(epoch_timeout_s=30.0)
    plan_epoch(c, 0, 10)
    c.handle(p.Acked(acks(c, 1).acks[:1]))
    clock.now += 11
    out = tick(c)
    assert out[0].event["type"] == "waiting_for" and out[0].event["missing"] == ["counts[0]"]
    clock.now += 25
    out = tick(c, {CNT: 20.0})
    assert kinds(out) == ["Emit", "FindDead"] and out[1].known == frozenset({CNT})
    assert out[0].event["error"] == ("epoch 1 did not complete within 30 s: counts[0] have not acknowledged it; "
                                     "restarting counts[0], which stopped answering")


def test_waiting_for_storage_is_not_a_hang():
    c, clock = running(epoch_timeout_s=5.0)
    plan_epoch(c, 0, 10)
    c.handle(p.StorageWait("counts[0]", True, "s3 down"))
    clock.now += 60
    assert tick(c) == []


def test_a_sink_that_cannot_commit_starts_a_recovery_and_fails_the_job_while_settling():
    c, _ = running()
    plan_epoch(c, 0, 10)
    c.handle(acks(c, 1))
    out = c.handle(p.SinkCommitFailed(1, Failure(FailureKind.USER_CODE, "sink down", epoch=1)))
    assert kinds(out) == ["Emit", "FindDead"]
    c, _ = make()
    c.handle(p.Start())
    c.handle(p.RestorePoint(None, [], {1: {"sinks": {"out": [{"key": "a"}]}}}, 1))
    out = c.handle(p.SinkCommitFailed(1, Failure(FailureKind.USER_CODE, "sink down", "trace", epoch=1)))
    assert out == [p.Fail("sink down", "trace")]


def test_a_failure_no_replay_can_fix_stops_the_job():
    c, _ = running()
    c.handle(p.TaskFailed(SRC, 0, Failure(FailureKind.FATAL, "column 'x' is missing")))
    out = tick(c)
    assert kinds(out) == ["Emit", "Fail"] and out[-1].message == "column 'x' is missing"


def test_a_stop_runs_out_the_epochs_in_flight_then_takes_a_final_checkpoint():
    c, _ = running()
    plan_epoch(c, 0, 10)
    c.handle(p.StopRequested(savepoint=True))
    c.handle(acks(c, 1))
    out = c.handle(p.SinksCommitted(1))
    write = out[-1]
    assert kinds(out) == ["Emit", "WriteOffsets"] and write.plan.checkpoint and write.plan.savepoint
    assert write.plan.ranges == {"src": {0: (10, 10)}}
    c.handle(p.OffsetsWritten(write.plan))
    c.handle(acks(c, 2, state=True))
    c.handle(p.SinksCommitted(2))
    assert not c.finished
    c.handle(p.RetentionApplied(2, []))
    assert c.finished and c.savepoint == 2 and c.summary()["stopped"] == "requested"


def test_a_backlog_is_planned_at_once_and_live_input_once_a_trigger():
    c, clock = running(max_epochs_in_flight=3)
    clock.now += 1.0
    c.handle(p.Tick())
    out = c.handle(p.SourcesProbed(planned(0, 10, waiting=500)))
    c.handle(p.OffsetsWritten(out[0].plan))
    assert kinds(c.handle(p.Tick())) == ["ProbeSources"]  # 500 waiting: at once
    out = c.handle(p.SourcesProbed(planned(10, 20)))
    c.handle(p.OffsetsWritten(out[0].plan))
    assert c.handle(p.Tick()) == []  # caught up: the next trigger
    clock.now += 1.0
    assert kinds(c.handle(p.Tick())) == ["ProbeSources"]


def test_a_run_without_new_input_says_so_and_where_it_stands():
    from sluiceway.cluster.events import format_event

    c, clock = running(epochs=8)
    plan_epoch(c, 0, 10)
    c.handle(acks(c, 1))
    c.handle(p.SinksCommitted(1))
    reports = []
    for _ in range(40):  # 40 s of nothing readable
        clock.now += 1.0
        reports += [i.event for i in tick(c) if isinstance(i, p.Emit)]
    assert [r["type"] for r in reports] == ["waiting_for_input"] * 2  # after 10 s, then 20 s later
    assert [r["idle_s"] for r in reports] == [10.0, 30.0]
    assert format_event(reports[0]) == ("WAITING (input): no source has new records for 10 s; 1 of 8 epochs "
                                        "planned; src at p0 10")


def test_history_records_have_their_json_form_and_format():
    from sluiceway.checkpoint.timeline import RecordKind
    from sluiceway.cluster import records

    c, _ = running()
    plan_epoch(c, 0, 10)
    c.handle(acks(c, 1))
    c.handle(p.SinksCommitted(1))
    plan_epoch(c, 10, 20)
    out = c.handle(acks(c, 2, state=True))
    record = next(i for i in out if isinstance(i, p.WriteHistory)).record
    assert record.kind is RecordKind.CHECKPOINT and record.to_json()["status"] == "complete"
    assert record.to_json()["format"] == records.HISTORY_FORMAT and record.to_json()["size_bytes"] == 5
    assert records.Rescale({"a": 1}, {"a": 2}, 4).to_json() == {"from": {"a": 1}, "to": {"a": 2},
                                                                 "restored_checkpoint": 4, "format": 1}
    ended = c.end_records("idle", None, "r1")[-1].record
    assert ended.kind is RecordKind.RUN_ENDED and ended.to_json()["last_checkpoint"] == 2
