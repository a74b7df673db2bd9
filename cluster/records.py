"""What the controller records, each a dataclass with an explicit JSON form:
the job's history records (:class:`HistoryRecord`, written by
:mod:`sluiceway.checkpoint.timeline`), :class:`EpochRecord` (one completed
epoch) and the checkpoint's :class:`~sluiceway.checkpoint.manifest.Manifest`
(:func:`manifest`). No Ray here."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from sluiceway.checkpoint.manifest import Manifest, assemble_state, build_manifest
from sluiceway.checkpoint.timeline import RecordKind, step_sizes
from sluiceway.cluster.epochs import EpochPlan, TaskAck
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.restart import Failure


HISTORY_FORMAT = 1  # the version of every history record's JSON form


@dataclass(frozen=True)
class HistoryRecord:
    """A record of the job's lasting history (``history/``): its kind, and
    its JSON form (:meth:`to_json`: its fields, renamed where a JSON name is
    a Python keyword, and ``format``)."""

    kind: ClassVar[RecordKind]
    renamed: ClassVar[dict] = {}

    def to_json(self) -> dict:
        doc = {self.renamed.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        return {**doc, "format": HISTORY_FORMAT}


@dataclass(frozen=True)
class CheckpointCompleted(HistoryRecord):
    """A complete checkpoint, with Flink's fields and more."""

    kind: ClassVar[RecordKind] = RecordKind.CHECKPOINT
    id: int
    epoch: int
    savepoint: bool
    trigger_time: float
    completed_at: float
    duration_s: float
    alignment_s: float
    tasks: list
    size_bytes: int
    written_bytes: int
    size_delta_bytes: int | None
    offsets: dict
    steps: dict
    status: str = "complete"
    reason: str | None = None

    @classmethod
    def of(cls, plan: EpochPlan, acks: list[TaskAck], manifest: Manifest, previous_size: int | None,
           completed_at: float) -> "CheckpointCompleted":
        return cls(
            id=manifest.id, epoch=plan.epoch, savepoint=plan.savepoint, trigger_time=plan.planned_at,
            completed_at=completed_at, duration_s=round(completed_at - plan.planned_at, 6),
            alignment_s=round(max((a.alignment_s for a in acks), default=0.0), 6),
            tasks=[{"task": str(a.task), "alignment_s": round(a.alignment_s, 6), "snapshot_s": round(a.snapshot_s, 6),
                    "written_bytes": sum(f["size_bytes"] for f in a.state_files),
                    **({"state_memory": a.state_memory} if a.state_memory else {})} for a in acks],
            size_bytes=manifest.size_bytes, written_bytes=manifest.written_bytes,
            size_delta_bytes=None if previous_size is None else manifest.size_bytes - previous_size,
            offsets=manifest.offsets, steps=step_sizes(manifest.state, manifest.files),
        )


@dataclass(frozen=True)
class CheckpointNotCompleted(HistoryRecord):
    """A checkpoint that failed (a recovery followed) or was aborted (the job stopped)."""

    kind: ClassVar[RecordKind] = RecordKind.CHECKPOINT
    id: int
    epoch: int
    status: str  # failed or aborted
    reason: str
    savepoint: bool
    trigger_time: float
    duration_s: float
    acknowledged_by: list
    offsets: dict
    completed_at: None = None

    @classmethod
    def of(cls, plan: EpochPlan, acked: list[str], status: str, reason: str, at: float) -> "CheckpointNotCompleted":
        return cls(id=plan.epoch, epoch=plan.epoch, status=status, reason=reason, savepoint=plan.savepoint,
                   trigger_time=plan.planned_at, duration_s=round(at - plan.planned_at, 6), acknowledged_by=acked,
                   offsets={s: {str(k): o for k, o in parts.items()} for s, parts in plan.next_offsets().items()})


@dataclass(frozen=True)
class Recovery(HistoryRecord):
    """A recovery: what failed, how long detection and restore took, what was restored and replayed."""

    kind: ClassVar[RecordKind] = RecordKind.RECOVERY
    failure: str
    failure_kind: str
    failed_task: str | None
    failed_epoch: int | None
    detect_s: float
    delay_s: float
    restore_s: float
    restored_checkpoint: int | None
    replay_epochs: list
    restarted_tasks: list

    @classmethod
    def of(cls, failure: Failure, detect_s: float, restore_s: float, delay_s: float, restored: int,
           replay: list[int], restarted: list[str]) -> "Recovery":
        return cls(failure=failure.message, failure_kind=failure.kind.value, failed_task=failure.task,
                   failed_epoch=failure.epoch, detect_s=round(detect_s, 3), delay_s=delay_s,
                   restore_s=round(restore_s, 3), restored_checkpoint=restored or None, replay_epochs=replay,
                   restarted_tasks=restarted)


@dataclass(frozen=True)
class RunStarted(HistoryRecord):
    """A run began: who runs it, what it restored and replays, where its tasks run."""

    kind: ClassVar[RecordKind] = RecordKind.RUN_STARTED
    run_id: str
    host: str
    pid: int
    restored_checkpoint: int | None
    replay_epochs: list
    parallelism: dict
    nodes: int
    placement: dict


@dataclass(frozen=True)
class Rescale(HistoryRecord):
    """The parallelism changed since the previous run."""

    kind: ClassVar[RecordKind] = RecordKind.RESCALE
    renamed: ClassVar[dict] = {"from_": "from"}
    from_: dict | None
    to: dict
    restored_checkpoint: int | None


