"""The coordinator's epoch bookkeeping, as plain classes.

:func:`plan_epoch` decides the next epoch's offset ranges (the backpressure
cap lives here); :class:`EpochBook` collects task acknowledgements and says
which epochs are complete, in order. Acks of an earlier generation (before a
recovery) are recognised as stale and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluiceway.checkpoint.types import TaskId
from sluiceway.operators.event_time import SourceEpoch
from sluiceway.operators.sources import Lag, Source

Ranges = dict[str, dict[int, tuple[int, int]]]  # source step -> partition -> [start, stop)


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch reads. Written to the offsets log before it runs."""

    epoch: int
    ranges: Ranges
    checkpoint: bool
    planned_at: float
    waiting: int = 0  # records readable but left for later epochs when this one was planned
    savepoint: bool = False  # a checkpoint written whole, kept until a user deletes it
    gaps: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)  # offsets skipped: never readable
    # For watermarks, the same on every replay: when each partition last had
    # something to read (idle partitions), and which are read to their end.
    active_at: dict[str, dict[int, float]] = field(default_factory=dict)
    ended: dict[str, list[int]] = field(default_factory=dict)
    # Each source's lag when this epoch was planned ({"records", "oldest_s"}), for the commit log and the page.
    lag: dict[str, dict] = field(default_factory=dict)

    def source_epoch(self, step: str) -> SourceEpoch:
        """What the tasks of source ``step`` need to know for watermarks."""
        return SourceEpoch(self.planned_at, self.active_at.get(step, {}), frozenset(self.ended.get(step, ())))

    @property
    def rows(self) -> int:
        return sum(stop - start for parts in self.ranges.values() for start, stop in parts.values())

    def next_offsets(self) -> dict[str, dict[int, int]]:
        return {s: {p: stop for p, (_, stop) in parts.items()} for s, parts in self.ranges.items()}

    def to_json(self) -> dict:
        return {
            "epoch": self.epoch,
            "checkpoint": self.checkpoint,
            "planned_at": self.planned_at,
            "waiting": self.waiting,
            "savepoint": self.savepoint,
            "ranges": {s: {str(p): [a, b] for p, (a, b) in parts.items()} for s, parts in self.ranges.items()},
            **({"gaps": {s: {str(p): [a, b] for p, (a, b) in parts.items()} for s, parts in self.gaps.items()}}
               if self.gaps else {}),
            **({"active_at": {s: {str(p): t for p, t in parts.items()} for s, parts in self.active_at.items()}}
               if self.active_at else {}),
            **({"ended": self.ended} if self.ended else {}),
            **({"lag": self.lag} if self.lag else {}),
        }

    @classmethod
    def from_json(cls, doc) -> "EpochPlan":
        """Parse an offsets log entry; ``ValueError`` names what is wrong with it.

        >>> EpochPlan.from_json({"epoch": 2, "checkpoint": False, "planned_at": 1.0})
        Traceback (most recent call last):
        ...
        ValueError: it has no 'ranges'
        """
        if not isinstance(doc, dict):
            raise ValueError(f"it is a JSON {type(doc).__name__}, not an object")
        for name, types in (("epoch", int), ("checkpoint", bool), ("planned_at", (int, float)), ("ranges", dict)):
            if name not in doc:
                raise ValueError(f"it has no {name!r}")
            if not isinstance(doc[name], types) or (types is int and isinstance(doc[name], bool)):
                raise ValueError(f"its {name!r} is {doc[name]!r}")
        ranges: Ranges = {}
        for step, parts in doc["ranges"].items():
            if not isinstance(parts, dict):
                raise ValueError(f"its ranges of {step!r} are {parts!r}, not an object")
            ranges[step] = {}
            for p, span in parts.items():
                ok = isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
                if not (p.isdigit() and ok and 0 <= span[0] <= span[1]):
                    raise ValueError(f"its range of {step!r} partition {p!r} is {span!r}, not [start, stop]")
                ranges[step][int(p)] = (span[0], span[1])
        savepoint = doc.get("savepoint", False)
        if not isinstance(savepoint, bool) or (savepoint and not doc["checkpoint"]):
            raise ValueError(f"its 'savepoint' is {savepoint!r} (a savepoint must be a checkpoint)")
        gaps = {step: {int(p): (a, b) for p, (a, b) in parts.items()} for step, parts in doc.get("gaps", {}).items()}
        active_at = {step: {int(p): float(t) for p, t in parts.items()}
                     for step, parts in doc.get("active_at", {}).items()}
        ended = {step: [int(p) for p in parts] for step, parts in doc.get("ended", {}).items()}
        lag = doc.get("lag", {})
        if not isinstance(lag, dict):
            raise ValueError(f"its 'lag' is {lag!r}, not an object")
        return cls(doc["epoch"], ranges, doc["checkpoint"], doc["planned_at"], int(doc.get("waiting", 0)), savepoint,
                   gaps, active_at, ended, lag)


