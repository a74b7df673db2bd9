"""Schemas that do not break readers: a ParquetSink or DeltaSink refuses, at
pre-commit and in one line naming the column and the epoch, a batch whose
column types cannot be merged with what it committed, or with what another
pre-commit already wrote for a new column; types Arrow promotes are written
and read back merged. Refused epochs never commit, nothing committed is
lost, and the job, once fixed, runs on."""

from __future__ import annotations

import json
import os

import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from sluiceway.operators.errors import FlowValidationError, SinkError
from sluiceway.operators.sinks import ParquetSink, SinkContext, SinkOwner, read_committed

FIX = "cast the column in the job (pyarrow.compute.cast in a map_batches step), or write to a new folder"


def rows(cents, type_=pa.int64(), **more) -> pa.Table:
    return pa.table({"cents": pa.array(cents, type_), **more})


def writers(sink, attempt="f1g0", n=2):
    return [sink.open(SinkContext("out", i, n, "clicks", attempt)) for i in range(n)]


def refused(writer, epoch, table) -> str:
    with pytest.raises(FlowValidationError) as err:
        writer.precommit(epoch, table)
    return str(err.value).splitlines()[0]


def test_a_column_that_changes_type_is_refused_and_the_fixed_job_runs_on(tmp_path):
    """Issue 23, case 5: int64, then string. Before, the job succeeded and
    read_committed failed with "Unable to merge"."""
    out = str(tmp_path / "out")
    sink = ParquetSink(out)
    w = writers(sink)
    sink.commit(1, [w[0].precommit(1, rows([1, 2])), w[1].precommit(1, rows([3]))])
    w[0].precommit(2, rows([4]))
    assert refused(w[1], 2, rows(["5"], pa.string())) == (
        f"step 'out' (sink): cannot write epoch 2: column 'cents' is string here but int64 in the epochs "
        f"ParquetSink folder file://{out} already committed, and readers cannot merge the two; {FIX}")
    assert os.listdir(tmp_path / "out" / "data" / "epoch=0000000002") == ["part-00000-f1g0.parquet"]  # not s1's
    assert read_committed(out).column("cents").to_pylist() == [1, 2, 3]  # epoch 2 never committed
    sink.abort(1, SinkContext("out", -1, 0, "clicks", "f2"))  # the next run, with the column cast
    w = writers(sink, "f2g0")
    sink.commit(2, [w[0].precommit(2, rows([4])), w[1].precommit(2, rows(["5"], pa.string()).cast(
        pa.schema([("cents", pa.int64())])))])
    got = read_committed(out, include_epoch=True)
    assert got.to_pydict() == {"cents": [1, 2, 3, 4, 5], "epoch": [1, 1, 1, 2, 2]}


def test_types_arrow_promotes_are_written_and_read_back_merged(tmp_path):
    out = str(tmp_path / "out")
    sink = ParquetSink(out)
    w = writers(sink)
    sink.commit(1, [w[0].precommit(1, rows([1])), w[1].precommit(1, rows([2], pa.int32()))])
    sink.commit(2, [w[0].precommit(2, rows([2.5], pa.float64())), w[1].precommit(2, rows([3]))])
    got = read_committed(out)
    assert got.schema.field("cents").type == pa.float64()
    assert got.column("cents").to_pylist() == [1.0, 2.0, 2.5, 3.0]
    with open(tmp_path / "out" / "_sluiceway" / "schema.json") as f:
        assert json.load(f)["columns"] == {"cents": "double"}
    assert refused(w[0], 3, rows(["x"], pa.string())).startswith(
        "step 'out' (sink): cannot write epoch 3: column 'cents' is string here but double in the epochs")
    sink.commit(3, [w[0].precommit(3, rows([None], pa.null())), w[1].precommit(3, rows([7]))])  # nulls fit all
    assert read_committed(out).column("cents").to_pylist() == [1.0, 2.0, 2.5, 3.0, None, 7.0]


