"""Changing a flow between runs: derived step ids, and what a restore
carries, refuses or drops (cluster/evolution.py)."""

from datetime import timedelta

import pyarrow.compute as pc
import pytest

from sluiceway.checkpoint.manifest import Manifest
from sluiceway.cluster import evolution
from sluiceway.cluster.epochs import EpochPlan
from sluiceway.jobs.dataflow import Dataflow
from sluiceway.jobs.testing import CollectSink
from sluiceway.operators.errors import FlowDefinitionError
from sluiceway.operators.sources import ListSource
from sluiceway.operators.windows import Tumbling

ROWS = [{"user_id": 1, "cents": 5, "page": "a"}]


def flow(*, insert_filter=False, key="user_id", pairs=(("cents", "sum"),), aggregate=True, name=None,
         second_source=False, window=False):
    f = Dataflow("j")
    stream = f.source(ListSource(ROWS))
    if second_source:
        f.source(ListSource(ROWS)).sink(CollectSink())
    if insert_filter:
        stream = stream.filter(pc.field("cents") >= 0)
    if window:
        stream = stream.with_event_time("cents")
    keyed = stream.key_by(key)
    if window:
        keyed = keyed.window(Tumbling(timedelta(seconds=10)))
    if aggregate:
        keyed.aggregate([([], "count_all"), *pairs], name=name).sink(CollectSink())
    else:
        stream.sink(CollectSink())
    return f


def checkpoint_of(f: Dataflow, *, signatures=True) -> Manifest:
    """A manifest as a run of ``f`` writes it: state for each stateful step,
    a read position for each source."""
    sigs = evolution.signatures(f.graph)
    state = {s: {"0": [["c/1/x", 0]]} for s, sig in sigs.items() if sig["role"] == "state"}
    offsets = {s: {"0": 1} for s, sig in sigs.items() if sig["role"] == "source"}
    return Manifest(job="j", id=2, epoch=2, started_at=0.0, completed_at=1.0, offsets=offsets, watermarks={},
                    parallelism={}, max_key_groups=128, tasks=[], state=state, files={}, sink_handles={},
                    steps=sigs if signatures else {})


def losing(changes):
    return [c for c in changes if c.loses]


def test_unnamed_step_ids_do_not_move_when_a_stateless_step_or_a_branch_is_added():
    before = list(flow().graph.steps)
    after = list(flow(insert_filter=True, second_source=True).graph.steps)
    stateful = [s for s in before if s.startswith(("source", "aggregate", "sink"))]
    assert set(stateful) <= set(after)
    assert not [c for c in evolution.compare(checkpoint_of(flow()), flow(insert_filter=True).graph) if c.loses]


def test_two_alike_unnamed_steps_are_told_apart_by_order():
    f = Dataflow("j")
    s = f.source(ListSource(ROWS))
    a = s.key_by("user_id").aggregate([([], "count_all")])
    b = s.key_by("user_id").aggregate([([], "count_all")])
    assert b.step_id == f"{a.step_id}-2"


def test_step_names_that_are_not_folder_names_are_refused():
    with pytest.raises(FlowDefinitionError, match="without '/'"):
        Dataflow("j").source(ListSource(ROWS), name="a/b")


def test_a_changed_key_is_refused_naming_both_keys_and_the_way_out():
    changes = evolution.compare(checkpoint_of(flow()), flow(key="page").graph)
    line = losing(changes)[0].line
    assert line.startswith("the checkpoint holds the state of aggregate step (keyed by 'user_id') 'aggregate-user_id-")
    assert "made at " in line and "test_evolution.py" in line
    assert "aggregate step (keyed by 'page')" in line and "cannot take it over: state keeps the key" in line


def test_a_changed_key_under_a_kept_name_is_refused_as_a_key_change():
    changes = evolution.compare(checkpoint_of(flow(name="totals")), flow(key="page", name="totals").graph)
    assert [c.line for c in losing(changes)] == [
        "aggregate step (keyed by 'user_id') 'totals' is now keyed by 'page': its state is keyed by 'user_id'"]