@dataclass
class TaskAck:
    """A task finished an epoch: its barrier went downstream, its sink output
    is pre-committed, and at a checkpoint epoch its state files are written."""

    task: TaskId
    generation: int
    epoch: int
    rows_in: int = 0
    rows_out: int = 0
    duration_s: float = 0.0
    state_files: list[dict] = field(default_factory=list)
    state: dict[str, dict[str, list]] = field(default_factory=dict)
    snapshot_s: float = 0.0
    alignment_s: float = 0.0  # first barrier of the epoch received to the last one
    sink_handles: dict[str, dict] = field(default_factory=dict)
    watermark: int | None = None
    dead_letters: int = 0  # records or files the source task could not decode
    late: int = 0  # events that came after their window closed (sent to late())
    event_time: dict[str, dict] = field(default_factory=dict)  # event-time step -> its marks, at checkpoints
    state_memory: dict[str, dict] = field(default_factory=dict)  # step -> resident and mapped bytes, at checkpoints


@dataclass(frozen=True)
class Planned:
    """What :func:`plan_epoch` decided: the ranges (``None`` when no partition
    has anything new) and how many records are still waiting after them."""

    ranges: Ranges | None
    lag: dict[str, Lag] = field(default_factory=dict)  # per source step: what is left after these ranges
    gaps: Ranges = field(default_factory=dict)  # offsets no longer readable, skipped by the source's choice

    @property
    def waiting(self) -> int:
        """Records readable and left for later epochs, over every source."""
        return total_waiting(self.lag)


def total_waiting(lag: dict[str, Lag]) -> int:
    return sum(source_lag.records for source_lag in lag.values())


