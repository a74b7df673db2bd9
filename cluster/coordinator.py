"""The coordinator on Ray: a thin driver of the :class:`JobController`.

The controller (:mod:`sluiceway.cluster.controller`) decides; this module
carries its instructions out on Ray and feeds it what happens. Its loop
(:meth:`Coordinator.run`):

1. **Collect** what executors sent (acks, failure reports, storage waits)
   from the inbox, and the answers of liveness pings (a dead executor or
   node fails its ping within about a second with the fast health check;
   each of its tasks is lost); each is an event for the controller.
2. **Tick**: the controller plans, detects a stuck epoch, ends a restart
   delay; the driver carries out what it says (:mod:`~sluiceway.cluster.driver`
   does the storage and sink side, this module the actors).

Tasks run in executors (:mod:`sluiceway.cluster.executor`), a few per node
(one per CPU by default), started once: a recovery places a lost task on a
live executor that is already running; when executors were lost, a node
that joins gets standby executors, up to as many as the run had.

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
from sluiceway.checkpoint.errors import CheckpointError, CorruptCheckpointError, IncompatibleJobError, LeaseLostError
from sluiceway.checkpoint.lease import Lease
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster import protocol as p
from sluiceway.cluster.controller import JobController
from sluiceway.cluster.driver import Driver
from sluiceway.cluster.epochs import TaskAck
from sluiceway.cluster.errors import JobFailedError
from sluiceway.cluster.executor import interleave, place
from sluiceway.cluster.executor_actor import ExecutorActor
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.metrics import ray_metrics
from sluiceway.cluster.options import RunOptions
from sluiceway.cluster.placement import pinned, worker_node_cpus
from sluiceway.cluster.restart import Failure
from sluiceway.operators.errors import FlowDefinitionError, OperatorError

__all__ = ["Coordinator", "CoordinatorActor", "RunOptions"]

PING_INTERVAL_S = 0.5
LOOP_WAIT_S = 0.02
RESET_TIMEOUT_S = 120.0
# In a recovery every task's work in flight is discarded: a task that cannot answer a probe this soon (dead, hung,
# or blocked, e.g. in a sink waiting on the locks of a transaction the recovery has yet to abort) is replaced
# rather than waited for.
PROBE_TIMEOUT_S = 5.0
NODE_WAIT_S = 60.0  # how long a recovery waits for a node with CPUs to place tasks on
NODE_SCAN_S = 2.0  # how often the coordinator looks for nodes that joined (they get standby executors)


def start_executors(plan: PhysicalPlan, storage: JobStorage, options: RunOptions, run_id: str, coordinator,
                    nodes: dict[str, int], first: int = 0, limit: int | None = None) -> dict[str, tuple[object, str]]:
    """Executors on ``nodes`` (id -> CPUs): ``executors_per_node`` on each, or one per CPU, named
    ``sluiceway/<job>/<run>/x<n>`` from ``n = first``; never more in all than the job has tasks, or ``limit``
    (taken a node at a time, round-robin). Their processes start in parallel. Returns name -> (actor, node)."""
    wanted = {node: options.executors_per_node or cpus for node, cpus in sorted(nodes.items())}
    order = [node for i in range(max(wanted.values(), default=0)) for node, k in wanted.items() if i < k]
    started, n = {}, first
    for node in order[:min(len(plan.tasks()), len(order) if limit is None else limit)]:
        name = f"sluiceway/{plan.job}/{run_id}/x{n}"
        n += 1
        started[name] = (ExecutorActor.options(scheduling_strategy=pinned(node), name=name).remote(
            plan, storage, name, coordinator), node)
    return started


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
        self.executors: dict[str, object] = {}  # name -> actor
        self.executor_node: dict[str, str] = {}
        self.assignment: dict[TaskId, str] = {}  # task -> the executor it runs in
        self._hosted: dict[str, list[TaskId]] = {}  # the other way round, made when the assignment changes
        self._started_executors = 0
        self._capacity = 0  # the most executors this run had: lost ones are replaced by standbys up to it
        self._node_scan_at = 0.0
        self._pings: dict[str, tuple[object | None, float]] = {}  # executor -> (outstanding ping, sent at)
        self._alive_at: dict[str, float] = {}  # task -> when its executor last answered a ping
        self.storage.on_wait = lambda kind, message: self.storage_event("coordinator", kind, message)
        for step, sink in self.sinks.items():  # commits that wait for their system say so
            sink.on_wait = lambda kind, message, step=step: self.storage_event(f"sink {step}", kind, message)

    # ------------------------------------------------------------ messages
    def ack(self, acks: list[TaskAck]) -> None:
        """The acks of one executor's round."""
        self.inbox.put(tuple(acks))

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
    def run(self, me, executors: dict | None = None) -> dict:
        """Run the job; ``executors``: those started for it already (:meth:`adopt`)."""
        self.me = me
        self.adopt(executors or {})
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
            for actor in self.executors.values():
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
            if isinstance(message, tuple):
                acks.extend(message)
            else:
                events.append(message)
        if acks:
            events.insert(0, p.Acked(tuple(acks)))
        self._add_standby_executors()
        return events + self._check_liveness()

    def _tasks_of(self, executor: str) -> list[TaskId]:
        return self._hosted.get(executor, [])

    def _check_liveness(self) -> list[p.Event]:
        """One outstanding ping per executor; a dead executor's ping fails, and each of its tasks is lost."""
        now = time.time()
        for name, actor in self.executors.items():
            ref, sent = self._pings.get(name, (None, 0.0))
            if ref is None and now - sent >= PING_INTERVAL_S:
                self._pings[name] = (actor.ping.remote(), now)
        outstanding = {ref: name for name, (ref, _) in self._pings.items() if ref is not None}
        if not outstanding:
            return []
        ready, _ = ray.wait(list(outstanding), num_returns=len(outstanding), timeout=0)
        lost = []
        for ref in ready:
            name = outstanding[ref]
            try:
                ray.get(ref)
                self._pings[name] = (None, now)
                for task in self._tasks_of(name):
                    self._alive_at[str(task)] = now
            except RayActorError:
                self._drop_executor(name)
                lost.extend(p.TaskLost(task, name.rsplit("/", 1)[-1]) for task in self._tasks_of(name))
        return lost

    def _silent(self) -> dict:
        """Tasks whose executor has not answered its ping, and for how long."""
        now = time.time()
        return {task: now - sent for name, (ref, sent) in self._pings.items() if ref is not None and now - sent > 1.0
                for task in self._tasks_of(name)}

    def lost_at(self, failure: Failure) -> float | None:
        return self._alive_at.get(failure.task or "")

    # ---------------------------------------------------------- executors
    def _live_nodes(self) -> dict[str, int]:
        """Live nodes with CPUs (id -> CPUs); with none (all lost, their replacements not joined yet) it waits up
        to :data:`NODE_WAIT_S` for one."""
        nodes = worker_node_cpus()
        deadline = time.time() + NODE_WAIT_S
        while not nodes and time.time() < deadline:
            time.sleep(0.25)
            nodes = worker_node_cpus()
        if not nodes:
            raise JobFailedError(
                f"job {self.plan.job!r}: no live Ray node offers CPUs to run tasks on (none joined within "
                f"{NODE_WAIT_S:.0f} s); add a worker node or give the head node CPUs"
            )
        return nodes

    def _start_executors(self, nodes: dict[str, int], limit: int | None = None) -> None:
        """Executors on each node of ``nodes`` that has none (see :func:`start_executors`)."""
        have = set(self.executor_node.values())
        started = start_executors(self.plan, self.storage, self.options, self.run_id, self.me,
                                  {n: c for n, c in nodes.items() if n not in have}, first=self._started_executors,
                                  limit=limit)
        self.adopt(started)
        self._capacity = max(self._capacity, len(self.executors))

    def adopt(self, executors: dict[str, tuple[object, str]]) -> None:
        """Executors started for this run elsewhere (``run()`` starts the first ones beside the coordinator's
        own process, so that both start at once): name -> (actor, node)."""
        for name, (actor, node) in executors.items():
            self.executors[name], self.executor_node[name] = actor, node
            self._started_executors = max(self._started_executors, int(name.rsplit("/x", 1)[1]) + 1)
        self._capacity = max(self._capacity, len(self.executors))

    def _add_standby_executors(self) -> None:
        """When executors were lost, standby ones (no tasks yet) on nodes that have none (a node that joined, a
        replacement), up to the number the run had: where the next lost tasks go without waiting for a
        process to start."""
        now = time.time()
        deficit = self._capacity - len(self.executors)
        if not self.executors or deficit <= 0 or now - self._node_scan_at < NODE_SCAN_S:
            return
        self._node_scan_at = now
        nodes = worker_node_cpus()
        if set(nodes) - set(self.executor_node.values()):
            self._start_executors(nodes, limit=deficit)

    def _drop_executor(self, name: str) -> None:
        actor = self.executors.pop(name, None)
        self.executor_node.pop(name, None)
        self._pings.pop(name, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def start_tasks(self, instruction: p.StartTasks) -> None:
        """Place these tasks on executors: at the start, round-robin over new executors on every live node;
        in a recovery, on the live executors with the fewest tasks (already running, so nothing waits for a
        process to start). An executor still hosting one of them (it stopped answering) is killed first."""
        for name in {self.assignment[t] for t in instruction.tasks if t in self.assignment}:
            self._drop_executor(name)
        if not self.executors:
            self._start_executors(self._live_nodes())
        self.nodes = len(set(self.executor_node.values()))
        by_node: dict[str, list[str]] = {}
        for name, node in self.executor_node.items():
            by_node.setdefault(node, []).append(name)
        load = {name: len(self._tasks_of(name)) for name in self.executors}
        placed = place(instruction.tasks, load, interleave(by_node), offset=instruction.offset)
        self.assignment.update(placed)
        self._hosted = {}
        for task, name in self.assignment.items():
            self._hosted.setdefault(name, []).append(task)
        self.placement.update({t: self.executor_node[e] for t, e in placed.items()})
        self._pings = {}

    def started_fields(self) -> dict:
        return {"actor_names": {str(t): e for t, e in self.assignment.items()},
                "executors": len(self.executors)}

    def reset_tasks(self, instruction: p.ResetTasks) -> p.Event:
        """Reset every executor to the restore point; a corrupt state file is an answer, not an error."""
        refs = [
            actor.reset.remote(instruction.generation, self._tasks_of(name), self.assignment, self.executors,
                               instruction.manifest, instruction.first_epoch, self.lease.fencing,
                               instruction.high_water)
            for name, actor in self.executors.items()
        ]
        try:
            ray.get(refs, timeout=RESET_TIMEOUT_S)
            return p.TasksReset()
        except RayActorError as exc:
            return p.ResetFailed(f"an executor died while restoring checkpoint state ({type(exc).__name__})",
                                 lost=True)
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
        """The known dead, and every task of an executor that is dead, or does not answer a probe now."""
        dead_executors = {self.assignment[t] for t in instruction.known if t in self.assignment}
        probes = {a.ping.remote(): n for n, a in self.executors.items() if n not in dead_executors}
        answered, silent = ray.wait(list(probes), num_returns=len(probes), timeout=PROBE_TIMEOUT_S) if probes \
            else ([], [])
        dead_executors.update(probes[ref] for ref in silent)
        for ref in answered:
            try:
                ray.get(ref)
            except RayActorError:
                dead_executors.add(probes[ref])
        dead = set(instruction.known) | {t for t, e in self.assignment.items() if e in dead_executors}
        for name in dead_executors:
            self._drop_executor(name)
        self._pings = {}
        return p.DeadFound(frozenset(dead))

    def run_epoch(self, instruction: p.RunEpoch) -> None:
        """One call per executor that hosts a source task (one found dead since is skipped: its tasks are lost,
        and the recovery that follows replays the epoch)."""
        sources = {self.assignment[t] for s in self.plan.stages.values() if s.source is not None for t in s.tasks()}
        for name in sources:
            actor = self.executors.get(name)
            if actor is not None:
                actor.run_source_epoch.remote(instruction.generation, instruction.plan)

    def __reduce__(self):
        raise TypeError("a Coordinator lives inside its actor; it must not be pickled")


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=16)
class CoordinatorActor:
    """The Ray face of :class:`Coordinator`: ``run`` blocks; the other methods
    are called by tasks and the driver while it runs."""

    def __init__(self, plan: PhysicalPlan, storage: JobStorage, options: RunOptions, job_doc: dict, lease: Lease):
        self.coordinator = Coordinator(plan, storage, options, job_doc, lease)

    def run(self, executors: dict | None = None) -> dict:
        """Run the job; whatever stops it is raised as a :class:`JobFailedError`
        whose first line names the cause."""
        try:
            return self.coordinator.run(ray.get_runtime_context().current_actor, executors)
        except (JobFailedError, IncompatibleJobError, FlowDefinitionError):
            raise  # a refusal of the flow's change names its cause in its first line
        except (CheckpointError, OperatorError) as exc:  # storage, or a connector past its deadline: its own words
            lines = str(exc).splitlines()
            raise JobFailedError(lines[0], "\n".join(lines[1:])) from None
        except Exception as exc:  # noqa: BLE001 - a bug of ours: shown whole
            raise JobFailedError(
                f"the coordinator of job {self.coordinator.plan.job!r} failed: {type(exc).__name__}: {exc}",
                traceback.format_exc(),
            ) from None

    def ack(self, acks: list[TaskAck]) -> None:
        self.coordinator.ack(acks)

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