@dataclass(frozen=True)
class RunEnded(HistoryRecord):
    """A run ended: why, and where it left the job."""

    kind: ClassVar[RecordKind] = RecordKind.RUN_ENDED
    run_id: str
    reason: str | None
    error: str | None
    last_epoch: int
    last_checkpoint: int
    restarts: int


@dataclass(frozen=True)
class EpochRecord:
    """One completed epoch's facts, made once where the acks come together
    and projected into the commit log entry, the ``epoch`` event and the
    run's totals: a new counter is one field here and its projections.

    >>> from sluiceway.checkpoint.types import TaskId
    >>> plan = EpochPlan(4, {"s": {0: (10, 30)}}, False, 100.0, waiting=5)
    >>> acks = [TaskAck(TaskId("s", 0), 0, 4, rows_in=20, rows_out=20, sink_handles={"out": {"subtask": 0}}),
    ...         TaskAck(TaskId("s", 1), 0, 4, rows_in=0, late=2)]
    >>> r = EpochRecord.of(plan, acks, completed_at=100.5, duration_s=0.5, generation=1, fencing=3, sinks=["out"])
    >>> r.rows_in, r.late, r.sinks
    (20, 2, {'out': [{'subtask': 0}]})
    >>> r.commit_json()["waiting"]
    5
    """

    epoch: int
    planned_at: float
    completed_at: float
    duration_s: float
    rows_in: int
    rows_out: int
    dead_letters: int
    late: int
    waiting: int  # records readable and left for later when it was planned
    lag: dict  # each source's lag as of the same plan
    checkpoint: bool
    generation: int
    fencing: int
    sinks: dict  # sink step -> each task's pre-commit handle, in task order

    COUNTERS = ("rows_in", "rows_out", "dead_letters", "late")  # summed over tasks, and over a run

    @classmethod
    def of(cls, plan: EpochPlan, acks: list[TaskAck], *, completed_at: float, duration_s: float, generation: int,
           fencing: int, sinks) -> "EpochRecord":
        return cls(
            epoch=plan.epoch, planned_at=plan.planned_at, completed_at=completed_at,
            duration_s=round(duration_s, 6),
            **{name: sum(getattr(a, name) for a in acks) for name in cls.COUNTERS},
            waiting=plan.waiting, lag=plan.lag, checkpoint=plan.checkpoint, generation=generation, fencing=fencing,
            sinks={step: [a.sink_handles[step] for a in acks if step in a.sink_handles] for step in sinks},
        )

    def commit_json(self) -> dict:
        """The commit log entry (``commits/<epoch>.json``)."""
        return {name: getattr(self, name) for name in (
            "epoch", "planned_at", "completed_at", "duration_s", *self.COUNTERS, "waiting", "lag", "checkpoint",
            "generation", "fencing", "sinks")}


def manifest(job: PhysicalPlan, plan: EpochPlan, acks: list[TaskAck], *, previous_files: dict, fencing: int,
             completed_at: float, steps: dict | None = None) -> Manifest:
    """A checkpoint's manifest from its epoch's acks (task order): per-task
    rows, the state map over this and earlier checkpoints' files, marks."""
    tasks = [{
        "task": str(a.task), "stage": a.task.stage, "subtask": a.task.subtask,
        "written": [f["path"] for f in a.state_files],
        "written_bytes": sum(f["size_bytes"] for f in a.state_files),
        "snapshot_s": round(a.snapshot_s, 6), "duration_s": round(a.duration_s, 6),
        **{name: getattr(a, name) for name in EpochRecord.COUNTERS},
    } for a in acks]
    state, files = assemble_state([a.state for a in acks], [f for a in acks for f in a.state_files], previous_files)
    return build_manifest(
        job=job.job, checkpoint_id=plan.epoch, epoch=plan.epoch,
        offsets={s: {str(k): o for k, o in parts.items()} for s, parts in plan.next_offsets().items()},
        watermarks={str(a.task): a.watermark for a in acks}, event_time=event_time_marks(job, acks),
        tasks=tasks, state=state, files=files, fencing=fencing, started_at=plan.planned_at,
        completed_at=completed_at, parallelism=job.parallelism(), max_key_groups=job.max_key_groups,
        sink_handles={str(a.task): a.sink_handles for a in acks}, savepoint=plan.savepoint, steps=steps,
    )


def event_time_marks(job: PhysicalPlan, acks: list[TaskAck]) -> dict:
    """Per event-time step, each partition's largest event time and each
    source task's watermark floor: what a restore gives the source tasks."""
    marks: dict[str, dict] = {}
    for a in acks:
        for step, m in a.event_time.items():
            entry = marks.setdefault(step, {"partitions": {}, "floors": {},
                                            "parallelism": job.stages[a.task.stage].parallelism})
            entry["partitions"].update(m["partitions"])
            entry["floors"][str(a.task.subtask)] = m["floor"]
    return marks


def stage_watermarks(acks: list[TaskAck]) -> dict[str, int | None]:
    """Each stage's lowest task watermark after an epoch (for the epoch event)."""
    by_stage: dict[str, list[int | None]] = {}
    for a in acks:
        by_stage.setdefault(a.task.stage, []).append(a.watermark)
    return {stage: None if None in marks else min(marks) for stage, marks in by_stage.items()}
