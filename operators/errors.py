"""Errors raised by operators, sources and sinks. Every class pickles."""


class OperatorError(Exception):
    """Base of everything raised by :mod:`sluiceway.operators`."""


class FlowDefinitionError(OperatorError):
    """An operator was configured wrongly; raised when the flow is built."""


class UserCodeError(OperatorError):
    """A user function raised while processing a batch.

    Carries the step that ran it and the user's traceback as text, so the
    cause survives crossing process boundaries.
    """

    def __init__(self, step: str, kind: str, traceback_text: str):
        super().__init__(step, kind, traceback_text)
        self.step = step
        self.kind = kind
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f"step {self.step!r} ({self.kind}) raised:\n{self.traceback_text}"
