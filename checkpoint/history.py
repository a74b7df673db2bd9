"""The checkpoint history as anyone can read it: the CLI and users' scripts.

It joins the job's lasting history records (:mod:`sluiceway.checkpoint.timeline`:
every checkpoint ever attempted, complete, failed or aborted) with what the
checkpoint folders hold now: a complete checkpoint whose folder retention
removed is listed as ``removed``; one that can still be restored, as
``complete``.

>>> from sluiceway.checkpoint import JobStorage, CheckpointHistory
>>> CheckpointHistory(JobStorage("memory://history-doc", "none")).list()
[]
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from sluiceway.checkpoint.errors import CheckpointError
from sluiceway.checkpoint.manifest import check_manifest, require_manifest
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.timeline import diff_checkpoints, read_history


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
    reason: str | None = None  # why a checkpoint failed or was aborted
    restored: int = 0  # how often a recovery or a restart restored it
    attempts: int = 1
    savepoint: bool = False  # kept until a user deletes it

    def to_dict(self) -> dict:
        return asdict(self)


class CheckpointHistory:
    def __init__(self, storage: JobStorage):
        self.storage = storage

    @functools.cached_property
    def records(self) -> dict[int, dict]:
        """Each checkpoint's latest history record, read once per instance."""
        return read_history(self.storage).checkpoints()

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint ever attempted, oldest first: from the history
        records, with the state of its folder now."""
        folders = {i: check_manifest(self.storage, i) for i in self.storage.checkpoint_ids()}
        return [self._row(i, self.records.get(i), folders.get(i)) for i in sorted(set(self.records) | set(folders))]

    def row(self, checkpoint_id: int) -> CheckpointInfo | None:
        """The row :meth:`list` would show for one checkpoint (``None``: unknown)."""
        check = check_manifest(self.storage, checkpoint_id) if checkpoint_id in self.storage.checkpoint_ids() else None
        record = self.records.get(checkpoint_id)
        return None if record is None and check is None else self._row(checkpoint_id, record, check)

    @staticmethod
    def _row(checkpoint_id: int, record: dict | None, check) -> CheckpointInfo:
        m = check.manifest.to_json() if check and check.manifest else {}
        if record is None:  # no record (written before histories existed, or in progress)
            status = check.status.value
        elif record["status"] != "complete":
            status = record["status"]
        elif check is None:
            status = "removed"  # by retention: the record outlives the files
        else:
            status = check.status.value
        return CheckpointInfo(
            id=checkpoint_id,
            epoch=(record or m).get("epoch", checkpoint_id),
            status=status,
            started_at=(record or {}).get("trigger_time", m.get("started_at")),
            duration_s=(record or m).get("duration_s"),
            size_bytes=(record or m).get("size_bytes"),
            offsets=(record or m).get("offsets", {}),
            written_bytes=(record or m).get("written_bytes"),
            problem=check.problem if check else None,
            reason=(record or {}).get("reason"),
            restored=len((record or {}).get("restored_by", [])),
            attempts=(record or {}).get("attempts", 1),
            savepoint=bool((record or m).get("savepoint")),
        )

    def record(self, checkpoint_id: int) -> dict:
        """The history record of one checkpoint (kept after retention)."""
        records = self.records
        if checkpoint_id not in records:
            known = ", ".join(str(i) for i in records) or "none"
            raise CheckpointError(
                f"job {self.storage.job!r} has no checkpoint {checkpoint_id} in its history under "
                f"{self.storage.root_url} (checkpoints: {known})"
            )
        return records[checkpoint_id]

    def diff(self, a: int, b: int) -> dict:
        """How checkpoint ``b`` differs from ``a``: offsets advanced, state per step."""
        return diff_checkpoints(self.record(a), self.record(b))

    def show(self, checkpoint_id: int) -> dict:
        """The manifest of one complete checkpoint, as its JSON."""
        if checkpoint_id not in self.storage.checkpoint_ids():
            known = ", ".join(str(i) for i in self.storage.checkpoint_ids()) or "none"
            raise CheckpointError(
                f"job {self.storage.job!r} has no checkpoint {checkpoint_id} under {self.storage.root_url} "
                f"(checkpoints: {known})"
            )
        return require_manifest(self.storage, checkpoint_id).to_json()