def plan_epoch(
    epoch: int,
    sources: dict[str, Source],
    next_offsets: dict[str, dict[int, int]],
    *,
    now: float,
    started_at: float,
    max_records_per_epoch: int,
    parallelism: dict[str, int] | None = None,
) -> Planned:
    """Ranges for ``epoch``: each source's cap is split evenly over its partitions; for a source that
    :attr:`~sluiceway.operators.sources.Source.reads_in_order`, evenly over its ``parallelism[step]`` tasks,
    each spending its share on its unfinished partitions lowest first (:func:`_in_order_caps`).

    >>> from sluiceway.operators.sources import ListSource
    >>> plan_epoch(1, {"s": ListSource([{"x": i} for i in range(10)])}, {}, now=0, started_at=0,
    ...            max_records_per_epoch=4)
    Planned(ranges={'s': {0: (0, 4)}}, lag={'s': Lag(records=6, oldest_s=None)}, gaps={})
    >>> _.waiting
    6
    """
    ranges: Ranges = {}
    gaps: Ranges = {}
    lags: dict[str, Lag] = {}
    any_rows = False
    for step, source in sources.items():
        n = source.partition_count()
        offsets = next_offsets.get(step, {})
        cap = max(1, max_records_per_epoch // n)
        caps = _in_order_caps(source, offsets, (parallelism or {}).get(step, 1), max_records_per_epoch) \
            if source.reads_in_order else None
        if source.max_offsets_per_epoch is not None:
            cap = min(cap, source.max_offsets_per_epoch)
        parts = {}
        for p in range(n):
            start = offsets.get(p, 0)
            if caps is not None:
                cap = caps.get(p, 0)
            first, latest = source.readable(p, now, started_at)
            if start < first:  # deleted before it was read: the source says whether to go on
                skipped_to = source.skip_gap(p, start, first)
                gaps.setdefault(step, {})[p] = (start, skipped_to)
                start = skipped_to
            latest = max(start, latest)
            stop = max(start, min(latest, source.plan_stop(p, start, latest, cap))) if cap > 0 else start
            parts[p] = (start, stop)
            lag = source.lag(p, stop, latest, now) if stop < latest else Lag()
            lags[step] = lags.get(step, Lag()) + lag
            any_rows = any_rows or stop > start or p in gaps.get(step, {})
        ranges[step] = parts
    return Planned(ranges if any_rows else None, lags, gaps)


def _in_order_caps(source: Source, offsets: dict[int, int], parallelism: int, budget: int) -> dict[int, int]:
    """What each partition of an in-order backlog may read this epoch: each of the ``parallelism`` tasks (task
    ``s`` reads the partitions ``p % parallelism == s``) gets an even share of ``budget`` and spends it on its
    unfinished partitions lowest first (many small files, or a slice of one big one).

    >>> from sluiceway.operators.sources import ListSource
    >>> _in_order_caps(ListSource([{"x": i} for i in range(12)], partitions=4), {0: 3}, 2, 8)
    {1: 3, 2: 3, 3: 1}
    """
    left = [max(1, budget // parallelism)] * parallelism
    if source.max_offsets_per_epoch is not None:
        left = [min(x, source.max_offsets_per_epoch) for x in left]
    caps = {}
    for p in range(source.partition_count()):
        task = p % parallelism
        if left[task] <= 0:
            if not any(left):
                break
            continue
        end = source.end_offset(p)
        remaining = left[task] if end is None else min(left[task], end - offsets.get(p, 0))
        if remaining > 0:
            caps[p] = remaining
            left[task] -= remaining
    return caps


@dataclass
class Trigger:
    """When to plan the next epoch: every ``interval_s`` on live input, and
    at once, without waiting, while records are waiting (a backlog).

    >>> t = Trigger(interval_s=1.0)
    >>> t.due(now=100.0, waiting=0)
    True
    >>> t.planned(now=100.0)
    >>> t.due(now=100.2, waiting=0), t.due(now=100.2, waiting=5_000_000), t.due(now=101.0, waiting=0)
    (False, True, True)
    """

    interval_s: float
    next_at: float = float("-inf")

    def due(self, now: float, waiting: int) -> bool:
        return waiting > 0 or now >= self.next_at

    def planned(self, now: float) -> None:
        self.next_at = now + self.interval_s


@dataclass
class EpochSizer:
    """How many records the next epoch may read, so that an epoch's latency
    (planned to complete) stays near the trigger interval.

    It keeps a smoothed rate of records per second of epoch latency and
    plans ``rate * trigger_s`` records, between ``min_records`` and the cap.
    A trigger of 0 means "as fast as possible": epochs are as big as the cap.

    >>> sizer = EpochSizer(trigger_s=1.0, max_records=1_000_000)
    >>> sizer.size()  # nothing measured yet: the cap
    1000000
    >>> sizer.observe(rows=1_000_000, latency_s=4.0)  # a slow job: 250k records/s
    >>> sizer.size()
    250000
    """

    trigger_s: float
    max_records: int
    min_records: int = 1000
    smoothing: float = 0.5
    rate: float | None = None

    def observe(self, rows: int, latency_s: float) -> None:
        if rows <= 0 or latency_s <= 0:
            return
        sample = rows / latency_s
        self.rate = sample if self.rate is None else self.smoothing * sample + (1 - self.smoothing) * self.rate

    def size(self) -> int:
        floor = min(self.min_records, self.max_records)
        if self.trigger_s <= 0 or self.rate is None:
            return self.max_records
        return max(floor, min(self.max_records, int(self.rate * self.trigger_s)))


def watermark_marks(sources: dict[str, Source], ranges: Ranges, active_at: dict[str, dict[int, float]],
                    now: float) -> tuple[dict[str, dict[int, float]], dict[str, list[int]]]:
    """For the plan of an epoch: when each partition last had something to
    read (this epoch counts), and which bounded partitions it reads to their end.

    >>> from sluiceway.operators.sources import ListSource
    >>> watermark_marks({"s": ListSource([{"x": 1}], partitions=2)}, {"s": {0: (0, 1), 1: (0, 0)}}, {}, now=5.0)
    ({'s': {0: 5.0, 1: 5.0}}, {'s': [0, 1]})
    """
    active: dict[str, dict[int, float]] = {}
    ended: dict[str, list[int]] = {}
    for step, source in sources.items():
        parts = ranges.get(step, {})
        known = active_at.get(step, {})
        active[step] = {p: now if stop > start or p not in known else known[p]
                        for p, (start, stop) in sorted(parts.items())}
        done = [p for p, (_, stop) in sorted(parts.items())
                if source.end_offset(p) is not None and stop >= source.end_offset(p)]
        if done:
            ended[step] = done
    return active, ended


def sources_exhausted(sources: dict[str, Source], next_offsets: dict[str, dict[int, int]]) -> bool:
    """True when every partition of every source is bounded and fully planned."""
    for step, source in sources.items():
        for p in range(source.partition_count()):
            end = source.end_offset(p)
            if end is None or next_offsets.get(step, {}).get(p, 0) < end:
                return False
    return True


class EpochBook:
    """Acks per in-flight epoch, for one generation of tasks."""

    def __init__(self, tasks: list[TaskId], generation: int):
        self.tasks = frozenset(tasks)
        self.generation = generation
        self.plans: dict[int, EpochPlan] = {}
        self.acks: dict[int, dict[TaskId, TaskAck]] = {}
        self.dispatched_at: dict[int, float] = {}
        self.stale_acks = 0

    @property
    def in_flight(self) -> int:
        return len(self.plans)

    def add(self, plan: EpochPlan, now: float = 0.0) -> None:
        if plan.epoch in self.plans:
            raise ValueError(f"epoch {plan.epoch} is already in flight")
        self.plans[plan.epoch] = plan
        self.acks[plan.epoch] = {}
        self.dispatched_at[plan.epoch] = now

    def pending_checkpoints(self) -> list[tuple[EpochPlan, list[str]]]:
        """Checkpoint epochs in flight, each with the tasks that acknowledged it."""
        return [(p, sorted(str(t) for t in self.acks[e])) for e, p in sorted(self.plans.items()) if p.checkpoint]

    def latency(self, epoch: int, now: float) -> float:
        """Seconds from dispatch to ``now`` of a completed epoch (once per epoch)."""
        return now - self.dispatched_at.pop(epoch, now)

    def overdue(self, now: float, bound_s: float) -> tuple[int, list[TaskId]] | None:
        """The oldest epoch in flight for longer than ``bound_s``, and the
        tasks that have not acknowledged it; ``None`` if none is overdue.

        >>> book = EpochBook([TaskId("a", 0), TaskId("b", 0)], generation=0)
        >>> book.add(EpochPlan(1, {}, False, 0.0), now=100.0)
        >>> _ = book.handle_ack(TaskAck(TaskId("a", 0), 0, 1))
        >>> book.overdue(now=105.0, bound_s=10.0), book.overdue(now=111.0, bound_s=10.0)
        (None, (1, [TaskId(stage='b', subtask=0)]))
        """
        for epoch in sorted(self.plans):
            if now - self.dispatched_at[epoch] > bound_s:
                return epoch, sorted(self.tasks - set(self.acks[epoch]))
        return None

    def handle_ack(self, ack: TaskAck) -> bool:
        """Record an ack; False if it is stale (old generation or unknown epoch)."""
        if ack.generation != self.generation or ack.epoch not in self.plans or ack.task not in self.tasks:
            self.stale_acks += 1
            return False
        self.acks[ack.epoch][ack.task] = ack  # a task's repeated ack replaces its first: counted once
        return True

    def pop_complete(self) -> list[tuple[EpochPlan, dict[TaskId, TaskAck]]]:
        """Complete epochs, lowest first, stopping at the first incomplete one."""
        out = []
        for epoch in sorted(self.plans):
            if len(self.acks[epoch]) != len(self.tasks):  # acks are keyed by task, and only of known tasks
                break
            out.append((self.plans.pop(epoch), self.acks.pop(epoch)))
        return out
