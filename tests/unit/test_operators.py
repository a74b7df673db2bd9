import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sluiceway.operators.keys import key_groups
from sluiceway.operators.aggregate import Aggregate
from sluiceway.operators.base import OperatorContext
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError
from sluiceway.operators.sources import GeneratorSource, ListSource
from sluiceway.operators.stateless import Filter, MapBatches, MapRecords

CTX = OperatorContext("step", 0, 1, 128)


def table():
    return pa.table({"user": ["a", "b", "a", "c"], "amount": [1, 2, 3, None]})


def test_map_batches_applies_per_batch_and_accepts_tables():
    op = MapBatches(lambda b: b.append_column("double", pc.multiply(b["amount"], 2)))
    out = op.build(CTX, None).process(table())
    assert out.column("double").to_pylist() == [2, 4, 6, None]


def test_map_batches_rejects_wrong_return_type():
    logic = MapBatches(lambda b: [1, 2]).build(CTX, None)
    with pytest.raises(TypeError, match="must return a pyarrow.RecordBatch"):
        logic.process(table())


def test_filter_with_expression_and_function():
    assert Filter(pc.field("amount") > 1).build(CTX, None).process(table()).column("user").to_pylist() == ["b", "a"]
    fn = Filter(lambda b: pc.equal(b["user"], "a")).build(CTX, None)
    assert fn.process(table()).column("amount").to_pylist() == [1, 3]


def test_filter_rejects_non_predicates_at_build_time():
    with pytest.raises(FlowDefinitionError, match="pyarrow.compute expression"):
        Filter("amount > 1")


def test_map_records_is_per_row_and_drops_none():
    op = MapRecords(lambda r: None if r["user"] == "b" else {"u": r["user"].upper()})
    assert op.build(CTX, None).process(table()).to_pylist() == [{"u": "A"}, {"u": "A"}, {"u": "C"}]


def test_aggregate_emits_updated_keys_only_with_all_functions():
    op = Aggregate("user", [("amount", "count"), ("amount", "sum"), ("amount", "min"), ("amount", "max"),
                            ("amount", "mean"), ([], "count_all")])
    logic = op.build(CTX, None)
    first = logic.process(table()).to_pylist()
    assert first == [
        {"user": "a", "amount_count": 2, "amount_sum": 4, "amount_min": 1, "amount_max": 3, "amount_mean": 2.0, "count_all": 2},
        {"user": "b", "amount_count": 1, "amount_sum": 2, "amount_min": 2, "amount_max": 2, "amount_mean": 2.0, "count_all": 1},
        {"user": "c", "amount_count": 0, "amount_sum": None, "amount_min": None, "amount_max": None, "amount_mean": None, "count_all": 1},
    ]
    second = logic.process(pa.table({"user": ["c", "a"], "amount": [10, 0]})).to_pylist()
    assert second == [  # the order Arrow's single-threaded group-by gives this one-chunk input
        {"user": "c", "amount_count": 1, "amount_sum": 10, "amount_min": 10, "amount_max": 10, "amount_mean": 10.0, "count_all": 2},
        {"user": "a", "amount_count": 3, "amount_sum": 4, "amount_min": 0, "amount_max": 3, "amount_mean": 4 / 3, "count_all": 3},
    ]


def test_aggregate_snapshot_restores_to_the_same_results():
    op = Aggregate("user", [("amount", "sum"), ("amount", "mean")])
    a = op.build(CTX, None)
    a.process(table())
    snapshot = a.snapshot()
    assert all(isinstance(kg, int) and 0 <= kg < 128 for kg in snapshot)
    b = op.build(CTX, snapshot)
    more = pa.table({"user": ["a", "d"], "amount": [5, 1]})
    assert b.process(more).to_pylist() == a.process(more).to_pylist()


def test_aggregate_errors_name_the_fix():
    with pytest.raises(FlowDefinitionError, match="not supported; use one of"):
        Aggregate("user", [("amount", "median")])
    with pytest.raises(FlowDefinitionError, match="count_all counts rows"):
        Aggregate("user", [("amount", "count_all")])
    logic = Aggregate("user", [("price", "sum")]).build(CTX, None)
    with pytest.raises(FlowValidationError, match=r"^step 'step' \(aggregate\): the stream has no column 'price' "
                       r"\(it has user, amount\); fix the column names"):
        logic.process(table())


def test_generator_source_grows_with_time_and_is_bounded():
    src = GeneratorSource(lambda p, a, b: pa.record_batch({"i": pa.array(range(a, b))}), 2, 100, rows_per_partition=250)
    assert src.latest_offset(0, now=101.5, started_at=100.0) == 150
    assert src.latest_offset(1, now=200.0, started_at=100.0) == 250
    assert src.read(1, 3, 6).column("i").to_pylist() == [3, 4, 5]


