"""The simulated pieces of :mod:`sluiceway.cluster.simulation`: a bounded
source, a two-phase sink that checks commits as they come, a dict of files
behind real :class:`~sluiceway.checkpoint.storage.JobStorage` (faults on
demand, fenced writes refused), and tasks that follow the task protocol
without Arrow. No Ray here.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from sluiceway.checkpoint.errors import StorageError
from sluiceway.checkpoint.storage import JobStorage, StorageRetry
from sluiceway.checkpoint.types import TaskId, key_group_range
from sluiceway.cluster import protocol as p
from sluiceway.cluster.alignment import Barrier, BarrierEvent, Data
from sluiceway.cluster.epochs import TaskAck
from sluiceway.cluster.graph import JobGraph, PhysicalPlan, Step
from sluiceway.cluster.graph import plan as physical_plan
from sluiceway.cluster.restart import Failure, FailureKind
from sluiceway.operators.sinks import Sink, SinkContext, SinkWriter
from sluiceway.operators.sources import Source

if TYPE_CHECKING:
    from sluiceway.cluster.simulation import Run, World

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
class SimStorage(JobStorage):
    """Checkpoint storage in memory, no retries, faults on demand; records
    who writes commit points (invariant 5) and what is deleted (invariant 6)."""

    def __init__(self, world: "World", fencing: int | None):
        super().__init__("memory://sim", "sim", StorageRetry(deadline_s=0.0))
        self.fs = world.files  # a DictFiles of the world's
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

    def reset(self, generation: int, manifest: dict | None, first_epoch: int, high_water: int) -> None:
        self.generation, self.failed = generation, False
        self.high_water = high_water
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
                step_map = manifest.state.get("counts", {})
                cache: dict[str, dict] = {}
                for kg_text, chain in step_map.items():
                    if int(kg_text) in owned:
                        path = chain[-1][0]
                        if path not in cache:
                            raw = self.run.storage.read_bytes(self.run.storage.absolute(path))
                            if raw is None:
                                raise Violation(f"restore point {manifest.id} names state file {path}, "
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
        if barrier.epoch > self.high_water:
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


