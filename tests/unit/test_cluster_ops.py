"""Operations without Ray: savepoints (written whole, kept by retention,
in the offsets log), the local cluster's state file and process sessions,
and the CLI's one-line errors when there is no cluster."""

import json
import os
import signal
import stat
import subprocess
import time

import pyarrow as pa
import pytest

from sluiceway.checkpoint import JobStorage
from sluiceway.checkpoint.manifest import assemble_state, build_manifest
from sluiceway.checkpoint.retention import apply_retention
from sluiceway.cluster import devcluster
from sluiceway.cluster.alignment import Barrier
from sluiceway.cluster.connect import resolve
from sluiceway.cluster.epochs import EpochPlan
from sluiceway.cluster.errors import ClusterError
from sluiceway.jobs.cli import main
from test_state_chains import checkpoint, keyed_runtime


def test_a_savepoint_writes_every_key_group_whole_and_stands_alone(tmp_path):
    storage = JobStorage(str(tmp_path), "chain")
    runtime, physical = keyed_runtime(storage)
    everyone = pa.table({"k": pa.array(range(5_000), pa.int64()), "v": pa.repeat(1, 5_000)})
    manifest, _ = checkpoint(runtime, physical, storage, 1, everyone, None)
    one = pa.table({"k": pa.array([7], pa.int64()), "v": pa.array([5], pa.int64())})
    manifest, delta = checkpoint(runtime, physical, storage, 2, one, manifest)
    assert sum(f["rows"] for f in delta.state_files) == 1  # an ordinary checkpoint: the change only
    barrier = Barrier(3, checkpoint=True, savepoint=True)
    runtime.process_epoch(3, barrier, [one.slice(0, 0)], 0)
    result = runtime.finish_epoch(3, barrier)
    assert sum(f["rows"] for f in result.state_files) == 5_000  # the savepoint: everything
    state, files = assemble_state([result.state], result.state_files, manifest.files)
    assert {f["checkpoint"] for f in files.values()} == {3}  # refers to no older checkpoint's files
    assert all(len(chain) == 1 for chain in state["sums"].values())


def _manifest(storage, cid, savepoint=False):
    doc = build_manifest(job=storage.job, checkpoint_id=cid, epoch=cid, offsets={}, watermarks={}, tasks=[],
                         state={}, files={}, started_at=0.0, completed_at=1.0, parallelism={}, max_key_groups=128,
                         sink_handles={}, savepoint=savepoint)
    storage.write_manifest(cid, doc.to_json())


def test_retention_keeps_savepoints_and_the_epoch_logs_after_the_oldest(tmp_path):
    storage = JobStorage(str(tmp_path), "job")
    for epoch in range(1, 13):
        storage.write_offsets(epoch, {"epoch": epoch})
        storage.write_commit(epoch, {"epoch": epoch})
    for cid in (2, 4, 6, 8, 10, 12):
        _manifest(storage, cid, savepoint=cid == 4)
    assert apply_retention(storage, keep=2) == [2, 6, 8]
    assert storage.checkpoint_ids() == [4, 10, 12]
    assert storage.offset_epochs() == list(range(4, 13))  # the savepoint can replay what followed it


def test_an_offsets_entry_keeps_its_savepoint_flag_and_rejects_a_savepoint_that_is_no_checkpoint():
    plan = EpochPlan(5, {"src": {0: (10, 10)}}, True, 1.0, 0, savepoint=True)
    assert EpochPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    with pytest.raises(ValueError, match="a savepoint must be a checkpoint"):
        EpochPlan.from_json({**plan.to_json(), "checkpoint": False})


def _state(tmp_path, nodes=()):
    return devcluster.ClusterState(address="127.0.0.1:1", host="127.0.0.1", token_file=str(tmp_path / "t"),
                                   ray_tmpdir=str(tmp_path / "ray"), started_at=0.0, memory=1, object_store_memory=1,
                                   nodes=list(nodes))


