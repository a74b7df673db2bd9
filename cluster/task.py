"""The task actor: the Ray face of a :class:`~sluiceway.cluster.taskhost.TaskHost`.
One actor per task; single-threaded, so calls from one caller run in the
order they were sent.

Every call carries the generation it belongs to. After a recovery the
coordinator bumps the generation and resets every task; messages of an older
generation that are still in flight are dropped on arrival.
"""

from __future__ import annotations

import ray

from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster.alignment import Barrier
from sluiceway.cluster.epochs import EpochPlan
from sluiceway.cluster.events import read_new
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.taskhost import TaskHost


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class TaskActor:
    def __init__(self, plan: PhysicalPlan, task: TaskId, storage: JobStorage, coordinator):
        self.task = task
        self.coordinator = coordinator
        storage.on_wait = lambda kind, message: coordinator.storage_event.remote(str(task), kind, message)
        self.downstream: dict[str, list] = {}
        self.host = TaskHost(
            plan, task, storage, send=self._send, acknowledge=lambda ack: coordinator.ack.remote(ack),
            report=lambda task, generation, failure, exc: coordinator.task_failed.remote(task, generation, failure),
        )

    def _send(self, stage: str, subtask: int, generation: int, channel: tuple, table, barrier: Barrier) -> None:
        self.downstream[stage][subtask].deliver.remote(generation, channel, table, barrier)

    def ping(self) -> str:
        return str(self.task)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def log_lines(self, offsets: dict[str, int]) -> tuple[list[str], dict[str, int]]:
        """What this task printed since ``offsets`` (for ``sluiceway logs``)."""
        return read_new(offsets)

    def reset(self, generation: int, manifest: dict | None, downstream: dict[str, list], first_epoch: int,
              fencing: int, high_water: int = 0) -> None:
        """Restore ``manifest``'s state (see :meth:`TaskHost.reset`); ``downstream``: each stage's actors."""
        self.downstream = downstream
        self.host.reset(generation, manifest, first_epoch, fencing, high_water)

    def run_source_epoch(self, generation: int, plan: EpochPlan) -> None:
        self.host.run_source_epoch(generation, plan)

    def deliver(self, generation: int, channel: tuple[TaskId, int], table, barrier: Barrier) -> None:
        """Data and barrier from ``channel``: an upstream task and the input port it feeds."""
        self.host.deliver(generation, channel, table, barrier)