def test_two_pre_commits_cannot_write_two_types_of_a_new_column(tmp_path):
    """Subtasks of one epoch, and epochs in flight together, agree on a new
    column's type: the first pre-commit that writes it claims it."""
    out = str(tmp_path / "out")
    sink = ParquetSink(out)
    w = writers(sink)
    sink.commit(1, [w[0].precommit(1, rows([1])), w[1].precommit(1, rows([2]))])
    h0 = w[0].precommit(2, rows([3], note=pa.array([7], pa.int64())))
    assert refused(w[1], 2, rows([4], note=pa.array(["x"]))) == (
        "step 'out' (sink): cannot write epoch 2: column 'note' is string here but int64 in epoch 2 (subtask 0), "
        f"pre-committed to ParquetSink folder file://{out} and not committed yet; {FIX}")
    assert refused(w[1], 3, rows([4], note=pa.array(["x"]))).startswith(  # a later epoch, before 2 commits
        "step 'out' (sink): cannot write epoch 3: column 'note' is string here but int64 in epoch 2 (subtask 0)")
    sink.commit(2, [h0, w[1].precommit(2, rows([4], note=pa.array([8], pa.int32())))])
    assert read_committed(out).to_pydict() == {"cents": [1, 2, 3, 4], "note": [None, None, 7, 8]}
    assert refused(w[1], 3, rows([5], note=pa.array(["x"]))).startswith(
        "step 'out' (sink): cannot write epoch 3: column 'note' is string here but int64 in the epochs")


def test_the_first_epoch_has_the_same_guard(tmp_path):
    sink = ParquetSink(str(tmp_path / "out"))
    w = writers(sink)
    w[1].precommit(1, rows(["a"], pa.string()))
    assert refused(w[0], 1, rows([1])).startswith(
        "step 'out' (sink): cannot write epoch 1: column 'cents' is int64 here but string in epoch 1 (subtask 1)")


def test_an_abort_forgets_the_types_of_epochs_that_never_committed(tmp_path):
    out = str(tmp_path / "out")
    sink = ParquetSink(out)
    w = writers(sink)
    sink.commit(1, [w[0].precommit(1, rows([1])), w[1].precommit(1, rows([2]))])
    w[0].precommit(2, rows([3], note=pa.array([1])))  # the job failed here; the user changes 'note' to text
    sink.abort(1, SinkContext("out", -1, 0, "clicks", "f2"))
    w = writers(sink, "f2g0")
    sink.commit(2, [w[0].precommit(2, rows([3], note=pa.array(["a"]))), w[1].precommit(2, rows([4]))])
    assert read_committed(out).to_pydict() == {"cents": [1, 2, 3, 4], "note": [None, None, "a", None]}


def test_a_commit_that_finds_two_types_refuses_and_loses_nothing(tmp_path):
    """The last guard, for a mix the pre-commits could not see (here: their
    claims removed by hand between them)."""
    out = str(tmp_path / "out")
    sink = ParquetSink(out)
    w = writers(sink)
    sink.commit(1, [w[0].precommit(1, rows([1])), w[1].precommit(1, rows([2]))])
    h0 = w[0].precommit(2, rows([3], note=pa.array([1])))
    fsspec.filesystem("file").rm(str(tmp_path / "out" / "_sluiceway" / "columns"), recursive=True)
    h1 = w[1].precommit(2, rows([4], note=pa.array(["a"])))
    with pytest.raises(SinkError) as err:
        sink.commit(2, [h0, h1])
    assert str(err.value) == (
        f"ParquetSink folder file://{out} cannot commit epoch 2: column 'note' is string in one of its files but "
        "int64 in the others or in the epochs committed before, and readers cannot merge the two; its files "
        "stay, not committed: make the job give the column one type, and write to a new folder")
    assert read_committed(out).column("cents").to_pylist() == [1, 2]
    assert sorted(os.listdir(tmp_path / "out" / "data" / "epoch=0000000002")) == [
        "part-00000-f1g0.parquet", "part-00001-f1g0.parquet"]


def test_a_folder_written_before_schemas_were_recorded_gets_its_record(tmp_path):
    out = str(tmp_path / "out")
    sink = ParquetSink(out)
    w = writers(sink)
    sink.commit(1, [w[0].precommit(1, rows([1])), w[1].precommit(1, rows([2], pa.float64()))])
    fsspec.filesystem("file").rm(str(tmp_path / "out" / "_sluiceway"), recursive=True)  # as an older release left it
    sink.claim(SinkOwner("clicks", "id", "out", "file:///ckpt", fresh=False))
    with open(tmp_path / "out" / "_sluiceway" / "schema.json") as f:
        assert json.load(f)["columns"] == {"cents": "double"}
    assert refused(writers(sink, "f2g0")[0], 2, rows(["x"], pa.string())).startswith(
        "step 'out' (sink): cannot write epoch 2: column 'cents' is string here but double in the epochs")


