"""The executor actor: the Ray face of an :class:`~sluiceway.cluster.executor.Executor`.

A job starts a few of these per node (by default one per CPU the node
offers) and spreads its tasks over them; a dead task's work moves to one
that is already running. Single-threaded, so calls from one caller run in
the order they were sent.

Every message carries the generation it belongs to. After a recovery the
coordinator bumps the generation and resets every executor; messages of an
older generation still in flight are dropped on arrival.
"""

from __future__ import annotations

import os

import ray

from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster.epochs import EpochPlan
from sluiceway.cluster.events import read_new
from sluiceway.cluster.executor import Executor, Message
from sluiceway.cluster.graph import PhysicalPlan


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class ExecutorActor:
    def __init__(self, plan: PhysicalPlan, storage: JobStorage, name: str, coordinator):
        self.peers: dict[str, object] = {}
        storage.on_wait = lambda kind, message: coordinator.storage_event.remote(name, kind, message)
        self.executor = Executor(
            plan, storage, name, transmit=self._transmit, acknowledge=lambda acks: coordinator.ack.remote(acks),
            report=lambda task, generation, failure, exc: coordinator.task_failed.remote(task, generation, failure),
        )

    def _transmit(self, where: str, messages: list[Message]) -> None:
        self.peers[where].deliver.remote(messages)

    def ping(self) -> str:
        return self.executor.name

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def traffic(self) -> dict:
        return vars(self.executor.traffic).copy()

    def log_lines(self, offsets: dict[str, int]) -> tuple[list[str], dict[str, int]]:
        """What this executor's tasks printed since ``offsets`` (for ``sluiceway logs``)."""
        return read_new(offsets)

    def reset(self, generation: int, tasks: list[TaskId], routes: dict[TaskId, str], peers: dict[str, object],
              manifest, first_epoch: int, fencing: int, high_water: int = 0) -> None:
        """Host ``tasks``, restored from ``manifest`` (see :meth:`Executor.reset`); ``peers``: every executor
        of the job by name."""
        self.peers = peers
        self.executor.reset(generation, tasks, routes, manifest, first_epoch, fencing, high_water)

    def run_source_epoch(self, generation: int, plan: EpochPlan) -> None:
        self.executor.run_source_epoch(generation, plan)

    def deliver(self, messages: list[Message]) -> None:
        self.executor.deliver(messages)
