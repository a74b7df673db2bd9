"""Parquet files as a replayable source."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluiceway.jobs import Dataflow
from sluiceway.jobs.testing import CollectSink, run_local
from sluiceway.operators.errors import FlowDefinitionError
from sluiceway.operators.sources import ParquetFilesSource


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        rows = list(range(i * 1000, i * 1000 + 1000))
        pq.write_table(pa.table({"n": rows, "s": [str(r) for r in rows]}), tmp_path / f"part-{i}.parquet",
                       row_group_size=300)
    return tmp_path


def test_any_range_reads_exactly_its_rows_across_row_groups(folder):
    src = ParquetFilesSource(str(folder), columns=["n"])
    assert src.partition_count() == 3 and [src.end_offset(p) for p in range(3)] == [1000] * 3
    for start, stop in ((0, 1), (299, 301), (250, 950), (999, 1000), (0, 1000)):
        assert src.read(2, start, stop).column("n").to_pylist() == list(range(2000 + start, 2000 + stop))
    assert src.read(0, 10, 12).column_names == ["n"]


def test_glob_list_and_errors(folder):
    assert ParquetFilesSource(f"{folder}/part-[01].parquet").partition_count() == 2
    assert ParquetFilesSource([str(folder / "part-2.parquet")]).read(0, 0, 2).column("n").to_pylist() == [2000, 2001]
    with pytest.raises(FlowDefinitionError, match="found no Parquet files"):
        ParquetFilesSource(f"{folder}/nothing-*.parquet")


def test_a_flow_reads_every_row_once(folder):
    flow, out = Dataflow("files"), CollectSink()
    flow.source(ParquetFilesSource(str(folder)), parallelism=2).sink(out)
    run_local(flow, max_records_per_epoch=700)
    assert sorted(r["n"] for r in out.rows()) == list(range(3000))
