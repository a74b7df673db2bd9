"""One task's side of the epoch protocol, without Ray: the one epoch runner.

:class:`TaskHost` takes a task's messages (an epoch's plan for a source
task; data and barriers from upstream channels for the others) and runs
each epoch: read → align → process → exchange → pre-commit and snapshot →
acknowledge. It drops what belongs to an earlier generation, runs source
epochs in order, and reports what fails. What it sends goes through three
callables, so the Ray actor (:mod:`sluiceway.cluster.task`) and the
in-process runner (:func:`sluiceway.jobs.testing.run_local`) carry the same
runner: ``send(stage, subtask, generation, channel, table, barrier)``,
``acknowledge(ack)`` and ``report(task, generation, failure, exc)``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from sluiceway.checkpoint.errors import CorruptCheckpointError
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster.alignment import Barrier, BarrierAligner, BarrierEvent, Data
from sluiceway.cluster.epochs import EpochPlan, TaskAck
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.restart import Failure, failure_from_exception
from sluiceway.cluster.runtime import TaskRuntime

Send = Callable[[str, int, int, tuple, object, Barrier], None]


class TaskHost:
    """One task: its runtime, its generation, its barrier aligner (see module doc)."""

    def __init__(self, plan: PhysicalPlan, task: TaskId, storage: JobStorage, *, send: Send,
                 acknowledge: Callable[[TaskAck], None],
                 report: Callable[[TaskId, int, Failure, BaseException], None], clock: Callable[[], float] = time.time):
        self.plan = plan
        self.task = task
        self.runtime = TaskRuntime(plan, task, storage)
        self.send, self.acknowledge, self.report, self.clock = send, acknowledge, report, clock
        self.generation = -1
        self.failed = False
        self.aligner: BarrierAligner | None = None
        self.next_source_epoch = 0
        self.current_epoch: int | None = None
        self._first_barrier_at: dict[int, float] = {}
        self._early_plans: dict[int, EpochPlan] = {}

    def reset(self, generation: int, manifest: dict | None, first_epoch: int, fencing: int,
              high_water: int = 0) -> None:
        """Drop everything in flight and restore state from ``manifest``;
        replays of epochs up to ``high_water`` skip the sinks.

        Raises :class:`CorruptCheckpointError` when a state file fails its checksum.
        """
        self.generation = generation
        self.failed = False
        self._early_plans = {}
        self._first_barrier_at = {}
        self.next_source_epoch = first_epoch
        self.aligner = self.plan.aligner(self.task.stage, first_epoch)
        try:
            self.runtime.restore(manifest, attempt=f"f{fencing}g{generation}", high_water=high_water)
        except CorruptCheckpointError:
            self.failed = True
            raise

    def run_source_epoch(self, generation: int, plan: EpochPlan) -> None:
        """A source task's epoch; plans that arrive early wait for their turn."""
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
        self._first_barrier_at.setdefault(barrier.epoch, self.clock())
        events = [] if table is None else [Data(channel, table)]
        events.append(BarrierEvent(channel, barrier))
        for event in events:
            for aligned in self.aligner.handle(event):
                self._run_epoch(aligned.barrier, aligned.tables, 0, ports=[port for _, port in aligned.channels])

    def _run_epoch(self, barrier: Barrier, tables: list, rows_in: int, dead_letters=None, partitions=None,
                   source=None, ports=None) -> None:
        t0 = self.clock()
        self.current_epoch = barrier.epoch
        alignment_s = t0 - self._first_barrier_at.pop(barrier.epoch, t0)
        out = self.runtime.process_epoch(barrier.epoch, barrier, tables, rows_in, dead_letters, partitions, source,
                                         ports)
        # 1. Forward data and barrier (with the watermark of the step feeding
        #    each exchange) first, so downstream starts while we write.
        for exchange, parts in out.exchanges.items():
            watermark, idle = out.barriers[exchange]
            sent = replace(barrier, watermark=watermark, idle=idle)
            for j, part in enumerate(parts):
                self.send(exchange.to_stage, j, self.generation, (self.task, exchange.port), part, sent)
        # 2. Pre-commit sink output; snapshot state at a checkpoint epoch.
        result = self.runtime.finish_epoch(barrier.epoch, barrier)
        # 3. Acknowledge to the coordinator.
        self.acknowledge(TaskAck(
            task=self.task, generation=self.generation, epoch=barrier.epoch, rows_in=rows_in,
            rows_out=result.rows_out, duration_s=self.clock() - t0, state_files=result.state_files,
            state=result.state, snapshot_s=result.snapshot_s, alignment_s=alignment_s,
            sink_handles=result.sink_handles, watermark=out.watermark,
            dead_letters=0 if dead_letters is None else dead_letters.num_rows, late=out.late,
            event_time=result.event_time, state_memory=result.state_memory,
        ))

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported, the coordinator decides
            self.failed = True
            self.report(self.task, self.generation, failure_from_exception(exc, str(self.task), self.current_epoch),
                        exc)
