"""The coordinator actor: drives epochs, completes checkpoints, recovers.

Its loop (:meth:`Coordinator.run`) repeats four phases:

1. **Collect** acks and failure reports from tasks, and the answers of
   liveness pings (a dead actor or node fails its ping within about a second
   with the fast health check).
2. **Recover** if anything failed: new actors for the dead tasks only, every
   task reset to the latest complete checkpoint, and the epochs planned after
   it replayed with exactly the ranges of the offsets log.
3. **Complete** epochs whose tasks have all acknowledged, in order: manifest
   (the commit point of a checkpoint), commit log (with the sinks' handles:
   the decision), sink commits, retention. After a failure, the sinks commit
   again every epoch of the commit log after the restored checkpoint, and
   abort the pre-commits of epochs after the last one (two-phase commit).
4. **Plan** the next epoch when the trigger is due and fewer than
   ``max_epochs_in_flight`` run: offsets log first, then the source tasks.

A coordinator started on an existing checkpoint dir rebuilds its position
from storage alone (:meth:`_restore_point`).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from sluiceway.checkpoint import lease as leases
from sluiceway.checkpoint.errors import CheckpointError, CorruptCheckpointError, IncompatibleJobError, LeaseLostError
from sluiceway.checkpoint.lease import DEFAULT_TTL_S, Lease
from sluiceway.checkpoint.manifest import (assemble_state, build_manifest, commit_record_from, latest_complete,
                                          restorable)
from sluiceway.checkpoint.retention import apply_retention
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.timeline import HistoryWriter, RecordKind, record_names
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster.epochs import (EpochBook, EpochPlan, EpochSizer, TaskAck, Trigger, plan_epoch, total_waiting,
                                      sources_exhausted, watermark_marks)
from sluiceway.cluster.errors import JobFailedError
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.metrics import ray_metrics
from sluiceway.cluster import records
from sluiceway.cluster.placement import pinned, spread, worker_nodes
from sluiceway.cluster.restart import Failure, FailureKind, GiveUp, RestartPolicy, RestartTracker, primary
from sluiceway.cluster.task import TaskActor
from sluiceway.operators.sinks import SinkContext
from sluiceway.operators.sources import Lag

PING_INTERVAL_S = 0.5
STUCK_FLOOR_S = 60.0
STUCK_BEFORE_FIRST_EPOCH_S = 600.0  # no epoch finished yet: nothing to compare with, so be generous
LOOP_WAIT_S = 0.02
RESET_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RunOptions:
    """How a job runs. Durations in seconds."""

    trigger_s: float = 1.0
    checkpoint_every: int = 5
    max_epochs_in_flight: int = 2
    max_records_per_epoch: int = 1_000_000
    keep_checkpoints: int = 3
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    until_idle: bool = False
    lease_ttl_s: float = DEFAULT_TTL_S
    epoch_timeout_s: float | None = None  # None: 10x the slowest recent epoch, at least 60 s (600 s before one)
    epochs: int | None = None  # stop after this many new epochs in this run
    restore_checkpoint: int | None = None  # start from this retained checkpoint, not the latest

    def __post_init__(self):
        problems = []
        if self.trigger_s < 0:
            problems.append(f"trigger must be >= 0 seconds, got {self.trigger_s}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1 epoch, got {self.checkpoint_every}")
        if self.max_epochs_in_flight < 1:
            problems.append(f"max_epochs_in_flight must be >= 1, got {self.max_epochs_in_flight}")
        if self.max_records_per_epoch < 1:
            problems.append(f"max_records_per_epoch must be >= 1, got {self.max_records_per_epoch}")
        if self.keep_checkpoints < 1:
            problems.append(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.epoch_timeout_s is not None and self.epoch_timeout_s <= 0:
            problems.append(f"epoch_timeout_s must be > 0 seconds or None, got {self.epoch_timeout_s}")
        if self.lease_ttl_s <= 0:
            problems.append(f"lease_ttl_s must be > 0 seconds, got {self.lease_ttl_s}")
        if self.restore_checkpoint is not None and self.restore_checkpoint < 1:
            problems.append(f"restore_checkpoint must be a checkpoint id (>= 1), got {self.restore_checkpoint}")
        if self.epochs is not None and self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if problems:
            raise ValueError("; ".join(problems))


def _stage_watermarks(acks: list[TaskAck]) -> dict[str, int | None]:
    """Each stage's lowest task watermark after an epoch (for the epoch event)."""
    by_stage: dict[str, list[int | None]] = {}
    for a in acks:
        by_stage.setdefault(a.task.stage, []).append(a.watermark)
    return {stage: None if None in marks else min(marks) for stage, marks in by_stage.items()}