class CountingFileSystem(LocalFileSystem):
    """A local filesystem that counts reads of each file name (``sluiceway-counting:///path``)."""

    protocol = ("sluiceway-counting",)
    reads: dict = {}

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("sluiceway-counting://"):
            path = path[len("sluiceway-counting://"):]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"sluiceway-counting://{self._strip_protocol(name)}"

    def cat_file(self, path, *args, **kwargs):
        name = os.path.basename(path)
        CountingFileSystem.reads[name] = CountingFileSystem.reads.get(name, 0) + 1
        return super().cat_file(path, *args, **kwargs)


def test_a_steady_job_reads_the_committed_schema_once_per_writer(tmp_path):
    fsspec.register_implementation("sluiceway-counting", CountingFileSystem, clobber=True)
    CountingFileSystem.reads = {}
    sink = ParquetSink(f"sluiceway-counting://{tmp_path}/out")
    w = writers(sink)
    seen = []
    for epoch in range(1, 21):
        sink.commit(epoch, [w[0].precommit(epoch, rows([epoch])), w[1].precommit(epoch, rows([-epoch]))])
        seen.append(CountingFileSystem.reads.get("schema.json", 0))
    # epoch 1: each writer looks and finds none, the commit looks and records it; epoch 2: each writer reads it
    assert seen[:2] == [3, 5] and seen[-1] == 5, seen
    assert read_committed(f"{tmp_path}/out").num_rows == 40


def test_delta_refuses_a_type_its_column_cannot_hold_and_adds_new_columns(tmp_path):
    deltalake = pytest.importorskip("deltalake")
    from sluiceway.operators.connectors.delta import DeltaSink

    url = str(tmp_path / "table")
    sink = DeltaSink(url)
    w = writers(sink)
    sink.commit(1, [w[0].precommit(1, rows([1])), w[1].precommit(1, rows([2]))])
    assert refused(w[0], 2, rows([2.5], pa.float64())) == (
        f"step 'out' (sink): cannot write epoch 2: column 'cents' is double here but int64 in DeltaSink table "
        f"file://{url}, which cannot hold it; cast the column in the job (pyarrow.compute.cast in a map_batches "
        "step), or write to a new table")
    h0 = w[0].precommit(2, rows([3], pa.int32(), note=pa.array(["a"], pa.large_string())))
    assert refused(w[1], 2, rows([4], note=pa.array([5]))).startswith(
        "step 'out' (sink): cannot write epoch 2: column 'note' is int64 here but string in epoch 2 (subtask 0)")
    sink.commit(2, [h0, w[1].precommit(2, rows([4]))])
    table = deltalake.DeltaTable(url)
    assert table.to_pyarrow_table().sort_by("cents").to_pydict() == {"cents": [1, 2, 3, 4],
                                                                      "note": [None, None, "a", None]}


def test_delta_makes_its_table_with_every_claimed_column(tmp_path):
    """Epoch 2's column is in the table epoch 1 makes: never dropped."""
    deltalake = pytest.importorskip("deltalake")
    from sluiceway.operators.connectors.delta import DeltaSink

    url = str(tmp_path / "table")
    sink = DeltaSink(url)
    w = writers(sink)
    h1 = w[0].precommit(1, rows([1]))
    h2 = w[1].precommit(2, rows([2], note=pa.array(["late"])))
    sink.commit(1, [h1])
    sink.commit(2, [h2])
    got = deltalake.DeltaTable(url).to_pyarrow_table().sort_by("cents")
    assert got.to_pydict() == {"cents": [1, 2], "note": [None, "late"]}


def test_delta_merge_keeps_no_op_column(tmp_path):
    deltalake = pytest.importorskip("deltalake")
    from sluiceway.operators.connectors.delta import DeltaSink

    url = str(tmp_path / "table")
    sink = DeltaSink(url, mode="merge", key="id")
    w = writers(sink, n=1)[0]
    sink.commit(1, [w.precommit(1, pa.table({"id": [1, 2], "v": ["a", "b"], "_op": ["insert", "insert"]}))])
    sink.commit(2, [w.precommit(2, pa.table({"id": [1, 3], "v": [None, "c"], "_op": ["delete", "insert"],
                                             "w": pa.array([None, 1.5])}))])
    got = deltalake.DeltaTable(url).to_pyarrow_table().sort_by("id")
    assert got.to_pydict() == {"id": [2, 3], "v": ["b", "c"], "w": [None, 1.5]}
