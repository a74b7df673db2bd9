"""Errors raised by operators, sources and sinks. Every class pickles.

Each error's ``str()`` starts with one line that names the cause (which step,
which function, which column); details follow on later lines.
"""

from __future__ import annotations

import os
import traceback

_OWN_DIRS = tuple(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + d + os.sep
    for d in ("operators", "cluster", "checkpoint", "jobs")
)
# Libraries the built-in operators call: their frames are not the user's code.
_LIBRARY_PARTS = tuple(f"{os.sep}{lib}{os.sep}" for lib in ("ray", "pyarrow", "numpy", "fsspec"))


def _is_user_frame(filename: str) -> bool:
    return not filename.startswith(_OWN_DIRS) and not any(part in filename for part in _LIBRARY_PARTS) \
        and not filename.startswith("pyarrow/")


def _exception_only(exc: BaseException) -> list[str]:
    """The exception's last line; a library's exception by its class name alone (``ArrowInvalid: ...``)."""
    if type(exc).__module__.split(".")[0] in ("pyarrow", "numpy"):
        return [f"{type(exc).__name__}: {exc}\n" if str(exc) else f"{type(exc).__name__}\n"]
    return traceback.format_exception_only(type(exc), exc)


def call_site() -> str | None:
    """Where the user's code called into sluiceway: ``"job.py:12: flow.source(...)"``
    (the innermost frame outside sluiceway), for errors that name the user's call."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        if _is_user_frame(frame.filename):
            line = f"{frame.filename}:{frame.lineno}"
            return f"{line}: {frame.line.strip()}" if frame.line else line
    return None


class OperatorError(Exception):
    """Base of everything raised by :mod:`sluiceway.operators`."""


class FlowDefinitionError(OperatorError):
    """An operator was configured wrongly; raised when the flow is built."""


class SinkError(OperatorError):
    """A sink's own files (output, commit markers) cannot be used."""


class SinkOwnershipError(SinkError):
    """A sink's folder or table is written by another job, another sink step
    of this job, or this job under other checkpoints: refused when the run
    starts (``Sink.claim``), before anything is written or deleted. The
    message is one line: the place, its owner, the fix."""


class SourceError(OperatorError):
    """A source cannot give what a plan asks for: an unknown topic, records
    already deleted by retention. Replaying does not help; the job stops."""


def user_frames(exc: BaseException) -> str:
    """The traceback of ``exc`` with sluiceway's and Ray's own frames left out:
    what the user wrote, then the exception line.

    >>> try:
    ...     {}["missing"]
    ... except KeyError as e:
    ...     print(user_frames(e).splitlines()[-1])
    KeyError: 'missing'
    """
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_user_frame(f.filename)]
    lines = traceback.format_list(frames) + _exception_only(exc)
    return "".join(lines).rstrip("\n")


class UserCodeError(OperatorError):
    """A user function raised while processing a batch.

    Carries the step that ran it, the exception's type and message and the
    user's own traceback lines as text, so the cause survives crossing
    process boundaries.

    >>> err = UserCodeError("parse", "map_batches", "ValueError", "bad record", "  File ...\\nValueError: bad record")
    >>> str(err).splitlines()[0]
    "step 'parse' (map_batches) raised ValueError: bad record"
    """

    def __init__(self, step: str, kind: str, error_type: str, message: str, frames: str, epoch: int | None = None):
        super().__init__(step, kind, error_type, message, frames, epoch)
        self.step = step
        self.kind = kind
        self.error_type = error_type
        self.message = message
        self.frames = frames
        self.epoch = epoch

    @classmethod
    def from_exception(cls, step: str, kind: str, exc: BaseException, defined_at: str | None = None
                       ) -> "UserCodeError":
        """``defined_at``: where the user made the step (:func:`call_site`), shown when the error came from
        a built-in operator (no frame of the user's own code), in place of the library's internals."""
        message = str(exc).splitlines()[0] if str(exc) else ""
        frames = user_frames(exc)
        if defined_at and frames == "".join(_exception_only(exc)).rstrip("\n"):  # no frame of the user's
            frames = f"  the step was made at {defined_at}\n{frames}"
        return cls(step, kind, type(exc).__name__, message, frames)

    @property
    def headline(self) -> str:
        return f"step {self.step!r} ({self.kind}) raised {self.error_type}" + (f": {self.message}" if self.message else "")

    @property
    def signature(self) -> tuple:
        """What makes two failures "the same failure"."""
        return (self.step, self.error_type, self.message)

    def __str__(self) -> str:
        return f"{self.headline}\nTraceback of the user's code (most recent call last):\n{self.frames}"


class FlowValidationError(OperatorError):
    """The flow does not fit its data: a column it names is missing, a source
    broke its contract. No replay can fix it, so the job fails at once,
    without spending restarts."""

    def __init__(self, step: str, kind: str, problem: str):
        super().__init__(step, kind, problem)
        self.step = step
        self.kind = kind
        self.problem = problem

    def __str__(self) -> str:
        return f"step {self.step!r} ({self.kind}): {self.problem}"


def missing_columns(step: str, kind: str, wanted: list[str], have: list[str], fix: str) -> FlowValidationError:
    """The error for columns a step names and the stream lacks.

    >>> str(missing_columns("by_user", "key_by", ["usr"], ["user", "amount"], "fix the name in key_by(...)"))
    "step 'by_user' (key_by): the stream has no column 'usr' (it has user, amount); fix the name in key_by(...)"
    """
    absent = [c for c in wanted if c not in have]
    names = ", ".join(repr(c) for c in absent)
    noun = "column" if len(absent) == 1 else "columns"
    return FlowValidationError(step, kind, f"the stream has no {noun} {names} (it has {', '.join(have)}); {fix}")
