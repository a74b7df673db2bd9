"""What one task does with one epoch, without Ray.

:class:`TaskRuntime` holds the live logic of every step chained in a stage,
pushes an epoch's input through them, partitions what leaves through
exchanges, pre-commits sink output and snapshots state. The Ray actor in
:mod:`sluiceway.cluster.task` only delivers messages to it and sends what it
returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.checkpoint.manifest import Manifest
from sluiceway.checkpoint.state import StateFiles, write_key_groups
from sluiceway.checkpoint.errors import CorruptCheckpointError, StorageError
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.types import TaskId, key_group_range
from sluiceway.cluster.alignment import Barrier, min_watermark
from sluiceway.cluster.graph import Exchange, PhysicalPlan
from sluiceway.operators.base import OperatorContext, OperatorLogic, Outputs
from sluiceway.operators.event_time import EventTimeLogic, SourceEpoch, restored_marks
from sluiceway.operators.errors import FlowValidationError, UserCodeError, missing_columns
from sluiceway.operators.keys import key_groups
from sluiceway.operators.sinks import SinkContext, SinkWriter
from sluiceway.operators.state import RestoredState, concat
from sluiceway.operators.stateless import Identity


SIDE_PORTS = {"dead_letters": "dead_letters", "late": "late"}  # step kind -> the side output it reads


@dataclass
class EpochOutput:
    """What leaves a task for one epoch: per exchange, one table (or None)
    per downstream subtask, and the watermark (and idleness) its barrier carries."""

    epoch: int
    exchanges: dict[Exchange, list[pa.Table | None]]
    rows_in: int
    started: float
    barriers: dict[Exchange, tuple[int | None, bool]] = field(default_factory=dict)
    watermark: int | None = None  # this task's watermark after the epoch (recorded in checkpoints)
    late: int = 0  # events windows sent to late()


@dataclass
class SourceInput:
    """What a source task read for one epoch: a table per partition read."""

    tables: list[pa.Table]
    rows: int
    dead_letters: pa.Table | None  # what the source could not decode, for the dead_letters() streams
    partitions: list[int] = field(default_factory=list)  # the partition of each table


@dataclass
class EpochResult:
    sink_handles: dict[str, dict] = field(default_factory=dict)
    rows_out: int = 0
    state_files: list[dict] = field(default_factory=list)  # files written at this checkpoint
    state: dict[str, dict[str, list]] = field(default_factory=dict)  # step -> key group -> chain of [file, batch]
    snapshot_s: float = 0.0
    event_time: dict[str, dict] = field(default_factory=dict)  # event-time step -> marks, at a checkpoint
    state_memory: dict[str, dict] = field(default_factory=dict)  # step -> resident and mapped bytes, at a checkpoint


def stage_watermark(watermarks: dict, stage: str) -> int | None:
    """The watermark the tasks of ``stage`` had at a checkpoint (the same for
    every task behind an all-to-all exchange; the lowest after a rescale).

    >>> stage_watermark({"w[0]": 7, "w[1]": 7, "s[0]": 9}, "w")
    7
    """
    marks = [m for task, m in watermarks.items() if task.startswith(f"{stage}[")]
    if not marks or any(m is None for m in marks):
        return None
    return min(marks)


def partition_by_key(table: pa.Table, key: str, parallelism: int, max_key_groups: int) -> list[pa.Table | None]:
    """Rows grouped by the downstream subtask owning their key group; order kept within each."""
    if key not in table.column_names:
        raise missing_columns(None, "key_by", [key], table.column_names, f"fix the column name in key_by({key!r})")
    if parallelism == 1:
        return [table]
    kg = key_groups(table.column(key), max_key_groups)
    target = pc.divide(pc.multiply(kg, parallelism), max_key_groups).to_numpy()
    # One stable sort by target, then one gather per part (not a slice: a pickled slice carries every buffer
    # it views): O(rows) whatever the parallelism, where a filter per part is O(rows x parallelism).
    order = np.argsort(target, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(target, minlength=parallelism))])
    return [table.take(pa.array(order[bounds[j]:bounds[j + 1]])) for j in range(parallelism)]


def partition_rebalance(table: pa.Table, parallelism: int) -> list[pa.Table | None]:
    """Contiguous, near-equal slices: deterministic for replay."""
    n = table.num_rows
    bounds = [n * j // parallelism for j in range(parallelism + 1)]
    return [table.slice(bounds[j], bounds[j + 1] - bounds[j]) for j in range(parallelism)]


class TaskRuntime:
    """The steps of one stage in one subtask."""

    def __init__(self, plan: PhysicalPlan, task: TaskId, storage: JobStorage):
        self.plan = plan
        self.task = task
        self.storage = storage
        self.stage = plan.stages[task.stage]
        self.logic: dict[str, OperatorLogic] = {}
        self.sink_writers: dict[str, SinkWriter] = {}
        self._buffers: dict[str, list[pa.Table]] = {}
        self.high_water = 0
        self.event_logic: dict[str, EventTimeLogic] = {}
        self.partitions: list[int] = []
        self._late = 0

    # -------------------------------------------------------------- restore
    def restore(self, manifest: Manifest | None, attempt: str = "f0g0", high_water: int = 0) -> None:
        """Build every step's logic from ``manifest`` (None: empty state).
        ``attempt`` names the files this incarnation writes; epochs up to
        ``high_water`` are in the commit log, so a replay of them
        rebuilds state and leaves the sinks alone."""
        self.attempt = attempt
        self.high_water = high_water
        graph, stage = self.plan.graph, self.stage
        owned = key_group_range(self.task.subtask, stage.parallelism, self.plan.max_key_groups)
        self.logic, self.sink_writers, self.event_logic = {}, {}, {}
        self.partitions = self.plan.source_partitions(self.task) if stage.source is not None else []
        watermark = stage_watermark(manifest.watermarks, stage.id) if stage.source is None and manifest else None
        for step_id in stage.steps:
            step = graph.steps[step_id]
            budget = step.state_budget_mb or graph.state_budget_mb
            context = OperatorContext(step_id, self.task.subtask, stage.parallelism, self.plan.max_key_groups,
                                      watermark, budget * 2**20)
            if step.source is not None:
                self._user_call(step_id, "source", step.source.bind, self.storage, step_id)
            if step.sink is not None:
                self.sink_writers[step_id] = step.sink.open(
                    SinkContext(step_id, self.task.subtask, stage.parallelism, self.plan.job, attempt,
                                self.storage.on_wait)
                )
                continue
            operator = step.operator or Identity()
            restored = None
            if step.kind == "event_time":
                record = manifest.event_time.get(step_id) if manifest else None
                restored = restored_marks(record, self.partitions, self.task.subtask, stage.parallelism)
            if operator.stateful:
                step_map = manifest.state.get(step_id, {}) if manifest else {}
                chains = {kg: chain for kg, chain in step_map.items() if int(kg) in owned}
                if manifest is not None:  # lazily: a key group's runs are fetched when an epoch first needs them
                    files = StateFiles(self.storage, manifest.files)
                    files.check_present(chains)
                    restored = RestoredState({int(kg): chain for kg, chain in chains.items()}, files)
            self.logic[step_id] = self._user_call(step_id, operator.kind, operator.build, context, restored)
            if isinstance(self.logic[step_id], EventTimeLogic):
                self.event_logic[step_id] = self.logic[step_id]
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self._buffers = {s: [] for s in self.sink_writers}
        self._exchange_buffers: dict[Exchange, list[pa.Table]] = {x: [] for x in self.stage.exchanges}

    # ------------------------------------------------------------- process
    def _user_call(self, step_id: str, kind: str, fn, *args):
        try:
            return fn(*args)
        except FlowValidationError as exc:  # the flow does not fit its data: no replay helps
            raise FlowValidationError(exc.step or step_id, exc.kind or kind, exc.problem) from None
        except (StorageError, CorruptCheckpointError):  # checkpoint storage (retried), or state it holds
            raise
        except Exception as exc:  # noqa: BLE001 - carried to the coordinator with the user's traceback
            raise UserCodeError.from_exception(step_id, kind, exc, self.plan.graph.steps[step_id].defined_at) from None

    def _emit(self, step_id: str, table: pa.Table | None, port: str = "main") -> None:
        """Send ``table`` to the children of ``step_id`` that read ``port``:
        its output (``main``), or a side output (the source's ``dead_letters``,
        a window's ``late`` events), which only the steps made for it get."""
        if table is None or table.num_rows == 0:
            return
        for child in self.stage.children[step_id]:
            if SIDE_PORTS.get(self.plan.graph.steps[child].kind, "main") != port:
                continue
            if child in self.sink_writers:
                self._buffers[child].append(table)
            else:
                self._push(child, table)
        for exchange in self.stage.exchanges:
            if exchange.from_step == step_id and port == "main":
                self._exchange_buffers[exchange].append(table)

    def _deliver(self, step_id: str, result) -> None:
        if isinstance(result, Outputs):
            self._emit(step_id, result.main)
            for port, table in result.side.items():
                if port == "late":
                    self._late += table.num_rows
                self._emit(step_id, table, port)
        else:
            self._emit(step_id, result)

    def _push(self, step_id: str, table: pa.Table) -> None:
        kind = self.plan.graph.steps[step_id].kind
        self._deliver(step_id, self._user_call(step_id, kind, self.logic[step_id].process, table))

    def _watermarks(self, barrier: Barrier, source: SourceEpoch | None) -> dict[str, tuple[int | None, bool]]:
        """Each step's watermark (and idleness): an event-time step's own, or
        its upstream's in the chain, or the one the aligned barrier brought."""
        marks: dict[str, tuple[int | None, bool]] = {}
        for step_id in self.stage.steps:
            logic = self.event_logic.get(step_id)
            if logic is not None and source is not None:
                marks[step_id] = logic.advance(source, self.partitions)
            else:
                upstream = self.plan.graph.steps[step_id].upstream
                marks[step_id] = marks.get(upstream, (barrier.watermark, barrier.idle))
        return marks

    def process_epoch(self, epoch: int, barrier: Barrier, inputs: list[pa.Table | None], rows_in: int,
                      dead_letters: pa.Table | None = None, partitions: list[int] | None = None,
                      source: SourceEpoch | None = None, ports: list[int] | None = None) -> EpochOutput:
        """Run one epoch's input (and, in a source task, the source's dead
        letters) through the chain and fire end-of-epoch hooks with each
        step's watermark. A source task with event time passes each
        partition's table (``partitions``) on its own, so the event-time
        step knows where each row came from, and what the plan says about
        the partitions (``source``). A stage with two inputs (a join) gives
        its first step each input's rows at once (``ports``: the input of
        each table), so the step sees the whole epoch of both sides.
        Returns what to send downstream; call :meth:`finish_epoch` after sending."""
        started = time.time()
        self._late = 0
        root = self.stage.steps[0]
        if len(self.stage.inputs) > 1:
            by_port = [[t for t, p in zip(inputs, ports) if p == port] for port in range(len(self.stage.inputs))]
            kind = self.plan.graph.steps[root].kind
            self._deliver(root, self._user_call(root, kind, self.logic[root].process_inputs,
                                                [concat(tables) for tables in by_port]))
            batches = []
        elif self.event_logic and partitions is not None:
            for logic in self.event_logic.values():
                logic.planned_at = source.planned_at
            batches = list(zip(partitions, inputs))
        else:
            batches = [(None, concat(inputs))]
        for partition, table in batches:
            if table is None or table.num_rows == 0:
                continue
            for logic in self.event_logic.values():
                logic.partition = partition
            if root in self.sink_writers:
                self._buffers[root].append(table)
            else:
                self._push(root, table)
        if dead_letters is not None:
            self._emit(root, dead_letters, "dead_letters")
        marks = self._watermarks(barrier, source)
        for step_id in self.stage.steps:
            logic = self.logic.get(step_id)
            if logic is not None:
                kind = self.plan.graph.steps[step_id].kind
                self._deliver(step_id, self._user_call(step_id, kind, logic.on_epoch_end, epoch, marks[step_id][0]))
        if self.event_logic:
            watermark = min_watermark([marks[s][0] for s in self.event_logic])[0]
        else:
            watermark = barrier.watermark
        out: dict[Exchange, list[pa.Table | None]] = {}
        for exchange, tables in self._exchange_buffers.items():
            n = self.plan.stages[exchange.to_stage].parallelism
            data = concat(tables)
            if data is None:
                out[exchange] = [None] * n
            elif exchange.key is None:
                out[exchange] = partition_rebalance(data, n)
            else:
                out[exchange] = self._user_call(
                    exchange.to_stage, "key_by", partition_by_key, data, exchange.key, n, self.plan.max_key_groups
                )
            tables.clear()
        barriers = {x: marks[x.from_step] for x in self.stage.exchanges}
        return EpochOutput(epoch, out, rows_in, started, barriers, watermark, self._late)

    def finish_epoch(self, epoch: int, barrier: Barrier) -> EpochResult:
        """Pre-commit sink output, and snapshot state at a checkpoint epoch."""
        result = EpochResult()
        for step_id, writer in self.sink_writers.items():
            table = concat(self._buffers[step_id])
            self._buffers[step_id] = []
            if epoch <= self.high_water:  # committed before: the coordinator committed it again
                continue
            result.sink_handles[step_id] = self._user_call(step_id, "sink", writer.precommit, epoch, table)
            result.rows_out += 0 if table is None else table.num_rows
        if barrier.checkpoint:
            t0 = time.time()
            for step_id, logic in self.logic.items():
                # incremental: what changed since the last checkpoint (a store's new run, or key groups whole);
                # a savepoint writes every group whole, so it never depends on files retention may delete
                changes = self._user_call(step_id, "snapshot", logic.snapshot_changes, barrier.savepoint)
                if changes is None:
                    continue
                for compacted, tables in ((False, changes.runs), (True, changes.compacted)):
                    if tables:
                        attempt = self.attempt + ("c" if compacted else "")
                        entry = write_key_groups(self.storage, epoch, step_id, self.task.subtask, attempt, tables)
                        result.state_files.append(entry)
                        logic.state_written(entry["path"], entry["key_groups"], compacted)
                result.state[step_id] = {str(kg): chain for kg, chain in sorted(logic.state_chains().items())}
                result.state_memory[step_id] = logic.state_memory()
            result.event_time = {s: logic.marks(self.partitions) for s, logic in self.event_logic.items()}
            result.snapshot_s = time.time() - t0
        return result

    # ------------------------------------------------------------- sources
    def read_source(self, ranges: dict[int, tuple[int, int]]) -> SourceInput:
        """Read this task's partitions' planned ranges, in partition order."""
        step_id = self.stage.source
        source = self.plan.graph.steps[step_id].source
        read = SourceInput([], 0, None)
        dead = []
        for partition in self.plan.source_partitions(self.task):
            start, stop = ranges.get(partition, (0, 0))
            if stop > start:
                table, bad = self._user_call(step_id, "source", source.read_batch, partition, start, stop)
                read.tables.append(table)
                read.partitions.append(partition)
                read.rows += table.num_rows
                if bad is not None and bad.num_rows:
                    dead.append(bad)
        if dead:
            read.dead_letters = pa.concat_tables(dead)
        return read