def test_cluster_state_file_is_private_and_round_trips(tmp_path):
    node = devcluster.NodeRecord("worker-1", 123, "ab" * 28, 2, "log")
    devcluster.save_state(_state(tmp_path, [node]), str(tmp_path))
    path = devcluster.state_path(str(tmp_path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert devcluster.load_state(str(tmp_path)).nodes == [node]
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ClusterError, match=r"cluster state file .* is malformed"):
        devcluster.load_state(str(tmp_path))


def test_nodes_are_found_by_name_or_id_prefix_and_the_head_is_never_killed(tmp_path):
    head = devcluster.NodeRecord("head", 1, "aa" * 28, 0, "log", head=True)
    worker = devcluster.NodeRecord("worker-1", 2, "bb" * 28, 1, "log")
    state = _state(tmp_path, [head, worker])
    assert state.worker("worker-1") is worker and state.worker("bbbbbb") is worker
    with pytest.raises(ClusterError, match="'worker-9' is not a node of this cluster; nodes: head"):
        state.worker("worker-9")
    with pytest.raises(ClusterError, match="head is the head node"):
        devcluster.kill_node(state, "head", state_dir=str(tmp_path))


def test_kill_session_kills_every_process_of_a_session_and_nothing_else(tmp_path):
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.time() + 5
        while len(devcluster.session_members(leader.pid)) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert len(devcluster.session_members(leader.pid)) == 3
        assert devcluster.kill_session(leader.pid) == 3
        leader.wait(timeout=5)
        deadline = time.time() + 5
        while devcluster.session_members(leader.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert devcluster.session_members(leader.pid) == []
        assert bystander.poll() is None
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()


def test_without_a_cluster_every_command_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLUICEWAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="no cluster to use: none was started with `sluiceway up`"):
        resolve(None)
    for args in (["jobs"], ["status", "x"], ["down"], ["kill-node", "--random"], ["workers", "add", "1"]):
        assert main(args) == 1
        first = capsys.readouterr().err.splitlines()[0]
        assert first.startswith("sluiceway: error: no cluster"), first


def test_an_address_nobody_answers_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLUICEWAY_HOME", str(tmp_path / "home"))
    t0 = time.time()
    assert main(["jobs", "--address", "127.0.0.1:9"]) == 1
    assert "no Ray cluster answers at 127.0.0.1:9" in capsys.readouterr().err.splitlines()[0]
    assert time.time() - t0 < 10


def test_a_replay_of_a_committed_epoch_rebuilds_state_and_leaves_the_sinks_alone(tmp_path):
    from sluiceway.cluster.graph import plan
    from sluiceway.cluster.runtime import TaskRuntime
    from sluiceway.jobs import Dataflow
    from sluiceway.operators.sinks import ParquetSink
    from sluiceway.operators.sources import ListSource

    flow = Dataflow("replay")
    flow.source(ListSource([{"k": 1}])).key_by("k", name="by_k").aggregate([("k", "count")], name="n") \
        .sink(ParquetSink(str(tmp_path / "out")), name="out")
    physical = plan(flow.graph, 1)
    task = [t for t in physical.tasks() if t.stage == "by_k"][0]
    runtime = TaskRuntime(physical, task, JobStorage(str(tmp_path / "ckpt"), "replay"))
    runtime.restore(None, high_water=5)
    batch = pa.table({"k": pa.array([1, 1], pa.int64())})
    for epoch, expect_handle in ((5, False), (6, True)):
        barrier = Barrier(epoch, checkpoint=False)
        runtime.process_epoch(epoch, barrier, [batch], 2)
        assert ("out" in runtime.finish_epoch(epoch, barrier).sink_handles) is expect_handle
    assert runtime.logic["n"].snapshot()  # the replayed epoch still counted in the state


def test_parquet_abort_deletes_only_uncommitted_epochs_after_the_given_one(tmp_path):
    from sluiceway.operators.sinks import ParquetSink, SinkContext, read_committed

    sink = ParquetSink(str(tmp_path / "out"))
    handles = {e: sink.open(SinkContext("out", 0, 1, "job", attempt="f1g0")).precommit(e, pa.table({"x": [e]}))
               for e in (3, 4, 5)}
    sink.commit(3, [handles[3]])
    sink.abort(3, SinkContext("out", -1, 0, "job"))
    assert sorted(os.listdir(tmp_path / "out" / "data")) == ["epoch=0000000003"]
    assert read_committed(str(tmp_path / "out")).column("x").to_pylist() == [3]


def test_delta_sink_commits_an_epoch_once_and_aborts_what_never_completed(tmp_path):
    import deltalake

    from sluiceway.operators.sinks import DeltaSink, SinkContext

    sink = DeltaSink(str(tmp_path / "table"))
    writers = [sink.open(SinkContext("out", s, 2, "job", attempt="f1g0")) for s in (0, 1)]
    first = [writers[0].precommit(1, pa.table({"x": [1, 2]})), writers[1].precommit(1, pa.table({"x": [3]}))]
    assert deltalake.DeltaTable.is_deltatable(str(tmp_path / "table")) is False  # pre-committed: invisible
    sink.commit(1, first)
    sink.commit(1, first)  # a replayed commit is recognised by its application transaction
    sink.commit(2, [writers[0].precommit(2, pa.table({"x": [4]}))])
    writers[1].precommit(3, pa.table({"x": [5]}))  # an epoch that never completed
    sink.abort(2, SinkContext("out", -1, 0, "job"))
    table = deltalake.DeltaTable(str(tmp_path / "table"))
    assert sorted(table.to_pyarrow_table().column("x").to_pylist()) == [1, 2, 3, 4]
    assert table.transaction_version("sluiceway/job/out") == 2
    assert not [f for f in os.listdir(tmp_path / "table") if f.startswith("part-e0000000003")]


def test_an_offsets_entry_keeps_each_sources_lag_as_planned():
    plan = EpochPlan(3, {"src": {0: (0, 10)}}, False, 1.0, 7, lag={"src": {"records": 7, "oldest_s": 0.5}})
    again = EpochPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan and again.lag["src"]["records"] == plan.waiting
    assert EpochPlan.from_json({k: v for k, v in plan.to_json().items() if k != "lag"}).lag == {}  # older entries
    with pytest.raises(ValueError, match="'lag'"):
        EpochPlan.from_json({**plan.to_json(), "lag": [1]})
