"""Example job: click-through rate per search query, from a window join.

Two generated streams (2 partitions each, deterministic): *searches*, one
per session (``sid``, ``query``, ``ts``), and *clicks* on the results,
which come late and out of order (up to two hours after the search) and
are sometimes sent twice. The job

1. keeps the clicks (``kind == "click"``) and drops repeats of a click
   (``dedupe("click_id", within=1 minute)``);
2. joins each search with the clicks of its session within an hour
   (``join(..., how="left")``: a search nobody clicked within the hour
   comes out once, with a null click, when the watermark passes it);
3. counts searches and clicked searches per query (a running aggregate, so
   a table) and adds the rate: ``<output>/ctr``, an upsert changelog.

``expected_ctr`` computes the final rates in plain pyarrow over the whole
input, independently of the job.

Run it: ``sluiceway run jobs/examples/search_clicks.py --until-idle``
(output under ``$SLUICEWAY_EXAMPLE_OUTPUT``, default ``./.sluiceway-output``;
``$SLUICEWAY_EXAMPLE_ROWS`` sessions per partition, default 20,000).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.sources import GeneratorSource, offsets

PARTITIONS = 2
ROWS_PER_PARTITION = int(os.environ.get("SLUICEWAY_EXAMPLE_ROWS", "20000"))
ROWS_PER_SECOND = int(os.environ.get("SLUICEWAY_EXAMPLE_RATE", "20000"))
OUTPUT = os.environ.get("SLUICEWAY_EXAMPLE_OUTPUT", ".sluiceway-output")
QUERIES = pa.array([f"query-{i:02d}" for i in range(20)])
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
WITHIN = timedelta(hours=1)
_T0_US = int(T0.timestamp() * 1_000_000)


def _session(partition: int, offset: pa.Array) -> pa.Array:
    return pc.add(pc.multiply(offset, PARTITIONS), partition)


def _session_time(sid: pa.Array) -> pa.Array:
    """Sessions start half a second apart."""
    return pc.add(pc.multiply(sid, 500_000), _T0_US)


def _timestamps(micros: pa.Array) -> pa.Array:
    return pc.cast(micros, pa.timestamp("us", tz="UTC"))


def searches(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Search ``[start, stop)`` of ``partition``: one per session."""
    sid = _session(partition, offsets(start, stop))
    return pa.record_batch({
        "sid": sid,
        "query": pc.take(QUERIES, pc.remainder(pc.multiply(sid, 7), len(QUERIES))),
        "ts": _timestamps(_session_time(sid)),
    })


