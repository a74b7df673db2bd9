import json

import pyarrow as pa
import pytest

from sluiceway.checkpoint import CheckpointHistory, CorruptCheckpointError, JobStorage, StorageError
from sluiceway.checkpoint.manifest import CheckpointStatus, assemble_state, build_manifest, latest_complete
from sluiceway.checkpoint.retention import apply_retention, plan_retention
from sluiceway.checkpoint.state import read_key_groups, write_key_groups


@pytest.fixture
def storage(tmp_path):
    return JobStorage(str(tmp_path / "ckpt"), "job")


def groups():
    return {7: pa.table({"k": [1, 3], "v": [10, 30]}), 3: pa.table({"k": [2, 5], "v": [20, 50]}),
            90: pa.table({"k": [4], "v": [40]})}


def write_checkpoint(storage, checkpoint_id, with_manifest=True, changed=None, previous=None):
    """A checkpoint of one step 'agg' on one subtask: ``changed`` key groups
    are written now, the others referred to in ``previous`` (a manifest)."""
    changed = groups() if changed is None else changed
    entry = write_key_groups(storage, checkpoint_id, "agg", 0, "f1g0", changed)
    index = dict((previous or {}).get("state", {}).get("agg", {}))
    index.update({kg: [[entry["path"], b]] for kg, b in entry["key_groups"].items()})
    state, files = assemble_state([{"agg": index}], [entry], (previous or {}).get("files", {}))
    manifest = build_manifest(
        job=storage.job, checkpoint_id=checkpoint_id, epoch=checkpoint_id, offsets={"src": {"0": checkpoint_id * 10}},
        watermarks={}, tasks=[{"task": "agg[0]"}], state=state, files=files, started_at=1.0, completed_at=1.5,
        parallelism={"agg": 1}, max_key_groups=128, sink_handles={},
    )
    if with_manifest:
        storage.write_manifest(checkpoint_id, manifest.to_json())
    return manifest.to_json()


def test_state_round_trip_reads_only_requested_key_groups(storage):
    m = write_checkpoint(storage, 4)
    assert sorted(map(int, m["state"]["agg"])) == [3, 7, 90]
    got = read_key_groups(storage, m["state"]["agg"], m["files"], range(0, 64))
    assert {kg: [t.to_pydict() for t in chain] for kg, chain in got.items()} == {
        3: [{"k": [2, 5], "v": [20, 50]}], 7: [{"k": [1, 3], "v": [10, 30]}]}
    assert read_key_groups(storage, m["state"]["agg"], m["files"], {90})[90][0].column("k").to_pylist() == [4]
    assert read_key_groups(storage, m["state"]["agg"], m["files"], range(100, 128)) == {}


def test_incremental_checkpoint_writes_only_changed_groups_and_refers_to_older_files(storage):
    first = write_checkpoint(storage, 2)
    second = write_checkpoint(storage, 4, changed={7: pa.table({"k": [1, 3], "v": [11, 31]})}, previous=first)
    assert second["state"]["agg"]["3"] == first["state"]["agg"]["3"]  # unchanged: the old file
    assert second["state"]["agg"]["7"][0] != first["state"]["agg"]["7"][0]
    assert {f["checkpoint"] for f in second["files"].values()} == {2, 4}
    written = [p for p, f in second["files"].items() if f["checkpoint"] == 4]
    assert second["written_bytes"] == sum(second["files"][p]["size_bytes"] for p in written) < second["size_bytes"]
    assert second["files"][written[0]]["rows"] == 2


def test_restore_from_a_chain_of_incremental_checkpoints_equals_a_full_one(storage):
    full = groups()
    manifest = write_checkpoint(storage, 1)
    for cid, kg in ((2, 7), (3, 90), (4, 7), (5, 3)):
        full[kg] = pa.table({"k": [100 + cid], "v": [cid]})
        manifest = write_checkpoint(storage, cid, changed={kg: full[kg]}, previous=manifest)
    assert len(manifest["files"]) == 3  # key groups 90, 7 and 3 come from checkpoints 3, 4 and 5
    chained = read_key_groups(storage, manifest["state"]["agg"], manifest["files"], range(128))
    other = JobStorage(storage.root_url, "job_full")
    reference = write_checkpoint(other, 5, changed=full)
    direct = read_key_groups(other, reference["state"]["agg"], reference["files"], range(128))
    assert {k: [t.to_pylist() for t in c] for k, c in chained.items()} == {k: [t.to_pylist() for t in c] for k, c in direct.items()}


def test_retention_never_deletes_a_file_a_retained_checkpoint_refers_to(storage):
    manifest = write_checkpoint(storage, 1)
    for cid in (2, 3, 4):
        manifest = write_checkpoint(storage, cid, changed={7: pa.table({"k": [cid], "v": [cid]})}, previous=manifest)
    assert apply_retention(storage, keep=2) == [1, 2]
    assert latest_complete(storage)[0].checkpoint_id == 4
    for cid in (3, 4):  # the retained ones still restore in full, from checkpoint 1's file too
        m = storage.read_manifest(cid)
        assert len(read_key_groups(storage, m["state"]["agg"], m["files"], range(128))) == 3
    assert storage.read_manifest(1) is None  # checkpoint 1 is no longer a restore point...
    assert storage.checkpoint_ids() == [1, 3, 4]  # ...but its folder keeps the file others use
    assert not storage.fs.exists(storage.checkpoint_path(2))  # nothing of 2 is referenced
    assert [r.status for r in CheckpointHistory(storage).list()] == ["retired", "complete", "complete"]
    for cid in (5, 6):  # later checkpoints rewrite every group: the retired folder goes too
        manifest = write_checkpoint(storage, cid, previous=manifest)
    apply_retention(storage, keep=2)
    assert storage.checkpoint_ids() == [5, 6]


