"""The Dataflow builder and the Stream methods users write jobs with.

Every method checks its arguments when the flow is built, not when it runs.
The examples below run on :func:`sluiceway.jobs.testing.run_local`, the
in-process runner for tests; ``sluiceway.jobs.run`` runs the same flow on Ray.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable

import pyarrow as pa

from sluiceway.checkpoint.types import DEFAULT_MAX_KEY_GROUPS
from sluiceway.cluster.graph import JobGraph, Step
from sluiceway.operators.aggregate import Aggregate
from sluiceway.operators.cep import Match, Pattern
from sluiceway.operators.errors import FlowDefinitionError
from sluiceway.operators.event_time import DEFAULT_IDLE_TIMEOUT, EventTime
from sluiceway.operators.joins import Enrich, TableJoin, VersionedEnrich, WindowJoin
from sluiceway.operators.search import Range, Search
from sluiceway.operators.tables import Dedupe, ToTable
from sluiceway.operators.windows import Hopping, Tumbling, Window
from sluiceway.operators.sinks import Sink
from sluiceway.operators.sources import Source
from sluiceway.operators.stateless import Filter, MapBatches, MapRecords
from sluiceway.operators.store import DEFAULT_STATE_BUDGET_MB


def _check_budget(megabytes) -> None:
    if not isinstance(megabytes, int) or isinstance(megabytes, bool) or megabytes < 1:
        raise FlowDefinitionError(f"state_budget_mb must be a positive number of MiB, got {megabytes!r}")


def _check_parallelism(parallelism) -> None:
    if parallelism is not None and (not isinstance(parallelism, int) or parallelism < 1):
        raise FlowDefinitionError(f"parallelism must be a positive integer or None, got {parallelism!r}")


class Dataflow:
    """A named streaming job: sources, the steps between them, sinks.

    >>> flow = Dataflow("clicks")
    >>> flow.name
    'clicks'
    """

    def __init__(self, name: str, *, parallelism: int | None = None, max_key_groups: int = DEFAULT_MAX_KEY_GROUPS,
                 state_budget_mb: int = DEFAULT_STATE_BUDGET_MB):
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
            raise FlowDefinitionError(f"flow name {name!r} must be letters, digits, '-' or '_' (it names a folder)")
        _check_parallelism(parallelism)
        if not isinstance(max_key_groups, int) or not 1 <= max_key_groups < 2**16:
            raise FlowDefinitionError(f"max_key_groups must be an integer from 1 to 65535, got {max_key_groups!r}")
        _check_budget(state_budget_mb)
        self.name = name
        self.graph = JobGraph(name, max_key_groups=max_key_groups, parallelism=parallelism,
                              state_budget_mb=state_budget_mb)

    def __repr__(self) -> str:
        return f"Dataflow({self.name!r}, steps={list(self.graph.steps)})"

    def _step_id(self, name: str | None) -> str | None:
        """A step's given name, checked; ``None`` lets the graph derive one
        that stays the same when steps are added before it
        (:func:`sluiceway.cluster.graph.derived_id`)."""
        if name is not None:
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise FlowDefinitionError(f"step name {name!r} must be a non-empty string without '/' (it names a "
                                          "folder)")
        return name

    def renamed(self, old: str, new: str) -> "Dataflow":
        """Declare that step ``new`` is the step a checkpoint knows as
        ``old``: a restore gives it that step's state (or a source's read
        position). Needed when a step's id changed: a name given or changed,
        or an unnamed step whose source or keyed step upstream changed.
        ``sluiceway checkpoints show`` and the refusal of a restore name
        the old ids. Keep the declaration until a checkpoint was taken with
        the new id.

        >>> flow = Dataflow("renamed")
        >>> flow.renamed("aggregate_3", "totals").graph.renamed
        {'aggregate_3': 'totals'}
        """
        for what, step in (("old", old), ("new", new)):
            if not isinstance(step, str) or not step:
                raise FlowDefinitionError(f"renamed() needs the {what} step id as text, got {step!r}")
        if old in self.graph.renamed and self.graph.renamed[old] != new:
            raise FlowDefinitionError(f"step {old!r} is already declared renamed to {self.graph.renamed[old]!r}")
        self.graph.renamed[old] = new
        return self

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
        step = self.graph.add(Step(self._step_id(name), "source", None, parallelism, source=source))
        return Stream(self, step.id)


class Stream:
    """A stream of Arrow batches leaving one step. A stream may feed several
    steps and sinks (fan-out): each receives every batch."""

    def __init__(self, flow: Dataflow, step_id: str):
        self.flow = flow
        self.step_id = step_id

    def __repr__(self) -> str:
        return f"Stream({self.flow.name!r}, {self.step_id!r})"

    def state_budget(self, megabytes: int) -> "Stream":
        """Keep at most ``megabytes`` MiB of this step's state in memory per
        task (the flow's ``state_budget_mb`` otherwise, 512 by default); the
        rest stays on the node's local disk, memory-mapped.

        >>> from sluiceway.operators.sources import ListSource
        >>> flow = Dataflow("b")
        >>> totals = flow.source(ListSource([{"k": 1}])).key_by("k").aggregate([([], "count_all")]).state_budget(64)
        >>> flow.graph.steps[totals.step_id].state_budget_mb
        64
        """
        step = self.flow.graph.steps[self.step_id]
        if step.operator is None or not step.operator.stateful:
            raise FlowDefinitionError(f"state_budget() follows a step that keeps state; {self.step_id!r} keeps none")
        _check_budget(megabytes)
        step.state_budget_mb = megabytes
        return self

    def _then(self, kind, operator, name, parallelism=None, cls=None) -> "Stream":
        _check_parallelism(parallelism)
        step = self.flow.graph.add(
            Step(self.flow._step_id(name), kind, self.step_id, parallelism, operator=operator)
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
            Step(self.flow._step_id(name), "key_by", self.step_id, parallelism, key=column)
        )
        return KeyedStream(self.flow, step.id, column)

    def _check_event_time_place(self, what: str) -> None:
        step = self.flow.graph.steps[self.step_id]
        while step is not None:
            if step.kind in ("key_by", "aggregate", "window", "event_time", "table", "dedupe", "enrich", "window_join",
                             "table_join", "match", "search", "versioned_enrich"):
                raise FlowDefinitionError(
                    f"{what} must come before key_by, windows and aggregates, on the source's stream "
                    f"(it follows a {step.kind} step {step.id!r}): watermarks are tracked per source partition"
                )
            step = self.flow.graph.steps.get(step.upstream) if step.upstream else None

    def with_event_time(self, column: str, *, max_out_of_orderness: timedelta = timedelta(0),
                        idle_timeout: timedelta = DEFAULT_IDLE_TIMEOUT, name: str | None = None) -> "Stream":
        """Declare the column (a timestamp) saying when each event happened.
        Each source partition's watermark is its largest event time minus
        ``max_out_of_orderness``; a partition with nothing to read for
        ``idle_timeout`` stops holding the watermark back; a bounded source
        read to its end lets every window close. Call it on the source's
        stream (maps and filters may come first), before ``key_by``.

        >>> from datetime import datetime, timedelta, timezone
        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.operators.windows import Tumbling
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        >>> rows = [{"user": "a", "ts": t0 + timedelta(seconds=s)} for s in (1, 3, 12)]
        >>> flow, out = Dataflow("doc_event_time"), CollectSink()
        >>> (flow.source(ListSource(rows)).with_event_time("ts", max_out_of_orderness=timedelta(seconds=5))
        ...      .key_by("user").window(Tumbling(timedelta(seconds=10))).aggregate([([], "count_all")]).sink(out))
        >>> epochs = run_local(flow)
        >>> [(r["window_start"].second, r["count_all"]) for r in out.rows()]
        [(0, 2), (10, 1)]
        """
        self._check_event_time_place("with_event_time")
        operator = EventTime(column, max_out_of_orderness=max_out_of_orderness, idle_timeout=idle_timeout)
        return self._then("event_time", operator, name)

    def with_ingestion_time(self, column: str = "ingested_at", *, name: str | None = None) -> "Stream":
        """Stamp each row with the time its epoch was planned (``column``, a
        UTC timestamp) and use it as event time: "processing time" windows
        that a replay rebuilds exactly, since the offsets log keeps the time."""
        self._check_event_time_place("with_ingestion_time")
        if not isinstance(column, str) or not column:
            raise FlowDefinitionError(f"with_ingestion_time needs a column name, got {column!r}")
        return self._then("event_time", EventTime(None, ingestion_column=column), name)

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

    def _event_time_column(self, what: str) -> str:
        event_time = self.flow.graph.upstream_event_time(self.step_id)
        if event_time is None:
            raise FlowDefinitionError(
                f"{what} needs event time: call with_event_time(column, ...) or with_ingestion_time() "
                f"on the source's stream of {self.step_id!r}, before key_by"
            )
        return event_time.operator.column

    def to_table(self, key: str, *, updates: str = "upsert", parallelism: int | None = None,
                 name: str | None = None) -> "Table":
        """The latest row per ``key`` of this changelog (rows with ``_op`` =
        ``insert``/``update``/``delete``; a row without one is an upsert),
        kept as keyed state; the result is the table's own changelog: one
        row per key an epoch changed, ``_op`` = ``insert``, ``update`` (new
        values) or ``delete`` (the last values). ``updates="retract"``
        emits an update as the old row's ``delete`` then the new row's
        ``insert``. A key's changes within an epoch apply in the order they
        came, so only the last shows.

        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> flow, out = Dataflow("doc_to_table"), CollectSink()
        >>> changes = [{"id": 1, "v": "a", "_op": "insert"}, {"id": 2, "v": "b", "_op": "insert"},
        ...            {"id": 1, "v": "c", "_op": "update"}, {"id": 2, "v": None, "_op": "delete"}]
        >>> flow.source(ListSource(changes)).to_table("id").sink(out)
        >>> epochs = run_local(flow, max_records_per_epoch=2)
        >>> [(r["id"], r["v"], r["_op"]) for r in out.rows()]
        [(1, 'a', 'insert'), (2, 'b', 'insert'), (1, 'c', 'update'), (2, 'b', 'delete')]
        """
        keyed = self.key_by(key, parallelism=parallelism)
        step = keyed._then("table", ToTable(key, updates), name)
        return Table(self.flow, step.step_id, key, retract=updates == "retract")

    def dedupe(self, columns, *, within: timedelta, parallelism: int | None = None,
               name: str | None = None) -> "WithLate":
        """Drop repeats: an event is dropped when an event with the same id
        (``columns``, a name or a list) was kept at most ``within`` of event
        time away from it. An id is forgotten once the watermark passes its
        latest kept event's time plus ``within``, so state holds only recent
        ids. Events behind the watermark go to ``late()``. Needs event time.

        >>> from datetime import datetime, timedelta, timezone
        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        >>> rows = [{"id": i, "ts": t0 + timedelta(seconds=s)} for i, s in [(1, 0), (2, 1), (1, 2), (1, 30)]]
        >>> flow, out = Dataflow("doc_dedupe"), CollectSink()
        >>> flow.source(ListSource(rows)).with_event_time("ts").dedupe("id", within=timedelta(seconds=10)).sink(out)
        >>> epochs = run_local(flow, max_records_per_epoch=1)
        >>> [(r["id"], r["ts"].second) for r in out.rows()]
        [(1, 0), (2, 1), (1, 30)]
        """
        time_column = self._event_time_column("dedupe")
        op = Dedupe(columns, time_column, within)
        keyed = self.key_by(op.columns[0], parallelism=parallelism)
        return keyed._then("dedupe", op, name, cls=WithLate)

    def enrich(self, table: "Table", *, on: str, how: str = "left", version: str | None = None,
               suffix: str = "_right", parallelism: int | None = None, name: str | None = None) -> "Stream":
        """Join each event with ``table``'s row for its ``on`` column (the
        table's key). ``how="left"`` keeps events without a row (the table's
        columns null), ``how="inner"`` drops them. Within an epoch the
        table's changes apply first, then the epoch's events are looked up:
        an event sees the changes planned into its own epoch, so a replay
        gives the same answer. The table's watermark does not hold the
        stream's back.

        With ``version`` (the table's column saying from when each row is
        valid), each event gets the row *as it was at the event's time*: of
        the table's changes, each a version of its key from its ``version``
        time (a delete ends the row from its own), the latest starting at
        or before the event. The table must come from ``to_table`` over a
        stream with event time; an event waits until the watermark of both
        passes it, so the answer depends on no epoch, and events behind the
        watermark go to ``late()``.

        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> flow, out = Dataflow("doc_enrich"), CollectSink()
        >>> customers = flow.source(ListSource([{"id": 1, "name": "ann"}])).to_table("id")
        >>> orders = flow.source(ListSource([{"customer": 1, "total": 9}, {"customer": 2, "total": 4}]))
        >>> orders.enrich(customers, on="customer").sink(out)
        >>> epochs = run_local(flow)
        >>> out.rows()
        [{'customer': 1, 'total': 9, 'name': 'ann'}, {'customer': 2, 'total': 4, 'name': None}]
        """
        if not isinstance(table, Table):
            raise FlowDefinitionError(
                f"enrich needs a table (stream.to_table(key) or an aggregate), got {type(table).__name__}"
            )
        if table.flow is not self.flow:
            raise FlowDefinitionError("enrich joins a table of the same flow")
        _check_parallelism(parallelism)
        if version is not None:  # the table's own changes are its versions: read what to_table reads
            steps = self.flow.graph.steps
            made = steps[table.step_id]
            if made.kind != "table":
                raise FlowDefinitionError(f"enrich(version=...) needs a table made with stream.to_table(key); "
                                          f"{table.step_id!r} is a {made.kind} step")
            changes = steps[steps[made.upstream].upstream]
            Stream(self.flow, changes.id)._event_time_column("enrich(version=...)")
            op = VersionedEnrich(on, table.key, version, self._event_time_column("enrich(version=...)"), how, suffix)
            step = self.flow.graph.add(Step(self.flow._step_id(name), "versioned_enrich", self.step_id,
                                            parallelism, operator=op, key=on, right=changes.id,
                                            right_key=table.key))
            return WithLate(self.flow, step.id)
        op = Enrich(on, table.key, how, suffix)
        step = self.flow.graph.add(Step(self.flow._step_id(name), "enrich", self.step_id, parallelism,
                                        operator=op, key=on, right=table.step_id, right_key=table.key,
                                        right_timed=False))
        return Stream(self.flow, step.id)

    def search(self, queries: "Table", *, equal: dict[str, str], ranges=(), parallelism: int | None = None,
               name: str | None = None) -> "Stream":
        """Standing queries: match every event against the rows of ``queries``
        (a table of queries keyed by their id, so they can be added, changed
        and removed while the job runs) and emit one row per match: the
        event's columns and the query's id. ``equal`` maps event columns to
        query columns that must be equal; ``ranges`` are ``(event column,
        op, query column)`` with op ``<=``, ``<``, ``>=`` or ``>``
        (``("price", "<=", "max_price")``). A null in a query's column
        matches any event, except in the first ``equal`` attribute, which
        every query must set: events and queries are partitioned by it. The
        queries are indexed (by equality values, then by the first range's
        bound), so an event is not tested against every query. Within an
        epoch, query changes apply first.

        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> flow, out = Dataflow("doc_search"), CollectSink()
        >>> alerts = flow.source(ListSource([{"alert": 1, "area": "soho", "max_price": 500, "min_rooms": 2},
        ...                                  {"alert": 2, "area": "soho", "max_price": None, "min_rooms": 4}]))
        >>> listings = flow.source(ListSource([{"listing": 10, "area": "soho", "price": 450, "rooms": 3},
        ...                                    {"listing": 11, "area": "soho", "price": 900, "rooms": 5}]))
        >>> listings.search(alerts.to_table("alert", updates="retract"), equal={"area": "area"},
        ...                 ranges=[("price", "<=", "max_price"), ("rooms", ">=", "min_rooms")]).sink(out)
        >>> epochs = run_local(flow)
        >>> [(r["listing"], r["alert"]) for r in out.rows()]
        [(10, 1), (11, 2)]
        """
        if not isinstance(queries, Table) or queries.flow is not self.flow:
            raise FlowDefinitionError("search needs a table of queries of the same flow (stream.to_table(id))")
        if not isinstance(equal, dict):
            raise FlowDefinitionError(f"search(equal=...) maps event columns to query columns, got {equal!r}")
        parsed = []
        for r in ranges:
            if isinstance(r, Range):
                parsed.append(r)
            elif isinstance(r, (tuple, list)) and len(r) == 3:
                parsed.append(Range(*r))
            else:
                raise FlowDefinitionError(f"search ranges are (event column, op, query column), got {r!r}")
        op = Search(queries.key, equal, parsed)
        event_column, query_column = op.partition
        queries._check_partitioned_on(query_column, "the queries are")
        _check_parallelism(parallelism)
        step = self.flow.graph.add(Step(self.flow._step_id(name), "search", self.step_id, parallelism,
                                        operator=op, key=event_column, right=queries.step_id, right_key=query_column,
                                        right_timed=False))
        return Stream(self.flow, step.id)

    def join(self, other: "Stream", *, on: str, within: timedelta, right_on: str | None = None,
             how: str = "inner", suffix: str = "_right", parallelism: int | None = None,
             name: str | None = None) -> "WithLate":
        """Window join: each pair of an event here and one of ``other`` with
        equal keys (``on``; ``right_on`` if the other side names it
        differently) whose event times are at most ``within`` apart. Each
        side keeps its events until the watermark passes their time plus
        ``within``; then ``how="left"`` emits a left event that never paired
        (the right columns null), ``how="outer"`` one of either side.
        Right columns named like left ones get ``suffix``. Events behind
        the watermark go to ``late()``. Both sides need event time.

        >>> from datetime import datetime, timedelta, timezone
        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        >>> flow, out = Dataflow("doc_join"), CollectSink()
        >>> searches = flow.source(ListSource([{"sid": 1, "ts": t0, "q": "cats"}, {"sid": 2, "ts": t0, "q": "dogs"}]))
        >>> clicks = flow.source(ListSource([{"sid": 1, "ts": t0 + timedelta(minutes=5)}]))
        >>> (searches.with_event_time("ts").join(clicks.with_event_time("ts"), on="sid", within=timedelta(hours=1),
        ...                                        how="left").sink(out))
        >>> epochs = run_local(flow)
        >>> [(r["q"], r["ts_right"] is not None) for r in out.rows()]
        [('cats', True), ('dogs', False)]
        """
        if not isinstance(other, Stream) or other.flow is not self.flow:
            raise FlowDefinitionError("join needs another stream of the same flow")
        _check_parallelism(parallelism)
        right_on = right_on or on
        op = WindowJoin(on, right_on, self._event_time_column("join"), other._event_time_column("join"), within,
                        how, suffix)
        step = self.flow.graph.add(Step(self.flow._step_id(name), "window_join", self.step_id, parallelism,
                                        operator=op, key=on, right=other.step_id, right_key=right_on))
        return WithLate(self.flow, step.id)

    def sink(self, sink: Sink, *, name: str | None = None) -> None:
        """Write the stream to ``sink``, exactly once."""
        if not isinstance(sink, Sink):
            raise FlowDefinitionError(f"stream.sink needs a sluiceway sink (ParquetSink, ...), got {type(sink).__name__}")
        self.flow.graph.add(Step(self.flow._step_id(name), "sink", self.step_id, sink=sink))


class KeyedStream(Stream):
    """A stream partitioned by a key column."""

    def __init__(self, flow: Dataflow, step_id: str, key: str):
        super().__init__(flow, step_id)
        self.key = key

    def aggregate(self, pairs, *, name: str | None = None) -> "Table":
        """Running aggregates per key, as ``pyarrow.TableGroupBy.aggregate``
        takes them (count, count_all, sum, min, max, mean). Each epoch emits
        the updated rows of the keys it touched: an upsert changelog, so the
        result is a :class:`Table` to enrich with.

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
        step = self._then("aggregate", Aggregate(self.key, pairs), name)
        return Table(self.flow, step.step_id, self.key)

    def match(self, pattern: Pattern, *, within: timedelta | None = None, name: str | None = None) -> "WithLate":
        """Complex event processing: the matches of ``pattern`` (see
        :class:`~sluiceway.operators.cep.Pattern`) per key, in event-time
        order, each match's events at most ``within`` apart from its first
        to its last (``not_followed_by`` has its own bound); one row per
        matched event with ``match_start``, ``match_end`` and
        ``match_step``. A match is emitted once the watermark passes its
        last event (or its negation's bound); matches never share events.
        Events behind the watermark go to ``late()``. Needs event time.

        >>> from datetime import datetime, timedelta, timezone
        >>> import pyarrow.compute as pc
        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        >>> pays = [{"card": 7, "status": s, "ts": t0 + timedelta(minutes=m)}
        ...         for m, s in enumerate(["declined", "declined", "declined", "approved"])]
        >>> fraud = (Pattern.begin("declined", pc.field("status") == "declined", times=3)
        ...                 .then("approved", pc.field("status") == "approved"))
        >>> flow, out = Dataflow("doc_match"), CollectSink()
        >>> (flow.source(ListSource(pays)).with_event_time("ts").key_by("card")
        ...      .match(fraud, within=timedelta(minutes=5)).sink(out))
        >>> epochs = run_local(flow)
        >>> [(r["ts"].minute, r["match_step"]) for r in out.rows()]
        [(0, 'declined'), (1, 'declined'), (2, 'declined'), (3, 'approved')]
        """
        time_column = self._event_time_column("match")
        return self._then("match", Match(self.key, time_column, pattern, within), name, cls=WithLate)

    def window(self, spec, *, allowed_lateness: timedelta = timedelta(0), emit: str = "final") -> "WindowedStream":
        """Event-time windows per key: ``Tumbling(size)``, ``Hopping(size, hop)``,
        ``Sliding(size)`` or ``Session(gap)`` from
        :mod:`sluiceway.operators.windows`; reduce them with ``aggregate``,
        ``reduce`` or ``fold``. A window fires when the watermark passes its end
        plus ``allowed_lateness`` (``emit="final"``), or emits its current
        result every epoch it changes (``emit="updates"``); events after it
        fired go to ``late()``. Needs ``with_event_time`` upstream.
        """
        return WindowedStream(self, self._event_time_column("window"), spec, allowed_lateness, emit)

    def rolling_mean(self, column: str, size: timedelta, hop: timedelta, *, name: str | None = None) -> "WindowResult":
        """The mean of ``column`` over the last ``size``, every ``hop``: a hopping window's mean per key."""
        return self.window(Hopping(size, hop)).aggregate([(column, "mean")], name=name)

    def event_rate(self, size: timedelta, *, name: str | None = None) -> "WindowResult":
        """Events per key in tumbling windows of ``size``: ``count_all`` and ``events_per_s``."""
        return self.window(Tumbling(size))._add(dict(aggregate=[([], "count_all")], rate=True), name)


