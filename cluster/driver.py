"""Carrying out the controller's instructions: the part every driver shares.

:class:`Driver` does what touches checkpoint storage and the sinks (offsets
log, manifests, commit log, history, retention, sink commits, the restore
point) and leaves what moves tasks to its subclasses: the Ray coordinator
(:mod:`~sluiceway.cluster.coordinator`), the in-process runner
(:func:`sluiceway.jobs.testing.run_local`) and the simulation
(:mod:`~sluiceway.cluster.simulation`). So the one protocol they all run is
the controller's, and the storage side of it is written once.
"""

from __future__ import annotations

import traceback
from collections import deque
from typing import Callable

from sluiceway.checkpoint import lease as leases
from sluiceway.checkpoint.errors import CheckpointError, CorruptCheckpointError
from sluiceway.checkpoint.lease import Lease
from sluiceway.checkpoint.manifest import latest_complete, restorable
from sluiceway.checkpoint.retention import apply_retention
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.timeline import HistoryWriter, RecordKind, record_names
from sluiceway.cluster import protocol as p
from sluiceway.cluster import records
from sluiceway.cluster.controller import JobController
from sluiceway.cluster.launch import record_graph
from sluiceway.cluster.epochs import EpochPlan, plan_epoch
from sluiceway.cluster.errors import JobFailedError
from sluiceway.cluster.restart import Failure, FailureKind
from sluiceway.operators.sinks import SinkContext


