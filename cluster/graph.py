"""The job graph: logical steps as the user built them, and the physical
plan the runtime executes (stages of chained steps, exchanges between them).

Chaining: a step joins its upstream's stage unless it starts one: a source,
a ``key_by`` (hash exchange into key groups), a step whose parallelism
differs from its upstream's (rebalance exchange), or a step with two inputs
(a join: a hash exchange from each side, on each side's key, into one
stage; each side is a *port*). Exchanges are all-to-all: every upstream
subtask sends every downstream subtask one message per epoch, so every
channel, an upstream task and the port it feeds, carries every barrier.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from sluiceway.checkpoint.types import DEFAULT_MAX_KEY_GROUPS, TaskId
from sluiceway.cluster.alignment import BarrierAligner
from sluiceway.operators.base import Operator
from sluiceway.operators.errors import FlowDefinitionError, call_site
from sluiceway.operators.sinks import Sink
from sluiceway.operators.sources import Source
from sluiceway.operators.store import DEFAULT_STATE_BUDGET_MB


@dataclass
class Step:
    """One logical step. Exactly one of ``operator``, ``source``, ``sink`` is
    set, except for ``key_by`` which only names a key. A step with two inputs
    (a join) reads ``upstream`` keyed by ``key`` on port 0 and ``right`` keyed
    by ``right_key`` on port 1; ``right_timed=False`` keeps the right side's
    watermark from holding the step's back (a table read for lookups)."""

    id: str | None  # None: named by JobGraph.add from what the step is and what feeds it (derived_id)
    kind: str
    upstream: str | None
    parallelism: int | None = None
    operator: Operator | None = None
    source: Source | None = None
    sink: Sink | None = None
    key: str | None = None
    right: str | None = None
    right_key: str | None = None
    right_timed: bool = True
    state_budget_mb: int | None = None  # memory for this step's state per task (None: the flow's)
    defined_at: str | None = None  # the user's call that made the step (file:line: code), for errors

    @property
    def inputs(self) -> list[str]:
        """The steps this one reads, in port order."""
        return [s for s in (self.upstream, self.right) if s is not None]

    def describe(self) -> dict:
        part = self.operator or self.source or self.sink
        d = {"id": self.id, "kind": self.kind, "upstream": self.upstream, "parallelism": self.parallelism}
        if part is not None:
            d["config"] = part.describe()
        if self.key is not None:
            d["key"] = self.key
        if self.right is not None:
            d["right"], d["right_key"] = self.right, self.right_key
        return d


@dataclass
class JobGraph:
    name: str
    steps: dict[str, Step] = field(default_factory=dict)
    max_key_groups: int = DEFAULT_MAX_KEY_GROUPS
    parallelism: int | None = None
    state_budget_mb: int = DEFAULT_STATE_BUDGET_MB  # memory per stateful step and task; the rest on local disk
    renamed: dict[str, str] = field(default_factory=dict)  # a checkpoint's step id -> the step that restores it

    def add(self, step: Step) -> Step:
        for upstream in step.inputs:
            if upstream not in self.steps:
                raise FlowDefinitionError(f"step {step.id or step.kind!r} reads from unknown step {upstream!r}")
        if step.id is None:
            step.id = derived_id(step, self.steps)
        elif step.id in self.steps:
            raise FlowDefinitionError(
                f"step {step.id!r} already exists in flow {self.name!r}; do you have two steps with the same name?"
            )
        if step.defined_at is None:
            step.defined_at = call_site()
        self.steps[step.id] = step
        return step

    def upstream_event_time(self, step_id: str) -> Step | None:
        """The nearest ``event_time`` step at or above ``step_id``."""
        step = self.steps.get(step_id)
        while step is not None:
            if step.kind == "event_time":
                return step
            step = self.steps.get(step.upstream) if step.upstream else None
        return None

    def children(self, step_id: str) -> list[Step]:
        return [s for s in self.steps.values() if step_id in s.inputs]

    def describe(self) -> list[dict]:
        return [s.describe() for s in self.steps.values()]


# Steps that keep no state and change no partitioning of state: inserting or removing one leaves the identity of
# the steps after it alone.
TRANSPARENT = frozenset({"filter", "map", "map_batches", "key_by"})
# What names where a source reads or a sink writes, among the fields of their describe().
_LOCATION_FIELDS = ("url", "log", "topic", "table", "tables", "slot", "server", "stream", "subject", "queue", "path")


