"""The user's front door: build a :class:`Dataflow`, ``run`` it on Ray.

>>> from sluiceway.jobs import Dataflow
>>> Dataflow("hello").name
'hello'
"""

from sluiceway.jobs.dataflow import Dataflow, KeyedStream, Stream
from sluiceway.jobs.errors import FlowDefinitionError, JobFailedError, JobFileError
from sluiceway.jobs.runner import run

__all__ = ["Dataflow", "FlowDefinitionError", "JobFailedError", "JobFileError", "KeyedStream", "Stream", "run"]
