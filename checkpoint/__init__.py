"""Everything durable: the storage layout on fsspec, the offsets and commit
logs, checkpoint manifests, state files, history and retention.

No Ray here: this package is tested in milliseconds and used by the runtime,
the CLI and anyone who wants to read what a job did.
"""

from sluiceway.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleJobError,
    StorageError,
)
from sluiceway.checkpoint.history import CheckpointHistory, CheckpointInfo
from sluiceway.checkpoint.manifest import Manifest
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.types import CheckpointId, Epoch, KeyGroup, TaskId

__all__ = [
    "CheckpointError",
    "CheckpointHistory",
    "CheckpointId",
    "CheckpointInfo",
    "CorruptCheckpointError",
    "Epoch",
    "IncompatibleJobError",
    "JobStorage",
    "KeyGroup",
    "Manifest",
    "StorageError",
    "TaskId",
]
