import pytest

from sluiceway.cluster.alignment import Aligned, Barrier, BarrierAligner, BarrierEvent, Data, ProtocolError
from sluiceway.cluster.epochs import EpochBook, EpochPlan, EpochSizer, TaskAck, Trigger, plan_epoch, sources_exhausted
from sluiceway.operators.sources import GeneratorSource
from sluiceway.checkpoint.types import TaskId
from sluiceway.operators.sources import ListSource


def b(epoch, checkpoint=False, wm=None):
    return Barrier(epoch, checkpoint, wm)


def test_epoch_waits_for_every_channel_and_keeps_channel_order():
    a = BarrierAligner(["c0", "c1", "c2"], first_epoch=1)
    assert a.handle(Data("c2", "z1")) == []
    assert a.handle(BarrierEvent("c2", b(1))) == []
    assert a.handle(Data("c0", "x1")) == []
    assert a.handle(BarrierEvent("c0", b(1))) == []
    out = a.handle(BarrierEvent("c1", b(1)))
    assert out == [Aligned(b(1), ["x1", "z1"], ["c0", "c2"])]


def test_early_data_of_next_epoch_is_held_back_then_released_in_order():
    a = BarrierAligner(["c0", "c1"], first_epoch=5)
    a.handle(BarrierEvent("c0", b(5)))
    a.handle(Data("c0", "early6"))
    a.handle(BarrierEvent("c0", b(6, checkpoint=True)))
    assert a.held_back == 2  # two closed epochs of c0 wait for c1
    out = a.handle(BarrierEvent("c1", b(5)))
    assert out == [Aligned(b(5), [], [])]
    out = a.handle(Data("c1", "late6")) + a.handle(BarrierEvent("c1", b(6)))
    assert out == [Aligned(b(6, checkpoint=True), ["early6", "late6"], ["c0", "c1"])]
    assert a.held_back == 0


def test_an_untimed_channel_never_holds_the_watermark_back():
    a = BarrierAligner(["stream", "table"], first_epoch=1, untimed={"table"})
    a.handle(BarrierEvent("stream", b(1, wm=10)))
    assert a.handle(BarrierEvent("table", b(1, wm=None)))[0].barrier.watermark == 10
    a.handle(BarrierEvent("table", b(2, wm=3)))
    assert a.handle(BarrierEvent("stream", b(2, wm=12)))[0].barrier.watermark == 12


def test_watermark_is_minimum_and_unknown_if_any_is_unknown():
    a = BarrierAligner(["c0", "c1"], first_epoch=1)
    a.handle(BarrierEvent("c0", b(1, wm=10.0)))
    assert a.handle(BarrierEvent("c1", b(1, wm=4.0)))[0].barrier.watermark == 4.0
    a.handle(BarrierEvent("c0", b(2, wm=12.0)))
    assert a.handle(BarrierEvent("c1", b(2)))[0].barrier.watermark is None


def test_protocol_violations_raise():
    a = BarrierAligner(["c0"], first_epoch=1)
    with pytest.raises(ProtocolError, match="expected 1"):
        a.handle(BarrierEvent("c0", b(2)))
    with pytest.raises(ProtocolError, match="unknown channel"):
        a.handle(Data("nope", "x"))


def test_plan_epoch_caps_records_and_skips_when_nothing_new():
    src = {"s": ListSource([{"x": i} for i in range(10)], partitions=2)}
    planned = plan_epoch(1, src, {}, now=0, started_at=0, max_records_per_epoch=4)
    assert planned.ranges == {"s": {0: (0, 2), 1: (0, 2)}} and planned.waiting == 6
    after = {"s": {0: 5, 1: 5}}
    assert plan_epoch(2, src, after, now=0, started_at=0, max_records_per_epoch=4).ranges is None
    assert sources_exhausted(src, after) and not sources_exhausted(src, {"s": {0: 5, 1: 4}})


def test_epoch_plan_json_round_trip():
    plan = EpochPlan(3, {"s": {0: (1, 5), 1: (2, 2)}}, True, 12.5)
    assert EpochPlan.from_json(plan.to_json()) == plan and plan.rows == 4


def test_book_completes_in_order_and_drops_stale_acks():
    t0, t1 = TaskId("s", 0), TaskId("s", 1)
    book = EpochBook([t0, t1], generation=2)
    for e in (1, 2):
        book.add(EpochPlan(e, {}, False, 0.0))
    assert not book.handle_ack(TaskAck(t0, generation=1, epoch=1))  # before the recovery
    assert not book.handle_ack(TaskAck(t0, generation=2, epoch=9))  # unknown epoch
    book.handle_ack(TaskAck(t0, 2, 2))
    book.handle_ack(TaskAck(t1, 2, 2))
    assert book.pop_complete() == []  # epoch 1 not complete yet: 2 waits
    book.handle_ack(TaskAck(t0, 2, 1))
    book.handle_ack(TaskAck(t1, 2, 1))
    assert [p.epoch for p, _ in book.pop_complete()] == [1, 2]
    assert book.stale_acks == 2 and book.in_flight == 0


def test_backlog_is_planned_back_to_back_and_live_input_waits_for_the_trigger():
    """A fake clock that never moves: with a backlog every epoch is due at
    once; once caught up, the next one waits for the trigger."""
    src = {"s": GeneratorSource(lambda p, a, b: None, partitions=2, rows_per_second=1e6, rows_per_partition=2_500_000)}
    trigger, sizer = Trigger(interval_s=1.0), EpochSizer(trigger_s=1.0, max_records=1_000_000)
    now, offsets, planned_at, waiting = 1000.0, {}, [], 0
    while True:
        if not trigger.due(now, waiting=waiting):
            break
        planned = plan_epoch(len(planned_at) + 1, src, offsets, now=now, started_at=0.0,
                             max_records_per_epoch=sizer.size())
        if planned.ranges is None:
            break
        trigger.planned(now)
        planned_at.append(now)
        waiting = planned.waiting
        offsets = {s: {p: stop for p, (_, stop) in parts.items()} for s, parts in planned.ranges.items()}
    assert len(planned_at) == 5 and set(planned_at) == {1000.0}  # 5 M records, 1 M per epoch, no waiting
    assert not trigger.due(now, waiting=0) and trigger.due(now + 1.0, waiting=0)


def test_sizer_keeps_latency_near_the_trigger():
    sizer = EpochSizer(trigger_s=1.0, max_records=1_000_000, smoothing=1.0)
    sizer.observe(rows=1_000_000, latency_s=10.0)  # 100k records/s: 1 M records would take 10 s
    assert sizer.size() == 100_000
    sizer.observe(rows=100_000, latency_s=0.05)  # fast again: back to the cap
    assert sizer.size() == 1_000_000
    sizer.observe(rows=10, latency_s=100.0)
    assert sizer.size() == 1000  # never below the floor
    assert EpochSizer(trigger_s=0.0, max_records=500, rate=1.0).size() == 500  # trigger 0: the cap
