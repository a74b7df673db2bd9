"""Incremental checkpoints: a checkpoint writes the rows that changed (and
the small runs they are merged with), a chain of runs restores exactly the
state a full copy would."""

import pyarrow as pa

from sluiceway.checkpoint import JobStorage
from sluiceway.checkpoint.manifest import assemble_state, build_manifest
from sluiceway.cluster.alignment import Barrier
from sluiceway.cluster.graph import plan
from sluiceway.cluster.runtime import TaskRuntime
from sluiceway.jobs import Dataflow
from sluiceway.jobs.testing import CollectSink
from sluiceway.operators.keys import key_groups
from sluiceway.operators.sources import ListSource
from sluiceway.operators.store import MAX_RUNS, TIER_RATIO


def keyed_runtime(storage, manifest=None):
    flow = Dataflow("chain")
    flow.source(ListSource([{"k": 0, "v": 0}])).key_by("k", name="by_k").aggregate([("v", "sum")], name="sums") \
        .sink(CollectSink())
    physical = plan(flow.graph, 1)
    task = [t for t in physical.tasks() if t.stage == "by_k"][0]
    runtime = TaskRuntime(physical, task, storage)
    runtime.restore(manifest)
    return runtime, physical


def checkpoint(runtime, physical, storage, epoch, table, previous):
    barrier = Barrier(epoch, checkpoint=True)
    runtime.process_epoch(epoch, barrier, [table], table.num_rows)
    result = runtime.finish_epoch(epoch, barrier)
    state, files = assemble_state([result.state], result.state_files, previous.files if previous else {})
    manifest = build_manifest(job="chain", checkpoint_id=epoch, epoch=epoch, offsets={}, watermarks={}, tasks=[],
                              state=state, files=files, started_at=0.0, completed_at=1.0,
                              parallelism=physical.parallelism(), max_key_groups=128, sink_handles={})
    storage.write_manifest(epoch, manifest.to_json())
    return manifest, result


def test_small_changes_are_written_as_deltas_and_restore_exactly(tmp_path):
    storage = JobStorage(str(tmp_path), "chain")
    runtime, physical = keyed_runtime(storage)
    everyone = pa.table({"k": pa.array(range(20_000), pa.int64()), "v": pa.repeat(1, 20_000)})
    manifest, first = checkpoint(runtime, physical, storage, 1, everyone, None)
    rows_first = sum(f["rows"] for f in first.state_files)
    assert rows_first == 20_000
    groups = key_groups(everyone.column("k"), 128).to_pylist()
    by_group = {}
    for k, kg in zip(range(20_000), groups):
        by_group.setdefault(kg, []).append(k)
    most = 0
    for epoch in range(2, 42):  # one key changes in every key group each time
        keys = [ks[epoch % len(ks)] for ks in by_group.values()]
        few = pa.table({"k": pa.array(keys, pa.int64()), "v": pa.repeat(epoch, len(keys))})
        manifest, result = checkpoint(runtime, physical, storage, epoch, few, manifest)
        written = sum(f["rows"] for f in result.state_files)
        most = max(most, written)
        chains = list(manifest.state["sums"].values())
        assert all(chain[0][0] == first.state_files[0]["path"] for chain in chains)  # the base is never rewritten
        assert all(2 <= len(c) <= MAX_RUNS for c in chains)
    # The changed rows and the small runs they were merged with, never a key group whole again.
    assert most <= TIER_RATIO * 8 * few.num_rows < 20_000
    expected = {kg: t.sort_by("k").to_pylist() for kg, t in runtime.logic["sums"].snapshot().items()}
    restored, _ = keyed_runtime(storage, manifest)
    got = {kg: t.sort_by("k").to_pylist() for kg, t in restored.logic["sums"].snapshot().items()}
    assert got == expected
