"""Everything durable: the storage layout on fsspec, the offsets and commit
logs, checkpoint manifests, state files, history and retention.

No Ray here: this package is tested in milliseconds and used by the runtime,
the CLI and anyone who wants to read what a job did.
"""

import importlib

_WHERE = {
    "CheckpointError": "errors", "CorruptCheckpointError": "errors", "IncompatibleJobError": "errors",
    "StorageError": "errors", "CheckpointHistory": "history", "CheckpointInfo": "history", "Manifest": "manifest",
    "JobStorage": "storage", "CheckpointId": "types", "Epoch": "types", "KeyGroup": "types", "TaskId": "types",
}


def __getattr__(name: str):  # imported when first used: the CLI starts without fsspec and pyarrow
    if name not in _WHERE:
        raise AttributeError(f"module 'sluiceway.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sluiceway.checkpoint.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


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
