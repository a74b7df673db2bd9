"""Compaction of a ParquetSink's small files while the job commits and
readers read: every row exactly once, in order, at every moment."""

from __future__ import annotations

import os
import threading
import time

import pytest

from sluiceway.jobs import Dataflow
from sluiceway.jobs.testing import run_local
from sluiceway.operators.compaction import Compaction, compact, list_compactions
from sluiceway.operators.sinks import ParquetSink, _ParquetLayout, read_committed
from sluiceway.operators.sources import ListSource


def test_compaction_while_the_job_commits_and_readers_read(tmp_path):
    rows, out = 6000, str(tmp_path / "out")
    sink = ParquetSink(out, compaction=Compaction(min_files=6, target_mb=1, keep_inputs_s=1.0))
    flow = Dataflow("compacted")
    flow.source(ListSource([{"n": i, "pad": "x" * 40} for i in range(rows)], partitions=3), parallelism=3).sink(sink)
    problems, reads, done = [], [0], threading.Event()

    def reader():
        while not done.is_set():
            try:
                table = read_committed(out, include_epoch=True)
            except FileNotFoundError as exc:  # a read slower than keep_inputs_s three times over: not expected
                problems.append(f"read failed: {exc}")
                continue
            reads[0] += 1
            if table.num_rows == 0:
                continue
            seen = table.column("n").to_pylist()
            if len(seen) != len(set(seen)):
                problems.append(f"a row read twice in a read of {len(seen)} rows")
            epochs = table.column("epoch").to_pylist()
            if epochs != sorted(epochs):
                problems.append("epochs out of order")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        epochs = run_local(flow, max_records_per_epoch=150)  # 40 epochs of 3 files
        sink._compactor.wait(30)
        # What the background thread had not reached yet, and the replaced folders, a second later.
        while compact(_ParquetLayout(out), sink.compaction) is not None:
            pass
        compact(_ParquetLayout(out), sink.compaction, now=time.time() + 2)
    finally:
        done.set()
        thread.join(30)
    assert not problems, problems[:5]
    assert reads[0] >= 2 and epochs == 40 and sink._compactor.runs >= 1 and sink._compactor.last_error is None
    final = read_committed(out, include_epoch=True)
    assert sorted(final.column("n").to_pylist()) == list(range(rows))
    compactions = list_compactions(_ParquetLayout(out))
    assert len(compactions) >= 2 and compactions[0].first == 1
    assert all(a.last < b.first for a, b in zip(compactions, compactions[1:]))
    covered = {e for c in compactions for e in range(c.first, c.last + 1)}
    left = [d for d in os.listdir(os.path.join(out, "data")) if d.startswith("epoch=")]
    assert not any(int(d[6:]) in covered for d in left)  # replaced folders removed after keep_inputs_s
    assert len(left) + len(compactions) < epochs  # fewer files than one folder per epoch


def test_compaction_keeps_replaced_files_for_readers_that_listed_them_and_is_never_fatal(tmp_path):
    out = str(tmp_path / "out")
    sink = ParquetSink(out)
    flow = Dataflow("kept")
    flow.source(ListSource([{"n": i} for i in range(100)], partitions=2), parallelism=2).sink(sink)
    run_local(flow, max_records_per_epoch=10)
    layout = _ParquetLayout(out)
    made = compact(layout, Compaction(min_files=2, target_mb=1, keep_inputs_s=600), now=1000.0)
    assert made is not None and made.first == 1 and made.last == 10 and made.rows == 100
    assert len([d for d in os.listdir(os.path.join(out, "data")) if d.startswith("epoch=")]) == 10  # still there
    assert compact(layout, Compaction(min_files=2, keep_inputs_s=600), now=1500.0) is None  # nothing new
    compact(layout, Compaction(min_files=2, keep_inputs_s=600), now=1601.0)  # older than keep_inputs_s now
    assert [d for d in os.listdir(os.path.join(out, "data")) if d.startswith("epoch=")] == []
    before = read_committed(out, include_epoch=True)  # from the compaction, in the order of the epochs
    assert before.column("n").to_pylist() == [n for e in range(10) for p in (0, 1) for n in range(10 * e + p, 10 * e + 10, 2)]
    assert before.column("epoch").to_pylist() == [e for e in range(1, 11) for _ in range(10)]
    with pytest.raises(ValueError, match="min_files >= 2"):
        Compaction(min_files=1)


def test_an_overlapping_compaction_is_ignored_by_readers(tmp_path):
    out = str(tmp_path / "out")
    flow = Dataflow("overlap")
    flow.source(ListSource([{"n": i} for i in range(60)])).sink(ParquetSink(out))
    run_local(flow, max_records_per_epoch=10)
    layout = _ParquetLayout(out)
    first = compact(layout, Compaction(min_files=3, target_mb=1))
    # A second compactor that did not see the first (its own view of the range): readers use one of them.
    from sluiceway.operators import compaction

    markers = [(e, layout.read_marker(e)["files"]) for e in range(2, 5)]
    second = compaction._merge(layout, markers, 2**30, 0.0)
    assert (first.first, first.last) == (1, 6) and (second.first, second.last) == (2, 4)
    assert read_committed(out).column("n").to_pylist() == list(range(60))
