"""FileSource on Ray: files picked up once each across a restart of the job,
a corrupt file delivered as a dead letter into its own sink, counted in the
epoch metrics."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluiceway.checkpoint.timeline import RecordKind, history
from sluiceway.checkpoint import JobStorage
from sluiceway.jobs import Dataflow, run
from sluiceway.operators.connectors.files import FileSource
from sluiceway.operators.sinks import ParquetSink, read_committed

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]


def flow_over(inbox, out):
    flow = Dataflow("inbox")
    files = flow.source(FileSource(str(inbox), "parquet", partitions=2, bounded=True), name="files")
    files.sink(ParquetSink(str(out / "rows")), name="rows_out")
    files.dead_letters(name="bad_files").sink(ParquetSink(str(out / "dead")), name="dead_out")
    return flow


def test_files_are_read_once_each_across_a_restart_and_a_corrupt_one_is_a_dead_letter(tmp_path):
    inbox, out, ckpt = tmp_path / "in", tmp_path / "out", str(tmp_path / "ckpt")
    inbox.mkdir()
    for i in range(4):
        pq.write_table(pa.table({"id": list(range(i * 100, i * 100 + 100))}), inbox / f"a-{i}.parquet")
    first = run(flow_over(inbox, out), ckpt, trigger_s=0.1, max_records_per_epoch=2)
    assert first["stopped"] == "idle" and first["rows_in"] == 400
    for i in range(4, 6):
        pq.write_table(pa.table({"id": list(range(i * 100, i * 100 + 100))}), inbox / f"b-{i}.parquet")
    (inbox / "b-broken.parquet").write_bytes(b"not a parquet file")
    second = run(flow_over(inbox, out), ckpt, trigger_s=0.1, max_records_per_epoch=2)
    assert second["stopped"] == "idle" and second["rows_in"] == 200 and second["dead_letters"] == 1
    ids = read_committed(str(out / "rows")).column("id").to_pylist()
    assert sorted(ids) == list(range(600))  # each file once, none twice
    [letter] = read_committed(str(out / "dead")).to_pylist()
    assert letter["location"].endswith("b-broken.parquet") and "ArrowInvalid" in letter["reason"]
    storage = JobStorage(ckpt, "inbox")
    assert sum(storage.read_commit(e).get("dead_letters", 0) for e in storage.commit_epochs()) == 1
    assert history(ckpt, "inbox").of_kind(RecordKind.RUN_STARTED)
