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


def test_ten_thousand_files_are_read_in_order_with_bounded_memory(tmp_path):
    from sluiceway.cluster.epochs import plan_epoch

    files, per_file = 10_000, 20
    for i in range(files):
        pq.write_table(pa.table({"n": range(i * per_file, (i + 1) * per_file)}), tmp_path / f"f{i:05d}.parquet",
                       row_group_size=8)
    src = ParquetFilesSource(str(tmp_path))
    assert src.partition_count() == files and sum(src.rows) == files * per_file
    offsets, parallelism, budget, epochs = {}, 2, 5000, 0
    while True:
        planned = plan_epoch(epochs + 1, {"s": src}, {"s": offsets}, now=0, started_at=0,
                             max_records_per_epoch=budget, parallelism={"s": parallelism})
        if planned.ranges is None:
            break
        epochs += 1
        ranges = {p: r for p, r in planned.ranges["s"].items() if r[1] > r[0]}
        # Each task reads its lowest unfinished files, as many as its share of the epoch holds.
        for task in range(parallelism):
            mine = sorted(p for p in ranges if p % parallelism == task)
            assert mine == list(range(mine[0], mine[-1] + 1, parallelism)) and len(mine) <= budget // 2 // per_file + 1
        for p, (start, stop) in ranges.items():
            assert src.read(p, start, stop).column("n").to_pylist() == list(range(p * per_file + start,
                                                                                 p * per_file + stop))
        groups, open_files = src.held()
        assert groups <= parallelism and open_files <= parallelism  # only files read partly stay open
        offsets = {p: stop for p, (_, stop) in planned.ranges["s"].items()}
    assert epochs == files * per_file // budget and all(offsets[p] == per_file for p in range(files))


def test_a_backlog_of_files_in_a_flow_reads_each_row_once_in_order(tmp_path):
    for i in range(300):
        pq.write_table(pa.table({"n": range(i * 50, (i + 1) * 50)}), tmp_path / f"f{i:03d}.parquet",
                       row_group_size=20)
    flow, out = Dataflow("backlog"), CollectSink()
    flow.source(ParquetFilesSource(str(tmp_path)), parallelism=3).sink(out)
    epochs = run_local(flow, max_records_per_epoch=999)
    got = [r["n"] for r in out.rows()]
    assert sorted(got) == list(range(300 * 50)) and epochs == -(-300 * 50 // 999)
    for task in range(3):  # each task's rows come in file order
        mine = [n for n in got if (n // 50) % 3 == task]
        assert mine == sorted(mine)
