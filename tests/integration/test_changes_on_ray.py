"""Changing a job between runs on one checkpoint dir (the README's unnamed
style): what carries, what is refused with a line naming the step and the
flag, and that no row is lost or counted twice either way."""

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sluiceway.checkpoint.errors import IncompatibleJobError
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.cluster.events import format_event
from sluiceway.jobs import run
from sluiceway.jobs.dataflow import Dataflow
from sluiceway.operators.sinks import ParquetSink, read_committed
from sluiceway.operators.sources import GeneratorSource

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]

ROWS, USERS = 400, 10  # per run: half of them, 20 per user


def payments(partition, start, stop):
    offsets = pa.array(range(start, stop), pa.int64())
    return pa.record_batch({"user_id": pc.remainder(offsets, USERS), "cents": pa.array([1] * (stop - start)),
                            "page": pc.cast(pc.remainder(offsets, 3), pa.string())})


def build(tmp_path, *, insert_filter=False, key="user_id", extra_pairs=(), aggregate=True):
    flow = Dataflow("payments")
    stream = flow.source(GeneratorSource(payments, 1, 1e9, ROWS))
    stream.sink(ParquetSink(str(tmp_path / "raw")))
    if insert_filter:
        stream = stream.filter(pc.field("cents") >= 0)
    if aggregate:
        stream.key_by(key).aggregate([([], "count_all"), ("cents", "sum"), *extra_pairs]) \
            .sink(ParquetSink(str(tmp_path / "totals")))
    return flow


def first_half(tmp_path):
    summary = run(build(tmp_path), str(tmp_path / "ckpt"), epochs=2, trigger_s=0, max_records_per_epoch=ROWS // 4,
                  checkpoint_every=1)
    assert summary["last_checkpoint"] == 2


def rest(tmp_path, flow, **settings):
    return run(flow, str(tmp_path / "ckpt"), trigger_s=0, max_records_per_epoch=ROWS // 4, **settings)


def latest_counts(tmp_path) -> dict:
    totals = read_committed(str(tmp_path / "totals"), include_epoch=True).to_pylist()
    latest = {}
    for row in sorted(totals, key=lambda r: r["epoch"]):
        latest[row["user_id"]] = row
    return latest


def assert_raw_exactly_once(tmp_path):
    offsets = sorted(read_committed(str(tmp_path / "raw")).column("user_id").to_pylist())
    assert offsets == sorted(i % USERS for i in range(ROWS))


def test_an_inserted_filter_keeps_the_running_totals(tmp_path):
    first_half(tmp_path)
    events = []
    rest(tmp_path, build(tmp_path, insert_filter=True), on_event=events.append)
    assert {r["count_all"] for r in latest_counts(tmp_path).values()} == {ROWS // USERS}
    assert [e for e in events if e["type"] == "started"][0]["resume_checkpoint"] == 2
    assert_raw_exactly_once(tmp_path)
    graphs = JobStorage(str(tmp_path / "ckpt"), "payments").read_job()
    assert len(graphs["graph_history"]) == 1 and "filter" in str(graphs["graph"])


def test_a_changed_key_is_refused_then_starts_empty_when_allowed(tmp_path):
    first_half(tmp_path)
    with pytest.raises(IncompatibleJobError) as refused:
        rest(tmp_path, build(tmp_path, key="page"))
    line = str(refused.value).splitlines()[0]
    assert line.startswith("checkpoint 2 cannot be restored into this flow: the checkpoint holds the state of "
                           "aggregate step (keyed by 'user_id') 'aggregate-user_id-")
    assert "--allow-dropped-state" in line
    assert JobStorage(str(tmp_path / "ckpt"), "payments").read_job().get("graph_history") is None
    events = []
    rest(tmp_path, build(tmp_path, key="page"), allow_dropped_state=True, on_event=events.append)
    assert [format_event(e) for e in events if e["type"] == "flow_changed"][0].startswith(
        "DROPPED: the checkpoint holds the state of aggregate step (keyed by 'user_id')")
    assert_raw_exactly_once(tmp_path)
    pages = [r for r in read_committed(str(tmp_path / "totals")).to_pylist() if r.get("page") is not None]
    assert sum(1 for _ in pages) > 0


def test_an_added_pair_carries_the_old_ones(tmp_path):
    first_half(tmp_path)
    rest(tmp_path, build(tmp_path, extra_pairs=[("cents", "max")]))
    latest = latest_counts(tmp_path)
    assert {r["count_all"] for r in latest.values()} == {ROWS // USERS}
    assert {r["cents_max"] for r in latest.values()} == {1}
    assert_raw_exactly_once(tmp_path)


def test_a_removed_stateful_step_is_refused_then_dropped_when_allowed(tmp_path):
    first_half(tmp_path)
    with pytest.raises(IncompatibleJobError, match=r"^checkpoint 2 cannot be restored .* state of aggregate step"):
        rest(tmp_path, build(tmp_path, aggregate=False))
    summary = rest(tmp_path, build(tmp_path, aggregate=False), allow_dropped_state=True)
    assert summary["rows_in"] == ROWS // 2
    assert_raw_exactly_once(tmp_path)
