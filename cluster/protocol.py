"""The words between the job controller and the drivers that carry it out.

The controller (:mod:`sluiceway.cluster.controller`) takes **events** (what
happened: a task acknowledged an epoch, storage answered, a timer fired) and
returns **instructions** (what to do next: write this offsets entry, run this
epoch, commit these sinks). A driver (Ray: :mod:`~sluiceway.cluster.coordinator`,
in process: :func:`sluiceway.jobs.testing.run_local`, simulated:
:mod:`sluiceway.cluster.simulation`) carries the instructions out in order.

Two kinds of instruction:

- **Commands** need no answer (write a history record, run an epoch's source
  tasks). A command that fails raises in the driver: a storage error stops
  the run, as it always did.
- **Questions** (subclasses of :class:`Question`) are answered by exactly one
  event, which the driver hands back to the controller at once. A question is
  always the last instruction of its list, so nothing is carried out on the
  strength of an answer not yet given.

All of it is plain data: no Ray, no storage handles, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluiceway.checkpoint.manifest import Manifest
from sluiceway.checkpoint.types import TaskId
from sluiceway.cluster.epochs import EpochPlan, Planned, TaskAck
from sluiceway.cluster.restart import Failure


# ---------------------------------------------------------------- events
class Event:
    """Something the controller hears of."""


@dataclass(frozen=True)
class Start(Event):
    """The run begins: find the restore point."""


@dataclass(frozen=True)
class Tick(Event):
    """Time passed: plan if due, detect a stuck epoch, end a restart delay.
    ``silent``: tasks whose liveness probe has gone unanswered, and for how
    many seconds (a hung task; a dead one is a :class:`TaskLost`)."""

    silent: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RestorePoint(Event):
    """Answer to :class:`ReadRestorePoint`: the checkpoint to restore (its
    manifest, ``None`` for none), the offsets log after it, the commit log
    from it on, and the corrupt checkpoints passed over."""

    manifest: Manifest | None
    plans: list[EpochPlan]
    commits: dict[int, dict | None]  # epoch -> commit log entry, for every logged epoch >= the checkpoint's
    high_water: int  # the newest epoch in the commit log (0: none)
    corrupt: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class TasksReset(Event):
    """Answer to :class:`ResetTasks`: every task restored its state."""


@dataclass(frozen=True)
class ResetFailed(Event):
    """Answer to :class:`ResetTasks`: a state file of the checkpoint failed
    its checksum (``problem``), or a task died while resetting (``lost``)."""

    problem: str
    lost: bool = False


@dataclass(frozen=True)
class SourcesProbed(Event):
    """Answer to :class:`ProbeSources`: what the next epoch can read."""

    planned: Planned


@dataclass(frozen=True)
class OffsetsWritten(Event):
    """Answer to :class:`WriteOffsets`: the plan is in the offsets log
    (``adopted``: another run had written this epoch first; its plan runs)."""

    plan: EpochPlan
    adopted: bool = False


@dataclass(frozen=True)
class Acked(Event):
    """Acks of tasks: one task's, or every task's of a node gathered into one message."""

    acks: tuple[TaskAck, ...]


@dataclass(frozen=True)
class TaskFailed(Event):
    """A task reported a failure (its user code raised, storage gave up ...)."""

    task: TaskId
    generation: int
    failure: Failure


@dataclass(frozen=True)
class TaskLost(Event):
    """A task's process or node is gone (its liveness probe failed); ``executor``: the process, when known."""

    task: TaskId
    executor: str | None = None


@dataclass(frozen=True)
class SinksCommitted(Event):
    """Answer to :class:`CommitSinks`."""

    epoch: int


@dataclass(frozen=True)
class SinkCommitFailed(Event):
    """Answer to :class:`CommitSinks`: a sink raised."""

    epoch: int
    failure: Failure


@dataclass(frozen=True)
class RetentionApplied(Event):
    """Answer to :class:`ApplyRetention`: the checkpoints it removed."""

    epoch: int
    deleted: list[int]


@dataclass(frozen=True)
class DeadFound(Event):
    """Answer to :class:`FindDead`: the tasks that must be started again."""

    dead: frozenset[TaskId]


@dataclass(frozen=True)
class StorageWait(Event):
    """``who`` (a task, the coordinator, a sink) waits for storage or its
    system (``waiting``), or has it back: a pause, not a hang."""

    who: str
    waiting: bool
    message: str
    deadline_s: float | None = None