class WithLate(Stream):
    """A stream with a side stream of the events that came too late for it."""

    def late(self, *, name: str | None = None) -> Stream:
        """The events that arrived behind the watermark, as they came in:
        sink them like any stream. Counted per epoch in the job's metrics (``late``)."""
        return self._then("late", None, name)


class WindowedStream:
    """A keyed stream cut into windows, waiting for how to reduce them."""

    def __init__(self, keyed: KeyedStream, time_column: str, spec, allowed_lateness: timedelta, emit: str):
        self.keyed, self.time_column, self.spec = keyed, time_column, spec
        self.allowed_lateness, self.emit = allowed_lateness, emit
        self.result: WindowResult | None = None

    def _add(self, how: dict, name: str | None) -> "WindowResult":
        if self.result is not None:
            raise FlowDefinitionError("this window already has a reducer; call window(...) again for another")
        op = Window(self.keyed.key, self.time_column, self.spec, allowed_lateness=self.allowed_lateness,
                    emit=self.emit, **how)
        self.result = self.keyed._then("window", op, name, cls=WindowResult)
        return self.result

    def aggregate(self, pairs, *, name: str | None = None) -> "WindowResult":
        """Aggregates per key and window, as ``pyarrow.TableGroupBy.aggregate``
        takes them (count, count_all, sum, min, max, mean): the key,
        ``window_start``, ``window_end`` and ``<column>_<function>`` columns."""
        return self._add({"aggregate": pairs}, name)

    def reduce(self, fn: Callable[[pa.Table], dict], *, name: str | None = None) -> "WindowResult":
        """``fn(rows)`` once per key and window, with the window's events (a
        pyarrow Table in event-time order): a dict of output columns, a list
        of them, or a table."""
        return self._add({"reduce": fn}, name)

    def fold(self, init, fn: Callable[[dict, dict], dict], *, name: str | None = None) -> "WindowResult":
        """``acc = fn(acc, record)`` over each window's events in event-time
        order, from ``init`` (a dict, or a function returning one); the final
        ``acc`` is the window's row. The per-record slow path."""
        return self._add({"fold": (init, fn)}, name)

    def late(self, *, name: str | None = None) -> Stream:
        """The events that came after their window fired (see :meth:`WindowResult.late`)."""
        if self.result is None:
            raise FlowDefinitionError("late() follows the window's reducer: call aggregate/reduce/fold first")
        return self.result.late(name=name)


