"""Retention: keep the last K complete checkpoints, delete only what is
provably unused.

Checkpoints are incremental, so a retained checkpoint may refer to state
files in an older checkpoint's folder. Retention therefore works on files:

1. Decide which checkpoints go (:func:`plan_retention`): complete ones older
   than the K newest, and folders without a manifest that are older than the
   newest complete one (abandoned by a failure). Corrupt ones are kept for a
   human to look at; the latest complete checkpoint is never deleted.
   Retired ones (below) are looked at again, as later retention frees them.
   Savepoints are never deleted; the epoch logs are kept from the oldest
   retained checkpoint or savepoint on, so that any of them can be restored.
2. Collect every file that a retained manifest refers to.
3. For each checkpoint that goes: if retained manifests still refer to some
   of its files, mark it ``RETIRED.json``; delete its manifest (it is no
   longer a restore point). Then, once every doomed manifest is gone, delete
   their files that nothing refers to, and each whole folder once nothing in
   it is referenced.
"""

from __future__ import annotations



from sluiceway.checkpoint.manifest import CheckpointStatus, check_manifest
from sluiceway.checkpoint.storage import JobStorage


def plan_retention(statuses: dict[int, CheckpointStatus], keep: int) -> list[int]:
    """Which checkpoint ids to delete, given every folder's status.

    >>> S = CheckpointStatus
    >>> plan_retention({1: S.COMPLETE, 2: S.INCOMPLETE, 3: S.COMPLETE, 4: S.COMPLETE, 5: S.INCOMPLETE}, keep=2)
    [1, 2]
    """
    if keep < 1:
        raise ValueError(f"retention must keep at least one checkpoint, got keep={keep}")
    complete = sorted(i for i, s in statuses.items() if s is CheckpointStatus.COMPLETE)
    if not complete:
        return []
    kept = set(complete[-keep:])
    newest = complete[-1]
    doomed = []
    for checkpoint_id, status in sorted(statuses.items()):
        if checkpoint_id in kept or checkpoint_id > newest:
            continue
        if status in (CheckpointStatus.COMPLETE, CheckpointStatus.INCOMPLETE, CheckpointStatus.RETIRED):
            doomed.append(checkpoint_id)
    return doomed


def apply_retention(storage: JobStorage, keep: int) -> list[int]:
    """Delete what :func:`plan_retention` allows, file by file, keeping every
    file a retained manifest refers to; prune the epoch logs below the
    oldest kept checkpoint. Returns the checkpoint ids no longer restorable."""
    checks = {i: check_manifest(storage, i) for i in storage.checkpoint_ids()}
    savepoints = {i for i, c in checks.items() if c.manifest is not None and c.manifest.savepoint}
    doomed = [i for i in plan_retention({i: c.status for i, c in checks.items()}, keep) if i not in savepoints]
    referenced = {
        path
        for i, c in checks.items()
        if i not in doomed and c.manifest is not None
        for path in c.manifest.files
    }
    # Every doomed manifest goes before any file: storage that fails half way
    # must not leave a manifest that names a deleted file (found by the simulation).
    folders = {}
    for checkpoint_id in doomed:
        present = storage.files_under(storage.checkpoint_path(checkpoint_id))
        still_used = [p for p in present if storage.relative(p) in referenced]
        if still_used:
            storage.write_json(storage.retired_path(checkpoint_id), {"checkpoint": checkpoint_id, "kept": len(still_used)})
        storage.delete_file(storage.manifest_path(checkpoint_id))
        folders[checkpoint_id] = (present, still_used)
    for checkpoint_id, (present, still_used) in folders.items():
        if not still_used:
            storage.delete_tree(storage.checkpoint_path(checkpoint_id))
            continue
        for path in present:
            unused = storage.relative(path) not in referenced
            if unused and path not in (storage.retired_path(checkpoint_id), storage.manifest_path(checkpoint_id)):
                storage.delete_file(path)
    complete = sorted(i for i, c in checks.items() if c.status is CheckpointStatus.COMPLETE and i not in doomed)
    if complete:
        storage.prune_logs(below_epoch=complete[0])
    return doomed
