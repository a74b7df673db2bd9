"""The checkpoint history as anyone can read it: the CLI and users' scripts.

>>> from sluiceway.checkpoint import JobStorage, CheckpointHistory
>>> CheckpointHistory(JobStorage("memory://history-doc", "none")).list()
[]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sluiceway.checkpoint.errors import CheckpointError
from sluiceway.checkpoint.manifest import CheckpointStatus, check_manifest, require_manifest
from sluiceway.checkpoint.storage import JobStorage


@dataclass(frozen=True)
class CheckpointInfo:
    """One row of ``sluiceway checkpoints list``."""

    id: int
    epoch: int | None
    status: str
    started_at: float | None
    duration_s: float | None
    size_bytes: int | None
    offsets: dict
    written_bytes: int | None = None
    problem: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class CheckpointHistory:
    def __init__(self, storage: JobStorage):
        self.storage = storage

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint folder, oldest first, complete or not."""
        rows = []
        for checkpoint_id in self.storage.checkpoint_ids():
            check = check_manifest(self.storage, checkpoint_id)
            m = check.manifest or {}
            rows.append(
                CheckpointInfo(
                    id=checkpoint_id,
                    epoch=m.get("epoch", checkpoint_id if check.status is CheckpointStatus.INCOMPLETE else None),
                    status=check.status.value,
                    started_at=m.get("started_at"),
                    duration_s=m.get("duration_s"),
                    size_bytes=m.get("size_bytes"),
                    offsets=m.get("offsets", {}),
                    written_bytes=m.get("written_bytes"),
                    problem=check.problem,
                )
            )
        return rows

    def show(self, checkpoint_id: int) -> dict:
        """The manifest of one complete checkpoint."""
        if checkpoint_id not in self.storage.checkpoint_ids():
            known = ", ".join(str(i) for i in self.storage.checkpoint_ids()) or "none"
            raise CheckpointError(
                f"job {self.storage.job!r} has no checkpoint {checkpoint_id} under {self.storage.root_url} "
                f"(checkpoints: {known})"
            )
        return require_manifest(self.storage, checkpoint_id)