def clicks(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Rows ``[start, stop)`` of ``partition``: two per session, the click
    (if the session clicks) and a repeat of it for every seventh session,
    or ``kind == "none"``. Clicks come 0 to 2 hours after the search, so the
    stream is out of order by up to two hours; half of them are within the hour."""
    offset = offsets(start, stop)
    sid = _session(partition, pc.divide(offset, 2))
    second = pc.equal(pc.remainder(offset, 2), 1)
    query_index = pc.remainder(pc.multiply(sid, 7), len(QUERIES))
    clicks_at_all = pc.less(pc.remainder(pc.multiply(sid, 31), 100), pc.add(pc.multiply(query_index, 3), 20))
    repeated = pc.equal(pc.remainder(sid, 7), 0)
    is_click = pc.and_(clicks_at_all, pc.or_(pc.invert(second), repeated))
    delay = pc.multiply(pc.remainder(pc.multiply(sid, 7919), 7200), 1_000_000)
    return pa.record_batch({
        "click_id": sid,
        "sid": sid,
        "kind": pc.if_else(is_click, "click", "none"),
        "ts": _timestamps(pc.add(_session_time(sid), delay)),
    })


def add_rate(batch: pa.RecordBatch) -> pa.RecordBatch:
    rate = pc.divide(pc.cast(batch["clicked_sum"], pa.float64()), pc.cast(batch["count_all"], pa.float64()))
    return batch.append_column("ctr", rate)


def clicked(batch: pa.RecordBatch) -> pa.RecordBatch:
    return batch.append_column("clicked", pc.cast(pc.is_valid(batch["click_id"]), pa.int64()))


def build(output: str = OUTPUT, rows_per_partition: int = ROWS_PER_PARTITION,
          rows_per_second: float = ROWS_PER_SECOND) -> Dataflow:
    flow = Dataflow("search_clicks")
    add_to(flow, output, rows_per_partition, rows_per_second)
    return flow


def add_to(flow: Dataflow, output: str, rows_per_partition: int, rows_per_second: float, prefix: str = "") -> None:
    """This job's steps in ``flow`` (step names start with ``prefix``):
    sessions are read at ``rows_per_second / 2`` per partition, both
    streams keeping pace."""
    searched = flow.source(GeneratorSource(searches, PARTITIONS, rows_per_second / 2, rows_per_partition),
                           name=f"{prefix}searches").with_event_time("ts", max_out_of_orderness=timedelta(seconds=5))
    clicked_rows = (flow.source(GeneratorSource(clicks, PARTITIONS, rows_per_second, 2 * rows_per_partition),
                                name=f"{prefix}clicks")
                    .filter(pc.field("kind") == "click", name=f"{prefix}only_clicks")
                    .with_event_time("ts", max_out_of_orderness=timedelta(hours=2)))
    once = clicked_rows.dedupe("click_id", within=timedelta(minutes=1), name=f"{prefix}click_once")
    joined = searched.join(once.map_batches(lambda b: b.drop_columns(["kind"]), name=f"{prefix}click_cols"),
                           on="sid", within=WITHIN, how="left", name=f"{prefix}search_click")
    ctr = (joined.map_batches(clicked, name=f"{prefix}clicked").key_by("query", name=f"{prefix}by_query")
           .aggregate([([], "count_all"), ("clicked", "sum")], name=f"{prefix}per_query")
           .map_batches(add_rate, name=f"{prefix}rate"))
    ctr.sink(ParquetSink(f"{output}/ctr"), name=f"{prefix}ctr_out")


def expected_ctr(rows_per_partition: int = ROWS_PER_PARTITION) -> pa.Table:
    """The final rate per query, in plain pyarrow: a search counts as clicked
    when its session has a click within the hour after it (or before it)."""
    s = pa.Table.from_batches([searches(p, 0, rows_per_partition) for p in range(PARTITIONS)])
    c = pa.Table.from_batches([clicks(p, 0, 2 * rows_per_partition) for p in range(PARTITIONS)])
    c = c.filter(pc.equal(c["kind"], "click"))
    c = c.group_by("sid").aggregate([("ts", "min")])  # a repeat is the same click
    both = s.join(c, "sid", join_type="left outer")
    gap = pc.abs(pc.subtract(pc.cast(both["ts_min"], pa.int64()), pc.cast(both["ts"], pa.int64())))
    hit = pc.fill_null(pc.less_equal(gap, int(WITHIN.total_seconds() * 1_000_000)), False)
    both = both.append_column("clicked", pc.cast(hit, pa.int64()))
    out = both.group_by("query").aggregate([([], "count_all"), ("clicked", "sum")])
    out = out.select(["query", "count_all", "clicked_sum"])
    return pa.Table.from_batches([add_rate(b) for b in out.to_batches()]).sort_by("query")


def final_ctr(changelog: pa.Table) -> pa.Table:
    """The last upsert per query of the committed changelog (rows in epoch order)."""
    indexed = changelog.append_column("__row", pa.array(range(changelog.num_rows), pa.int64()))
    last = indexed.group_by("query").aggregate([("__row", "max")])
    return changelog.take(last["__row_max"]).select(["query", "count_all", "clicked_sum", "ctr"]).sort_by("query")


flow = build()
