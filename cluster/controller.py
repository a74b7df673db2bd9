"""The job controller: the coordinator's decisions as a pure state machine.

:meth:`JobController.handle` takes one event (:mod:`~sluiceway.cluster.protocol`)
and returns the instructions that follow from it. It has an injected clock
and no Ray, threads or storage I/O, so every protocol step is tested as
``handle(event) -> instructions`` in microseconds, and the simulation
(:mod:`~sluiceway.cluster.simulation`) drives it through thousands of faults.

A run goes through these phases:

1. **Restore** (``Start``): read the restore point (the newest complete
   checkpoint and the offsets log after it), start the tasks, commit again
   the checkpoint's epoch and every epoch the commit log holds after it,
   reset every task to the checkpoint, then abort the sinks' pre-commits
   above the high water (after the reset, so that no task still running an
   earlier generation's epoch can pre-commit behind the abort). A corrupt
   state file falls back to the checkpoint before.
2. **Run**: replay the logged epochs after the checkpoint with exactly their
   ranges, then plan new ones when the trigger is due and fewer than
   ``max_epochs_in_flight`` run (offsets log first, then the source tasks).
3. **Complete** epochs whose tasks have all acknowledged, in order:
   manifest (the commit point of a checkpoint), commit log entry (the
   decision, with the sinks' handles), sink commits, retention.
4. **Recover** from failures (a task's report, a lost task, a stuck epoch, a
   sink that cannot commit): the restart policy decides; a new generation
   makes everything in flight stale; after the delay the dead tasks are found
   and started again, and the run restores as in 1.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from sluiceway.checkpoint.errors import CorruptCheckpointError, IncompatibleJobError
from sluiceway.checkpoint.manifest import Manifest, commit_record_from
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster import protocol as p
from sluiceway.cluster import evolution, records
from sluiceway.cluster.epochs import EpochBook, EpochPlan, EpochSizer, TaskAck, Trigger, sources_exhausted, \
    total_waiting, watermark_marks
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.options import RunOptions
from sluiceway.cluster.records import EpochRecord
from sluiceway.cluster.recovery import STUCK_BEFORE_FIRST_EPOCH_S, STUCK_FLOOR_S, Phase, Recovery
from sluiceway.cluster.restart import Failure, FailureKind, RestartTracker



class JobController(Recovery):
    """One run of one job, as ``handle(event) -> instructions`` (see module doc)."""

    def __init__(self, plan: PhysicalPlan, options: RunOptions, *, fencing: int, clock: Callable[[], float]):
        self.plan = plan
        self.options = options
        self.fencing = fencing
        self.clock = clock
        self.tasks = plan.tasks()
        self.sources = plan.sources()
        self.sink_steps = list(plan.sinks())
        self.step_signatures = evolution.signatures(plan.graph)  # recorded in each manifest
        self.phase = Phase.RESTORING
        self.generation = 0
        self.restarts = 0
        self.replayed = 0
        self.tracker = RestartTracker(options.restart)
        self.failures: list[str] = []  # every failure of the run, with its detail
        self.pending_failures: list[Failure] = []  # heard of, not yet recovered from
        self.bad_checkpoints: set[int] = set()
        self.stats = {"epochs": 0, **{name: 0 for name in EpochRecord.COUNTERS}, "checkpoints": 0}
        self.high_water = 0  # highest epoch ever in the commit log; stats count only newer ones
        self.last_completed = self.last_checkpoint = 0
        self.last_checkpoint_size: int | None = None
        self.previous_files: dict = {}
        self.restore_manifest: dict | None = None
        self.replay: deque[EpochPlan] = deque()
        self.next_epoch = 1
        self.next_offsets: dict = {}
        self.active_at: dict = {}
        self.lag: dict = {}
        self.trigger = Trigger(options.trigger_s)
        self.sizer = EpochSizer(options.trigger_s, options.max_records_per_epoch)
        self.book = EpochBook(self.tasks, self.generation)
        self.recent_latencies: deque[float] = deque(maxlen=20)
        self.stop_reason: str | None = None
        self.savepoint_requested = False
        self.savepoint: int | None = None
        self.unconfirmed_recovery = False
        self.epochs_planned_this_run = 0
        self.storage_waits: dict[str, float] = {}  # who -> since when it waits for storage
        self.known_dead: set[TaskId] = set()
        self._restore_chosen = options.restore_checkpoint  # the first restore uses it; recoveries the latest
        self._started = False  # tasks started and reset once: later restores are recoveries
        self._to_start: tuple[TaskId, ...] = ()
        self._settling: deque[tuple[int, dict]] = deque()
        self._awaiting: type | None = None  # the answer a question of ours waits for
        self._planning_since: float | None = None
        self._plan_s: dict[int, float] = {}  # epoch -> seconds spent planning it (offsets log write)
        self._completing: deque[tuple[EpochPlan, list[TaskAck]]] = deque()
        self._completion: dict = {}  # the epoch being completed: its record and timings
        self._recovery: dict = {}  # the recovery in progress: failure, start, delay
        self._reported: dict[int, float] = {}  # epoch -> when it was last reported as waiting
        self._no_input: tuple[float, float] | None = None  # no source had new records since, next report at
        self._handlers = {
            p.Start: self._on_start, p.Tick: self._on_tick, p.RestorePoint: self._on_restore_point,
            p.TasksReset: self._on_tasks_reset, p.ResetFailed: self._on_reset_failed,
            p.SourcesProbed: self._on_sources_probed, p.OffsetsWritten: self._on_offsets_written,
            p.Acked: self._on_acked, p.TaskFailed: self._on_task_failed, p.TaskLost: self._on_task_lost,
            p.SinksCommitted: self._on_sinks_committed, p.SinkCommitFailed: self._on_sink_commit_failed,
            p.RetentionApplied: self._on_retention_applied, p.DeadFound: self._on_dead_found,
            p.StorageWait: self._on_storage_wait, p.StopRequested: self._on_stop_requested,
        }

    # ------------------------------------------------------------ the face
    def handle(self, event: p.Event) -> list[p.Instruction]:
        """What follows from ``event``. Raises for a job that cannot run at
        all (a corrupt offsets log, a checkpoint of another shape)."""
        answer = type(event)
        if answer in _ANSWERS:
            if self._awaiting is not answer and not (answer in _ALT and _ALT[answer] is self._awaiting):
                raise RuntimeError(f"{answer.__name__} came while waiting for "
                                   f"{self._awaiting.__name__ if self._awaiting else 'nothing'}")
            self._awaiting = None
        out = self._handlers[answer](event)
        questions = [i for i in out if isinstance(i, p.Question)]
        if questions:
            assert len(questions) == 1 and out[-1] is questions[0], f"a question must come last: {out}"
            self._awaiting = _ANSWER_OF[type(questions[0])]
        return out

    @property
    def busy(self) -> bool:
        """A question of ours is unanswered."""
        return self._awaiting is not None

    @property
    def finished(self) -> bool:
        """The run ends: stopped, nothing in flight, its last epoch checkpointed."""
        return (
            self.phase is Phase.RUNNING
            and self.stop_reason is not None
            and not self.replay
            and not self._completing
            and self._awaiting is None
            and self.book.in_flight == 0
            and self.last_completed == self.last_checkpoint
            and (self.savepoint is not None or not self.savepoint_requested)
        )

    @property
    def waiting(self) -> int:
        """Records readable but not yet planned, as of the last plan."""
        return total_waiting(self.lag)

    def epoch_bound_s(self) -> float:
        """How long an epoch may take before it counts as stuck."""
        if self.options.epoch_timeout_s is not None:
            return self.options.epoch_timeout_s
        if not self.recent_latencies:
            return STUCK_BEFORE_FIRST_EPOCH_S
        return max(STUCK_FLOOR_S, 10 * max(self.recent_latencies))

    def summary(self) -> dict:
        return {
            "job": self.plan.job, **self.stats, "replayed_epochs": self.replayed, "restarts": self.restarts,
            "last_epoch": self.last_completed, "last_checkpoint": self.last_checkpoint, "stopped": self.stop_reason,
            "savepoint": self.savepoint, "failures": self.failures,
        }

    def end_records(self, reason: str | None, error: str | None, run_id: str) -> list[p.Instruction]:
        """The run's last history records: checkpoints in flight aborted, the run ended."""
        now = self.clock()
        out = self._checkpoints_lost("aborted", f"the run ended ({error or reason})", now)
        out.append(p.WriteHistory(records.RunEnded(run_id, reason, error, self.last_completed, self.last_checkpoint,
                                                   self.restarts), now))
        return out

    def _emit(self, kind: str, **fields) -> p.Emit:
        return p.Emit({"type": kind, "at": self.clock(), **fields})

    # ------------------------------------------------------------- restore
    def _on_start(self, event: p.Start) -> list[p.Instruction]:
        self._to_start = tuple(self.tasks)
        return self._read_restore_point()

    def _read_restore_point(self) -> list[p.Instruction]:
        chosen, self._restore_chosen = self._restore_chosen, None
        self.phase = Phase.RESTORING
        return [p.ReadRestorePoint(chosen, frozenset(self.bad_checkpoints))]

    def _on_restore_point(self, event: p.RestorePoint) -> list[p.Instruction]:
        out: list[p.Instruction] = [self._emit("corrupt_checkpoint", checkpoint=c, problem=problem)
                                    for c, problem in event.corrupt]
        manifest = event.manifest
        if manifest is not None and manifest.max_key_groups != self.plan.max_key_groups:
            raise IncompatibleJobError(
                f"checkpoint {manifest.id} has max_key_groups {manifest.max_key_groups}, "
                f"the flow has {self.plan.max_key_groups}; max_key_groups is fixed for a job's life"
            )
        renamed, dropped = self.plan.graph.renamed, set()
        if manifest is not None:
            manifest, dropped, changed = self._evolve(manifest, renamed)
            out += changed
        base = manifest.epoch if manifest else 0
        plans = [evolution.replayable(plan, renamed, dropped) for plan in event.plans]
        expected = list(range(base + 1, base + 1 + len(plans)))
        if [plan.epoch for plan in plans] != expected:
            raise CorruptCheckpointError(_gap_message(self.plan.job, base, [plan.epoch for plan in plans],
                                                      event.corrupt))
        self.restore_manifest = manifest
        self.previous_files = dict(manifest.files) if manifest else {}
        self.last_checkpoint_size = manifest.size_bytes if manifest else None
        self.replay = deque(plans)
        self.active_at = plans[-1].active_at if plans else {}  # when each source partition last had input
        self.last_completed = self.last_checkpoint = base
        self.next_epoch = base + len(plans) + 1
        if plans:
            self.next_offsets = plans[-1].next_offsets()
        elif manifest:
            self.next_offsets = {s: {int(k): o for k, o in parts.items()} for s, parts in manifest.offsets.items()}
        else:
            self.next_offsets = {}
        self.trigger = Trigger(self.options.trigger_s)
        self.lag = {}
        self.book = EpochBook(self.tasks, self.generation)
        self.high_water = max(self.high_water, event.high_water)
        if self._to_start:
            out.append(p.StartTasks(self._to_start, offset=self.restarts))
            self._to_start = ()
        # Settle the sinks (two-phase commit): the checkpoint's epoch and every logged epoch after it again, in
        # order; a checkpoint whose commit log entry is missing (the coordinator died between its manifest, the
        # commit point, and the entry) gets the entry from its manifest.
        commits = dict(event.commits)
        if base and commits.get(base) is None and manifest is not None:
            commits[base] = commit_record_from(manifest, self.sink_steps)
            out.append(p.WriteCommit(base, commits[base]))
            self.high_water = max(self.high_water, base)
        self._settling = deque((e, commits[e]["sinks"]) for e in sorted(commits)
                               if e >= base and commits[e] and commits[e].get("sinks"))
        return out + self._settle_next()

    def _evolve(self, manifest: Manifest, renamed: dict[str, str]) -> tuple[Manifest, set[str], list[p.Instruction]]:
        """The checkpoint as this flow restores it, the steps whose state it
        drops, and the changes to report; a change that drops state without
        ``allow_dropped_state`` refuses the restore."""
        changes = evolution.compare(manifest, self.plan.graph, renamed)
        losing = [c for c in changes if c.loses]
        if losing and not self.options.allow_dropped_state:
            more = f" ({len(losing) - 1} more change(s) would drop state too)" if len(losing) > 1 else ""
            raise IncompatibleJobError(
                f"checkpoint {manifest.id} cannot be restored into this flow: {losing[0].line}{more}; to run it "
                "anyway, with those steps starting empty, pass --allow-dropped-state (allow_dropped_state=True)"
            )
        out = [] if self._started else [self._emit("flow_changed", step=c.step, change=c.what, message=c.line,
                                                   drops_state=c.loses) for c in changes]
        return evolution.as_restored(manifest, changes, renamed), {c.step for c in losing}, out

    def _settle_next(self) -> list[p.Instruction]:
        if self._settling:
            epoch, handles = self._settling.popleft()
            return [p.CommitSinks(epoch, handles)]
        return [p.ResetTasks(self.generation, self.restore_manifest, self.last_checkpoint + 1, self.high_water)]

    def _on_tasks_reset(self, event: p.TasksReset) -> list[p.Instruction]:
        """Every task is reset: none runs an earlier generation's work any more (a reset waits behind it, and
        then drops its messages), so no pre-commit can land after this abort of those above the high water."""
        self.phase = Phase.RUNNING
        replay = [plan.epoch for plan in self.replay]
        restored = self.restore_manifest.id if self.restore_manifest else None
        out: list[p.Instruction] = [p.AbortSinks(self.high_water)]
        if not self._started:
            self._started = True
            out.append(p.Started(restored, replay))
        else:
            r = self._recovery
            out.append(p.Recovered(r["failure"], r["at"], r["delay_s"], self.last_checkpoint, replay, r["restarted"]))
            self.unconfirmed_recovery = True  # until a checkpoint after it completes (on idle input, an empty one)
        return out + self._plan(self.clock())

    def _on_reset_failed(self, event: p.ResetFailed) -> list[p.Instruction]:
        if event.lost:  # a task died while resetting: recover again
            self.phase = Phase.RUNNING
            self.pending_failures.append(Failure(FailureKind.TASK_LOST, event.problem))
            return []
        if self.restore_manifest is None:
            raise CorruptCheckpointError(event.problem)
        bad = self.restore_manifest.id
        self.bad_checkpoints.add(bad)
        self.generation += 1
        return [self._emit("corrupt_checkpoint", checkpoint=bad, problem=event.problem.splitlines()[0]),
                *self._read_restore_point()]

    # ---------------------------------------------------------------- time
    def _on_tick(self, event: p.Tick) -> list[p.Instruction]:
        now = self.clock()
        if self.phase is Phase.DELAYING:
            if now >= self._recovery["resume_at"] or self.stop_reason is not None:
                return self._find_dead()
            return []
        if self.phase is not Phase.RUNNING or self._awaiting is not None:
            return []
        if self.pending_failures:
            return self._recover(now)
        out = self._check_stuck(now, event.silent)
        if self.pending_failures:
            return self._recover(now)
        return out + self._plan(now)

    # ---------------------------------------------------------------- plan
    def _plan(self, now: float) -> list[p.Instruction]:
        if self.phase is not Phase.RUNNING or self._awaiting is not None or self.pending_failures:
            return []
        out: list[p.Instruction] = []
        while self.replay and self.book.in_flight < self.options.max_epochs_in_flight:
            out += self._dispatch(self.replay.popleft(), now)
        if self.replay or self.book.in_flight >= self.options.max_epochs_in_flight:
            return out
        if self.stop_reason is not None:
            if self.book.in_flight == 0 and not self._completing:
                if self.savepoint_requested and self.savepoint is None:
                    return out + self._write(self._empty_ranges(), checkpoint=True, now=now, savepoint=True)
                if self.last_completed != self.last_checkpoint:
                    return out + self._write(self._empty_ranges(), checkpoint=True, now=now)
            return out
        if not self.trigger.due(now, self.waiting):
            return out  # caught up: wait for the trigger. Behind: plan at once.
        self.trigger.planned(now)
        self._planning_since = now
        return out + [p.ProbeSources(self.next_epoch, self.next_offsets, self.sizer.size())]

    def _on_sources_probed(self, event: p.SourcesProbed) -> list[p.Instruction]:
        now = self._planning_since if self._planning_since is not None else self.clock()
        planned = event.planned
        ranges, self.lag = planned.ranges, planned.lag
        if ranges is None:
            if self.options.until_idle and sources_exhausted(self.sources, self.next_offsets):
                self.stop_reason = "idle"
            elif self.unconfirmed_recovery and self.book.in_flight == 0:
                # No input to carry a checkpoint: an empty epoch checkpoints the recovered state, so the restart
                # policy sees the recovery complete (and forgives it) on idle input too.
                return self._write(self._empty_ranges(), checkpoint=True, now=now)
            return self._report_no_input(now) + self._plan(self.clock())
        self._no_input = None
        self.epochs_planned_this_run += 1
        after = {s: {k: stop for k, (_, stop) in parts.items()} for s, parts in ranges.items()}
        if self.options.until_idle and sources_exhausted(self.sources, after):
            self.stop_reason = "idle"
        if self.options.epochs is not None and self.epochs_planned_this_run >= self.options.epochs:
            self.stop_reason = "epochs"
        checkpoint = self.stop_reason is not None or self.next_epoch % self.options.checkpoint_every == 0
        return self._write(ranges, checkpoint=checkpoint, now=now, waiting=self.waiting, gaps=planned.gaps)

    def _empty_ranges(self):
        return {
            s: {k: (self.next_offsets.get(s, {}).get(k, 0),) * 2 for k in range(src.partition_count())}
            for s, src in self.sources.items()
        }

    def _write(self, ranges, *, checkpoint: bool, now: float, waiting: int = 0, savepoint: bool = False,
               gaps=None) -> list[p.Instruction]:
        active_at, ended = watermark_marks(self.sources, ranges, self.active_at, now)
        lag = {step: {"records": lag.records, "oldest_s": lag.oldest_s} for step, lag in self.lag.items()}
        plan = EpochPlan(self.next_epoch, ranges, checkpoint, now, waiting, savepoint, gaps or {}, active_at, ended,
                         lag)
        if checkpoint:
            self.unconfirmed_recovery = False
        self._planning_since = now
        return [p.WriteOffsets(plan)]

    def _on_offsets_written(self, event: p.OffsetsWritten) -> list[p.Instruction]:
        plan, now = event.plan, self.clock()
        out: list[p.Instruction] = [self._emit("adopted_plan", epoch=plan.epoch)] if event.adopted else []
        self.next_epoch = plan.epoch + 1
        self.next_offsets = plan.next_offsets()
        self.active_at = plan.active_at
        self._plan_s[plan.epoch] = now - (self._planning_since if self._planning_since is not None else now)
        self._planning_since = None
        for step, parts in plan.gaps.items():
            for partition, (expected, skipped_to) in parts.items():
                out.append(self._emit("source_gap", epoch=plan.epoch, source=step, partition=partition,
                                      skipped=[expected, skipped_to], records=skipped_to - expected))
        return out + self._dispatch(plan, now)

    def _dispatch(self, plan: EpochPlan, now: float) -> list[p.Instruction]:
        self.book.add(plan, now)
        return [p.RunEpoch(plan, self.generation)]

    # ------------------------------------------------------------ complete
    def _on_acked(self, event: p.Acked) -> list[p.Instruction]:
        for ack in event.acks:
            self.book.handle_ack(ack)
        if self.phase is not Phase.RUNNING or self._awaiting is not None or self.pending_failures:
            return []
        return self._complete_next()

    def _complete_next(self) -> list[p.Instruction]:
        if not self._completing:
            self._completing.extend((plan, [acks[t] for t in sorted(acks)]) for plan, acks in self.book.pop_complete())
        if not self._completing:
            return self._plan(self.clock())
        plan, acks = self._completing[0]
        return self._complete(plan, acks)

    def _complete(self, plan: EpochPlan, acks: list[TaskAck]) -> list[p.Instruction]:
        """1. A checkpoint epoch: the manifest is the commit point. 2. The commit
        log records the epoch and its sinks' handles: from there on it is
        committed. 3. The sinks make it visible (idempotent; after a failure,
        done again from the log). 4. Retention, once the new checkpoint is safe."""
        now = self.clock()
        out: list[p.Instruction] = []
        written_bytes = None
        if plan.checkpoint:
            manifest = self._manifest(plan, acks, now)
            out.append(p.WriteManifest(plan.epoch, manifest))
            out.append(p.WriteHistory(records.CheckpointCompleted.of(
                plan, acks, manifest, self.last_checkpoint_size, now), now))
            self.last_checkpoint_size = manifest.size_bytes
            written_bytes = manifest.written_bytes
            self.previous_files = manifest.files
            self.last_checkpoint = plan.epoch
            if plan.savepoint:
                self.savepoint = plan.epoch
            self.stats["checkpoints"] += 1
            self.tracker.on_checkpoint_completed(now)
            out.append(p.NotifySources(plan.epoch, plan.next_offsets()))
        duration = self.book.latency(plan.epoch, now)  # from dispatch: a replay's plan is older than its run
        self.recent_latencies.append(duration)
        record = EpochRecord.of(plan, acks, completed_at=now, duration_s=duration, generation=self.generation,
                                fencing=self.fencing, sinks=self.sink_steps)
        if plan.epoch > self.high_water:
            self.sizer.observe(record.rows_in, duration)
        self._completion = {"record": record, "at": now, "written_bytes": written_bytes}
        if plan.epoch <= self.high_water:  # a replay: the commit log has it, and its sinks committed it
            return out + self._committed(plan)
        return out + [p.WriteCommit(plan.epoch, record.commit_json()), p.CommitSinks(plan.epoch, record.sinks)]

    def _manifest(self, plan: EpochPlan, acks: list[TaskAck], now: float) -> dict:
        return records.manifest(self.plan, plan, acks, previous_files=self.previous_files, fencing=self.fencing,
                                completed_at=now, steps=self.step_signatures)

    def _on_sinks_committed(self, event: p.SinksCommitted) -> list[p.Instruction]:
        if self.phase is Phase.RESTORING:
            return self._settle_next()
        return self._committed(self._completing[0][0])

    def _committed(self, plan: EpochPlan) -> list[p.Instruction]:
        record: EpochRecord = self._completion["record"]
        self._completion["committed_at"] = self.clock()
        self.last_completed = plan.epoch
        if plan.epoch > self.high_water:
            self.high_water = plan.epoch
            self.stats["epochs"] += 1
            for name in EpochRecord.COUNTERS:
                self.stats[name] += getattr(record, name)
        else:
            self.replayed += 1
        if plan.checkpoint:
            return [p.ApplyRetention(plan.epoch, self.options.keep_checkpoints)]
        return self._epoch_done(plan, [])

    def _on_retention_applied(self, event: p.RetentionApplied) -> list[p.Instruction]:
        return self._epoch_done(self._completing[0][0], event.deleted)

    def _epoch_done(self, plan: EpochPlan, deleted: list[int]) -> list[p.Instruction]:
        _, acks = self._completing.popleft()
        c, record = self._completion, self._completion["record"]
        plan_s = self._plan_s.pop(plan.epoch, None)  # None: a replay, planned by an earlier run or generation
        snapshot_s = max((a.snapshot_s for a in acks), default=0.0)
        event = self._emit(
            "epoch", epoch=plan.epoch, rows_in=record.rows_in, rows_out=record.rows_out,
            dead_letters=record.dead_letters, late=record.late, watermark=records.stage_watermarks(acks),
            duration_s=round(record.duration_s, 4),
            rows_per_s=round(record.rows_in / record.duration_s, 1) if record.duration_s > 0 else None,
            checkpoint=plan.epoch if plan.checkpoint else None, last_checkpoint=self.last_checkpoint,
            deleted_checkpoints=deleted, generation=self.generation,
            savepoint=plan.epoch if plan.savepoint else None, replay=plan_s is None, lag=plan.lag,
            phases={
                "plan": round(plan_s or 0.0, 6),
                "process": round(max((a.duration_s - a.snapshot_s for a in acks), default=0.0), 6),
                "align": round(max((a.alignment_s for a in acks), default=0.0), 6),
                "checkpoint": round(snapshot_s, 6) if plan.checkpoint else 0.0,
                "commit": round(c.get("committed_at", c["at"]) - c["at"], 6),
            },
            sources={s: {str(k): list(span) for k, span in parts.items()} for s, parts in plan.ranges.items()},
            waiting=plan.waiting, state_bytes=self.last_checkpoint_size,
            checkpoint_s=round(c["at"] - plan.planned_at, 6) if plan.checkpoint else None,
            checkpoint_bytes=c["written_bytes"],
            input_ended=sources_exhausted(self.sources, plan.next_offsets()),  # every bounded input row planned
        )
        self._reported.pop(plan.epoch, None)
        self._completion = {}
        return [event] + self._complete_next()

    # --------------------------------------------------------------- other
    def _on_stop_requested(self, event: p.StopRequested) -> list[p.Instruction]:
        self.savepoint_requested = self.savepoint_requested or event.savepoint
        if self.stop_reason is None:
            self.stop_reason = "requested"
        return []

    def __reduce__(self):
        raise TypeError("a JobController lives inside its driver; it must not be pickled")


