"""Errors of the user's front door. Every class pickles."""

from sluiceway.cluster.errors import JobFailedError
from sluiceway.operators.errors import FlowDefinitionError


class JobFileError(Exception):
    """A job file does not exist, does not load, or defines no Dataflow."""


__all__ = ["FlowDefinitionError", "JobFailedError", "JobFileError"]
