"""Watermarks without Ray: per partition, the minimum over inputs, idle and
ended partitions, what the plan records, what a checkpoint gives back."""

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from sluiceway.cluster.alignment import Barrier, BarrierAligner, BarrierEvent, min_watermark
from sluiceway.cluster.epochs import EpochPlan, watermark_marks
from sluiceway.cluster.graph import plan
from sluiceway.jobs import Dataflow
from sluiceway.jobs.testing import CollectSink, run_local
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError
from sluiceway.operators.event_time import MAX_WATERMARK, EventTime, SourceEpoch, restored_marks
from sluiceway.operators.sources import ListSource
from sluiceway.operators.windows import Tumbling, to_micros

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def us(seconds: float) -> int:
    return to_micros(T0 + timedelta(seconds=seconds))


def rows(*seconds):
    return pa.table({"ts": pa.array([T0 + timedelta(seconds=s) for s in seconds], pa.timestamp("ms", tz="UTC"))})


def logic(ooo=0, idle_s=30, restored=None):
    op = EventTime("ts", max_out_of_orderness=timedelta(seconds=ooo), idle_timeout=timedelta(seconds=idle_s))
    return op.build(None, restored)


def feed(lg, partition, *seconds):
    lg.partition = partition
    lg.process(rows(*seconds))


def test_partition_watermark_is_largest_event_time_minus_out_of_orderness_and_task_takes_the_minimum():
    lg = logic(ooo=2)
    feed(lg, 0, 10, 30, 20)
    feed(lg, 1, 15)
    epoch = SourceEpoch(100.0, {0: 100.0, 1: 100.0})
    assert lg.advance(epoch, [0, 1]) == (us(13), False)
    feed(lg, 1, 12)  # an older event does not move partition 1 back
    assert lg.advance(epoch, [0, 1]) == (us(13), False)


def test_a_partition_without_data_holds_the_watermark_until_it_is_idle():
    lg = logic(idle_s=5)
    feed(lg, 0, 10)
    assert lg.advance(SourceEpoch(100.0, {0: 100.0, 1: 96.0}), [0, 1]) == (None, False)
    assert lg.advance(SourceEpoch(101.0, {0: 101.0, 1: 96.0}), [0, 1]) == (us(10), False)  # idle for 5 s


def test_a_returning_partition_never_moves_the_watermark_back():
    lg = logic(idle_s=5)
    feed(lg, 0, 50)
    feed(lg, 1, 10)
    assert lg.advance(SourceEpoch(100.0, {0: 100.0, 1: 90.0}), [0, 1]) == (us(50), False)  # 1 is idle
    feed(lg, 1, 11)
    assert lg.advance(SourceEpoch(101.0, {0: 101.0, 1: 101.0}), [0, 1]) == (us(50), False)  # the floor holds


def test_all_idle_says_so_and_ended_partitions_let_everything_close():
    lg = logic(idle_s=1)
    feed(lg, 0, 10)
    lg.advance(SourceEpoch(100.0, {0: 100.0}), [0])
    assert lg.advance(SourceEpoch(200.0, {0: 100.0}), [0]) == (us(10), True)
    assert lg.advance(SourceEpoch(201.0, {0: 100.0}, frozenset({0})), [0]) == (MAX_WATERMARK, False)


def test_ingestion_time_is_the_planned_time():
    op = EventTime(None, ingestion_column="ingested_at")
    lg = op.build(None, None)
    lg.planned_at, lg.partition = 1_700_000_000.5, 0
    out = lg.process(pa.table({"x": [1, 2]}))
    assert out.column("ingested_at").to_pylist()[0].timestamp() == 1_700_000_000.5
    assert lg.advance(SourceEpoch(1_700_000_000.5, {0: 0.0}), [0]) == (1_700_000_000_500_000, False)


