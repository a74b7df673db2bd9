"""The coordinator on Ray: a thin driver of the :class:`JobController`.

The controller (:mod:`sluiceway.cluster.controller`) decides; this module
carries its instructions out on Ray and feeds it what happens. Its loop
(:meth:`Coordinator.run`):

1. **Collect** what tasks sent (acks, failure reports, storage waits) from
   the inbox, and the answers of liveness pings (a dead actor or node fails
   its ping within about a second with the fast health check); each is an
   event for the controller.
2. **Tick**: the controller plans, detects a stuck epoch, ends a restart
   delay; the driver carries out what it says (:mod:`~sluiceway.cluster.driver`
   does the storage and sink side, this module the actors).

A lease-renewal thread runs beside the loop; a run that loses its lease
stops at once. A coordinator started on an existing checkpoint dir rebuilds
its position from storage alone.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from sluiceway.checkpoint import lease as leases
from sluiceway.checkpoint.errors import CheckpointError, CorruptCheckpointError, LeaseLostError
from sluiceway.checkpoint.lease import Lease
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster import protocol as p
from sluiceway.cluster.controller import JobController
from sluiceway.cluster.driver import Driver
from sluiceway.cluster.epochs import TaskAck
from sluiceway.cluster.errors import JobFailedError
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.metrics import ray_metrics
from sluiceway.cluster.options import RunOptions
from sluiceway.cluster.placement import pinned, spread, worker_nodes
from sluiceway.cluster.restart import Failure
from sluiceway.cluster.task import TaskActor

__all__ = ["Coordinator", "CoordinatorActor", "RunOptions"]

PING_INTERVAL_S = 0.5
LOOP_WAIT_S = 0.02
RESET_TIMEOUT_S = 120.0
# In a recovery every task's work in flight is discarded: a task that cannot answer a probe this soon (dead, hung,
# or blocked, e.g. in a sink waiting on the locks of a transaction the recovery has yet to abort) is replaced
# rather than waited for.
PROBE_TIMEOUT_S = 5.0
NODE_WAIT_S = 60.0  # how long a recovery waits for a node with CPUs to place tasks on


class Coordinator(Driver):
    """The controller's driver on Ray (see module doc)."""

    def __init__(self, plan: PhysicalPlan, storage: JobStorage, options: RunOptions, job_doc: dict, lease: Lease):
        super().__init__(JobController(plan, options, fencing=lease.fencing, clock=time.time), storage, lease,
                         job_doc, time.time)
        self.options = options
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._events: list[dict] = []
        self._events_lock = threading.Lock()
        self.metrics = ray_metrics(plan.job)
        self._metrics_failed = False
        self._lease_lost: LeaseLostError | None = None
        self._stop_renewing = threading.Event()
        self.actors: dict[TaskId, object] = {}
        self.actor_names: dict[TaskId, str] = {}
        self.incarnations: dict[TaskId, int] = {}
        self._pings: dict[TaskId, tuple[object | None, float]] = {}
        self._alive_at: dict[str, float] = {}  # task -> when it last answered a ping
        self.storage.on_wait = lambda kind, message: self.storage_event("coordinator", kind, message)
        for step, sink in self.sinks.items():  # commits that wait for their system say so
            sink.on_wait = lambda kind, message, step=step: self.storage_event(f"sink {step}", kind, message)

    # ------------------------------------------------------------ messages
    def ack(self, ack: TaskAck) -> None:
        self.inbox.put(ack)

    def task_failed(self, task: TaskId, generation: int, failure: Failure) -> None:
        self.inbox.put(p.TaskFailed(task, generation, failure))

    def storage_event(self, who: str, kind: str, message: str) -> None:
        """A task, a sink or the coordinator waits for storage, or has it back."""
        waiting = kind == "waiting"
        if waiting:
            self.publish({"type": "storage_waiting", "at": time.time(), "who": who, "error": message,
                          "deadline_s": self.storage.retry.deadline_s})
        else:
            self.publish({"type": "storage_resumed", "at": time.time(), "who": who, "message": message})
        self.inbox.put(p.StorageWait(who, waiting, message))

    def request_stop(self, savepoint: bool = False) -> None:
        """Stop after the epochs in flight and a final checkpoint; with
        ``savepoint``, that checkpoint is a savepoint (written whole, never
        removed by retention)."""
        self.inbox.put(p.StopRequested(savepoint))

    def drain_events(self) -> list[dict]:
        with self._events_lock:
            events, self._events = self._events, []
        return events

    def publish(self, event: dict) -> None:
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
        reason, error = "failed", None
        try:
            for step, source in self.sources.items():  # a source that cannot be read fails the run, named
                source.bind(self.storage, step)
            self.handle(p.Start())
            while not self.controller.finished:
                for event in self._collect():
                    self.handle(event)
                self.handle(p.Tick(self._silent()))
            reason = self.controller.stop_reason
        except BaseException as exc:
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise
        finally:
            self._stop_renewing.set()
            if self._lease_lost is None:
                self.end_records(reason, error)
            for actor in self.actors.values():
                ray.kill(actor, no_restart=True)
        return {**self.controller.summary(), "duration_s": round(time.time() - started, 3)}

    def check_lease(self) -> None:
        if self._lease_lost is not None:
            raise self._lease_lost
        super().check_lease()

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
                self.publish({"type": "lease_renewal_failed", "at": time.time(),
                              "error": str(exc).splitlines()[0]})

    # ------------------------------------------------------------ collect
    def _collect(self) -> list[p.Event]:
        """What arrived (acks of one pass gathered into one event), and the tasks whose ping failed."""
        if self._lease_lost is not None:
            raise self._lease_lost
        events: list[p.Event] = []
        acks: list[TaskAck] = []
        wait = LOOP_WAIT_S
        while True:
            try:
                message = self.inbox.get(timeout=wait) if wait else self.inbox.get_nowait()
            except queue.Empty:
                break
            wait = 0
            if isinstance(message, TaskAck):
                acks.append(message)
            else:
                events.append(message)
        if acks:
            events.insert(0, p.Acked(tuple(acks)))
        return events + self._check_liveness()

    def _check_liveness(self) -> list[p.Event]:
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
        lost = []
        for ref in ready:
            task = outstanding[ref]
            try:
                ray.get(ref)
                self._pings[task] = (None, now)
                self._alive_at[str(task)] = now
            except RayActorError:
                self._pings.pop(task, None)
                lost.append(p.TaskLost(task))
        return lost

    def _silent(self) -> dict:
        """Tasks whose ping has gone unanswered, and for how long."""
        now = time.time()
        return {task: now - sent for task, (ref, sent) in self._pings.items() if ref is not None and now - sent > 1.0}

    def lost_at(self, failure: Failure) -> float | None:
        return self._alive_at.get(failure.task or "")

    # -------------------------------------------------------------- tasks
    def start_tasks(self, instruction: p.StartTasks) -> None:
        """Actors for these tasks, spread over the live nodes (the old actor of a restarted task is killed).
        With no node offering CPUs (all lost, their replacements not joined yet) it waits up to
        :data:`NODE_WAIT_S` for one."""
        nodes = worker_nodes()
        deadline = time.time() + NODE_WAIT_S
        while not nodes and time.time() < deadline:
            time.sleep(0.25)
            nodes = worker_nodes()
        self.nodes = len(nodes)
        for task, node in zip(instruction.tasks, spread(len(instruction.tasks), nodes, offset=instruction.offset)):
            if task in self.actors:
                ray.kill(self.actors[task], no_restart=True)
            self.actors[task] = self._create_actor(task, node)
            self.placement[task] = node
        self._pings = {}

    def _create_actor(self, task: TaskId, node_id: str):
        """A task actor pinned to ``node_id``, named ``sluiceway/<job>/<run>/<task>#<incarnation>``."""
        n = self.incarnations[task] = self.incarnations.get(task, -1) + 1
        name = self.actor_names[task] = f"sluiceway/{self.plan.job}/{self.run_id}/{task}#{n}"
        return TaskActor.options(scheduling_strategy=pinned(node_id), name=name).remote(
            self.plan, task, self.storage, self.me
        )

    def started_fields(self) -> dict:
        return {"actor_names": {str(t): n for t, n in self.actor_names.items()}}

    def reset_tasks(self, instruction: p.ResetTasks) -> p.Event:
        """Reset every task to the restore point; a corrupt state file is an answer, not an error."""
        downstream = {s.id: [self.actors[t] for t in s.tasks()] for s in self.plan.stages.values()}
        refs = [
            a.reset.remote(instruction.generation, instruction.manifest, downstream, instruction.first_epoch,
                           self.lease.fencing, instruction.high_water)
            for a in self.actors.values()
        ]
        try:
            ray.get(refs, timeout=RESET_TIMEOUT_S)
            return p.TasksReset()
        except RayActorError as exc:
            return p.ResetFailed(f"a task died while restoring checkpoint state ({type(exc).__name__})", lost=True)
        except GetTimeoutError as exc:
            raise JobFailedError(
                f"job {self.plan.job!r}: tasks did not restore checkpoint state within {RESET_TIMEOUT_S:.0f} s"
            ) from exc
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            if not isinstance(cause, CorruptCheckpointError):
                raise cause from None
            return p.ResetFailed(str(cause))

    def find_dead(self, instruction: p.FindDead) -> p.DeadFound:
        """The known dead, and every task that does not answer a probe now."""
        dead = set(instruction.known)
        probes = {a.ping.remote(): t for t, a in self.actors.items() if t not in dead}
        answered, silent = ray.wait(list(probes), num_returns=len(probes), timeout=PROBE_TIMEOUT_S) if probes \
            else ([], [])
        dead.update(probes[ref] for ref in silent)
        for ref in answered:
            try:
                ray.get(ref)
            except RayActorError:
                dead.add(probes[ref])
        self._pings = {}
        return p.DeadFound(frozenset(dead))

    def run_epoch(self, instruction: p.RunEpoch) -> None:
        for stage in self.plan.stages.values():
            if stage.source is not None:
                for task in stage.tasks():
                    self.actors[task].run_source_epoch.remote(instruction.generation, instruction.plan)

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