def test_generator_source_must_return_one_row_per_offset():
    src = GeneratorSource(lambda p, a, b: pa.record_batch({"i": pa.array([1])}), 1, 10)
    with pytest.raises(FlowValidationError, match="exactly one row per offset"):
        src.read(0, 0, 5)


def test_list_source_round_robins_rows():
    src = ListSource(pa.table({"x": list(range(7))}), partitions=3)
    assert [src.end_offset(p) for p in range(3)] == [3, 2, 2]
    assert src.read(2, 0, 2).column("x").to_pylist() == [2, 5]


def test_an_epoch_touching_one_key_group_reads_and_writes_only_that_group():
    from sluiceway.checkpoint.state import MemoryStateFiles

    op = Aggregate("user", [("amount", "sum")])
    logic = op.build(CTX, None)
    users = pa.array(range(5000), pa.int64())
    logic.process(pa.table({"user": users, "amount": pa.repeat(1, 5000)}))  # state in every key group
    assert len(logic.store.groups) == 128
    kg = key_groups(pa.array([42], pa.int64()), 128)[0].as_py()
    same_group = [u for u, g in zip(users.to_pylist(), key_groups(users, 128).to_pylist()) if g == kg][:3]
    files = MemoryStateFiles()
    files.checkpoint(logic)
    logic.store.reset_touched()
    out = logic.process(pa.table({"user": same_group, "amount": [5, 5, 5]}))
    assert logic.store.reads == {kg} and logic.store.writes == {kg}
    assert logic.store.counters.rows_read == 3 and logic.store.counters.rows_written == 3  # those keys' rows only
    assert out.to_pylist() == [{"user": u, "amount_sum": 6} for u in same_group]  # only the updated keys
    changes = logic.snapshot_changes()
    assert list(changes.runs) == [kg] and changes.removed == set()
    assert sorted(changes.runs[kg].column("user").to_pylist()) == sorted(same_group)  # only the changed rows


def _bids(n=60):
    from datetime import datetime, timedelta, timezone

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [{"auction": i % 4, "name": f"n{i}", "ts": t0 + timedelta(seconds=i), "price": i} for i in range(n)]


def test_aggregating_the_key_column_itself_works_as_in_pyarrow():
    from datetime import timedelta

    from sluiceway.jobs.dataflow import Dataflow
    from sluiceway.jobs.testing import CollectSink, run_local
    from sluiceway.operators.windows import Hopping, Session, Tumbling

    rows = _bids()
    flow, keyed = Dataflow("key_counts"), CollectSink()
    stream = flow.source(ListSource(rows)).with_event_time("ts")
    stream.key_by("auction").aggregate([("auction", "count"), ("price", "sum")]).sink(keyed)
    windowed = {}
    for name, spec in [("tumbling", Tumbling(timedelta(seconds=10))),
                       ("hopping", Hopping(timedelta(seconds=10), timedelta(seconds=5))),
                       ("session", Session(timedelta(seconds=30)))]:
        windowed[name] = CollectSink()
        stream.key_by("auction").window(spec).aggregate([("auction", "count"), ("ts", "max")]).sink(windowed[name])
    run_local(flow, max_records_per_epoch=7)
    table = pa.Table.from_pylist(rows)
    expected = table.group_by("auction").aggregate([("auction", "count"), ("price", "sum")])
    last = {r["auction"]: r for r in keyed.rows()}  # an upsert changelog: the last row per key
    assert {k: (r["auction_count"], r["price_sum"]) for k, r in last.items()} == {
        r["auction"]: (r["auction_count"], r["price_sum"]) for r in expected.to_pylist()}
    tumbling = windowed["tumbling"].rows()
    assert sum(r["auction_count"] for r in tumbling) == len(rows) and len(tumbling) == 4 * 6
    assert sum(r["auction_count"] for r in windowed["hopping"].rows()) == 2 * len(rows)
    assert sorted((r["auction"], r["auction_count"]) for r in windowed["session"].rows()) == [(k, 15) for k in range(4)]


def test_an_arrow_error_in_a_built_in_step_names_the_step_and_the_users_call():
    from sluiceway.jobs.dataflow import Dataflow
    from sluiceway.jobs.testing import CollectSink, run_local
    from sluiceway.operators.errors import UserCodeError

    flow = Dataflow("bad_sum")
    flow.source(ListSource(_bids())).key_by("auction").aggregate([("name", "sum")], name="sums").sink(CollectSink())
    with pytest.raises(UserCodeError) as caught:
        run_local(flow)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("step 'sums' (aggregate) raised ArrowNotImplementedError: ")
    assert "the step was made at" in lines[2] and __file__ in lines[2] and 'aggregate([("name", "sum")]' in lines[2]
    assert not any("pyarrow" in line for line in lines[1:]), lines