@dataclass(frozen=True)
class StopRequested(Event):
    """Stop after the epochs in flight and a final checkpoint (a savepoint if asked)."""

    savepoint: bool = False


# ---------------------------------------------------------- instructions
class Instruction:
    """Something the controller asks a driver to do."""


class Question(Instruction):
    """An instruction answered by one event (always the last of its list)."""


@dataclass(frozen=True)
class ReadRestorePoint(Question):
    """Find the checkpoint to restore (``chosen``, else the newest complete one
    not in ``skip``) and read the logs after it. Answered by :class:`RestorePoint`."""

    chosen: int | None
    skip: frozenset[int]


@dataclass(frozen=True)
class StartTasks(Instruction):
    """Start these tasks (all of them at the start of a run, the dead ones in
    a recovery), spread over live nodes, ``offset`` turning the spread."""

    tasks: tuple[TaskId, ...]
    offset: int = 0


@dataclass(frozen=True)
class ResetTasks(Question):
    """Drop everything in flight in every task and restore ``manifest``'s
    state; replays of epochs up to ``high_water`` skip the sinks.
    Answered by :class:`TasksReset` or :class:`ResetFailed`."""

    generation: int
    manifest: Manifest | None
    first_epoch: int
    high_water: int


@dataclass(frozen=True)
class FindDead(Question):
    """Probe every task; answered by :class:`DeadFound` (``known``: already known dead)."""

    known: frozenset[TaskId]


@dataclass(frozen=True)
class ProbeSources(Question):
    """Ask the sources what epoch ``epoch`` can read from ``next_offsets``,
    at most ``max_records`` records. Answered by :class:`SourcesProbed`."""

    epoch: int
    next_offsets: dict
    max_records: int


@dataclass(frozen=True)
class WriteOffsets(Question):
    """Append ``plan`` to the offsets log (created, never overwritten), if
    this run still holds the lease (a commit-point write, as the next two).
    Answered by :class:`OffsetsWritten`."""

    plan: EpochPlan


@dataclass(frozen=True)
class RunEpoch(Instruction):
    """Send ``plan`` to every source task of ``generation``."""

    plan: EpochPlan
    generation: int


@dataclass(frozen=True)
class WriteManifest(Instruction):
    """Write checkpoint ``checkpoint_id``'s manifest (the commit point), if this run holds the lease."""

    checkpoint_id: int
    manifest: Manifest


@dataclass(frozen=True)
class WriteCommit(Instruction):
    """Append ``record`` to the commit log (the epoch is decided), if this run holds the lease."""

    epoch: int
    record: dict


@dataclass(frozen=True)
class CommitSinks(Question):
    """Commit ``epoch`` in every sink, from each sink's handles. Answered by
    :class:`SinksCommitted` or :class:`SinkCommitFailed`."""

    epoch: int
    handles: dict[str, list[dict]]


@dataclass(frozen=True)
class AbortSinks(Instruction):
    """Abort every sink's pre-commits of epochs after ``after``."""

    after: int


@dataclass(frozen=True)
class ApplyRetention(Question):
    """Keep the newest ``keep`` complete checkpoints. Answered by :class:`RetentionApplied`."""

    epoch: int
    keep: int


@dataclass(frozen=True)
class NotifySources(Instruction):
    """Tell each source the offsets checkpoint ``epoch`` covers."""

    epoch: int
    next_offsets: dict


@dataclass(frozen=True)
class WriteHistory(Instruction):
    """One history record (a :class:`~sluiceway.cluster.records.HistoryRecord`), at ``at``."""

    record: object
    at: float


@dataclass(frozen=True)
class Emit(Instruction):
    """A progress event for the CLI, the web page and the metrics."""

    event: dict


@dataclass(frozen=True)
class Started(Instruction):
    """The tasks are reset and the run begins: the driver records where the
    tasks run (history ``run_started``, the ``started`` event)."""

    restored: int | None
    replay: list[int]


@dataclass(frozen=True)
class Recovered(Instruction):
    """A recovery is done: the driver records it (history, ``recovered`` event)."""

    failure: Failure
    started_at: float
    delay_s: float
    restored: int
    replay: list[int]
    restarted: tuple[TaskId, ...]


@dataclass(frozen=True)
class Fail(Instruction):
    """Stop the run: the driver raises :class:`~sluiceway.cluster.errors.JobFailedError`."""

    message: str
    detail: str = ""