class WindowResult(WithLate):
    """What a window emits; :meth:`late` is its side stream of late events."""

    def late(self, *, name: str | None = None) -> Stream:
        """Events that arrived after a window they belong to had fired (and
        events without an event time), as they came in: sink them like any
        stream. Counted per epoch in the job's metrics (``late``).

        >>> from datetime import datetime, timedelta, timezone
        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.operators.windows import Tumbling
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        >>> rows = [{"k": "a", "ts": t0 + timedelta(seconds=s)} for s in (1, 15, 2)]  # 2 comes after 15
        >>> flow, out, late = Dataflow("doc_late"), CollectSink(), CollectSink()
        >>> windows = (flow.source(ListSource(rows)).with_event_time("ts").key_by("k")
        ...                .window(Tumbling(timedelta(seconds=10))).aggregate([([], "count_all")]))
        >>> windows.sink(out)
        >>> windows.late().sink(late)
        >>> epochs = run_local(flow, max_records_per_epoch=1)
        >>> [r["count_all"] for r in out.rows()], [r["ts"].second for r in late.rows()]
        ([1, 1], [2])
        """
        return super().late(name=name)


class Table(Stream):
    """A changelog stream with a key: the latest row per key is the table.
    ``stream.to_table(key)`` and keyed aggregates make one; enrich a stream
    with it, join it with another table, or sink it as a changelog (``_op``
    per row). ``retract``: an update comes as the old row's delete and the
    new row's insert."""

    def __init__(self, flow: Dataflow, step_id: str, key: str, retract: bool = False):
        super().__init__(flow, step_id)
        self.key = key
        self.retract = retract

    def __repr__(self) -> str:
        return f"Table({self.flow.name!r}, {self.step_id!r}, key={self.key!r})"

    def _check_partitioned_on(self, column: str, what: str) -> None:
        """A step partitioning this table by ``column`` (not its key) needs
        updates retracted: a row whose ``column`` changes must be taken out
        in the task that has it."""
        if column != self.key and not self.retract:
            raise FlowDefinitionError(
                f"{what} partitioned by {column!r}, not the key {self.key!r}: make the table with "
                f"to_table({self.key!r}, updates='retract'), so that a row whose {column!r} changes "
                "is taken out where it was"
            )

    def join(self, other: "Table", *, on: str, right_on: str | None = None, suffix: str = "_right",
             parallelism: int | None = None, name: str | None = None) -> Stream:
        """The inner join of two tables on ``on`` (``right_on`` for the other
        table's column), kept up to date as either changes: the changelog of
        the joined view, one row per pair of rows, named by the two rows'
        keys: ``insert`` when a pair enters the view, ``delete`` (last
        values) when it leaves it, ``update`` when one of its rows changed.
        A table joined on a column other than its key must retract its
        updates (``to_table(key, updates="retract")``), so a row whose join
        value changes is taken out where it was.

        >>> from sluiceway.operators.sources import ListSource
        >>> from sluiceway.jobs.testing import run_local, CollectSink
        >>> flow, out = Dataflow("doc_table_join"), CollectSink()
        >>> tweets = flow.source(ListSource([{"tweet": 1, "author": "ann"}, {"tweet": 2, "author": "cy"}]))
        >>> follows = flow.source(ListSource([{"id": "bob>ann", "follower": "bob", "followee": "ann"}]))
        >>> timeline = tweets.to_table("tweet", updates="retract").join(
        ...     follows.to_table("id", updates="retract"), on="author", right_on="followee")
        >>> timeline.sink(out)
        >>> epochs = run_local(flow)
        >>> [(r["tweet"], r["follower"], r["_op"]) for r in out.rows()]
        [(1, 'bob', 'insert')]
        """
        if not isinstance(other, Table) or other.flow is not self.flow:
            raise FlowDefinitionError("table.join needs another table of the same flow (stream.to_table(key))")
        right_on = right_on or on
        for table, column, side in ((self, on, "left"), (other, right_on, "right")):
            if not isinstance(column, str) or not column:
                raise FlowDefinitionError(f"table.join needs the {side} table's join column, got {column!r}")
            table._check_partitioned_on(column, f"the {side} table is")
        _check_parallelism(parallelism)
        op = TableJoin(on, right_on, self.key, other.key, suffix)
        step = self.flow.graph.add(Step(self.flow._step_id(name), "table_join", self.step_id,
                                        parallelism, operator=op, key=on, right=other.step_id, right_key=right_on,
                                        right_timed=False))
        return Stream(self.flow, step.id)