def test_pairs_added_at_the_end_carry_and_other_pair_changes_are_refused():
    old = checkpoint_of(flow(name="totals"))
    added = evolution.compare(old, flow(name="totals", pairs=(("cents", "sum"), ("cents", "max"))).graph)
    assert [(c.what, c.loses) for c in added] == [("added_pairs", False)]
    assert added[0].line == "aggregate 'totals' has new pairs max(cents): they count from this run on"
    swapped = evolution.compare(old, flow(name="totals", pairs=(("cents", "max"),)).graph)
    assert losing(swapped)[0].line == ("aggregate 'totals' had pairs [count_all(*), sum(cents)] and now has "
                                      "[count_all(*), max(cents)]: only pairs added at the end carry over")


def test_a_removed_stateful_step_is_refused_and_dropped_when_allowed():
    old = checkpoint_of(flow(name="totals"))
    changes = evolution.compare(old, flow(aggregate=False).graph)
    assert [c.step for c in losing(changes)] == ["totals"]
    restored = evolution.as_restored(old, changes)
    assert "totals" not in restored.state and restored.offsets == old.offsets


def test_a_window_whose_size_changed_is_refused():
    old = checkpoint_of(flow(window=True, name="w"))
    f = Dataflow("j")
    (f.source(ListSource(ROWS)).with_event_time("cents").key_by("user_id").window(Tumbling(timedelta(seconds=20)))
     .aggregate([([], "count_all"), ("cents", "sum")], name="w").sink(CollectSink()))
    line = losing(evolution.compare(old, f.graph))[0].line
    assert line.startswith("window step (keyed by 'user_id') 'w' changed how it keeps state (size 10.0 -> 20.0")


def test_a_declared_rename_restores_state_read_positions_and_replays_under_the_new_ids():
    old = checkpoint_of(flow(name="aggregate_3"))
    new = flow(name="totals")
    source = next(s for s in new.graph.steps if s.startswith("source"))
    new.renamed("aggregate_3", "totals")
    changes = evolution.compare(old, new.graph, new.graph.renamed)
    assert not losing(changes) and [c.what for c in changes] == ["renamed"]
    restored = evolution.as_restored(old, changes, new.graph.renamed)
    assert set(restored.state) == {"totals"} and set(restored.offsets) == {source}
    plan = EpochPlan(3, {"aggregate_3": {0: (1, 2)}}, False, 0.0)
    assert evolution.replayable(plan, {"aggregate_3": "x"}, set()).ranges == {"x": {0: (1, 2)}}
    assert evolution.replayable(plan, {}, {"aggregate_3"}).ranges == {}


def test_a_rename_to_a_missing_step_is_an_error():
    f = flow()
    f.renamed("a", "nope")
    with pytest.raises(FlowDefinitionError, match="names a step this flow does not have"):
        evolution.compare(checkpoint_of(flow()), f.graph, f.graph.renamed)


def test_checkpoints_from_before_signatures_are_checked_by_presence():
    old = checkpoint_of(flow(name="aggregate_3"), signatures=False)
    changes = evolution.compare(old, flow().graph)
    line = losing(changes)[0].line
    assert line.startswith("the checkpoint holds the state of aggregate step 'aggregate_3'; no step")
    assert "give it name='aggregate_3'" in line


def test_new_steps_and_sources_are_reported_and_carried():
    changes = evolution.compare(checkpoint_of(flow()), flow(second_source=True).graph)
    assert not losing(changes)
    assert [c.line.split(" is new")[1] for c in changes] == [": it reads from its start"]


def test_a_pair_whose_column_changed_type_names_the_pair_not_its_state_columns():
    import pyarrow as pa

    from sluiceway.jobs.testing import run_local
    from sluiceway.operators.errors import FlowValidationError
    from sluiceway.operators.sources import GeneratorSource

    def values(partition, start, stop):  # int64 for two epochs, then text
        v = pa.array([str(i) for i in range(start, stop)]) if start >= 2 else pa.array(range(start, stop))
        return pa.record_batch({"u": pa.array([1] * (stop - start)), "v": v})

    f = Dataflow("j")
    f.source(GeneratorSource(values, 1, 1e9, 4)).key_by("u").aggregate([("v", "max")], name="top").sink(CollectSink())
    with pytest.raises(FlowValidationError) as err:
        run_local(f, max_records_per_epoch=1)
    assert str(err.value) == ("step 'top' (aggregate): max(v) gets string values now, and its state holds int64 "
                              "(from earlier epochs or the restored checkpoint); cast 'v' in the job to keep the "
                              "state, or name the step anew to start it empty")