def derived_id(step: Step, steps: dict[str, Step]) -> str:
    """The id of an unnamed step: its kind, its key column, and a short hash
    of what it is (kind, key, where a source reads or a sink writes) and of
    the steps that anchor it, the nearest ones above it that are not
    :data:`TRANSPARENT` (their ids, derived or given); a sink that names
    where it writes is anchored by that alone. Adding or removing a
    filter or a map, or another branch of the flow, leaves it as it was, so
    a restored checkpoint still finds the step's state. Only steps alike in
    all of that (two unnamed aggregates by one key of one stream) are told
    apart by the order they were added: ``-2``, ``-3``.

    >>> source = Step("clicks", "source", None)
    >>> steps = {"clicks": source, "f": Step("f", "filter", "clicks"), "k": Step("k", "key_by", "f", key="user")}
    >>> derived_id(Step(None, "aggregate", "k", key="user"), steps)
    'aggregate-user-03b0df'
    >>> derived_id(Step(None, "aggregate", "clicks", key="user"), steps)  # without the filter and the key_by
    'aggregate-user-03b0df'
    """
    key = step.key if step.key is not None else getattr(step.operator, "key", None)
    key = key if isinstance(key, str) else None
    part = step.source or step.sink
    where = {}
    if part is not None:
        described = part.describe()
        where = {"type": type(part).__name__, **{f: described[f] for f in _LOCATION_FIELDS if f in described}}
    # A sink that writes somewhere is that place (two sinks of a flow cannot write one), whatever feeds it.
    anchors = [] if step.sink is not None and len(where) > 1 else [_anchor(s, steps) for s in step.inputs]
    identity = [step.kind, key, step.right_key, where, anchors]
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:6]
    label = step.kind if key is None else f"{step.kind}-{re.sub(r'[^A-Za-z0-9_]+', '_', key)[:32]}"
    base = f"{label}-{digest}"
    derived, n = base, 1
    while derived in steps:
        n += 1
        derived = f"{base}-{n}"
    return derived


def _anchor(step_id: str, steps: dict[str, Step]) -> str:
    step = steps[step_id]
    while step.kind in TRANSPARENT and step.upstream is not None:
        step = steps[step.upstream]
    return step.id


@dataclass(frozen=True)
class Exchange:
    """Output of ``from_step`` to every subtask of ``to_stage``, on its input
    ``port``: by key group of ``key``, or rebalanced in contiguous slices
    when ``key`` is None."""

    from_step: str
    to_stage: str
    key: str | None
    port: int = 0


@dataclass(frozen=True)
class StageInput:
    """One input of a stage: the upstream stage, the key it is partitioned
    by, and whether its watermark counts."""

    stage: str
    key: str | None
    timed: bool = True


@dataclass
class Stage:
    id: str
    parallelism: int
    steps: list[str]
    children: dict[str, list[str]]
    source: str | None = None
    inputs: list[StageInput] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)

    @property
    def input_stage(self) -> str | None:
        return self.inputs[0].stage if self.inputs else None

    @property
    def input_key(self) -> str | None:
        return self.inputs[0].key if self.inputs else None

    def tasks(self) -> list[TaskId]:
        return [TaskId(self.id, i) for i in range(self.parallelism)]


