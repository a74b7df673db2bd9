"""Executors: the processes tasks run in, and the per-process data plane.

A job's tasks do not each get a process. An :class:`Executor` hosts many
tasks (a :class:`~sluiceway.cluster.taskhost.TaskHost` each, as a Flink
TaskManager hosts slots or a Spark executor runs tasks), and carries their
messages:

- **between its own tasks** through a queue in the process (no
  serialization, no Ray call);
- **to another executor** in batches: the messages its tasks send while it
  works through one round of its queue go out as one call per destination
  executor, so an exchange costs at most one message per (executor,
  executor) pair and round, whatever the number of tasks;
- **to the coordinator**: the acks of one round go out as one call.

A *round* is the messages queued when it starts: first the source tasks'
epochs (:meth:`Executor.run_source_epoch`) or a batch from another
executor (:meth:`Executor.deliver`), then what the tasks sent to each
other in this process, round after round until the queue is empty. Each
round's output is sent before the next round starts, so other executors
start on it while this one goes on.

What each task owns does not change: its key groups, its sink subtask, its
state files and its channels (the aligner sees the same upstream tasks),
so barriers, exactly-once, rescale and recovery keep their meaning. Order
is kept per channel: one executor's calls to another arrive in the order
they were sent (Ray keeps the order of one caller's calls to one actor),
and a queue is first in, first out.

This module has no Ray in it: the Ray actor (:mod:`sluiceway.cluster.task`)
gives it ``transmit`` / ``acknowledge`` / ``report``, the in-process
runner (:mod:`sluiceway.cluster.inprocess`) runs every task in one
executor.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster.alignment import Barrier
from sluiceway.cluster.epochs import EpochPlan, TaskAck
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.restart import Failure
from sluiceway.cluster.taskhost import TaskHost


@dataclass(frozen=True)
class Message:
    """Data and a barrier for ``to`` from ``channel`` (an upstream task and the input port it feeds)."""

    to: TaskId
    generation: int
    channel: tuple
    table: object
    barrier: Barrier


@dataclass
class Traffic:
    """What an executor sent: calls to other executors (``batches``) with how many task messages they carried,
    messages kept in the process, and ack calls with how many acks."""

    batches: int = 0
    remote_messages: int = 0
    local_messages: int = 0
    ack_calls: int = 0
    acks: int = 0


class Executor:
    """The tasks of one process and their messages (see module doc)."""

    def __init__(self, plan: PhysicalPlan, storage: JobStorage, name: str, *,
                 transmit: Callable[[str, list[Message]], None],
                 acknowledge: Callable[[list[TaskAck]], None],
                 report: Callable[[TaskId, int, Failure, BaseException], None],
                 clock: Callable[[], float] = time.time):
        self.plan, self.storage, self.name = plan, storage, name
        self.transmit, self.acknowledge, self.report, self.clock = transmit, acknowledge, report, clock
        self.hosts: dict[TaskId, TaskHost] = {}
        self.routes: dict[TaskId, str] = {}  # every task of the job -> the executor it runs in
        self.queue: deque[Message] = deque()
        self.outbox: dict[str, list[Message]] = {}
        self.acks: list[TaskAck] = []
        self.traffic = Traffic()

    @property
    def tasks(self) -> list[TaskId]:
        return list(self.hosts)

    def reset(self, generation: int, tasks, routes: dict[TaskId, str], manifest, first_epoch: int, fencing: int,
              high_water: int = 0) -> None:
        """Host ``tasks`` from now on (a task new here gets its host; one gone elsewhere is dropped), route
        by ``routes``, drop every message in flight and restore each task's state from ``manifest`` (see
        :meth:`TaskHost.reset`). Raises :class:`~sluiceway.checkpoint.errors.CorruptCheckpointError` when a
        state file fails its checksum."""
        wanted = list(tasks)
        self.hosts = {t: self.hosts.get(t) or self._host(t) for t in wanted}
        self.routes = dict(routes)
        self.queue.clear()
        self.outbox.clear()
        self.acks.clear()
        for host in self.hosts.values():
            host.reset(generation, manifest, first_epoch, fencing, high_water)

    def _host(self, task: TaskId) -> TaskHost:
        return TaskHost(self.plan, task, self.storage, send=self._send, acknowledge=self.acks.append,
                        report=self.report, clock=self.clock)

    def run_source_epoch(self, generation: int, plan: EpochPlan) -> None:
        """Every source task here reads its part of the epoch; then the messages flow."""
        for task, host in self.hosts.items():
            if self.plan.stages[task.stage].source is not None:
                host.run_source_epoch(generation, plan)
        self._pump()

    def deliver(self, messages: list[Message]) -> None:
        """A batch from another executor."""
        self.queue.extend(messages)
        self._pump()

    def _send(self, stage: str, subtask: int, generation: int, channel: tuple, table, barrier: Barrier) -> None:
        to = TaskId(stage, subtask)
        where = self.routes[to]
        message = Message(to, generation, channel, table, barrier)
        if where == self.name:
            self.queue.append(message)
            self.traffic.local_messages += 1
        else:
            self.outbox.setdefault(where, []).append(message)

    def _pump(self) -> None:
        """Round after round until the queue is empty; each round's output is sent before the next."""
        while True:
            self._flush()
            if not self.queue:
                return
            for _ in range(len(self.queue)):
                message = self.queue.popleft()
                host = self.hosts.get(message.to)
                if host is not None:  # a task moved away in a recovery: its old generation's message is stale
                    host.deliver(message.generation, message.channel, message.table, message.barrier)

    def _flush(self) -> None:
        outbox, self.outbox = self.outbox, {}
        for where, messages in outbox.items():
            self.traffic.batches += 1
            self.traffic.remote_messages += len(messages)
            self.transmit(where, messages)
        if self.acks:
            acks = list(self.acks)
            self.acks.clear()  # the hosts append to this very list
            self.traffic.ack_calls += 1
            self.traffic.acks += len(acks)
            self.acknowledge(acks)


def interleave(executors_by_node: dict[str, list[str]]) -> list[str]:
    """Executors in an order that alternates nodes, so round-robin over it spreads tasks over nodes first.

    >>> interleave({"a": ["a0", "a1"], "b": ["b0"]})
    ['a0', 'b0', 'a1']
    """
    order, depth = [], max((len(v) for v in executors_by_node.values()), default=0)
    for i in range(depth):
        order.extend(names[i] for _, names in sorted(executors_by_node.items()) if i < len(names))
    return order


def place(tasks, load: dict[str, int], order: list[str], offset: int = 0) -> dict[TaskId, str]:
    """Each task to the executor with the fewest tasks (``load``), ties broken by ``order`` turned by
    ``offset``: a fresh start spreads round-robin, a recovery fills the emptiest executors first.

    >>> place(["t0", "t1", "t2"], {"a": 0, "b": 1}, ["a", "b"])
    {'t0': 'a', 't1': 'a', 't2': 'b'}
    """
    if not order:
        raise RuntimeError("no executor to place tasks on")
    load = {name: load.get(name, 0) for name in order}
    rank = {name: (i - offset) % len(order) for i, name in enumerate(order)}
    placed = {}
    for task in tasks:
        name = min(order, key=lambda n: (load[n], rank[n]))
        placed[task] = name
        load[name] += 1
    return placed
