"""A deterministic simulation of the whole job protocol under faults.

The real :class:`~sluiceway.cluster.controller.JobController` and the real
storage side of the driver (:class:`~sluiceway.cluster.driver.Driver`: offsets
log, manifests, commit log, retention, restore points, sink settling, on an
in-memory fsspec store) run against simulated tasks, nodes, sinks and a
network, all driven by one seeded scheduler on a simulated clock. The tasks
follow the task protocol (generations, barrier alignment with the real
:class:`~sluiceway.cluster.alignment.BarrierAligner`, pre-commit at the
barrier, incremental state files at checkpoints, acks); the flow is a source
of ``partitions`` bounded partitions, a hash exchange, a count per key and a
two-phase sink.

Faults come at random points: task and node deaths, tasks that hang, a
coordinator crash before any instruction (the next run restarts from storage
alone), storage calls that fail or stall, sinks that fail between pre-commit
and commit, a second run taking the lease. After every step the invariants
are checked:

1. a sink commits an epoch only after every task acknowledged it and after
   its commit record is durable;
2. first commits come in epoch order, and a commit again is the same commit;
3. committed output is exactly the input, once (and no row twice at any time);
4. a restore point is a complete checkpoint; the final state counts every
   input row once;
5. a run that lost its lease writes no offsets, manifest or commit record,
   deletes no checkpoint file and aborts no pre-commit;
6. no file a retained checkpoint refers to is deleted;
7. the job finishes (no hang) within its step budget.

``python -m sluiceway.cluster.simulation --seeds 1000`` runs seeds 0..999;
a failing seed prints the one command that replays it exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, replace

from sluiceway.checkpoint import lease as leases
from sluiceway.checkpoint.errors import CheckpointError, LeaseLostError, StorageError
from sluiceway.checkpoint.lease import LeaseHolder
from sluiceway.checkpoint.manifest import CheckpointStatus, check_manifest
from sluiceway.checkpoint.storage import JobStorage, StorageRetry
from sluiceway.checkpoint.types import TaskId, key_group_range
from sluiceway.cluster import protocol as p
from sluiceway.cluster.alignment import Barrier, BarrierAligner, BarrierEvent, Data
from sluiceway.cluster.controller import JobController
from sluiceway.cluster.driver import Driver
from sluiceway.cluster.epochs import TaskAck
from sluiceway.cluster.errors import JobFailedError
from sluiceway.cluster.graph import JobGraph, PhysicalPlan, Step
from sluiceway.cluster.graph import plan as physical_plan
from sluiceway.cluster.options import RunOptions
from sluiceway.cluster.restart import Failure, FailureKind, RestartPolicy
from sluiceway.operators.sinks import Sink, SinkContext, SinkWriter
from sluiceway.operators.sources import Source

COMMIT_POINTS = ("/offsets/", "/commits/", "/MANIFEST.json")


class Violation(BaseException):
    """An invariant of the protocol does not hold (a BaseException, so that
    no ``except Exception`` of the code under test takes it for a fault)."""


class SimCrash(Exception):
    """The simulated coordinator process died."""


# ----------------------------------------------------------------- the flow
class SimSource(Source):
    """``records`` per partition, arriving at ``rate`` records per simulated second."""

    def __init__(self, partitions: int, records: int, rate: float):
        self.partitions, self.records, self.rate = partitions, records, rate

    def partition_count(self) -> int:
        return self.partitions

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        return min(self.records, max(0, int(self.rate * (now - started_at))))

    def end_offset(self, partition: int) -> int | None:
        return self.records


class SimSink(Sink):
    """The external system: prepared transactions and committed output
    survive every run; it checks invariants 1 to 3 as commits come."""

    kind = "sim"

    def __init__(self, world: "World"):
        self.world = world
        self.prepared: dict[str, tuple[int, tuple]] = {}
        self.committed: dict[int, tuple[str, ...]] = {}  # epoch -> the handle keys it committed
        self.rows: set = set()
        self.last_first_commit = 0

    def open(self, context: SinkContext) -> SinkWriter:
        return SimWriter(self, context)

    def commit(self, epoch: int, handles: list[dict]) -> None:
        w = self.world
        w.maybe("sink_commit", f"sink failed to commit epoch {epoch}")
        keys = tuple(sorted(h["key"] for h in handles))
        if epoch in self.committed:
            if keys != self.committed[epoch]:
                raise Violation(f"epoch {epoch} committed again with other handles: {keys} != {self.committed[epoch]}")
            return
        if not w.storage_has(w.probe.commit_path(epoch)):
            raise Violation(f"sink committed epoch {epoch} before its commit record was durable")
        if sorted(h["subtask"] for h in handles) != list(range(w.sink_parallelism)):
            raise Violation(f"sink committed epoch {epoch} without every task's pre-commit: {handles}")
        if epoch != self.last_first_commit + 1:
            raise Violation(f"sink committed epoch {epoch} first after epoch {self.last_first_commit}")
        for key in keys:
            if key not in self.prepared:
                raise Violation(f"sink committed epoch {epoch} with a pre-commit that is gone: {key}")
            for row in self.prepared[key][1]:
                if row in self.rows:
                    raise Violation(f"row {row} committed twice (epoch {epoch})")
                self.rows.add(row)
        self.committed[epoch] = keys
        self.last_first_commit = epoch

    def abort(self, after_epoch: int, context: SinkContext) -> None:
        for key, (epoch, _) in list(self.prepared.items()):
            if epoch > after_epoch:
                if self.world.storage_has(self.world.probe.commit_path(epoch)) and epoch not in self.committed:
                    raise Violation(f"aborted epoch {epoch}, which the commit log decided")
                del self.prepared[key]


class SimWriter(SinkWriter):
    def __init__(self, sink: SimSink, context: SinkContext):
        self.sink, self.context = sink, context

    def precommit(self, epoch: int, rows) -> dict:
        self.sink.world.maybe("precommit", f"pre-commit of epoch {epoch} failed")
        key = f"{self.context.attempt}/{epoch}/{self.context.subtask}"
        self.sink.prepared[key] = (epoch, tuple(rows))
        return {"subtask": self.context.subtask, "key": key}


def sim_plan(sink: SimSink, partitions: int, source_parallelism: int, parallelism: int, records: int,
             rate: float, max_key_groups: int = 16) -> PhysicalPlan:
    """source -> hash exchange by key -> count per key -> sink."""
    graph = JobGraph("sim", max_key_groups=max_key_groups)
    graph.add(Step("src", "source", None, parallelism=source_parallelism,
                   source=SimSource(partitions, records, rate)))
    graph.add(Step("counts", "key_by", "src", parallelism=parallelism, key="k"))
    graph.add(Step("out", "sink", "counts", sink=sink))
    return physical_plan(graph)


# ----------------------------------------------------------------- storage
class SimFiles:
    """A dict of files with the few filesystem calls :class:`JobStorage`
    makes: one per simulation, so a listing costs what this job holds."""

    protocol = "sim"

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def unstrip_protocol(self, path: str) -> str:
        return f"sim://{path}"

    def makedirs(self, path: str, exist_ok: bool = True) -> None:
        pass

    def pipe_file(self, path: str, data: bytes) -> None:
        self.files[path] = bytes(data)

    def mv(self, source: str, target: str) -> None:
        self.files[target] = self.files.pop(source)

    def open(self, path: str, mode: str):
        assert mode == "xb", mode
        if path in self.files:
            raise FileExistsError(path)
        files = self.files

        class _Exclusive:
            def __enter__(self):
                return self

            def write(self, data):
                files[path] = bytes(data)

            def __exit__(self, *exc):
                return False
        return _Exclusive()

    def cat_file(self, path: str) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path]

    def size(self, path: str) -> int:
        return len(self.cat_file(path))

    def exists(self, path: str) -> bool:
        prefix = path.rstrip("/") + "/"
        return path in self.files or any(f.startswith(prefix) for f in self.files)

    def find(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted(f for f in self.files if f.startswith(prefix))

    def ls(self, path: str, detail: bool = False) -> list[str]:
        prefix = path.rstrip("/") + "/"
        children = {prefix + f[len(prefix):].split("/", 1)[0] for f in self.files if f.startswith(prefix)}
        if not children:
            raise FileNotFoundError(path)
        return sorted(children)

    def rm_file(self, path: str) -> None:
        if self.files.pop(path, None) is None:
            raise FileNotFoundError(path)

    def rm(self, path: str, recursive: bool = False) -> None:
        doomed = [f for f in self.files if f == path or f.startswith(path.rstrip("/") + "/")]
        if not doomed:
            raise FileNotFoundError(path)
        for f in doomed:
            del self.files[f]


class SimStorage(JobStorage):
    """Checkpoint storage in memory, no retries, faults on demand; records
    who writes commit points (invariant 5) and what is deleted (invariant 6)."""

    def __init__(self, world: "World", fencing: int | None):
        super().__init__("memory://sim", "sim", StorageRetry(deadline_s=0.0))
        self.fs = world.files
        self.world, self.fencing = world, fencing

    def _call(self, what: str, path: str, fn, *args, **kwargs):
        w = self.world
        if self.fencing is not None:
            w.maybe("storage", f"storage failed to {what} {path}", StorageError)
            if w.chance("stall"):
                w.now += w.rng.uniform(1.0, 20.0)  # a slow call: the clock moves on meanwhile
            fenced = self.fencing < w.newest_fencing
            if what in ("write", "create") and any(mark in path for mark in COMMIT_POINTS) and fenced:
                raise Violation(f"run with fencing {self.fencing} wrote {path} after run {w.newest_fencing} "
                                "took the lease")
            if what == "delete":
                if fenced and "/checkpoints/" in path:
                    raise Violation(f"run with fencing {self.fencing} deleted {path} after run "
                                    f"{w.newest_fencing} took the lease")
                w.deleted = True
        return fn(*args, **kwargs)


# ------------------------------------------------------------------- tasks
class SimTask:
    """One task incarnation: the task protocol without Arrow."""

    def __init__(self, run: "Run", task: TaskId, node: int):
        self.run, self.world, self.task, self.node = run, run.world, task, node
        self.alive, self.hung = True, False
        self.generation, self.failed = -1, False
        self.plan = run.plan
        self.stage = self.plan.stages[task.stage]
        self.is_source = self.stage.source is not None

    def reset(self, generation: int, manifest: dict | None, first_epoch: int, committed_through: int) -> None:
        self.generation, self.failed = generation, False
        self.committed_through = committed_through
        self.next_epoch, self.early = first_epoch, {}
        self.attempt = f"f{self.run.fencing}g{generation}"
        self.aligner = self.plan.aligner(self.task.stage, first_epoch)
        self.counts: dict[int, int] = {}
        self.index: dict[str, list] = {}
        self.dirty: set[int] = set()
        if not self.is_source:
            owned = key_group_range(self.task.subtask, self.stage.parallelism, self.plan.max_key_groups)
            self.writer = self.world.sink.open(SinkContext("out", self.task.subtask, self.stage.parallelism, "sim",
                                                           self.attempt))
            if manifest is not None:
                step_map = manifest["state"].get("counts", {})
                cache: dict[str, dict] = {}
                for kg_text, chain in step_map.items():
                    if int(kg_text) in owned:
                        path = chain[-1][0]
                        if path not in cache:
                            raw = self.run.storage.read_bytes(self.run.storage.absolute(path))
                            if raw is None:
                                raise Violation(f"restore point {manifest['id']} names state file {path}, "
                                                "which is gone")
                            cache[path] = json.loads(raw)
                        self.counts[int(kg_text)] = cache[path][kg_text]
                        self.index[kg_text] = chain

    def receive(self, message: tuple) -> None:
        if not self.alive or self.hung:
            return
        kind, generation, *rest = message
        if generation != self.generation or self.failed:
            return  # stale: an earlier generation's, or after this task failed
        try:
            if kind == "plan":
                self.early[rest[0].epoch] = rest[0]
                while self.next_epoch in self.early and not self.failed:
                    self._source_epoch(self.early.pop(self.next_epoch))
                    self.next_epoch += 1
            else:
                channel, rows, barrier = rest
                for event in (Data(channel, rows), BarrierEvent(channel, barrier)):
                    for aligned in self.aligner.handle(event):
                        self._count_epoch(aligned.barrier, [r for t in aligned.tables for r in t])
        except (StorageError, SimFault) as exc:
            self.failed = True
            kind = FailureKind.STORAGE if isinstance(exc, StorageError) else FailureKind.INTERNAL
            self.run.send(("task", self.task), "coordinator", p.TaskFailed(self.task, self.generation, Failure(
                kind, f"task {self.task} failed: {exc}", task=str(self.task))))

    def _source_epoch(self, plan) -> None:
        self.world.maybe("task", f"task {self.task} failed reading epoch {plan.epoch}")
        rows = [(part, o) for part in self.plan.source_partitions(self.task)
                for o in range(*plan.ranges.get("src", {}).get(part, (0, 0)))]
        downstream = self.plan.stages["counts"]
        parts: list[list] = [[] for _ in range(downstream.parallelism)]
        groups = self.plan.max_key_groups
        for row in rows:
            parts[_key_group(row, groups) * downstream.parallelism // groups].append(row)
        barrier = Barrier(plan.epoch, plan.checkpoint, None, plan.savepoint)
        for j, task in enumerate(downstream.tasks()):
            self.run.send(("task", self.task), ("task", task), ("data", self.generation, (self.task, 0), parts[j],
                                                                 barrier))
        self.run.send(("task", self.task), "coordinator",
                      TaskAck(self.task, self.generation, plan.epoch, rows_in=len(rows)))

    def _count_epoch(self, barrier: Barrier, rows: list) -> None:
        self.world.maybe("task", f"task {self.task} failed on epoch {barrier.epoch}")
        groups = self.plan.max_key_groups
        for row in rows:
            kg = _key_group(row, groups)
            self.counts[kg] = self.counts.get(kg, 0) + 1
            self.dirty.add(kg)
        ack = TaskAck(self.task, self.generation, barrier.epoch, rows_out=len(rows))
        if barrier.epoch > self.committed_through:
            ack.sink_handles = {"out": self.writer.precommit(barrier.epoch, rows)}
        if barrier.checkpoint:
            dirty = self.dirty if not barrier.savepoint else set(self.counts)
            if dirty:
                storage = self.run.storage
                path = storage.state_path(barrier.epoch, "counts", self.task.subtask, self.attempt)
                data = json.dumps({str(kg): self.counts[kg] for kg in sorted(dirty)}).encode()
                storage.write_bytes(path, data)
                rel = storage.relative(path)
                ack.state_files = [{"path": rel, "checkpoint": barrier.epoch, "size_bytes": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest(), "rows": len(dirty)}]
                for kg in dirty:
                    self.index[str(kg)] = [[rel, 0]]
            ack.state = {"counts": dict(self.index)}
            self.dirty = set()
        self.run.send(("task", self.task), "coordinator", ack)


class SimFault(Exception):
    """A fault the simulation injected."""


def _key_group(row: tuple, groups: int) -> int:
    return (row[0] * 7919 + row[1] * 104729) % groups


# ------------------------------------------------------------------ driver
class SimDriver(Driver):
    """The driver of one simulated run: tasks are :class:`SimTask`."""

    def __init__(self, run: "Run", controller: JobController, storage, lease, job_doc):
        super().__init__(controller, storage, lease, job_doc, lambda: run.world.now)
        self.run = run

    def before(self, instruction: p.Instruction) -> None:
        self.run.world.maybe("crash", f"the coordinator died before {type(instruction).__name__}", SimCrash)

    def start_tasks(self, instruction: p.StartTasks) -> None:
        w = self.run.world
        live = [n for n in range(w.nodes) if n not in w.dead_nodes] or [w.revive_node()]
        for i, task in enumerate(instruction.tasks):
            old = self.run.tasks.get(task)
            if old is not None:
                old.alive = False
            self.run.tasks[task] = SimTask(self.run, task, live[(i + instruction.offset) % len(live)])
            self.placement[task] = self.run.tasks[task].node
        self.run.reported_lost -= set(instruction.tasks)

    def reset_tasks(self, instruction: p.ResetTasks) -> p.Event:
        for task in sorted(self.run.tasks):
            sim = self.run.tasks[task]
            if not sim.alive or sim.hung:
                return p.ResetFailed(f"task {task} died while restoring checkpoint state", lost=True)
        manifest = instruction.manifest
        if manifest is not None and check_manifest(self.storage, manifest["id"]).status is not CheckpointStatus.COMPLETE:
            raise Violation(f"restore point {manifest['id']} is not a complete checkpoint")
        for task in sorted(self.run.tasks):
            self.run.tasks[task].reset(instruction.generation, manifest, instruction.first_epoch,
                                       instruction.committed_through)
        return p.TasksReset()

    def find_dead(self, instruction: p.FindDead) -> p.DeadFound:
        dead = {t for t, sim in self.run.tasks.items() if not sim.alive or sim.hung}
        return p.DeadFound(frozenset(dead | set(instruction.known)))

    def run_epoch(self, instruction: p.RunEpoch) -> None:
        for task in self.plan.stages["src"].tasks():
            self.run.send("coordinator", ("task", task), ("plan", instruction.generation, instruction.plan))

    def publish(self, event: dict) -> None:
        self.run.events.append(event["type"])


# -------------------------------------------------------------------- runs
class Run:
    """One coordinator incarnation: its controller, driver, tasks and inbox."""

    def __init__(self, world: "World", controller_class=JobController):
        self.world = world
        self.plan = world.plan
        holder = LeaseHolder(f"r{len(world.runs)}", "sim", len(world.runs), world.now)
        self.lease = leases.acquire(world.probe, holder, ttl_s=1e9, now=world.now, force=True)
        self.fencing = self.lease.fencing
        world.newest_fencing = max(world.newest_fencing, self.fencing)
        self.storage = SimStorage(world, self.fencing)
        self.controller = controller_class(self.plan, world.options, fencing=self.fencing, clock=lambda: world.now)
        job_doc = {"sources_started_at": 0.0}
        self.driver = SimDriver(self, self.controller, self.storage, self.lease, job_doc)
        self.tasks: dict[TaskId, SimTask] = {}
        self.inbox: deque = deque()
        self.events: list[str] = []
        self.reported_lost: set[TaskId] = set()
        self.ended: str | None = None
        self.started = False

    def send(self, sender, receiver, message) -> None:
        self.world.network.setdefault((id(self), sender, receiver), deque()).append((self, receiver, message))

    def deliver(self, receiver, message) -> None:
        if self.ended is not None:
            return
        if receiver == "coordinator":
            self.inbox.append(message)
        else:
            sim = self.tasks.get(receiver[1])
            if sim is not None:
                sim.receive(message)

    def step(self) -> None:
        """One turn of the coordinator's loop: start, or take what arrived, then tick."""
        try:
            if not self.started:
                self.started = True
                self.driver.handle(p.Start())
                return
            events: list[p.Event] = []
            acks = [m for m in self.inbox if isinstance(m, TaskAck)]
            events += [p.Acked(tuple(acks))] if acks else []
            events += [m for m in self.inbox if not isinstance(m, TaskAck)]
            self.inbox.clear()
            for task, sim in sorted(self.tasks.items()):
                if not sim.alive and task not in self.reported_lost:
                    self.reported_lost.add(task)
                    events.append(p.TaskLost(task))
            for event in events:
                self.driver.handle(event)
            silent = {t: self.world.now - s.hung for t, s in self.tasks.items() if s.hung}
            self.driver.handle(p.Tick(silent))
            if self.controller.finished:
                self.end("finished")
        except (SimCrash, JobFailedError, CheckpointError, LeaseLostError, SimFault) as exc:
            self.end(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def end(self, reason: str) -> None:
        self.ended = reason
        for sim in self.tasks.values():
            sim.alive = False  # a coordinator's tasks die with it


# ------------------------------------------------------------------- world
@dataclass
class Config:
    partitions: int = 3
    source_parallelism: int = 2
    parallelism: int = 2
    nodes: int = 3
    records: int = 60  # per partition
    rate: float = 20.0  # records per partition per simulated second
    max_steps: int = 60_000
    max_runs: int = 40


FAULT_KINDS = ("task_death", "node_death", "hang", "crash", "storage", "stall", "sink_commit", "precommit", "task",
               "takeover")


class World:
    """One seeded simulation (see module doc)."""

    def __init__(self, seed: int, config: Config = Config(), controller_class=JobController, faults: bool = True):
        self.seed, self.config = seed, config
        self.rng = random.Random(seed)
        self.now = 0.0
        self.controller_class = controller_class
        rng = self.rng
        self.faults = {k: 0.0 for k in FAULT_KINDS}
        if faults:  # each seed draws its own mix: some quiet, some stormy
            for kind in FAULT_KINDS:
                self.faults[kind] = rng.choice([0.0, 0.0005, 0.002, 0.01]) * (0.2 if kind in ("crash", "storage",
                                                                                          "takeover") else 1.0)
        self.options = RunOptions(
            trigger_s=1.0, checkpoint_every=rng.randint(1, 4), max_epochs_in_flight=rng.randint(1, 3),
            max_records_per_epoch=rng.randint(5, 80), keep_checkpoints=rng.randint(1, 3), until_idle=True,
            epoch_timeout_s=5.0, restart=RestartPolicy(max_failures=1_000, initial_delay_s=0.2, max_delay_s=2.0),
        )
        self.nodes = config.nodes
        self.dead_nodes: set[int] = set()
        self.files = SimFiles()
        self.sink = SimSink(self)
        self.sink_parallelism = config.parallelism
        self.plan = sim_plan(self.sink, config.partitions, config.source_parallelism, config.parallelism, config.records,
                             config.rate)
        self.probe = SimStorage(self, None)  # the test's own eyes: no faults, no fencing
        self.newest_fencing = 0
        self.network: dict = {}
        self.runs: list[Run] = []
        self.deleted = False
        self.steps = 0
        self.struck: dict[str, int] = {}  # fault kind -> how often it struck

    def maybe(self, kind: str, message: str, error=SimFault) -> None:
        if self.chance(kind):
            raise error(message)

    def chance(self, kind: str) -> bool:
        """Whether fault ``kind`` strikes now (counted when it does)."""
        if self.rng.random() < self.faults.get(kind, 0.0):
            self.struck[kind] = self.struck.get(kind, 0) + 1
            return True
        return False

    def storage_has(self, path: str) -> bool:
        return self.probe.fs.exists(path)

    def revive_node(self) -> int:
        node = min(self.dead_nodes)
        self.dead_nodes.discard(node)
        return node

    def active(self) -> list[Run]:
        return [r for r in self.runs if r.ended is None]

    def run(self) -> dict:
        """Run until the job finishes; raise :class:`Violation` if an invariant breaks."""
        self.runs.append(Run(self, self.controller_class))
        while True:
            self.steps += 1
            if self.steps > self.config.max_steps:
                raise Violation(f"no finish within {self.config.max_steps} steps: the job hangs "
                                f"(runs {[r.ended for r in self.runs]}, committed through "
                                f"{self.sink.last_first_commit})")
            self._step()
            finished = [r for r in self.runs if r.ended == "finished"]
            if finished:
                self._check_final(finished[0])
                return {"seed": self.seed, "steps": self.steps, "runs": len(self.runs),
                        "epochs": self.sink.last_first_commit, "time_s": round(self.now, 1),
                        "recoveries": sum(r.events.count("recovered") for r in self.runs), "faults": self.struck}
            if not self.active():
                if len(self.runs) >= self.config.max_runs:
                    raise Violation(f"{len(self.runs)} runs ended without finishing: "
                                    f"{[r.ended for r in self.runs][-3:]}")
                self.runs.append(Run(self, self.controller_class))  # restarted from storage alone

    def _step(self) -> None:
        rng = self.rng
        self.deleted = False
        self._faults()
        queues = [k for k, q in self.network.items() if q]
        if queues and rng.random() < 0.7:
            key = queues[rng.randrange(len(queues))]
            run, receiver, message = self.network[key].popleft()
            run.deliver(receiver, message)
        else:
            runs = self.active()
            if runs:
                rng.choice(runs).step()
            self.now += rng.choice([0.005, 0.02, 0.02, 0.1, 0.5])
        if self.deleted:
            self._check_retained()

    def _faults(self) -> None:
        rng, f = self.rng, self.faults
        runs = self.active()
        if not runs:
            return
        run = runs[-1]
        tasks = [t for _, t in sorted(run.tasks.items()) if t.alive]
        if tasks and self.chance("task_death"):
            rng.choice(tasks).alive = False
        if tasks and self.chance("hang"):
            victim = rng.choice(tasks)
            victim.hung = victim.hung or self.now
        if len(self.dead_nodes) < self.nodes - 1 and self.chance("node_death"):
            node = rng.choice([n for n in range(self.nodes) if n not in self.dead_nodes])
            self.dead_nodes.add(node)
            for t in tasks:
                if t.node == node:
                    t.alive = False
        if self.dead_nodes and rng.random() < 0.01:
            self.revive_node()  # a node comes back (or a new one joins)
        if len(self.runs) < self.config.max_runs and self.chance("takeover"):
            self.runs.append(Run(self, self.controller_class))  # a second run forces its way in

    def _check_retained(self) -> None:
        """Invariant 6: every file a retained manifest names still exists."""
        for checkpoint_id in self.probe.checkpoint_ids():
            manifest = self.probe.read_manifest(checkpoint_id)
            for path in (manifest or {}).get("files", {}):
                if not self.storage_has(self.probe.absolute(path)):
                    raise Violation(f"retention deleted {path}, which checkpoint {checkpoint_id} refers to")

    def _check_final(self, run: Run) -> None:
        """Invariants 3 and 4 at the end: all input committed once, state counts each row once."""
        expected = {(part, o) for part in range(self.config.partitions) for o in range(self.config.records)}
        if self.sink.rows != expected:
            missing, extra = expected - self.sink.rows, self.sink.rows - expected
            raise Violation(f"committed output is not the input: {len(missing)} rows missing "
                            f"(e.g. {sorted(missing)[:3]}), {len(extra)} extra")
        manifest = self.probe.read_manifest(run.controller.last_checkpoint)
        values: dict[str, int] = {}
        for kg_text, chain in manifest["state"].get("counts", {}).items():
            values[kg_text] = json.loads(self.probe.read_bytes(self.probe.absolute(chain[-1][0])))[kg_text]
        counted = sum(values.values())
        if counted != len(expected):
            raise Violation(f"the final checkpoint counts {counted} rows, the input has {len(expected)}")


def replay_command(seed: int) -> str:
    return f"python -m sluiceway.cluster.simulation --seed {seed}"


@dataclass
class Outcome:
    """What a batch of seeds did."""

    failed: list  # (seed, violation) of every seed that broke an invariant
    epochs: int = 0  # committed, over all seeds that passed
    runs: int = 0
    recoveries: int = 0
    faults: dict = None  # fault kind -> how often it struck

    def line(self, seeds: int, seconds: float) -> str:
        struck = ", ".join(f"{k} {v}" for k, v in sorted((self.faults or {}).items()))
        return (f"{seeds - len(self.failed)} passed, {len(self.failed)} failed: {seeds} seeds, {self.epochs} epochs "
                f"committed, {self.runs} runs, {self.recoveries} recoveries, in {seconds:.1f} s\nfaults: {struck}")


def run_seeds(seeds, config: Config = Config(), controller_class=JobController) -> Outcome:
    """Run every seed; the violations and what the seeds went through."""
    outcome = Outcome([], faults={})
    for seed in seeds:
        try:
            result = World(seed, config, controller_class).run()
        except Violation as exc:
            outcome.failed.append((seed, str(exc)))
            continue
        outcome.epochs += result["epochs"]
        outcome.runs += result["runs"]
        outcome.recoveries += result["recoveries"]
        for kind, n in result["faults"].items():
            outcome.faults[kind] = outcome.faults.get(kind, 0) + n
    return outcome


def main(argv=None, controller_class=JobController) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluiceway.cluster.simulation",
                                     description="Run the deterministic simulation of the job protocol.")
    parser.add_argument("--seeds", type=int, default=1000, help="run seeds FIRST..FIRST+N-1 (default 1000)")
    parser.add_argument("--first", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seed", type=int, help="run this one seed and say what it went through")
    args = parser.parse_args(argv)
    if args.seed is not None:
        try:
            print(World(args.seed, controller_class=controller_class).run())
            return 0
        except Violation as exc:
            print(f"seed {args.seed}: {exc}", file=sys.stderr)
            return 1
    started = time.perf_counter()
    outcome = run_seeds(range(args.first, args.first + args.seeds), controller_class=controller_class)
    for seed, problem in outcome.failed:
        print(f"seed {seed}: {problem}\n  replay: {replay_command(seed)}", file=sys.stderr)
    print(outcome.line(args.seeds, time.perf_counter() - started))
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
