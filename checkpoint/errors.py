"""Errors of durable storage. Every class pickles (they cross Ray)."""


class CheckpointError(Exception):
    """Base of everything raised by :mod:`sluiceway.checkpoint`."""


class StorageError(CheckpointError):
    """The checkpoint storage could not be read or written."""


class NoSuchBucketError(StorageError, FileNotFoundError):
    """A URL names an object-store bucket that does not exist. sluiceway
    never creates buckets (a mistyped name would become a new, empty one);
    a ``FileNotFoundError`` too, so that storage calls do not retry it."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's manifest or state files fail their checks."""


class IncompatibleJobError(CheckpointError):
    """A checkpoint dir holds a job this flow cannot resume."""


class LeaseHeldError(CheckpointError):
    """Another run holds the job's lease: a second run is refused."""


class LeaseLostError(CheckpointError):
    """This run's lease was taken over by a newer run: it must stop writing."""
