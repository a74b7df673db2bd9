"""The coordinator's history records, built as plain dicts (see
:mod:`sluiceway.checkpoint.timeline`). No Ray here."""

from __future__ import annotations

from sluiceway.checkpoint.timeline import step_sizes
from sluiceway.cluster.epochs import EpochPlan, TaskAck
from sluiceway.cluster.restart import Failure


def checkpoint_completed(plan: EpochPlan, acks: list[TaskAck], manifest: dict, previous_size: int | None,
                         completed_at: float) -> dict:
    """A complete checkpoint, with Flink's fields and more."""
    return {
        "id": manifest["id"],
        "epoch": plan.epoch,
        "status": "complete",
        "reason": None,
        "savepoint": plan.savepoint,
        "trigger_time": plan.planned_at,
        "completed_at": completed_at,
        "duration_s": round(completed_at - plan.planned_at, 6),
        "alignment_s": round(max((a.alignment_s for a in acks), default=0.0), 6),
        "tasks": [
            {"task": str(a.task), "alignment_s": round(a.alignment_s, 6), "snapshot_s": round(a.snapshot_s, 6),
             "written_bytes": sum(f["size_bytes"] for f in a.state_files)}
            for a in acks
        ],
        "size_bytes": manifest["size_bytes"],
        "written_bytes": manifest["written_bytes"],
        "size_delta_bytes": None if previous_size is None else manifest["size_bytes"] - previous_size,
        "offsets": manifest["offsets"],
        "steps": step_sizes(manifest),
    }


def checkpoint_not_completed(plan: EpochPlan, acked: list[str], status: str, reason: str, at: float) -> dict:
    """A checkpoint that failed (a recovery followed) or was aborted (the job stopped)."""
    return {
        "id": plan.epoch,
        "epoch": plan.epoch,
        "status": status,
        "reason": reason,
        "savepoint": plan.savepoint,
        "trigger_time": plan.planned_at,
        "completed_at": None,
        "duration_s": round(at - plan.planned_at, 6),
        "acknowledged_by": acked,
        "offsets": {s: {str(p): o for p, o in parts.items()} for s, parts in plan.next_offsets().items()},
    }


def recovery(failure: Failure, detect_s: float, restore_s: float, delay_s: float, restored: int,
             replay: list[int], restarted: list[str]) -> dict:
    """A recovery: what failed, how long detection and restore took, what was restored and replayed."""
    return {
        "failure": failure.message,
        "failure_kind": failure.kind.value,
        "failed_task": failure.task,
        "failed_epoch": failure.epoch,
        "detect_s": round(detect_s, 3),
        "delay_s": delay_s,
        "restore_s": round(restore_s, 3),
        "restored_checkpoint": restored or None,
        "replay_epochs": replay,
        "restarted_tasks": restarted,
    }