class Driver:
    """Carries out a :class:`JobController`'s instructions (see module doc).

    Subclasses implement the task side: :meth:`start_tasks`,
    :meth:`reset_tasks`, :meth:`find_dead`, :meth:`run_epoch`, and may record
    more in :meth:`started` / :meth:`recovered` / :meth:`publish`."""

    def __init__(self, controller: JobController, storage: JobStorage, lease: Lease, job_doc: dict,
                 clock: Callable[[], float]):
        self.controller = controller
        self.plan = controller.plan
        self.storage = storage
        self.lease = lease
        self.job_doc = job_doc
        self.clock = clock
        self.sources = controller.sources
        self.sinks = self.plan.sinks()
        self.source_parallelism = {s.source: s.parallelism for s in self.plan.stages.values() if s.source is not None}
        self.history = HistoryWriter(storage, lease.fencing)
        self.run_id = lease.holder.run_id
        self.placement: dict = {}  # task -> where it runs
        self.nodes = 1
        self._carry = {
            p.ReadRestorePoint: self._read_restore_point, p.StartTasks: self.start_tasks,
            p.ResetTasks: self.reset_tasks, p.FindDead: self.find_dead, p.ProbeSources: self.probe_sources,
            p.WriteOffsets: self._write_offsets, p.RunEpoch: self.run_epoch, p.WriteManifest: self._write_manifest,
            p.WriteCommit: self._write_commit, p.CommitSinks: self._commit_sinks, p.AbortSinks: self._abort_sinks,
            p.ApplyRetention: self._apply_retention, p.NotifySources: self._notify_sources,
            p.WriteHistory: self._write_history, p.Emit: self._emit, p.Started: self.started,
            p.Recovered: self.recovered, p.Fail: self._fail,
        }

    # ------------------------------------------------------------ the loop
    def handle(self, event: p.Event) -> None:
        """Give ``event`` to the controller and carry out what follows,
        answering its questions as they come."""
        self.execute(self.controller.handle(event))

    def execute(self, instructions: list[p.Instruction]) -> None:
        pending = deque(instructions)
        while pending:
            instruction = pending.popleft()
            self.before(instruction)
            answer = self._carry[type(instruction)](instruction)
            if answer is not None:
                pending.extendleft(reversed(self.controller.handle(answer)))

    def before(self, instruction: p.Instruction) -> None:
        """Called before each instruction (the simulation crashes here)."""

    # -------------------------------------------------------- the task side
    def start_tasks(self, instruction: p.StartTasks) -> None:
        raise NotImplementedError

    def reset_tasks(self, instruction: p.ResetTasks) -> p.Event:
        raise NotImplementedError

    def find_dead(self, instruction: p.FindDead) -> p.DeadFound:
        raise NotImplementedError

    def run_epoch(self, instruction: p.RunEpoch) -> None:
        raise NotImplementedError

    def probe_sources(self, instruction: p.ProbeSources) -> p.SourcesProbed:
        return p.SourcesProbed(plan_epoch(instruction.epoch, self.sources, instruction.next_offsets,
                                          now=self.clock(), started_at=self.job_doc["sources_started_at"],
                                          max_records_per_epoch=instruction.max_records,
                                          parallelism=self.source_parallelism))

    def publish(self, event: dict) -> None:
        """A progress event (the Ray driver keeps them for the CLI and metrics)."""

    def started(self, instruction: p.Started) -> None:
        """The run began: the generators' clock starts now that the tasks are
        ready; a run_started record, and a rescale record when parallelism
        changed since the previous run."""
        now = self.clock()
        changed = record_graph(self.job_doc, self.plan, now)
        if "sources_started_at" not in self.job_doc:
            self.job_doc["sources_started_at"] = now
            changed = True
        if changed:
            self.storage.write_job(self.job_doc)
        parallelism = self.plan.parallelism()
        previous = record_names(self.storage, [RecordKind.RUN_STARTED])
        before = self.storage.read_json(self.storage.history_path(previous[-1])) if previous else None
        if before and before.get("parallelism") != parallelism:
            self._record(records.Rescale(before.get("parallelism"), parallelism, instruction.restored), now)
        self._record(records.RunStarted(
            self.run_id, self.lease.holder.host, self.lease.holder.pid, instruction.restored, instruction.replay,
            parallelism, self.nodes, {str(t): n for t, n in self.placement.items()}), now)
        self.publish({"type": "started", "at": now, "tasks": {str(t): n for t, n in self.placement.items()},
                      "nodes": self.nodes, "resume_checkpoint": instruction.restored,
                      "replay_epochs": instruction.replay, **self.started_fields()})

    def started_fields(self) -> dict:
        return {}

    def recovered(self, instruction: p.Recovered) -> None:
        now = self.clock()
        failure = instruction.failure
        lost_at = self.lost_at(failure) if failure.kind is FailureKind.TASK_LOST else instruction.started_at
        restarted = [str(t) for t in instruction.restarted]
        self._record(records.Recovery.of(
            failure, detect_s=instruction.started_at - (lost_at or instruction.started_at),
            restore_s=now - instruction.started_at, delay_s=instruction.delay_s, restored=instruction.restored,
            replay=instruction.replay, restarted=restarted), instruction.started_at)
        self.publish({"type": "recovered", "at": now, "checkpoint": instruction.restored,
                      "restarted_tasks": restarted, "tasks": {str(t): n for t, n in self.placement.items()},
                      "replay_epochs": instruction.replay, "duration_s": round(now - instruction.started_at, 3),
                      **self.started_fields()})

    def lost_at(self, failure: Failure) -> float | None:
        """When the lost task last answered (for the recovery's detection time)."""
        return None

    # ------------------------------------------------------- storage, sinks
    def _read_restore_point(self, instruction: p.ReadRestorePoint) -> p.RestorePoint:
        """The checkpoint to restore, the offsets log after it, the commit log from it on."""
        if instruction.chosen is not None:
            check, corrupt = restorable(self.storage, instruction.chosen), []
        else:
            check, corrupt = latest_complete(self.storage, skip=set(instruction.skip))
        manifest = check.manifest if check else None
        base = manifest.epoch if manifest else 0
        plans = [self.read_plan(epoch) for epoch in self.storage.offset_epochs() if epoch > base]
        logged = self.storage.commit_epochs()
        commits = {epoch: self.storage.read_commit(epoch) for epoch in logged if epoch >= base}
        return p.RestorePoint(manifest, plans, commits, logged[-1] if logged else 0,
                              [(c.checkpoint_id, c.problem) for c in corrupt])

    def read_plan(self, epoch: int) -> EpochPlan:
        """One entry of the offsets log, or an error naming the file."""
        url = self.storage.url(self.storage.offsets_path(epoch))
        fix = (
            "the offsets log is written by sluiceway alone: restore the file from a backup, "
            "or start the job on a new checkpoint dir"
        )
        try:
            doc = self.storage.read_offsets(epoch)
        except CheckpointError as exc:
            raise CorruptCheckpointError(f"offsets log entry {url} cannot be read: {exc}; {fix}") from None
        if doc is None:
            raise CorruptCheckpointError(f"offsets log entry {url} vanished while the job started; {fix}")
        try:
            plan = EpochPlan.from_json(doc)
        except ValueError as exc:
            raise CorruptCheckpointError(f"offsets log entry {url} is malformed: {exc}; {fix}") from None
        if plan.epoch != epoch:
            raise CorruptCheckpointError(f"offsets log entry {url} says it is epoch {plan.epoch}; {fix}")
        return plan

    def check_lease(self) -> None:
        """Before a commit-point write: stop if a newer run owns the job."""
        leases.check(self.storage, self.lease)

    def _write_offsets(self, instruction: p.WriteOffsets) -> p.OffsetsWritten:
        plan = instruction.plan
        self.check_lease()
        try:
            self.storage.write_offsets(plan.epoch, {**plan.to_json(), "fencing": self.lease.fencing})
            return p.OffsetsWritten(plan)
        except FileExistsError:
            # Another run planned this epoch after we read the log (it has
            # lost the job, or we have): the plan in the log is the one to run.
            self.check_lease()
            return p.OffsetsWritten(self.read_plan(plan.epoch), adopted=True)

    def _write_manifest(self, instruction: p.WriteManifest) -> None:
        self.check_lease()
        self.storage.write_manifest(instruction.checkpoint_id, instruction.manifest.to_json())

    def _write_commit(self, instruction: p.WriteCommit) -> None:
        self.check_lease()
        self.storage.write_commit(instruction.epoch, instruction.record)

    def _commit_sinks(self, instruction: p.CommitSinks) -> p.Event:
        """Commit one epoch in every sink; a sink that fails is a failure of
        the epoch, and the recovery commits it again from the commit log."""
        epoch = instruction.epoch
        for step, sink in self.sinks.items():
            if step not in instruction.handles:
                continue
            try:
                sink.commit(epoch, instruction.handles[step])
            except Exception as exc:  # noqa: BLE001 - the sink's (or its system's) error, recovered from
                self.check_lease()
                return p.SinkCommitFailed(epoch, Failure(
                    FailureKind.USER_CODE,
                    f"sink {step!r} ({type(sink).__name__}) could not commit epoch {epoch}: "
                    f"{type(exc).__name__}: {exc}".splitlines()[0],
                    detail=traceback.format_exc(), task=None, epoch=epoch,
                    signature=("sink-commit", step, type(exc).__name__)))
        return p.SinksCommitted(epoch)

    def _abort_sinks(self, instruction: p.AbortSinks) -> None:
        """Only while this run holds the lease: a fenced run's abort would
        roll back the pre-commits of the run that took the job over."""
        self.check_lease()
        for step, sink in self.sinks.items():
            sink.abort(instruction.after, SinkContext(step, -1, 0, self.plan.job, f"f{self.lease.fencing}",
                                                      self.storage.on_wait))

    def _apply_retention(self, instruction: p.ApplyRetention) -> p.RetentionApplied:
        """Only while this run holds the lease: a fenced run's retention could
        delete files the newer run's checkpoints refer to."""
        self.check_lease()
        return p.RetentionApplied(instruction.epoch, apply_retention(self.storage, instruction.keep))

    def _notify_sources(self, instruction: p.NotifySources) -> None:
        """Each source hears the offsets a completed checkpoint covers (a log
        records the job's position). Bookkeeping: a failure is an event."""
        for step, source in self.sources.items():
            try:
                source.checkpointed(self.plan.job, instruction.next_offsets.get(step, {}))
            except Exception as exc:  # noqa: BLE001 - the job's output does not depend on it
                self.publish({"type": "source_checkpointed_failed", "at": self.clock(), "source": step,
                              "epoch": instruction.epoch, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})

    def _write_history(self, instruction: p.WriteHistory) -> None:
        self._record(instruction.record, instruction.at)

    def _record(self, record: records.HistoryRecord, at: float) -> None:
        self.history.write(record.kind, record.to_json(), at)

    def _emit(self, instruction: p.Emit) -> None:
        self.publish(instruction.event)

    def _fail(self, instruction: p.Fail) -> None:
        raise JobFailedError(instruction.message, instruction.detail)

    def end_records(self, reason: str | None, error: str | None) -> None:
        """The run's last history records; storage that is gone leaves them out
        (the job's own error says so)."""
        try:
            self.execute(self.controller.end_records(reason, error, self.run_id))
        except CheckpointError:
            pass

    def __reduce__(self):
        raise TypeError(f"a {type(self).__name__} drives one run where it was made; it must not be pickled")
