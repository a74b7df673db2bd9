"""Issue 23's reproductions, as a user runs them (``sluiceway.jobs.run`` on
Ray): two jobs on one ParquetSink folder, two sinks of a job on one folder,
a job run again after its checkpoint dir was deleted, and a column that
changes type between epochs. Each is refused with one line naming the cause
and the fix, and the committed output stays readable, with no row lost or
duplicated.

The refusals at start need ``cluster/launch.py`` to call
``check_sink_locations`` and ``Sink.claim``."""

from __future__ import annotations

import os
import re
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sluiceway.jobs import Dataflow, JobFailedError, run
from sluiceway.operators.errors import FlowDefinitionError, SinkOwnershipError
from sluiceway.operators.sinks import ParquetSink, read_committed
from sluiceway.operators.sources import GeneratorSource

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(240)]


def numbers(partition, start, stop):
    return pa.record_batch({"n": pa.array(range(start, stop), pa.int64())})


def shifted(by):
    def shift(batch):
        return batch.set_column(0, "n", pc.add(batch["n"], by))
    return shift


def numbers_flow(name: str, out: str, rows: int, first: int = 0, rate: float = 1e9) -> Dataflow:
    flow = Dataflow(name)
    flow.source(GeneratorSource(numbers, 1, rate, rows), name="numbers") \
        .map_batches(shifted(first), name="shift").sink(ParquetSink(out), name="out")
    return flow


def committed(out: str) -> list[int]:
    return read_committed(out).column("n").to_pylist()


def test_a_second_job_on_a_jobs_folder_is_refused_and_nothing_is_lost(tmp_path):
    """Issue 23, case 2: before, job b's epoch 1 took job a's marker for its
    own and deleted its own file: 5 rows lost."""
    out = str(tmp_path / "out")
    run(numbers_flow("a", out, 5), str(tmp_path / "ckpt_a"), trigger_s=0.05)
    with pytest.raises(SinkOwnershipError) as err:
        run(numbers_flow("b", out, 5, first=5), str(tmp_path / "ckpt_b"), trigger_s=0.05)
    assert str(err.value).splitlines()[0] == (f"ParquetSink folder file://{out} belongs to job 'a' (sink step "
                                              "'out'); job 'b' cannot write there: give this sink its own folder")
    assert committed(out) == [0, 1, 2, 3, 4]
    run(numbers_flow("b", str(tmp_path / "out_b"), 5, first=5), str(tmp_path / "ckpt_b"), trigger_s=0.05)
    assert committed(str(tmp_path / "out_b")) == [5, 6, 7, 8, 9]


def test_two_sinks_of_a_job_on_one_folder_are_refused_before_the_run(tmp_path):
    """Issue 23, case 3: before, both wrote part-00000-f1g0.parquet under one
    marker per epoch: 5 of 10 rows lost."""
    out = str(tmp_path / "out")
    flow = Dataflow("two_sinks")
    numbers_ = flow.source(GeneratorSource(numbers, 1, 1e9, 5), name="numbers")
    numbers_.sink(ParquetSink(out), name="out")
    numbers_.map_batches(shifted(5), name="shift").sink(ParquetSink(out), name="shifted_out")
    with pytest.raises(FlowDefinitionError) as err:
        run(flow, str(tmp_path / "ckpt"), trigger_s=0.05)
    assert str(err.value).splitlines()[0] == (f"sink steps 'out' (ParquetSink) and 'shifted_out' (ParquetSink) "
                                              f"both write file://{out}; give each sink its own folder")
    assert not os.path.exists(out)


def test_a_job_whose_checkpoints_were_deleted_is_refused_and_writes_nothing_twice(tmp_path):
    """Issue 23, case 4: before, the new run adopted the old epoch markers:
    10 duplicate rows (6,010 of 6,000)."""
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    run(numbers_flow("again", out, 6000, rate=4000), ckpt, trigger_s=0.25)
    assert committed(out) == list(range(6000))
    shutil.rmtree(ckpt)
    with pytest.raises(SinkOwnershipError) as err:
        run(numbers_flow("again", out, 6000, rate=4000), ckpt, trigger_s=0.25)
    first = str(err.value).splitlines()[0]
    assert re.fullmatch(
        rf"ParquetSink folder file://{re.escape(out)} holds output of job 'again' \(sink step 'out'\) committed "
        rf"under other checkpoints \((?:file://)?{re.escape(ckpt)}, job id \w+\), not the ones at "
        rf"(?:file://)?{re.escape(ckpt)} \(job id \w+\); running on would write it again: restore those "
        r"checkpoints, or point the sink at a new folder \(or delete this one\) to start over", first), first
    assert committed(out) == list(range(6000))


def text_from(at: int):
    """``n`` as text from row ``at`` on: the job's bug."""
    def parse(batch):
        if pc.max(batch["n"]).as_py() >= at:
            return batch.set_column(0, "n", pc.cast(batch["n"], pa.string()))
        return batch
    return parse


def fixed(batch):
    """The fix: the column cast back in the job."""
    return batch.set_column(0, "n", pc.cast(batch["n"], pa.int64()))


def test_a_column_that_changes_type_stops_the_job_and_the_fixed_job_resumes_exactly_once(tmp_path):
    """Issue 23, case 5: before, the job succeeded and read_committed failed
    with "Unable to merge: Field cents has incompatible types"."""
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")

    def flow(parse):
        f = Dataflow("types")
        f.source(GeneratorSource(numbers, 1, 1e9, 1000), name="numbers").map_batches(parse, name="parse") \
            .sink(ParquetSink(out), name="out")
        return f

    with pytest.raises(JobFailedError) as err:
        run(flow(text_from(500)), ckpt, trigger_s=0.05, max_records_per_epoch=100, checkpoint_every=2)
    first = str(err.value).splitlines()[0]
    assert re.fullmatch(
        rf"step 'out' \(sink\): cannot write epoch \d+: column 'n' is string here but int64 in the epochs "
        rf"ParquetSink folder file://{re.escape(out)} already committed, and readers cannot merge the two; cast "
        r"the column in the job \(pyarrow.compute.cast in a map_batches step\), or write to a new folder", first), first
    so_far = committed(out)  # readable, and a prefix of the rows
    assert so_far == list(range(len(so_far))) and len(so_far) <= 500
    run(flow(fixed), ckpt, trigger_s=0.05, max_records_per_epoch=100, checkpoint_every=2)
    got = read_committed(out)
    assert got.schema.field("n").type == pa.int64()
    assert got.column("n").to_pylist() == list(range(1000))
