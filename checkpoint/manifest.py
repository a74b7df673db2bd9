"""Checkpoint manifests: what makes a checkpoint complete.

A checkpoint is complete when, and only when, its MANIFEST.json exists, parses,
names this job, and every file it lists exists with the recorded size. State
files are checked against their sha256 when they are read
(:func:`sluiceway.checkpoint.state.read_state`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sluiceway.checkpoint.errors import CorruptCheckpointError, StorageError
from sluiceway.checkpoint.storage import JobStorage

MANIFEST_FORMAT = 1


class CheckpointStatus(str, enum.Enum):
    """Where a checkpoint folder stands. Only COMPLETE ones are ever restored."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"  # no manifest: in progress, or abandoned by a failure
    CORRUPT = "corrupt"  # manifest present but unreadable or files missing


@dataclass(frozen=True)
class ManifestCheck:
    checkpoint_id: int
    status: CheckpointStatus
    manifest: dict | None
    problem: str | None = None


def build_manifest(
    *,
    job: str,
    checkpoint_id: int,
    epoch: int,
    offsets: dict,
    watermarks: dict,
    tasks: list[dict],
    started_at: float,
    completed_at: float,
    parallelism: dict,
    max_key_groups: int,
    sink_handles: dict,
) -> dict:
    files = [f for t in tasks for f in t["files"]]
    return {
        "format": MANIFEST_FORMAT,
        "job": job,
        "id": checkpoint_id,
        "epoch": epoch,
        "status": CheckpointStatus.COMPLETE.value,
        "started_at": started_at,
        "completed_at": completed_at,
        "duration_s": round(completed_at - started_at, 6),
        "offsets": offsets,
        "watermarks": watermarks,
        "parallelism": parallelism,
        "max_key_groups": max_key_groups,
        "size_bytes": sum(f["size_bytes"] for f in files),
        "tasks": tasks,
        "sink_handles": sink_handles,
    }


def check_manifest(storage: JobStorage, checkpoint_id: int) -> ManifestCheck:
    """Classify one checkpoint folder. Storage errors propagate: an unreadable
    store must never read as "no checkpoint"."""
    try:
        manifest = storage.read_manifest(checkpoint_id)
    except StorageError as exc:
        if "not valid JSON" in str(exc):
            return ManifestCheck(checkpoint_id, CheckpointStatus.CORRUPT, None, str(exc))
        raise
    if manifest is None:
        return ManifestCheck(checkpoint_id, CheckpointStatus.INCOMPLETE, None)
    problem = _manifest_problem(storage, checkpoint_id, manifest)
    status = CheckpointStatus.CORRUPT if problem else CheckpointStatus.COMPLETE
    return ManifestCheck(checkpoint_id, status, manifest, problem)


def _manifest_problem(storage: JobStorage, checkpoint_id: int, manifest: dict) -> str | None:
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"unknown manifest format {manifest.get('format')!r}"
    if manifest.get("job") != storage.job or manifest.get("id") != checkpoint_id:
        return f"manifest names job {manifest.get('job')!r} checkpoint {manifest.get('id')!r}"
    for task in manifest.get("tasks", []):
        for entry in task.get("files", []):
            size = storage.file_size(storage.absolute(entry["path"]))
            if size is None:
                return f"state file {entry['path']} is missing"
            if size != entry["size_bytes"]:
                return f"state file {entry['path']} has {size} bytes, manifest says {entry['size_bytes']}"
    return None


def latest_complete(storage: JobStorage, skip: set[int] = frozenset()) -> tuple[ManifestCheck | None, list[ManifestCheck]]:
    """The newest complete checkpoint not in ``skip``, and the corrupt ones passed over."""
    passed_over = []
    for checkpoint_id in reversed(storage.checkpoint_ids()):
        if checkpoint_id in skip:
            continue
        check = check_manifest(storage, checkpoint_id)
        if check.status is CheckpointStatus.COMPLETE:
            return check, passed_over
        if check.status is CheckpointStatus.CORRUPT:
            passed_over.append(check)
    return None, passed_over


def require_manifest(storage: JobStorage, checkpoint_id: int) -> dict:
    check = check_manifest(storage, checkpoint_id)
    if check.status is CheckpointStatus.INCOMPLETE:
        raise CorruptCheckpointError(
            f"checkpoint {checkpoint_id} of job {storage.job!r} has no manifest (it never completed)"
        )
    if check.status is CheckpointStatus.CORRUPT:
        raise CorruptCheckpointError(f"checkpoint {checkpoint_id} of job {storage.job!r} is corrupt: {check.problem}")
    return check.manifest
