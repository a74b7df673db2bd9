"""Windows on crafted out-of-order input: exact contents per kind, events on
boundaries, late events within and beyond the allowed lateness, session
merges, and state that survives a checkpoint."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from sluiceway.operators.base import OperatorContext, Outputs
from sluiceway.operators.errors import FlowDefinitionError
from sluiceway.operators.windows import (Hopping, Session, Sliding, Tumbling, Window, session_groups,
                                         sliding_windows, to_micros, window_members)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
S = timedelta(seconds=1)
U = 1e-6  # one microsecond, in seconds


def at(seconds: float) -> datetime:
    return T0 + seconds * S


def wm(seconds: float) -> int:
    return to_micros(at(seconds))


def batch(events):
    """[(key, second, value)] -> a table."""
    return pa.table({"k": [e[0] for e in events], "ts": pa.array([at(e[1]) for e in events], pa.timestamp("us", tz="UTC")),
                     "v": [e[2] for e in events]})


class Harness:
    """One window logic driven epoch by epoch, remembering what it emitted."""

    def __init__(self, op: Window, restored=None, watermark=None):
        self.op = op
        self.logic = op.build(OperatorContext("w", 0, 1, 128, watermark), restored)
        self.out, self.late = [], []

    def epoch(self, events, watermark_s):
        result = self.logic.process(batch(events)) if events else None
        self._take(result)
        self._take(self.logic.on_epoch_end(1, None if watermark_s is None else wm(watermark_s)))
        return self

    def _take(self, result):
        if isinstance(result, Outputs):
            if result.main is not None:
                self.out += result.main.to_pylist()
            self.late += result.side.get("late", pa.table({})).to_pylist()
        elif result is not None:
            self.out += result.to_pylist()

    def windows(self, value="v_sum"):
        return [(r["k"], (r["window_start"] - T0) / S, (r["window_end"] - T0) / S, r[value]) for r in self.out]

    def late_values(self):
        return sorted(r["v"] for r in self.late)


def tumbling(**kw):
    return Window("k", "ts", Tumbling(10 * S), aggregate=[("v", "sum"), ("v", "count")], **kw)


def test_tumbling_out_of_order_and_boundaries():
    h = Harness(tumbling())
    h.epoch([("a", 9.999, 1), ("a", 10, 2), ("b", 3, 4), ("a", 0, 8)], watermark_s=5)
    assert h.out == []  # nothing closed yet
    h.epoch([("a", 2, 16), ("b", 19.5, 32)], watermark_s=10)  # out of order, before the watermark passed 10
    assert h.windows() == [("a", 0, 10, 25), ("b", 0, 10, 4)]
    h.epoch([("a", 29, 64)], watermark_s=20)
    assert h.windows()[2:] == [("a", 10, 20, 2), ("b", 10, 20, 32)]
    assert h.late == []
    assert [r["v_count"] for r in h.out] == [3, 1, 1, 1]


def test_late_events_within_and_beyond_lateness():
    h = Harness(tumbling(allowed_lateness=5 * S))
    h.epoch([("a", 1, 1)], watermark_s=12)  # window [0, 10) stays open until 15
    h.epoch([("a", 9, 2)], watermark_s=15)  # late by 3 s, within lateness: counted, then it fires
    assert h.windows() == [("a", 0, 10, 3)]
    h.epoch([("a", 8, 4), ("a", 16, 8)], watermark_s=16)  # [0, 10) fired: 4 goes to late()
    assert h.late_values() == [4]
    h.epoch([], watermark_s=40)
    assert h.windows()[1:] == [("a", 10, 20, 8)]


def test_hopping_windows_overlap_and_partly_late_events():
    h = Harness(Window("k", "ts", Hopping(10 * S, 5 * S), aggregate=[("v", "sum")]))
    h.epoch([("a", 5, 1), ("a", 7, 2), ("a", 12, 4)], watermark_s=10)
    assert h.windows() == [("a", 0, 10, 3)]
    h.epoch([("a", 9, 8)], watermark_s=20)  # [0,10) closed: late there, counted in [5,15)
    assert h.late_values() == [8]
    assert h.windows()[1:] == [("a", 5, 15, 15), ("a", 10, 20, 4)]


def test_hopping_with_a_hop_longer_than_the_size_skips_time():
    h = Harness(Window("k", "ts", Hopping(2 * S, 5 * S), aggregate=[("v", "sum")]))
    h.epoch([("a", 1, 1), ("a", 3, 2), ("a", 6, 4)], watermark_s=100)
    assert h.windows() == [("a", 0, 2, 1), ("a", 5, 7, 4)]
    assert h.late == []  # the event at 3 is in no window: not late either


def test_sessions_close_after_the_gap_and_merge_on_a_bridging_event():
    h = Harness(Window("k", "ts", Session(5 * S), aggregate=[("v", "sum")]))
    h.epoch([("a", 0, 1), ("a", 3, 2), ("a", 12, 4), ("b", 1, 100)], watermark_s=5.5)
    assert h.out == []  # [0, 8) is open until 8, b's [1, 6) until 6
    h.epoch([("a", 7.5, 8)], watermark_s=7)  # bridges [0, 8) and [12, 17) into [0, 17)
    h.epoch([("a", 17, 16)], watermark_s=16.9)  # exactly gap after 12: a new session
    assert h.windows() == [("b", 1, 6, 100)]
    h.epoch([], watermark_s=30)
    assert h.windows()[1:] == [("a", 0, 17, 15), ("a", 17, 22, 16)]


def test_session_late_event_only_when_its_session_is_gone():
    h = Harness(Window("k", "ts", Session(5 * S), aggregate=[("v", "sum")]))
    h.epoch([("a", 10, 1)], watermark_s=12)
    h.epoch([("a", 6, 2), ("a", 0, 4)], watermark_s=12)  # 6 joins the open [10, 15); 0's own session closed at 5
    assert h.late_values() == [4]
    h.epoch([], watermark_s=20)
    assert h.windows() == [("a", 6, 15, 3)]


def test_sliding_windows_follow_kafka_streams():
    h = Harness(Window("k", "ts", Sliding(10 * S), aggregate=[("v", "sum")]))
    h.epoch([("a", 12, 4), ("a", 0, 1), ("a", 5, 2)], watermark_s=None)
    h.epoch([], watermark_s=100)
    # Distinct sets within 10 s: {0}, {0,5}, {5}, {5,12}, {12}; both ends included. A window
    # starting just after an event starts one microsecond after it (Kafka: one millisecond).
    assert sorted(h.windows()) == [("a", -10, 0, 1), ("a", -5, 5, 3), ("a", U, 10 + U, 2), ("a", 2, 12, 6),
                                   ("a", 5 + U, 15 + U, 4)]


def test_sliding_windows_fire_in_order_and_never_twice():
    h = Harness(Window("k", "ts", Sliding(10 * S), aggregate=[("v", "sum")]))
    h.epoch([("a", 0, 1), ("a", 5, 2)], watermark_s=1)  # [-10, 0] closes at 0 + 1 µs
    assert h.windows() == [("a", -10, 0, 1)]
    h.epoch([("a", 12, 4)], watermark_s=12)
    assert h.windows()[1:] == [("a", -5, 5, 3), ("a", U, 10 + U, 2)]
    h.epoch([("a", 4, 8)], watermark_s=13)  # late: [-6, 4] closed long ago
    assert h.late_values() == [8]
    h.epoch([], watermark_s=100)
    assert h.windows()[3:] == [("a", 2, 12, 6), ("a", 5 + U, 15 + U, 4)]
    assert len(h.logic.store) == 0  # every event purged once its windows closed


def test_updates_mode_emits_each_epoch_and_never_again_after_close():
    h = Harness(tumbling(emit="updates"))
    h.epoch([("a", 1, 1)], watermark_s=1)
    h.epoch([("a", 2, 2), ("b", 3, 4)], watermark_s=2)
    h.epoch([("a", 11, 8)], watermark_s=11)
    assert h.windows() == [("a", 0, 10, 1), ("a", 0, 10, 3), ("b", 0, 10, 4), ("a", 10, 20, 8)]
    assert len(h.logic.store) == 1


def test_reduce_sees_each_windows_events_in_time_order():
    seen = []

    def top(rows):
        seen.append(rows.column("v").to_pylist())
        best = max(rows.to_pylist(), key=lambda r: r["v"])
        return {"best": best["v"], "at": best["ts"]}

    h = Harness(Window("k", "ts", Tumbling(10 * S), reduce=top))
    h.epoch([("a", 3, 5), ("a", 1, 7), ("a", 12, 1)], watermark_s=10)
    assert seen == [[7, 5]]
    assert [(r["k"], r["best"], r["at"]) for r in h.out] == [("a", 7, at(1))]


def test_fold_per_record():
    h = Harness(Window("k", "ts", Session(5 * S), fold=(lambda: {"path": ""}, lambda acc, r: {"path": acc["path"] + str(r["v"])})))
    h.epoch([("a", 2, 2), ("a", 0, 1), ("a", 20, 3)], watermark_s=30)
    assert [r["path"] for r in h.out] == ["12", "3"]


def test_state_is_restored_from_a_checkpoint_delta_and_gives_the_same_results():
    from sluiceway.checkpoint.state import MemoryStateFiles

    events = [[("a", 1, 1), ("b", 2, 2)], [("a", 11, 4), ("c", 3, 8)], [("b", 14, 16)], [("a", 25, 32)]]
    marks = [5, 10, 15, 40]
    whole = Harness(tumbling())
    for e, m in zip(events, marks):
        whole.epoch(e, m)
    first, files = Harness(tumbling()), MemoryStateFiles()
    first.epoch(events[0], marks[0])
    files.checkpoint(first.logic)  # the base
    first.epoch(events[1], marks[1])
    files.checkpoint(first.logic)  # a delta on it
    resumed = Harness(tumbling(), restored=files.restored(), watermark=wm(10))
    for e, m in zip(events[2:], marks[2:]):
        resumed.epoch(e, m)
    assert first.out + resumed.out == whole.out


def test_state_stays_bounded_on_a_long_stream():
    h = Harness(tumbling())
    sizes = []
    for second in range(0, 600, 2):
        h.epoch([(f"k{i}", second + i / 10, 1) for i in range(10)], watermark_s=second)
        sizes.append(len(h.logic.store))
    assert max(sizes[50:]) <= 20  # one open window per key (two around a boundary), however long it runs
    assert sum(r["v_sum"] for r in h.out) >= 10 * 295


def test_helpers_match_a_brute_force_oracle():
    rng = np.random.default_rng(7)
    keys = pa.array(["a"] * 20 + ["b"] * 20 + ["c"] * 20)
    t = np.concatenate([np.sort(rng.integers(0, 50, 20)) for _ in range(3)])
    owner, start, last = sliding_windows(keys, t, 7)
    window, event = window_members(keys, t, owner, start, last)
    got = {}
    for w, e in zip(window.tolist(), event.tolist()):
        got.setdefault((keys[int(owner[w])].as_py(), int(start[w]), int(last[w])), set()).add(e)
    k = keys.to_pylist()
    expected = {}
    for i in range(len(t)):  # every distinct set of a key's events within 7 of each other
        for lo in (t[i] - 7, t[i] + 1):
            members = {j for j in range(len(t)) if k[j] == k[i] and lo <= t[j] <= lo + 7}
            if members:
                expected[(k[i], int(lo), int(lo + 7))] = members
    assert {frozenset(v) for v in got.values()} == {frozenset(v) for v in expected.values()}
    assert session_groups(pa.array(["a", "a", "b"]), np.array([0, 5, 5]), np.array([5, 10, 10])).tolist() == [0, 1, 2]


def test_bad_definitions_fail_when_the_flow_is_built():
    with pytest.raises(FlowDefinitionError, match="Tumbling size must be positive"):
        Tumbling(timedelta(0))
    with pytest.raises(FlowDefinitionError, match="emit='updates' works with aggregate"):
        Window("k", "ts", Sliding(S), aggregate=[("v", "sum")], emit="updates")
    with pytest.raises(FlowDefinitionError, match="window takes Tumbling"):
        Window("k", "ts", 10, aggregate=[("v", "sum")])
    with pytest.raises(FlowDefinitionError, match="exactly one of"):
        Window("k", "ts", Tumbling(S))


def test_event_rate_and_rolling_mean_helpers():
    from sluiceway.jobs import Dataflow
    from sluiceway.jobs.testing import CollectSink, run_local
    from sluiceway.operators.sources import ListSource

    events = [{"k": "a", "ts": at(s), "v": v} for s, v in ((0, 2), (1, 4), (2.5, 6), (5, 8), (11, 10))]
    flow, rates, means = Dataflow("helpers"), CollectSink(), CollectSink()
    keyed = flow.source(ListSource(events)).with_event_time("ts").key_by("k")
    keyed.event_rate(5 * S).sink(rates)
    keyed.rolling_mean("v", 10 * S, 5 * S).sink(means)
    run_local(flow)
    assert [((r["window_start"] - T0) / S, r["count_all"], r["events_per_s"]) for r in rates.rows()] == [
        (0, 3, 0.6), (5, 1, 0.2), (10, 1, 0.2)]
    assert [((r["window_start"] - T0) / S, r["v_mean"]) for r in means.rows()] == [
        (-5, 4.0), (0, 5.0), (5, 9.0), (10, 10.0)]


def test_firing_in_small_batches_gives_the_same_windows(monkeypatch):
    from sluiceway.jobs.dataflow import Dataflow
    from sluiceway.jobs.testing import CollectSink, run_local
    from sluiceway.operators import windows
    from sluiceway.operators.sources import ListSource

    rows = [{"k": i % 300, "ts": at(i * 0.01), "v": i % 7} for i in range(6000)]

    def fired():
        flow, out = Dataflow("batches"), CollectSink()
        flow.source(ListSource(rows)).with_event_time("ts").key_by("k").window(Tumbling(timedelta(seconds=5))) \
            .aggregate([("v", "sum"), ([], "count_all")]).sink(out)
        run_local(flow, max_records_per_epoch=700)
        return sorted((r["k"], r["window_start"], r["v_sum"], r["count_all"]) for r in out.rows())

    whole = fired()
    monkeypatch.setattr(windows, "FIRE_GROUPS", 3)
    monkeypatch.setattr(windows, "FIRE_ROWS", 5)  # every batch is "large": they shrink to one group
    assert fired() == whole and len(whole) == 300 * 12 and sum(w[3] for w in whole) == 6000