class Coordinator:
    """Driver-side logic of the coordinator actor (see module doc)."""

    def __init__(self, plan: PhysicalPlan, storage: JobStorage, options: RunOptions, job_doc: dict, lease: Lease):
        self.plan = plan
        self.lease = lease
        self._lease_lost: LeaseLostError | None = None
        self.storage = storage
        self.options = options
        self.job_doc = job_doc
        self.sources = plan.sources()
        self.sinks = plan.sinks()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._events: list[dict] = []
        self._events_lock = threading.Lock()
        self.metrics = ray_metrics(plan.job)
        self._metrics_failed = False
        self._stop_requested = threading.Event()
        self.savepoint_requested = False
        self._restore_chosen = options.restore_checkpoint  # the first start restores it; recoveries the latest
        self.savepoint: int | None = None  # the savepoint this run took when asked to stop with one
        self._plan_s: dict[int, float] = {}  # epoch -> seconds spent planning it (offsets log write)
        self._stop_renewing = threading.Event()
        self.actors: dict[TaskId, object] = {}
        self.generation = 0
        self.restarts = 0
        self.tracker = RestartTracker(options.restart)
        self.failures: list[str] = []
        self.bad_checkpoints: set[int] = set()
        self.stats = {"epochs": 0, "rows_in": 0, "rows_out": 0, "dead_letters": 0, "late": 0, "checkpoints": 0}
        self.last_completed = 0
        self.last_checkpoint = 0
        self.stop_reason: str | None = None
        self.unconfirmed_recovery = False
        self.sizer = EpochSizer(options.trigger_s, options.max_records_per_epoch)
        self.recent_latencies: deque[float] = deque(maxlen=20)
        self.storage_waits: dict[str, float] = {}  # who -> since when it waits for storage
        self.storage.on_wait = lambda kind, message: self.storage_event("coordinator", kind, message)
        self.lag: dict[str, Lag] = {}  # per source step, as of the last plan: what is readable and not yet planned
        self.epochs_planned_this_run = 0
        self.high_water = 0  # highest epoch ever completed; stats count only newer ones
        self._pings: dict[TaskId, tuple[object | None, float]] = {}
        self._dead: set[TaskId] = set()
        self.run_id = lease.holder.run_id
        self.history = HistoryWriter(storage, lease.fencing)
        self.last_checkpoint_size: int | None = None
        self._alive_at: dict[str, float] = {}  # task -> when it last answered a ping
        self.incarnations: dict[TaskId, int] = {}
        self.actor_names: dict[TaskId, str] = {}

    @property
    def waiting(self) -> int:
        """Records readable but not yet planned, as of the last plan (a backlog is planned at once)."""
        return total_waiting(self.lag)

    # ------------------------------------------------------------ messages
    def ack(self, ack: TaskAck) -> None:
        self.inbox.put(("ack", ack))

    def task_failed(self, task: TaskId, generation: int, failure: Failure) -> None:
        self.inbox.put(("failed", (task, generation, failure)))

    def storage_event(self, who: str, kind: str, message: str) -> None:
        """A task or the coordinator waits for storage, or has it back."""
        if kind == "waiting":
            self.storage_waits[who] = time.time()
            self._event("storage_waiting", who=who, error=message, deadline_s=self.storage.retry.deadline_s)
        else:
            self.storage_waits.pop(who, None)
            self._event("storage_resumed", who=who, message=message)

    def request_stop(self, savepoint: bool = False) -> None:
        """Stop after the epochs in flight and a final checkpoint; with
        ``savepoint``, that checkpoint is a savepoint (written whole, never
        removed by retention)."""
        self.savepoint_requested = self.savepoint_requested or savepoint
        self._stop_requested.set()

    def drain_events(self) -> list[dict]:
        with self._events_lock:
            events, self._events = self._events, []
        return events

    def _event(self, kind: str, **fields) -> None:
        event = {"type": kind, "at": time.time(), **fields}
        with self._events_lock:
            self._events.append(event)
        try:
            self.metrics.on_event(event)
        except Exception as exc:  # noqa: BLE001 - metrics never stop a job; said once
            if not self._metrics_failed:
                self._metrics_failed = True
                print(f"metrics are off for job {self.plan.job!r}: {type(exc).__name__}: {exc}", flush=True)

    # ---------------------------------------------------------------- run
    def run(self, me) -> dict:
        self.me = me
        started = time.time()
        renewer = threading.Thread(target=self._renew_lease, name="lease-renewer", daemon=True)
        renewer.start()
        ended = {"reason": "failed", "error": None}
        try:
            self._start()
            while not self._finished():
                if self._lease_lost is not None:
                    raise self._lease_lost
                failures = self._collect() or self._complete_epochs()
                if failures:
                    self._recover(failures)
                    continue
                self._plan_next()
            ended["reason"] = self.stop_reason
        except BaseException as exc:
            ended["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise
        finally:
            self._stop_renewing.set()
            self._record_end(ended)
            for actor in self.actors.values():
                ray.kill(actor, no_restart=True)
        return {
            "job": self.plan.job,
            **self.stats,
            "replayed_epochs": self.replayed,
            "restarts": self.restarts,
            "last_epoch": self.last_completed,
            "last_checkpoint": self.last_checkpoint,
            "stopped": self.stop_reason,
            "savepoint": self.savepoint,
            "duration_s": round(time.time() - started, 3),
            "failures": self.failures,
        }

    def _record_end(self, ended: dict) -> None:
        """The run's last history records; none once the job belongs to another run."""
        if self._lease_lost is not None or not hasattr(self, "book"):
            return
        try:
            now = time.time()
            for plan, acked in self.book.pending_checkpoints():
                reason = f"the run ended ({ended['error'] or ended['reason']})"
                self.history.write(RecordKind.CHECKPOINT,
                                   records.checkpoint_not_completed(plan, acked, "aborted", reason, now), now)
            self.history.write(RecordKind.RUN_ENDED, {
                "run_id": self.run_id, **ended, "last_epoch": self.last_completed,
                "last_checkpoint": self.last_checkpoint, "restarts": self.restarts}, now)
        except CheckpointError:
            pass  # storage is gone: the job's own error says so

    def _renew_lease(self) -> None:
        """Renew the lease every quarter of its time to live, until the run
        ends or a newer run takes the job (then the main loop stops)."""
        interval = self.options.lease_ttl_s / 4
        while not self._stop_renewing.wait(interval):
            try:
                self.lease = leases.renew(self.storage, self.lease, ttl_s=self.options.lease_ttl_s, now=time.time())
            except LeaseLostError as exc:
                self._lease_lost = exc
                return
            except CheckpointError as exc:  # storage trouble: try again at the next interval
                self._event("lease_renewal_failed", error=str(exc).splitlines()[0])

    def _check_lease(self) -> None:
        """Before a commit-point write: stop if a newer run owns the job."""
        if self._lease_lost is not None:
            raise self._lease_lost
        leases.check(self.storage, self.lease)

    def _finished(self) -> bool:
        if self._stop_requested.is_set() and self.stop_reason is None:
            self.stop_reason = "requested"
        return (
            self.stop_reason is not None
            and not self.replay
            and self.book.in_flight == 0
            and self.last_completed == self.last_checkpoint
            and (self.savepoint is not None or not self.savepoint_requested)
        )

    # -------------------------------------------------------------- start
    def _start(self) -> None:
        for step, source in self.sources.items():
            source.bind(self.storage, step)
        for step, sink in self.sinks.items():  # commits that wait for their system say so
            sink.on_wait = lambda kind, message, step=step: self.storage_event(f"sink {step}", kind, message)
        commits = self.storage.commit_epochs()
        self.high_water = commits[-1] if commits else 0
        self.replayed = 0
        self._restore_point()
        nodes = worker_nodes()
        tasks = self.plan.tasks()
        self.placement = dict(zip(tasks, spread(len(tasks), nodes)))
        self.actors = {t: self._create_actor(t, n) for t, n in self.placement.items()}
        self._settle_sinks()
        self._reset_all()
        if "sources_started_at" not in self.job_doc:  # the generators' clock starts when tasks are ready
            self.job_doc["sources_started_at"] = time.time()
            self.storage.write_job(self.job_doc)
        self._record_start(len(nodes))
        self._event(
            "started",
            tasks={str(t): n for t, n in self.placement.items()},
            actor_names={str(t): n for t, n in self.actor_names.items()},
            nodes=len(nodes),
            resume_checkpoint=self.restore_manifest["id"] if self.restore_manifest else None,
            replay_epochs=[p.epoch for p in self.replay],
        )

    def _record_start(self, nodes: int) -> None:
        """A run_started record, and a rescale record when parallelism changed
        since the previous run."""
        now = time.time()
        parallelism = self.plan.parallelism()
        previous = record_names(self.storage, [RecordKind.RUN_STARTED])
        before = self.storage.read_json(self.storage.history_path(previous[-1])) if previous else None
        restored = self.restore_manifest["id"] if self.restore_manifest else None
        if before and before.get("parallelism") != parallelism:
            self.history.write(RecordKind.RESCALE, {"from": before.get("parallelism"), "to": parallelism,
                                                    "restored_checkpoint": restored}, now)
        self.history.write(RecordKind.RUN_STARTED, {
            "run_id": self.run_id, "host": self.lease.holder.host, "pid": self.lease.holder.pid,
            "restored_checkpoint": restored, "replay_epochs": [p.epoch for p in self.replay],
            "parallelism": parallelism, "nodes": nodes,
            "placement": {str(t): n for t, n in self.placement.items()}}, now)

    def _create_actor(self, task: TaskId, node_id: str):
        """A task actor pinned to ``node_id``, named ``sluiceway/<job>/<run>/<task>#<incarnation>``."""
        n = self.incarnations[task] = self.incarnations.get(task, -1) + 1
        name = self.actor_names[task] = f"sluiceway/{self.plan.job}/{self.run_id}/{task}#{n}"
        return TaskActor.options(scheduling_strategy=pinned(node_id), name=name).remote(
            self.plan, task, self.storage, self.me
        )

    def _restore_point(self) -> None:
        """Latest complete checkpoint, and the planned epochs after it to replay."""
        chosen, self._restore_chosen = self._restore_chosen, None
        if chosen is not None:
            check, corrupt = restorable(self.storage, chosen), []
        else:
            check, corrupt = latest_complete(self.storage, skip=self.bad_checkpoints)
        for c in corrupt:
            self._event("corrupt_checkpoint", checkpoint=c.checkpoint_id, problem=c.problem)
        manifest = check.manifest if check else None
        if manifest is not None and manifest.get("max_key_groups") != self.plan.max_key_groups:
            raise IncompatibleJobError(
                f"checkpoint {manifest['id']} has max_key_groups {manifest.get('max_key_groups')}, "
                f"the flow has {self.plan.max_key_groups}; max_key_groups is fixed for a job's life"
            )
        base = manifest["epoch"] if manifest else 0
        plans = []
        for epoch in self.storage.offset_epochs():
            if epoch > base:
                plans.append(self._read_plan(epoch))
        expected = list(range(base + 1, base + 1 + len(plans)))
        if [p.epoch for p in plans] != expected:
            raise CorruptCheckpointError(
                f"offsets log of job {self.plan.job!r} has gaps after epoch {base}: "
                f"{[p.epoch for p in plans]} (expected {expected})"
            )
        self.restore_manifest = manifest
        self.previous_files = dict(manifest["files"]) if manifest else {}
        self.last_checkpoint_size = manifest["size_bytes"] if manifest else None
        self.replay: deque[EpochPlan] = deque(plans)
        self.active_at = plans[-1].active_at if plans else {}  # when each source partition last had input
        self.last_completed = self.last_checkpoint = base
        self.next_epoch = base + len(plans) + 1
        if plans:
            self.next_offsets = plans[-1].next_offsets()
        elif manifest:
            self.next_offsets = {s: {int(p): o for p, o in parts.items()} for s, parts in manifest["offsets"].items()}
        else:
            self.next_offsets = {}
        self.trigger = Trigger(self.options.trigger_s)
        self.lag = {}
        self.book = EpochBook(self.plan.tasks(), self.generation)

    def _read_plan(self, epoch: int) -> EpochPlan:
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

    def _reset_all(self) -> None:
        """Reset every task to the restore point; a corrupt checkpoint falls back to the one before."""
        while True:
            downstream = {s.id: [self.actors[t] for t in s.tasks()] for s in self.plan.stages.values()}
            first = self.last_checkpoint + 1
            refs = [
                a.reset.remote(self.generation, self.restore_manifest, downstream, first, self.lease.fencing,
                               self.high_water)
                for a in self.actors.values()
            ]
            try:
                ray.get(refs, timeout=RESET_TIMEOUT_S)
                return
            except RayActorError:
                return  # a task died while resetting: its failed ping starts another recovery
            except GetTimeoutError as exc:
                raise JobFailedError(
                    f"job {self.plan.job!r}: tasks did not restore checkpoint state within {RESET_TIMEOUT_S:.0f} s"
                ) from exc
            except RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                if not isinstance(cause, CorruptCheckpointError) or self.restore_manifest is None:
                    raise cause from None
                bad = self.restore_manifest["id"]
                self.bad_checkpoints.add(bad)
                self._event("corrupt_checkpoint", checkpoint=bad, problem=str(cause).splitlines()[0])
                self.generation += 1
                self._restore_point()

    # ------------------------------------------------------------ collect
    def _collect(self) -> list[Failure]:
        failures = []
        wait = LOOP_WAIT_S
        while True:
            try:
                kind, payload = self.inbox.get(timeout=wait) if wait else self.inbox.get_nowait()
            except queue.Empty:
                break
            wait = 0
            if kind == "ack":
                self.book.handle_ack(payload)
            else:
                task, generation, failure = payload
                if generation == self.generation:
                    failures.append(failure)
        failures.extend(self._check_liveness())
        if not failures:
            failures.extend(self._check_stuck())
        return failures

    def epoch_bound_s(self) -> float:
        """How long an epoch may take before it counts as stuck."""
        if self.options.epoch_timeout_s is not None:
            return self.options.epoch_timeout_s
        if not self.recent_latencies:
            return STUCK_BEFORE_FIRST_EPOCH_S
        return max(STUCK_FLOOR_S, 10 * max(self.recent_latencies))

    def _unanswered_for(self, task: TaskId, now: float) -> float:
        """How long the task's outstanding ping has waited (0 if none waits)."""
        ref, sent = self._pings.get(task, (None, now))
        return now - sent if ref is not None else 0.0

    def _check_stuck(self) -> list[Failure]:
        """An epoch overdue while every actor is alive: name the tasks that have
        not acknowledged it; those not answering pings are restarted."""
        if self.storage_waits:
            return []  # waiting for storage is a pause, not a hang
        now, bound = time.time(), self.epoch_bound_s()
        overdue = self.book.overdue(now, bound)
        if overdue is None:
            return []
        epoch, missing = overdue
        hung = [t for t in missing if self._unanswered_for(t, now) > bound / 2]
        self._dead.update(hung)
        names = ", ".join(map(str, missing))
        restart = f"; restarting {', '.join(map(str, hung))}, which stopped answering" if hung else ""
        return [Failure(FailureKind.STUCK, f"epoch {epoch} did not complete within {bound:g} s: "
                        f"{names} have not acknowledged it{restart}", epoch=epoch)]

    def _check_liveness(self) -> list[Failure]:
        """One outstanding ping per task; a dead actor's ping fails."""
        now = time.time()
        for task, actor in self.actors.items():
            ref, sent = self._pings.get(task, (None, 0.0))
            if ref is None and now - sent >= PING_INTERVAL_S:
                self._pings[task] = (actor.ping.remote(), now)
        outstanding = {ref: task for task, (ref, _) in self._pings.items() if ref is not None}
        if not outstanding:
            return []
        ready, _ = ray.wait(list(outstanding), num_returns=len(outstanding), timeout=0)
        failures = []
        for ref in ready:
            task = outstanding[ref]
            try:
                ray.get(ref)
                self._pings[task] = (None, now)
                self._alive_at[str(task)] = now
            except RayActorError as exc:
                self._pings.pop(task, None)
                self._dead.add(task)
                failures.append(
                    Failure(
                        FailureKind.TASK_LOST,
                        f"task {task} died: its actor or node was lost ({type(exc).__name__})",
                        task=str(task),
                    )
                )
        return failures

    # ------------------------------------------------------------ recover
    def _recover(self, failures: list[Failure]) -> None:
        t0 = time.time()
        failure = primary(failures)
        self.failures.append(failure.text())
        decision = self.tracker.on_failure(failure, t0)
        giving_up = isinstance(decision, GiveUp)
        self.restarts += not giving_up
        self._event("failure", error=failure.message, failure_kind=failure.kind.value, restarts=self.restarts,
                    delay_s=None if giving_up else decision.delay_s)
        if giving_up:
            self._record_checkpoints_lost("aborted", f"the job stopped: {failure.message}", t0)
            raise JobFailedError(
                failure.message,
                f"job {self.plan.job!r} stopped: {decision.reason}; committed output stays as of epoch "
                f"{self.last_completed}" + (f"\n{failure.detail}" if failure.detail else ""),
            )
        if decision.delay_s:
            self._stop_requested.wait(decision.delay_s)
        # 1. Halt: a new generation makes every message in flight stale.
        self._record_checkpoints_lost("failed", failure.message, t0)
        self.generation += 1
        # 2. Find the dead: those that failed a ping, and any that do not answer now.
        dead = set(self._dead)
        probes = {t: a.ping.remote() for t, a in self.actors.items() if t not in dead}
        for task, ref in probes.items():
            try:
                ray.get(ref, timeout=30)
            except (RayActorError, GetTimeoutError):
                dead.add(task)
        # 3. New actors for the dead ones only, on live nodes.
        nodes = worker_nodes()
        for (task, node) in zip(sorted(dead), spread(len(dead), nodes, offset=self.restarts)):
            ray.kill(self.actors[task], no_restart=True)
            self.actors[task] = self._create_actor(task, node)
            self.placement[task] = node
        self._dead = set()
        self._pings = {}
        self.storage_waits.clear()
        # 4. Restore the latest complete checkpoint, settle the sinks, replay the epochs after it.
        self._restore_point()
        self._settle_sinks()
        self._reset_all()
        lost_at = self._alive_at.get(failure.task or "", t0) if failure.kind is FailureKind.TASK_LOST else t0
        self.history.write(RecordKind.RECOVERY, records.recovery(
            failure, detect_s=t0 - lost_at, restore_s=time.time() - t0, delay_s=decision.delay_s,
            restored=self.last_checkpoint, replay=[p.epoch for p in self.replay],
            restarted=[str(t) for t in sorted(dead)]), t0)
        self.unconfirmed_recovery = True  # until a checkpoint after it completes (on idle input, an empty one)
        self._event(
            "recovered",
            checkpoint=self.last_checkpoint,
            restarted_tasks=[str(t) for t in sorted(dead)],
            tasks={str(t): n for t, n in self.placement.items()},
            actor_names={str(t): n for t, n in self.actor_names.items()},
            replay_epochs=[p.epoch for p in self.replay],
            duration_s=round(time.time() - t0, 3),
        )

    def _record_checkpoints_lost(self, status: str, reason: str, now: float) -> None:
        for plan, acked in self.book.pending_checkpoints():
            self.history.write(RecordKind.CHECKPOINT,
                               records.checkpoint_not_completed(plan, acked, status, reason, now), now)

    # ----------------------------------------------------------- complete
    def _complete_epochs(self) -> list[Failure]:
        for plan, acks in self.book.pop_complete():
            failure = self._complete(plan, acks)
            if failure is not None:
                return [failure]
        return []

    def _complete(self, plan: EpochPlan, acks: dict[TaskId, TaskAck]) -> Failure | None:
        self._check_lease()
        now = time.time()
        ordered = [acks[t] for t in sorted(acks)]
        written_bytes = None
        # 1. A checkpoint epoch: the manifest is the commit point.
        if plan.checkpoint:
            tasks = [
                {
                    "task": str(a.task),
                    "stage": a.task.stage,
                    "subtask": a.task.subtask,
                    "written": [f["path"] for f in a.state_files],
                    "written_bytes": sum(f["size_bytes"] for f in a.state_files),
                    "snapshot_s": round(a.snapshot_s, 6),
                    "duration_s": round(a.duration_s, 6),
                    "rows_in": a.rows_in,
                    "rows_out": a.rows_out,
                    "dead_letters": a.dead_letters,
                    "late": a.late,
                }
                for a in ordered
            ]
            state, files = assemble_state(
                [a.state for a in ordered], [f for a in ordered for f in a.state_files], self.previous_files
            )
            manifest = build_manifest(
                job=self.plan.job,
                checkpoint_id=plan.epoch,
                epoch=plan.epoch,
                offsets={s: {str(p): o for p, o in parts.items()} for s, parts in plan.next_offsets().items()},
                watermarks={str(a.task): a.watermark for a in ordered},
                event_time=self._event_time_marks(ordered),
                tasks=tasks,
                state=state,
                files=files,
                fencing=self.lease.fencing,
                started_at=plan.planned_at,
                completed_at=now,
                parallelism=self.plan.parallelism(),
                max_key_groups=self.plan.max_key_groups,
                sink_handles={str(a.task): a.sink_handles for a in ordered},
                savepoint=plan.savepoint,
            )
            self.storage.write_manifest(plan.epoch, manifest)
            self.history.write(RecordKind.CHECKPOINT, records.checkpoint_completed(
                plan, ordered, manifest, self.last_checkpoint_size, now), now)
            self.last_checkpoint_size = manifest["size_bytes"]
            written_bytes = manifest["written_bytes"]
            self.previous_files = files
            self.last_checkpoint = plan.epoch
            if plan.savepoint:
                self.savepoint = plan.epoch
            self.stats["checkpoints"] += 1
            self.tracker.on_checkpoint_completed(now)
            self._tell_sources(plan)
        commit_started = time.time()
        committed_before = plan.epoch <= self.high_water  # a replay: the commit log has it, its sinks committed it
        handles = {step: [a.sink_handles[step] for a in ordered if step in a.sink_handles] for step in self.sinks}
        rows_in = sum(a.rows_in for a in ordered)
        rows_out = sum(a.rows_out for a in ordered)
        dead_letters = sum(a.dead_letters for a in ordered)
        late = sum(a.late for a in ordered)
        duration = self.book.latency(plan.epoch, now)  # from dispatch: a replay's plan is older than its run
        self.recent_latencies.append(duration)
        if plan.epoch > self.high_water:
            self.sizer.observe(rows_in, duration)
        record = {
            "epoch": plan.epoch,
            "planned_at": plan.planned_at,
            "completed_at": now,
            "duration_s": round(duration, 6),
            "rows_in": rows_in,
            "rows_out": rows_out,
            "dead_letters": dead_letters,
            "late": late,
            "waiting": plan.waiting,  # source lag when it was planned: records readable and left for later
            "lag": plan.lag,  # each source's lag as of the same plan
            "checkpoint": plan.checkpoint,
            "generation": self.generation,
            "fencing": self.lease.fencing,
            "sinks": handles,
        }
        if not committed_before:
            # 2. The commit log records the epoch and its sinks' handles: from here on it is committed ...
            self.storage.write_commit(plan.epoch, record)
            # 3. ... and the sinks make it visible (idempotent; after a failure, done again from the log).
            failure = self._commit_sinks(plan.epoch, handles)
            if failure is not None:
                return failure
        done = time.time()
        plan_s = self._plan_s.pop(plan.epoch, None)  # None: a replay, planned by an earlier run or generation
        self.last_completed = plan.epoch
        if plan.epoch > self.high_water:
            self.high_water = plan.epoch
            self.stats["epochs"] += 1
            self.stats["rows_in"] += rows_in
            self.stats["rows_out"] += rows_out
            self.stats["dead_letters"] += dead_letters
            self.stats["late"] += late
        else:
            self.replayed += 1
        # 4. Retention, after the new checkpoint is safe.
        deleted = apply_retention(self.storage, self.options.keep_checkpoints) if plan.checkpoint else []
        self._event(
            "epoch",
            epoch=plan.epoch,
            rows_in=rows_in,
            rows_out=rows_out,
            dead_letters=dead_letters,
            late=late,
            watermark=_stage_watermarks(ordered),
            duration_s=round(duration, 4),
            rows_per_s=round(rows_in / duration, 1) if duration > 0 else None,
            checkpoint=plan.epoch if plan.checkpoint else None,
            last_checkpoint=self.last_checkpoint,
            deleted_checkpoints=deleted,
            generation=self.generation,
            savepoint=plan.epoch if plan.savepoint else None,
            replay=plan_s is None,
            lag=plan.lag,
            phases={
                "plan": round(plan_s or 0.0, 6),
                "process": round(max((a.duration_s - a.snapshot_s for a in ordered), default=0.0), 6),
                "align": round(max((a.alignment_s for a in ordered), default=0.0), 6),
                "checkpoint": round(commit_started - now + max((a.snapshot_s for a in ordered), default=0.0), 6)
                if plan.checkpoint else 0.0,
                "commit": round(done - commit_started, 6),
            },
            sources={s: {str(p): list(span) for p, span in parts.items()} for s, parts in plan.ranges.items()},
            waiting=plan.waiting,
            state_bytes=self.last_checkpoint_size,
            checkpoint_s=round(now - plan.planned_at, 6) if plan.checkpoint else None,  # as its history record
            checkpoint_bytes=written_bytes,
            input_ended=sources_exhausted(self.sources, plan.next_offsets()),  # every bounded input row planned
        )
        return None

    def _event_time_marks(self, acks: list[TaskAck]) -> dict:
        """Per event-time step, each partition's largest event time and each
        source task's watermark floor: what a restore gives the source tasks."""
        marks: dict[str, dict] = {}
        for a in acks:
            for step, m in a.event_time.items():
                entry = marks.setdefault(step, {"partitions": {}, "floors": {},
                                                "parallelism": self.plan.stages[a.task.stage].parallelism})
                entry["partitions"].update(m["partitions"])
                entry["floors"][str(a.task.subtask)] = m["floor"]
        return marks

    def _tell_sources(self, plan: EpochPlan) -> None:
        """Each source hears the offsets a completed checkpoint covers (a log
        records the job's position). Bookkeeping: a failure is an event."""
        for step, source in self.sources.items():
            try:
                source.checkpointed(self.plan.job, plan.next_offsets().get(step, {}))
            except Exception as exc:  # noqa: BLE001 - the job's output does not depend on it
                self._event("source_checkpointed_failed", source=step, epoch=plan.epoch,
                            error=f"{type(exc).__name__}: {exc}".splitlines()[0])

    def _commit_sinks(self, epoch: int, handles: dict[str, list[dict]]) -> Failure | None:
        """Commit one epoch in every sink; a sink that fails is a failure of
        the epoch, and the recovery commits it again from the commit log."""
        for step, sink in self.sinks.items():
            if step not in handles:
                continue
            try:
                sink.commit(epoch, handles[step])
            except Exception as exc:  # noqa: BLE001 - the sink's (or its system's) error, recovered from
                self._check_lease()
                return Failure(FailureKind.USER_CODE,
                               f"sink {step!r} ({type(sink).__name__}) could not commit epoch {epoch}: "
                               f"{type(exc).__name__}: {exc}".splitlines()[0],
                               detail=traceback.format_exc(), task=None, epoch=epoch,
                               signature=("sink-commit", step, type(exc).__name__))
        return None

    def _settle_sinks(self) -> None:
        """Two-phase commit after a failure or restart: commit again the
        restored checkpoint's epoch and the epochs the commit log holds after
        it (their commits may not have finished), then abort the pre-commits
        of every later epoch.

        A checkpoint epoch is committed once its manifest is written, before
        its commit log entry: a coordinator that died between the two left
        an epoch no replay covers, so the entry is written here from the
        manifest's handles."""
        base = self.last_checkpoint
        if base and self.storage.read_commit(base) is None and self.restore_manifest is not None:
            self.storage.write_commit(base, commit_record_from(self.restore_manifest, list(self.sinks)))
            self.high_water = max(self.high_water, base)
        for epoch in self.storage.commit_epochs():
            if epoch < base:
                continue
            logged = (self.storage.read_commit(epoch) or {}).get("sinks")
            failure = self._commit_sinks(epoch, logged) if logged else None  # entries before 2PC have none
            if failure is not None:
                raise JobFailedError(failure.message, failure.detail)
        for step, sink in self.sinks.items():
            sink.abort(self.high_water, SinkContext(step, -1, 0, self.plan.job, f"f{self.lease.fencing}",
                                                    self.storage.on_wait))

    # --------------------------------------------------------------- plan
    def _plan_next(self) -> None:
        if self.book.in_flight >= self.options.max_epochs_in_flight:
            return
        if self.replay:
            self._dispatch(self.replay.popleft())
            return
        now = time.time()
        if self.stop_reason is not None:
            if self.book.in_flight == 0 and self.savepoint_requested and self.savepoint is None:
                self._write_and_dispatch(self._empty_ranges(), checkpoint=True, now=now, savepoint=True)
            elif self.book.in_flight == 0 and self.last_completed != self.last_checkpoint:
                self._write_and_dispatch(self._empty_ranges(), checkpoint=True, now=now)
            return
        if not self.trigger.due(now, self.waiting):
            return  # caught up: wait for the trigger. Behind: plan at once.
        self.trigger.planned(now)
        planned = plan_epoch(
            self.next_epoch,
            self.sources,
            self.next_offsets,
            now=now,
            started_at=self.job_doc["sources_started_at"],
            max_records_per_epoch=self.sizer.size(),
        )
        ranges, self.lag = planned.ranges, planned.lag
        if ranges is None:
            if self.options.until_idle and sources_exhausted(self.sources, self.next_offsets):
                self.stop_reason = "idle"
            elif self.unconfirmed_recovery and self.book.in_flight == 0:
                # No input to carry a checkpoint: an empty epoch checkpoints the recovered state, so the restart
                # policy sees the recovery complete (and forgives it) on idle input too.
                self._write_and_dispatch(self._empty_ranges(), checkpoint=True, now=now)
            return
        self.epochs_planned_this_run += 1
        after = {s: {p: stop for p, (_, stop) in parts.items()} for s, parts in ranges.items()}
        if self.options.until_idle and sources_exhausted(self.sources, after):
            self.stop_reason = "idle"
        if self.options.epochs is not None and self.epochs_planned_this_run >= self.options.epochs:
            self.stop_reason = "epochs"
        checkpoint = self.stop_reason is not None or self.next_epoch % self.options.checkpoint_every == 0
        self._write_and_dispatch(ranges, checkpoint=checkpoint, now=now, waiting=self.waiting, gaps=planned.gaps)

    def _empty_ranges(self):
        return {
            s: {p: (self.next_offsets.get(s, {}).get(p, 0),) * 2 for p in range(src.partition_count())}
            for s, src in self.sources.items()
        }

    def _write_and_dispatch(self, ranges, *, checkpoint: bool, now: float, waiting: int = 0,
                            savepoint: bool = False, gaps=None) -> None:
        active_at, ended = watermark_marks(self.sources, ranges, self.active_at, now)
        lag = {step: {"records": lag.records, "oldest_s": lag.oldest_s} for step, lag in self.lag.items()}
        plan = EpochPlan(self.next_epoch, ranges, checkpoint, now, waiting, savepoint, gaps or {}, active_at, ended,
                         lag)
        if checkpoint:
            self.unconfirmed_recovery = False
        self._check_lease()
        try:
            self.storage.write_offsets(plan.epoch, {**plan.to_json(), "fencing": self.lease.fencing})  # first
        except FileExistsError:
            # Another run planned this epoch after we read the log (it has
            # lost the job, or we have): the plan in the log is the one to run.
            self._check_lease()
            plan = self._read_plan(plan.epoch)
            self._event("adopted_plan", epoch=plan.epoch)
        self.next_epoch += 1
        self.next_offsets = plan.next_offsets()
        self.active_at = plan.active_at
        self._plan_s[plan.epoch] = time.time() - now
        for step, parts in plan.gaps.items():
            for partition, (expected, skipped_to) in parts.items():
                self._event("source_gap", epoch=plan.epoch, source=step, partition=partition,
                            skipped=[expected, skipped_to], records=skipped_to - expected)
        self._dispatch(plan)

    def _dispatch(self, plan: EpochPlan) -> None:
        self.book.add(plan, time.time())
        for stage in self.plan.stages.values():
            if stage.source is not None:
                for task in stage.tasks():
                    self.actors[task].run_source_epoch.remote(self.generation, plan)

    def __reduce__(self):
        raise TypeError("a Coordinator lives inside its actor; it must not be pickled")


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=16)
class CoordinatorActor:
    """The Ray face of :class:`Coordinator`: ``run`` blocks; the other methods
    are called by tasks and the driver while it runs."""

    def __init__(self, plan: PhysicalPlan, storage: JobStorage, options: RunOptions, job_doc: dict, lease: Lease):
        self.coordinator = Coordinator(plan, storage, options, job_doc, lease)

    def run(self) -> dict:
        """Run the job; whatever stops it is raised as a :class:`JobFailedError`
        whose first line names the cause."""
        try:
            return self.coordinator.run(ray.get_runtime_context().current_actor)
        except JobFailedError:
            raise
        except CheckpointError as exc:
            lines = str(exc).splitlines()
            raise JobFailedError(lines[0], "\n".join(lines[1:])) from None
        except Exception as exc:  # noqa: BLE001 - a bug of ours: shown whole
            import traceback

            raise JobFailedError(
                f"the coordinator of job {self.coordinator.plan.job!r} failed: {type(exc).__name__}: {exc}",
                traceback.format_exc(),
            ) from None

    def ack(self, ack: TaskAck) -> None:
        self.coordinator.ack(ack)

    def task_failed(self, task: TaskId, generation: int, error: str) -> None:
        self.coordinator.task_failed(task, generation, error)

    def stop(self, savepoint: bool = False) -> None:
        self.coordinator.request_stop(savepoint)

    def storage_event(self, who: str, kind: str, message: str) -> None:
        self.coordinator.storage_event(who, kind, message)

    def events(self) -> list[dict]:
        return self.coordinator.drain_events()

    def pid(self) -> int:
        return os.getpid()


