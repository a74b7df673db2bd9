"""Errors of the runtime. Every class pickles (they cross Ray)."""


class ClusterError(Exception):
    """Base of everything raised by :mod:`sluiceway.cluster`."""


class JobFailedError(ClusterError):
    """The job stopped for good: its restart budget is spent, or it cannot start.

    ``cause`` is the last failure's text (for user code: its traceback).
    """

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message, cause)
        self.message = message
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.message}\n{self.cause}" if self.cause else self.message
