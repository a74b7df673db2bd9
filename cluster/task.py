"""The task actor: delivers messages to a :class:`TaskRuntime` and carries
out what it returns. One actor per task; single-threaded, so calls from one
caller run in the order they were sent.

Every call carries the generation it belongs to. After a recovery the
coordinator bumps the generation and resets every task; messages of an older
generation that are still in flight are dropped on arrival.
"""

from __future__ import annotations

import time
from dataclasses import replace

import ray

from sluiceway.checkpoint.errors import CorruptCheckpointError
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster.alignment import Barrier, BarrierAligner, BarrierEvent, Data
from sluiceway.cluster.epochs import EpochPlan, TaskAck
from sluiceway.cluster.events import read_new
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.runtime import TaskRuntime
from sluiceway.cluster.restart import failure_from_exception


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class TaskActor:
    def __init__(self, plan: PhysicalPlan, task: TaskId, storage: JobStorage, coordinator):
        self.task = task
        self.plan = plan
        self.runtime = TaskRuntime(plan, task, storage)
        self.coordinator = coordinator
        storage.on_wait = lambda kind, message: coordinator.storage_event.remote(str(task), kind, message)
        self.generation = -1
        self.failed = False
        self.downstream: dict[str, list] = {}
        self.aligner: BarrierAligner | None = None
        self.next_source_epoch = 0
        self.current_epoch: int | None = None
        self._first_barrier_at: dict[int, float] = {}
        self._early_plans: dict[int, EpochPlan] = {}

    def ping(self) -> str:
        return str(self.task)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def log_lines(self, offsets: dict[str, int]) -> tuple[list[str], dict[str, int]]:
        """What this task printed since ``offsets`` (for ``sluiceway logs``)."""
        return read_new(offsets)

    def reset(
        self, generation: int, manifest: dict | None, downstream: dict[str, list], first_epoch: int, fencing: int,
        committed_through: int = 0,
    ) -> None:
        """Drop everything in flight and restore state from ``manifest``;
        replays of epochs up to ``committed_through`` skip the sinks.

        Raises :class:`CorruptCheckpointError` when a state file fails its checksum.
        """
        self.generation = generation
        self.failed = False
        self.downstream = downstream
        self._early_plans = {}
        self._first_barrier_at = {}
        self.next_source_epoch = first_epoch
        self.aligner = self.plan.aligner(self.task.stage, first_epoch)
        try:
            self.runtime.restore(manifest, attempt=f"f{fencing}g{generation}", committed_through=committed_through)
        except CorruptCheckpointError:
            self.failed = True
            raise

    def run_source_epoch(self, generation: int, plan: EpochPlan) -> None:
        if generation != self.generation or self.failed:
            return
        self._early_plans[plan.epoch] = plan
        while self.next_source_epoch in self._early_plans and not self.failed:
            plan = self._early_plans.pop(self.next_source_epoch)
            self.next_source_epoch += 1
            self._guarded(self._run_source, plan)

    def _run_source(self, plan: EpochPlan) -> None:
        self.current_epoch = plan.epoch
        step = self.runtime.stage.source
        read = self.runtime.read_source(plan.ranges.get(step, {}))
        self._run_epoch(Barrier(plan.epoch, plan.checkpoint, None, plan.savepoint), read.tables, read.rows,
                        read.dead_letters, read.partitions, plan.source_epoch(step))

    def deliver(self, generation: int, channel: tuple[TaskId, int], table, barrier: Barrier) -> None:
        """Data and barrier from ``channel``: an upstream task and the input port it feeds."""
        if generation != self.generation or self.failed:
            return
        self._guarded(self._deliver, channel, table, barrier)

    def _deliver(self, channel: tuple[TaskId, int], table, barrier: Barrier) -> None:
        self._first_barrier_at.setdefault(barrier.epoch, time.time())
        events = [] if table is None else [Data(channel, table)]
        events.append(BarrierEvent(channel, barrier))
        for event in events:
            for aligned in self.aligner.handle(event):
                self._run_epoch(aligned.barrier, aligned.tables, 0, ports=[port for _, port in aligned.channels])

    def _run_epoch(self, barrier: Barrier, tables: list, rows_in: int, dead_letters=None, partitions=None,
                   source=None, ports=None) -> None:
        t0 = time.time()
        self.current_epoch = barrier.epoch
        alignment_s = t0 - self._first_barrier_at.pop(barrier.epoch, t0)
        out = self.runtime.process_epoch(barrier.epoch, barrier, tables, rows_in, dead_letters, partitions, source,
                                         ports)
        # 1. Forward data and barrier (with the watermark of the step feeding
        #    each exchange) first, so downstream starts while we write.
        for exchange, parts in out.exchanges.items():
            watermark, idle = out.barriers[exchange]
            sent = replace(barrier, watermark=watermark, idle=idle)
            for j, handle in enumerate(self.downstream[exchange.to_stage]):
                handle.deliver.remote(self.generation, (self.task, exchange.port), parts[j], sent)
        # 2. Pre-commit sink output; snapshot state at a checkpoint epoch.
        result = self.runtime.finish_epoch(barrier.epoch, barrier)
        # 3. Acknowledge to the coordinator.
        self.coordinator.ack.remote(
            TaskAck(
                task=self.task,
                generation=self.generation,
                epoch=barrier.epoch,
                rows_in=rows_in,
                rows_out=result.rows_out,
                duration_s=time.time() - t0,
                state_files=result.state_files,
                state=result.state,
                snapshot_s=result.snapshot_s,
                alignment_s=alignment_s,
                sink_handles=result.sink_handles,
                watermark=out.watermark,
                dead_letters=0 if dead_letters is None else dead_letters.num_rows,
                late=out.late,
                event_time=result.event_time,
            )
        )

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported, the coordinator decides
            self.failed = True
            failure = failure_from_exception(exc, str(self.task), self.current_epoch)
            self.coordinator.task_failed.remote(self.task, self.generation, failure)
