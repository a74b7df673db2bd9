import json

import pyarrow as pa
import pytest

from sluiceway.checkpoint import CheckpointHistory, CorruptCheckpointError, JobStorage, StorageError
from sluiceway.checkpoint.manifest import CheckpointStatus, build_manifest, latest_complete
from sluiceway.checkpoint.retention import apply_retention, plan_retention
from sluiceway.checkpoint.state import KEY_GROUP_COLUMN, read_state, write_state


@pytest.fixture
def storage(tmp_path):
    return JobStorage(str(tmp_path / "ckpt"), "job")


def state_table():
    return pa.table({"k": [1, 2, 3, 4, 5], "v": [10, 20, 30, 40, 50], KEY_GROUP_COLUMN: pa.array([7, 3, 7, 90, 3], pa.int32())})


def write_checkpoint(storage, checkpoint_id, with_manifest=True):
    entry = write_state(storage, checkpoint_id, "agg", 0, state_table())
    if with_manifest:
        manifest = build_manifest(
            job=storage.job, checkpoint_id=checkpoint_id, epoch=checkpoint_id, offsets={"src": {"0": checkpoint_id * 10}},
            watermarks={}, tasks=[{"task": "agg[0]", "files": [entry]}], started_at=1.0, completed_at=1.5,
            parallelism={"agg": 1}, max_key_groups=128, sink_handles={},
        )
        storage.write_manifest(checkpoint_id, manifest)
    return entry


def test_state_round_trip_reads_only_requested_key_groups(storage):
    entry = write_checkpoint(storage, 4)
    assert sorted(map(int, entry["key_groups"])) == [3, 7, 90]
    parts = read_state(storage, entry, range(0, 64))
    got = pa.concat_tables(parts).sort_by("k").to_pydict()
    assert got == {"k": [1, 2, 3, 5], "v": [10, 20, 30, 50], KEY_GROUP_COLUMN: [7, 3, 7, 3]}
    assert pa.concat_tables(read_state(storage, entry, {90})).column("k").to_pylist() == [4]
    assert read_state(storage, entry, range(100, 128)) == []


def test_checkpoint_without_manifest_is_ignored(storage):
    write_checkpoint(storage, 5)
    write_checkpoint(storage, 10, with_manifest=False)
    check, corrupt = latest_complete(storage)
    assert check.checkpoint_id == 5 and corrupt == []
    statuses = {c.id: c.status for c in CheckpointHistory(storage).list()}
    assert statuses == {5: "complete", 10: "incomplete"}


def test_checksum_mismatch_is_detected_and_previous_checkpoint_used(storage):
    write_checkpoint(storage, 5)
    entry = write_checkpoint(storage, 10)
    path = storage.absolute(entry["path"])
    data = bytearray(storage.fs.cat_file(path))
    data[-20] ^= 0xFF
    storage.fs.pipe_file(path, bytes(data))  # same size, different bytes
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        read_state(storage, entry, range(128))
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
