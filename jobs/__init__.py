"""The user's front door: build a :class:`Dataflow`, ``run`` it on Ray.

>>> from sluiceway.jobs import Dataflow
>>> Dataflow("hello").name
'hello'

Names are imported when first used, so that ``sluiceway --help`` and other
commands that need no cluster start without importing Ray or pyarrow.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Dataflow": "sluiceway.jobs.dataflow", "KeyedStream": "sluiceway.jobs.dataflow", "Stream": "sluiceway.jobs.dataflow",
    "FlowDefinitionError": "sluiceway.jobs.errors", "JobFailedError": "sluiceway.jobs.errors",
    "JobFileError": "sluiceway.jobs.errors", "run": "sluiceway.jobs.runner",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'sluiceway.jobs' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
