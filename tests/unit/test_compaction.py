"""Compaction of a ParquetSink's small files while the job commits and
readers read: every row exactly once, in order, at every moment."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from sluiceway.jobs import Dataflow
from sluiceway.jobs.testing import run_local
from sluiceway.operators.compaction import Compaction, compact, list_compactions
from sluiceway.operators.sinks import ParquetSink, read_committed
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
        background = sink.wait_for_compaction(30)
        # What the background thread had not reached yet, and the replaced folders, a second later.
        while compact(out, sink.compaction) is not None:
            pass
        compact(out, sink.compaction, now=time.time() + 2)
    finally:
        done.set()
        thread.join(30)
    assert not problems, problems[:5]
    assert reads[0] >= 2 and epochs == 40 and background["runs"] >= 1 and background["last_error"] is None
    final = read_committed(out, include_epoch=True)
    assert sorted(final.column("n").to_pylist()) == list(range(rows))
    compactions = list_compactions(out)
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
    made = compact(out, Compaction(min_files=2, target_mb=1, keep_inputs_s=600), now=1000.0)
    assert made is not None and made.first == 1 and made.last == 10 and made.rows == 100
    assert len([d for d in os.listdir(os.path.join(out, "data")) if d.startswith("epoch=")]) == 10  # still there
    assert compact(out, Compaction(min_files=2, keep_inputs_s=600), now=1500.0) is None  # nothing new
    compact(out, Compaction(min_files=2, keep_inputs_s=600), now=1601.0)  # older than keep_inputs_s now
    assert [d for d in os.listdir(os.path.join(out, "data")) if d.startswith("epoch=")] == []
    before = read_committed(out, include_epoch=True)  # from the compaction, in the order of the epochs
    assert before.column("n").to_pylist() == [n for e in range(10) for p in (0, 1) for n in range(10 * e + p, 10 * e + 10, 2)]
    assert before.column("epoch").to_pylist() == [e for e in range(1, 11) for _ in range(10)]
    with pytest.raises(ValueError, match="min_files >= 2"):
        Compaction(min_files=1)


def test_of_two_overlapping_compactions_readers_use_one(tmp_path):
    out, other = tmp_path / "out", tmp_path / "other"
    flow = Dataflow("overlap")
    flow.source(ListSource([{"n": i} for i in range(60)])).sink(ParquetSink(str(out)))
    run_local(flow, max_records_per_epoch=10)
    # A second compactor that saw only epochs 1..3 committed, and did not see the first compactor's work.
    shutil.copytree(out, other)
    for epoch in (4, 5, 6):
        os.remove(other / "_committed" / f"{epoch:010d}.json")
    second = compact(str(other), Compaction(min_files=2, target_mb=1))
    first = compact(str(out), Compaction(min_files=2, target_mb=1))
    assert (first.first, first.last) == (1, 6) and (second.first, second.last) == (1, 3)
    for relative in (second.path, f"_compacted/{os.listdir(other / '_compacted')[0]}"):
        shutil.copy(other / relative, out / relative)
    assert [(c.first, c.last) for c in list_compactions(str(out))] == [(1, 3), (1, 6)]
    # Readers take 1..3 from the one that starts first and ends first, 4..6 from the epochs' own files.
    assert read_committed(str(out)).column("n").to_pylist() == list(range(60))
    assert compact(str(out), Compaction(min_files=2, target_mb=1)) is None  # nothing after epoch 6