def test_checkpoint_without_manifest_is_ignored(storage):
    write_checkpoint(storage, 5)
    write_checkpoint(storage, 10, with_manifest=False)
    check, corrupt = latest_complete(storage)
    assert check.checkpoint_id == 5 and corrupt == []
    statuses = {c.id: c.status for c in CheckpointHistory(storage).list()}
    assert statuses == {5: "complete", 10: "incomplete"}


def test_checksum_mismatch_is_detected_and_previous_checkpoint_used(storage):
    write_checkpoint(storage, 5)
    m = write_checkpoint(storage, 10)
    path = storage.absolute(next(iter(m["files"])))
    data = bytearray(storage.fs.cat_file(path))
    data[-20] ^= 0xFF
    storage.fs.pipe_file(path, bytes(data))  # same size, different bytes
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        read_key_groups(storage, m["state"]["agg"], m["files"], range(128))
    storage.fs.pipe_file(path, b"short")  # size differs: caught without reading
    check, corrupt = latest_complete(storage)
    assert check.checkpoint_id == 5 and [c.checkpoint_id for c in corrupt] == [10]


def test_unparsable_manifest_is_corrupt_not_complete(storage):
    write_checkpoint(storage, 3)
    write_checkpoint(storage, 6)
    storage.fs.pipe_file(storage.manifest_path(6), b"{not json")
    check, corrupt = latest_complete(storage)
    assert check.checkpoint_id == 3 and corrupt[0].status is CheckpointStatus.CORRUPT


def test_retention_never_deletes_the_latest_complete_checkpoint():
    S = CheckpointStatus
    assert plan_retention({1: S.COMPLETE}, keep=1) == []
    assert plan_retention({1: S.COMPLETE, 2: S.COMPLETE, 3: S.INCOMPLETE}, keep=1) == [1]
    assert plan_retention({1: S.INCOMPLETE, 2: S.INCOMPLETE}, keep=1) == []  # nothing proven unused
    assert plan_retention({1: S.CORRUPT, 2: S.COMPLETE}, keep=1) == []  # corrupt kept for a human
    with pytest.raises(ValueError):
        plan_retention({1: S.COMPLETE}, keep=0)


def test_apply_retention_deletes_folders_and_old_log_records(storage):
    for epoch in range(1, 9):
        storage.write_offsets(epoch, {"epoch": epoch})
        storage.write_commit(epoch, {"epoch": epoch})
    for cid in (2, 4, 6):
        write_checkpoint(storage, cid)
    write_checkpoint(storage, 8, with_manifest=False)
    assert apply_retention(storage, keep=2) == [2]
    assert storage.checkpoint_ids() == [4, 6, 8]
    assert storage.offset_epochs() == [4, 5, 6, 7, 8]
    assert storage.commit_epochs() == [4, 5, 6, 7, 8]


def test_history_lists_json_ready_rows(storage):
    write_checkpoint(storage, 2)
    rows = [r.to_dict() for r in CheckpointHistory(storage).list()]
    assert json.loads(json.dumps(rows))[0]["offsets"] == {"src": {"0": 20}}
    assert set(rows[0]) >= {"id", "epoch", "status", "started_at", "duration_s", "size_bytes", "offsets"}
    assert CheckpointHistory(storage).show(2)["epoch"] == 2


def test_show_of_unknown_checkpoint_lists_the_known_ones(storage):
    write_checkpoint(storage, 2)
    with pytest.raises(Exception, match=r"no checkpoint 9 .*checkpoints: 2"):
        CheckpointHistory(storage).show(9)


def test_unknown_protocol_is_a_clear_storage_error():
    with pytest.raises(StorageError, match="Use a local path or an fsspec URL"):
        JobStorage("nosuchproto://bucket/x", "job")


def test_a_file_where_the_folder_should_be_is_a_clear_storage_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="Check that the checkpoint dir is a folder"):
        JobStorage(str(blocker), "job").check_access()


def test_malformed_sink_marker_names_the_file(tmp_path):
    from sluiceway.operators.errors import SinkError
    from sluiceway.operators.sinks import read_committed

    marker = tmp_path / "out" / "_committed" / "0000000003.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("[1, 2]")
    with pytest.raises(SinkError, match=r"^commit marker file://.*0000000003.json is malformed: it lists no 'files'"):
        read_committed(str(tmp_path / "out"))
    marker.write_text("{half")
    with pytest.raises(SinkError, match=r"^commit marker .*0000000003.json is not valid JSON"):
        read_committed(str(tmp_path / "out"))


def test_parquet_commit_keeps_only_the_files_its_marker_names(tmp_path):
    from sluiceway.operators.sinks import ParquetSink, SinkContext, read_committed

    sink = ParquetSink(str(tmp_path / "out"))
    stale = sink.open(SinkContext("out", 0, 1, "job", attempt="f1g0")).precommit(7, pa.table({"x": [1, 2]}))
    owner = sink.open(SinkContext("out", 0, 1, "job", attempt="f2g0")).precommit(7, pa.table({"x": [1, 2]}))
    folder = tmp_path / "out" / "data" / "epoch=0000000007"
    assert len(list(folder.iterdir())) == 2
    sink.commit(7, [owner])
    assert [p.name for p in folder.iterdir()] == ["part-00000-f2g0.parquet"]
    sink.commit(7, [stale])  # a late commit of the same epoch changes nothing
    assert read_committed(str(tmp_path / "out")).column("x").to_pylist() == [1, 2]
