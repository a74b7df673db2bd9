"""The words of the epoch protocol, each named once.

The same words appear in logs, paths, CLI output and docs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

Epoch = NewType("Epoch", int)
"""One microbatch, numbered from 1. Epoch 0 means "before anything ran"."""

CheckpointId = NewType("CheckpointId", int)
"""A checkpoint's id: the epoch it was taken at, so a replayed checkpoint
lands in the same folder as the attempt it replaces."""

KeyGroup = NewType("KeyGroup", int)
"""A shard of keyed state, ``0 <= kg < max_key_groups``; fixed for a job's life."""

DEFAULT_MAX_KEY_GROUPS = 128


@dataclass(frozen=True, order=True)
class TaskId:
    """One running instance of a stage: ``stage[subtask]``."""

    stage: str
    subtask: int

    def __str__(self) -> str:
        return f"{self.stage}[{self.subtask}]"


def key_group_range(subtask: int, parallelism: int, max_key_groups: int) -> range:
    """The key groups a subtask owns: a contiguous range, as in Flink.

    >>> key_group_range(0, 2, 128), key_group_range(1, 2, 128)
    (range(0, 64), range(64, 128))
    """
    start = (subtask * max_key_groups + parallelism - 1) // parallelism
    stop = ((subtask + 1) * max_key_groups + parallelism - 1) // parallelism
    return range(start, stop)


def subtask_for_key_group(key_group: int, parallelism: int, max_key_groups: int) -> int:
    """Inverse of :func:`key_group_range`.

    >>> [subtask_for_key_group(kg, 3, 128) for kg in (0, 42, 43, 85, 86, 127)]
    [0, 0, 1, 1, 2, 2]
    """
    return key_group * parallelism // max_key_groups
