"""The controller's driver in one process, without Ray: what
:func:`sluiceway.jobs.testing.run_local` runs.

The same :class:`~sluiceway.cluster.controller.JobController` plans,
completes and commits; :class:`~sluiceway.cluster.executor.Executor`\ s
run the tasks' epochs as they do on Ray (one by default, holding every
task; ``executors=n`` spreads the tasks round-robin over ``n`` of them, and
their batches to each other go through a queue in this process). Checkpoint storage is a dict (:mod:`sluiceway.checkpoint.dictfiles`).
Differences from a run on Ray, all for a test's sake: epoch ``n`` counts as
planned at ``start_time + n * trigger_s`` whatever the clock says; sources
are read as of the end of time (every record a generator will make is
there); a failure raises the user's exception at once instead of restarting;
one epoch runs at a time; the only checkpoint is the last epoch.
"""

from __future__ import annotations

import math
import os
from collections import deque

from sluiceway.checkpoint import lease as leases
from sluiceway.checkpoint.dictfiles import in_memory_storage
from sluiceway.checkpoint.errors import CorruptCheckpointError
from sluiceway.checkpoint.lease import LeaseHolder
from sluiceway.cluster import protocol as p
from sluiceway.cluster.controller import JobController
from sluiceway.cluster.driver import Driver
from sluiceway.cluster.epochs import plan_epoch, sources_exhausted
from sluiceway.cluster.executor import Executor, Message, place
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.options import RunOptions

NEVER = 10**9  # checkpoint_every: no checkpoint but the last epoch's


class InProcessDriver(Driver):
    """Runs a flow's epochs in this process (see module doc)."""

    def __init__(self, plan: PhysicalPlan, *, max_records_per_epoch: int, max_epochs: int, start_time: float,
                 trigger_s: float, executors: int = 1):
        storage = in_memory_storage(plan.job)
        options = RunOptions(trigger_s=0.0, checkpoint_every=NEVER, max_epochs_in_flight=1,
                             max_records_per_epoch=max_records_per_epoch, keep_checkpoints=1, until_idle=True,
                             epochs=max_epochs)
        holder = LeaseHolder("in-process", os.getpid(), "local", start_time)
        lease = leases.acquire(storage, holder, ttl_s=float(NEVER), now=start_time)
        self.start_time, self.trigger_s = start_time, trigger_s
        controller = JobController(plan, options, fencing=lease.fencing, clock=self._planned_at)
        super().__init__(controller, storage, lease, {"sources_started_at": 0.0}, self._planned_at)
        self.acks: list = []
        self.ack_calls = 0
        self.batches: deque[tuple[str, list[Message]]] = deque()
        self.executors = {name: Executor(plan, self.storage, name, transmit=self._transmit,
                                         acknowledge=self._acknowledge, report=self._report)
                          for name in (f"x{i}" for i in range(executors))}

    def _planned_at(self) -> float:
        return self.start_time + self.controller.next_epoch * self.trigger_s

    def run(self) -> int:
        """Run until the sources are exhausted (or ``max_epochs``); the number of epochs run."""
        self.handle(p.Start())
        while not self.controller.finished:
            if self.acks:
                acks = tuple(self.acks)
                self.acks.clear()  # the hosts append to this very list
                self.handle(p.Acked(acks))
            self.handle(p.Tick())
        return self.controller.last_completed

    # -------------------------------------------------------------- tasks
    def start_tasks(self, instruction: p.StartTasks) -> None:
        self.placement.update(place(instruction.tasks, {}, list(self.executors)))

    def _transmit(self, where: str, messages: list[Message]) -> None:
        self.batches.append((where, messages))

    def _acknowledge(self, acks) -> None:
        self.ack_calls += 1
        self.acks.extend(acks)

    @staticmethod
    def _report(task, generation, failure, exc: BaseException) -> None:
        raise exc  # in process: the user's own exception, at once

    def reset_tasks(self, instruction: p.ResetTasks) -> p.Event:
        try:
            for name, executor in self.executors.items():
                executor.reset(instruction.generation, [t for t, e in self.placement.items() if e == name],
                               self.placement, instruction.manifest, instruction.first_epoch, self.lease.fencing,
                               instruction.high_water)
        except CorruptCheckpointError as exc:
            return p.ResetFailed(str(exc))
        return p.TasksReset()

    def find_dead(self, instruction: p.FindDead) -> p.DeadFound:
        return p.DeadFound(frozenset(instruction.known))

    def run_epoch(self, instruction: p.RunEpoch) -> None:
        """Every source task reads its part, then messages flow until every task has run the epoch."""
        for executor in self.executors.values():
            executor.run_source_epoch(instruction.generation, instruction.plan)
        while self.batches:
            where, messages = self.batches.popleft()
            self.executors[where].deliver(messages)

    def probe_sources(self, instruction: p.ProbeSources) -> p.SourcesProbed:
        planned = plan_epoch(instruction.epoch, self.sources, instruction.next_offsets, now=math.inf,
                             started_at=0.0, max_records_per_epoch=instruction.max_records,
                             parallelism=self.source_parallelism)
        if planned.ranges is None and not sources_exhausted(self.sources, instruction.next_offsets):
            raise RuntimeError("run_local needs bounded sources; a source has nothing to read yet")
        return p.SourcesProbed(planned)