# Which event answers which question (and the other answers a question may get).
_ANSWER_OF = {p.ReadRestorePoint: p.RestorePoint, p.ResetTasks: p.TasksReset, p.FindDead: p.DeadFound,
              p.ProbeSources: p.SourcesProbed, p.WriteOffsets: p.OffsetsWritten, p.CommitSinks: p.SinksCommitted,
              p.ApplyRetention: p.RetentionApplied}
_ALT = {p.ResetFailed: p.TasksReset, p.SinkCommitFailed: p.SinksCommitted}
_ANSWERS = set(_ANSWER_OF.values()) | set(_ALT)


def _gap_message(job: str, base: int, logged: list[int], corrupt: list[tuple[int, str]]) -> str:
    """Why a job cannot resume when the epochs after its restore point are not all in the offsets log.

    >>> _gap_message("j", 0, [3, 4], [(2, "its MANIFEST.json does not parse")])
    "job 'j' cannot resume: no complete checkpoint is readable (checkpoint 2: its MANIFEST.json does not parse), and the offsets log has no entry for epoch 1 (it holds epochs 3 to 4), so what came after the restore point cannot be replayed; restore the checkpoint folders from a backup, or start the job over with a new checkpoint dir"
    """
    first = next(e for e in range(base + 1, base + 2 + len(logged)) if e not in logged)
    if corrupt:
        shown = "; ".join(f"checkpoint {c}: {problem}" for c, problem in corrupt[:3])
        start = (f"no complete checkpoint is readable ({shown})" if base == 0
                 else f"the latest readable checkpoint is {base} (newer ones are not: {shown})")
    else:
        start = "it has no complete checkpoint" if base == 0 else f"its latest checkpoint is {base}"
    held = f"epochs {logged[0]} to {logged[-1]}" if logged else "none"
    return (f"job {job!r} cannot resume: {start}, and the offsets log has no entry for epoch {first} (it holds "
            f"{held}), so what came after the restore point cannot be replayed; restore the checkpoint folders "
            "from a backup, or start the job over with a new checkpoint dir")