@dataclass
class PhysicalPlan:
    job: str
    graph: JobGraph
    stages: dict[str, Stage]
    step_stage: dict[str, str]

    @property
    def max_key_groups(self) -> int:
        return self.graph.max_key_groups

    def tasks(self) -> list[TaskId]:
        return [t for stage in self.stages.values() for t in stage.tasks()]

    def input_channels(self, stage_id: str) -> list[tuple[TaskId, int]]:
        """Every (upstream task, port) feeding ``stage_id``, in port order."""
        stage = self.stages[stage_id]
        return [(t, port) for port, i in enumerate(stage.inputs) for t in self.stages[i.stage].tasks()]

    def aligner(self, stage_id: str, first_epoch: int) -> BarrierAligner | None:
        """The barrier aligner of a task of ``stage_id`` (``None`` for a
        source stage): its channels, those whose watermark does not hold the
        stage's back (a table read for lookups)."""
        stage = self.stages[stage_id]
        channels = self.input_channels(stage_id)
        if not channels:
            return None
        untimed = {(t, port) for port, i in enumerate(stage.inputs) if not i.timed for t in self.stages[i.stage].tasks()}
        return BarrierAligner(channels, first_epoch, untimed)

    def sources(self) -> dict[str, Source]:
        return {s.id: s.source for s in self.graph.steps.values() if s.source is not None}

    def sinks(self) -> dict[str, Sink]:
        return {s.id: s.sink for s in self.graph.steps.values() if s.sink is not None}

    def source_partitions(self, task: TaskId) -> list[int]:
        """The partitions a source task reads: ``p % parallelism == subtask``."""
        stage = self.stages[task.stage]
        source = self.graph.steps[stage.source].source
        return [p for p in range(source.partition_count()) if p % stage.parallelism == task.subtask]

    def parallelism(self) -> dict[str, int]:
        return {s.id: s.parallelism for s in self.stages.values()}

    def describe(self) -> dict:
        return {
            "steps": self.graph.describe(),
            "stages": [
                {"id": s.id, "parallelism": s.parallelism, "steps": s.steps, "input": s.input_stage, "key": s.input_key,
                 "inputs": [{"stage": i.stage, "key": i.key} for i in s.inputs]}
                for s in self.stages.values()
            ],
            "max_key_groups": self.max_key_groups,
        }


def plan(graph: JobGraph, parallelism: int | None = None) -> PhysicalPlan:
    """Cut the logical graph into stages. ``parallelism`` overrides the flow's
    default for steps that set none."""
    default = parallelism or graph.parallelism
    if not any(s.sink for s in graph.steps.values()):
        raise FlowDefinitionError(f"flow {graph.name!r} has no sink; add one with stream.sink(...)")
    stages: dict[str, Stage] = {}
    step_stage: dict[str, str] = {}
    for step in graph.steps.values():
        if step.kind == "source":
            n = step.parallelism or min(default or step.source.partition_count(), step.source.partition_count())
            stages[step.id] = Stage(step.id, n, [step.id], {step.id: []}, source=step.id)
            step_stage[step.id] = step.id
            continue
        if step.right is not None:  # two inputs: a stage of its own, fed by a hash exchange from each side
            n = step.parallelism or default or max(stages[step_stage[u]].parallelism for u in step.inputs)
            sides = [(step.upstream, step.key, True), (step.right, step.right_key, step.right_timed)]
            stages[step.id] = Stage(step.id, n, [step.id], {step.id: []},
                                    inputs=[StageInput(step_stage[u], k, timed) for u, k, timed in sides])
            for port, (upstream, key, _) in enumerate(sides):
                stages[step_stage[upstream]].exchanges.append(Exchange(upstream, step.id, key, port))
            step_stage[step.id] = step.id
            continue
        up_stage = stages[step_stage[step.upstream]]
        starts_stage = step.kind == "key_by" or (
            step.parallelism is not None and step.parallelism != up_stage.parallelism
        )
        if starts_stage:
            n = step.parallelism or default or up_stage.parallelism
            stages[step.id] = Stage(
                step.id, n, [step.id], {step.id: []}, inputs=[StageInput(up_stage.id, step.key)]
            )
            up_stage.exchanges.append(Exchange(step.upstream, step.id, step.key))
            step_stage[step.id] = step.id
        else:
            up_stage.steps.append(step.id)
            up_stage.children[step.upstream].append(step.id)
            up_stage.children[step.id] = []
            step_stage[step.id] = up_stage.id
    for step in graph.steps.values():
        if step.kind == "event_time" and stages[step_stage[step.id]].source is None:
            raise FlowDefinitionError(
                f"event time step {step.id!r} runs after an exchange (key_by or a change of parallelism); "
                "declare event time on the source's stream, before key_by: watermarks are tracked per source partition"
            )
    for stage in stages.values():
        if stage.parallelism < 1:
            raise FlowDefinitionError(f"stage {stage.id!r} has parallelism {stage.parallelism}; it must be >= 1")
        if stage.parallelism > graph.max_key_groups and stage.input_key:
            raise FlowDefinitionError(
                f"stage {stage.id!r} has parallelism {stage.parallelism} above max_key_groups {graph.max_key_groups}"
            )
    return PhysicalPlan(graph.name, graph, stages, step_stage)
