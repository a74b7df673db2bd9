"""The Dataflow builder and the Stream methods users write jobs with.

Every method checks its arguments when the flow is built, not when it runs.
The examples below run on :func:`sluiceway.jobs.testing.run_local`, the
in-process runner for tests; ``sluiceway.jobs.run`` runs the same flow on Ray.
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa

from sluiceway.checkpoint.types import DEFAULT_MAX_KEY_GROUPS
from sluiceway.cluster.graph import JobGraph, Step
from sluiceway.operators.aggregate import Aggregate
from sluiceway.operators.errors import FlowDefinitionError
from sluiceway.operators.sinks import Sink
from sluiceway.operators.sources import Source
from sluiceway.operators.stateless import Filter, MapBatches, MapRecords


def _check_parallelism(parallelism) -> None:
    if parallelism is not None and (not isinstance(parallelism, int) or parallelism < 1):
        raise FlowDefinitionError(f"parallelism must be a positive integer or None, got {parallelism!r}")


class Dataflow:
    """A named streaming job: sources, the steps between them, sinks.

    >>> flow = Dataflow("clicks")
    >>> flow.name
    'clicks'
    """

    def __init__(self, name: str, *, parallelism: int | None = None, max_key_groups: int = DEFAULT_MAX_KEY_GROUPS):
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
            raise FlowDefinitionError(f"flow name {name!r} must be letters, digits, '-' or '_' (it names a folder)")
        _check_parallelism(parallelism)
        if not isinstance(max_key_groups, int) or max_key_groups < 1:
            raise FlowDefinitionError(f"max_key_groups must be a positive integer, got {max_key_groups!r}")
        self.name = name
        self.graph = JobGraph(name, max_key_groups=max_key_groups, parallelism=parallelism)
        self._counter = 0

    def __repr__(self) -> str:
        return f"Dataflow({self.name!r}, steps={list(self.graph.steps)})"

    def _step_id(self, kind: str, name: str | None) -> str:
        if name is not None:
            if not isinstance(name, str) or not name or "/" in name:
                raise FlowDefinitionError(f"step name {name!r} must be a non-empty string without '/'")
            return name
        self._counter += 1
        return f"{kind}_{self._counter}"

    def source(self, source: Source, *, parallelism: int | None = None, name: str | None = None) -> "Stream":
        """Read a partitioned source; ``parallelism`` tasks share its partitions.

        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> flow = Dataflow("doc_source")
        >>> out = CollectSink()
        >>> flow.source(ListSource([{"x": 1}, {"x": 2}])).sink(out)
        >>> epochs = run_local(flow)
        >>> out.rows()
        [{'x': 1}, {'x': 2}]
        """
        if not isinstance(source, Source):
            raise FlowDefinitionError(
                f"flow.source needs a sluiceway source (GeneratorSource, ListSource, ...), got {type(source).__name__}"
            )
        _check_parallelism(parallelism)
        step = self.graph.add(Step(self._step_id("source", name), "source", None, parallelism, source=source))
        return Stream(self, step.id)


class Stream:
    """A stream of Arrow batches leaving one step. A stream may feed several
    steps and sinks (fan-out): each receives every batch."""

    def __init__(self, flow: Dataflow, step_id: str):
        self.flow = flow
        self.step_id = step_id

    def __repr__(self) -> str:
        return f"Stream({self.flow.name!r}, {self.step_id!r})"

    def _then(self, kind, operator, name, parallelism=None, cls=None) -> "Stream":
        _check_parallelism(parallelism)
        step = self.flow.graph.add(
            Step(self.flow._step_id(kind, name), kind, self.step_id, parallelism, operator=operator)
        )
        return (cls or Stream)(self.flow, step.id)

    def map_batches(self, fn: Callable[[pa.RecordBatch], pa.RecordBatch], *, name: str | None = None,
                    parallelism: int | None = None) -> "Stream":
        """Apply ``fn`` to every RecordBatch: the fast path.

        >>> import pyarrow.compute as pc
        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> flow, out = Dataflow("doc_map_batches"), CollectSink()
        >>> (flow.source(ListSource([{"x": 1}, {"x": 2}]))
        ...      .map_batches(lambda b: b.append_column("y", pc.multiply(b["x"], 10)))
        ...      .sink(out))
        >>> epochs = run_local(flow)
        >>> out.rows()
        [{'x': 1, 'y': 10}, {'x': 2, 'y': 20}]
        """
        return self._then("map_batches", MapBatches(fn), name, parallelism)

    def filter(self, predicate, *, name: str | None = None) -> "Stream":
        """Keep rows where ``predicate`` holds: a pyarrow compute expression, or
        a function from a batch to a boolean array.

        >>> import pyarrow.compute as pc
        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> flow, out = Dataflow("doc_filter"), CollectSink()
        >>> flow.source(ListSource([{"x": i} for i in range(5)])).filter(pc.field("x") >= 3).sink(out)
        >>> epochs = run_local(flow)
        >>> out.rows()
        [{'x': 3}, {'x': 4}]
        """
        return self._then("filter", Filter(predicate), name)

    def map(self, fn: Callable[[dict], dict | None], *, name: str | None = None) -> "Stream":
        """Apply ``fn`` to every record as a dict (``None`` drops it). Convenient,
        and the slow path: prefer :meth:`map_batches`.

        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> flow, out = Dataflow("doc_map"), CollectSink()
        >>> flow.source(ListSource([{"w": "a"}, {"w": "bb"}])).map(lambda r: {"w": r["w"], "n": len(r["w"])}).sink(out)
        >>> epochs = run_local(flow)
        >>> out.rows()
        [{'w': 'a', 'n': 1}, {'w': 'bb', 'n': 2}]
        """
        return self._then("map", MapRecords(fn), name)

    def key_by(self, column: str, *, parallelism: int | None = None, name: str | None = None) -> "KeyedStream":
        """Repartition by a stable hash of ``column`` into key groups, so all
        rows of a key meet in one task.

        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> flow, out = Dataflow("doc_key_by"), CollectSink()
        >>> flow.source(ListSource([{"k": "a"}, {"k": "b"}, {"k": "a"}])).key_by("k", parallelism=2).sink(out)
        >>> epochs = run_local(flow)
        >>> sorted(r["k"] for r in out.rows())
        ['a', 'a', 'b']
        """
        if not isinstance(column, str) or not column:
            raise FlowDefinitionError(f"key_by needs a column name, got {column!r}")
        _check_parallelism(parallelism)
        step = self.flow.graph.add(
            Step(self.flow._step_id("key_by", name), "key_by", self.step_id, parallelism, key=column)
        )
        return KeyedStream(self.flow, step.id, column)

    def dead_letters(self, *, name: str | None = None) -> "Stream":
        """What this stream's source could not decode (a corrupt file, an
        unreadable log segment), one row per bad input with its location and
        the reason: a stream to sink like any other. Counted per epoch in the
        job's metrics (``dead_letters``). Call it on the stream ``flow.source``
        returns.

        >>> import pyarrow as pa
        >>> from sluiceway.operators.sources import ListSource, dead_letter
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> class Picky(ListSource):
        ...     def read_batch(self, partition, start, stop):
        ...         return self.read(partition, start, stop), dead_letter("picky", partition, start, stop, "-", "no")
        >>> flow, good, bad = Dataflow("doc_dead_letters"), CollectSink(), CollectSink()
        >>> stream = flow.source(Picky([{"x": 1}]))
        >>> stream.sink(good)
        >>> stream.dead_letters().sink(bad)
        >>> epochs = run_local(flow)
        >>> good.rows(), [(r["source"], r["reason"]) for r in bad.rows()]
        ([{'x': 1}], [('picky', 'no')])
        """
        step = self.flow.graph.steps[self.step_id]
        if step.kind != "source":
            raise FlowDefinitionError(
                f"dead_letters() belongs to a source's stream, and {self.step_id!r} is a {step.kind} step: "
                "call it on the stream flow.source(...) returned"
            )
        return self._then("dead_letters", None, name)

    def sink(self, sink: Sink, *, name: str | None = None) -> None:
        """Write the stream to ``sink``, exactly once."""
        if not isinstance(sink, Sink):
            raise FlowDefinitionError(f"stream.sink needs a sluiceway sink (ParquetSink, ...), got {type(sink).__name__}")
        self.flow.graph.add(Step(self.flow._step_id("sink", name), "sink", self.step_id, sink=sink))


class KeyedStream(Stream):
    """A stream partitioned by a key column."""

    def __init__(self, flow: Dataflow, step_id: str, key: str):
        super().__init__(flow, step_id)
        self.key = key

    def aggregate(self, pairs, *, name: str | None = None) -> Stream:
        """Running aggregates per key, as ``pyarrow.TableGroupBy.aggregate``
        takes them (count, count_all, sum, min, max, mean). Each epoch emits
        the updated rows of the keys it touched: an upsert changelog.

        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> flow, out = Dataflow("doc_aggregate"), CollectSink()
        >>> rows = [{"user": "a", "amount": 2}, {"user": "b", "amount": 5}, {"user": "a", "amount": 4}]
        >>> (flow.source(ListSource(rows)).key_by("user")
        ...      .aggregate([("amount", "sum"), ("amount", "mean")]).sink(out))
        >>> epochs = run_local(flow)
        >>> sorted(out.rows(), key=lambda r: r["user"])
        [{'user': 'a', 'amount_sum': 6, 'amount_mean': 3.0}, {'user': 'b', 'amount_sum': 5, 'amount_mean': 5.0}]
        """
        return self._then("aggregate", Aggregate(self.key, pairs), name)
