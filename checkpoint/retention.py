"""Retention: keep the last K complete checkpoints, delete only what is
provably unused.

A checkpoint folder may be deleted when it is complete and older than the K
newest complete ones, or when it has no manifest and a newer checkpoint is
complete (checkpoints complete in epoch order, so it was abandoned). Corrupt
ones are kept for a human to look at. The latest complete checkpoint is never
deleted.
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
        if status in (CheckpointStatus.COMPLETE, CheckpointStatus.INCOMPLETE):
            doomed.append(checkpoint_id)
    return doomed


def apply_retention(storage: JobStorage, keep: int) -> list[int]:
    """Delete what :func:`plan_retention` allows; prune the epoch logs below
    the oldest kept checkpoint. Returns the deleted checkpoint ids."""
    statuses = {i: check_manifest(storage, i).status for i in storage.checkpoint_ids()}
    doomed = plan_retention(statuses, keep)
    for checkpoint_id in doomed:
        storage.delete_tree(storage.checkpoint_path(checkpoint_id))
    complete = sorted(i for i, s in statuses.items() if s is CheckpointStatus.COMPLETE and i not in doomed)
    if complete:
        storage.prune_logs(below_epoch=complete[0])
    return doomed