def test_marks_round_trip_through_a_checkpoint_record():
    lg = logic()
    feed(lg, 0, 10)
    feed(lg, 2, 20)
    lg.advance(SourceEpoch(1.0, {0: 1.0, 2: 1.0}), [0, 2])
    record = {"partitions": lg.marks([0, 2])["partitions"], "floors": {"0": lg.floor}, "parallelism": 1}
    again = logic(restored=restored_marks(record, [0, 2], 0, 1))
    assert again.largest == lg.largest and again.floor == lg.floor == us(10)


def test_null_and_non_timestamp_event_times():
    lg = logic()
    lg.partition = 0
    lg.process(pa.table({"ts": pa.array([None], pa.timestamp("ms"))}))
    assert lg.largest == {}
    with pytest.raises(FlowValidationError, match="event-time column 'ts' is int64, not a timestamp"):
        lg.process(pa.table({"ts": [1]}))


def test_aligned_watermark_is_the_minimum_over_channels_that_are_not_idle():
    assert min_watermark([5, 3], [False, False]) == (3, False)
    assert min_watermark([5, 1], [False, True]) == (5, False)
    assert min_watermark([5, None], [False, False]) == (None, False)
    a = BarrierAligner(["a", "b"], 1)
    a.handle(BarrierEvent("a", Barrier(1, False, watermark=7)))
    [aligned] = a.handle(BarrierEvent("b", Barrier(1, False, watermark=2, idle=True)))
    assert (aligned.barrier.watermark, aligned.barrier.idle) == (7, False)


def test_the_plan_records_activity_and_ends_and_round_trips():
    src = ListSource([{"x": i} for i in range(3)], partitions=2)
    active, ended = watermark_marks({"s": src}, {"s": {0: (0, 1), 1: (0, 0)}}, {"s": {0: 1.0, 1: 1.0}}, now=9.0)
    assert active == {"s": {0: 9.0, 1: 1.0}} and ended == {}
    plan_ = EpochPlan(4, {"s": {0: (0, 1), 1: (0, 0)}}, False, 9.0, active_at=active, ended={"s": [1]})
    again = EpochPlan.from_json(plan_.to_json())
    assert again == plan_
    assert again.source_epoch("s") == SourceEpoch(9.0, {0: 9.0, 1: 1.0}, frozenset({1}))


def test_event_time_belongs_before_key_by():
    flow = Dataflow("et_place")
    keyed = flow.source(ListSource([{"k": 1, "ts": T0}])).key_by("k")
    with pytest.raises(FlowDefinitionError, match="with_event_time must come before key_by"):
        keyed.with_event_time("ts")
    with pytest.raises(FlowDefinitionError, match="window needs event time"):
        keyed.window(Tumbling(timedelta(seconds=1)))
    flow2 = Dataflow("et_parallel")
    stream = flow2.source(ListSource([{"k": 1, "ts": T0}])).map_batches(lambda b: b, parallelism=3)
    stream.with_event_time("ts").sink(CollectSink())
    with pytest.raises(FlowDefinitionError, match="runs after an exchange"):
        plan(flow2.graph)


def test_windows_per_partition_in_a_local_run_with_a_lagging_partition():
    # Partition 1 lags 20 s behind partition 0: with a per-partition watermark nothing of it is late.
    events = [{"k": "a", "ts": T0 + timedelta(seconds=s)} for s in (30, 10, 31, 11, 32, 12, 33, 13)]
    flow, out, late = Dataflow("lagging"), CollectSink(), CollectSink()
    windows = (flow.source(ListSource(events, partitions=2)).with_event_time("ts").key_by("k")
               .window(Tumbling(timedelta(seconds=10))).aggregate([([], "count_all")]))
    windows.sink(out)
    windows.late().sink(late)
    run_local(flow, max_records_per_epoch=2)
    assert late.rows() == []
    assert [(r["window_start"].second, r["count_all"]) for r in out.rows()] == [(10, 4), (30, 4)]
