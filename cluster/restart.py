"""The restart policy, as a pure state machine: what to do after a failure.

Two rules from Flink, combined, plus one of our own:

- **Failure rate.** At most ``max_failures`` failures may be *open* at once.
  A failure stays open until the job proves healthy again (a checkpoint
  completes after the restore that followed it) or until it is older than
  ``failure_window_s``. A job that loses a node every day therefore runs for
  ever; a job in a crash loop spends its budget in minutes.
- **Exponential delay.** The first restart after a healthy stretch is
  immediate; each further open failure waits ``initial_delay_s``, then
  ``multiplier`` times longer, up to ``max_delay_s``.
- **Deterministic errors.** User code that fails the same way on the same
  epoch again after a restore will fail on every replay: the job stops after
  that one replay, with the user's traceback. Errors that no replay can fix
  (a column the flow names is missing) stop the job at once.

>>> tracker = RestartTracker(RestartPolicy(max_failures=2, initial_delay_s=1.0))
>>> tracker.on_failure(Failure(FailureKind.TASK_LOST, "lost node", task="a[0]"), now=0.0)
Restart(delay_s=0.0)
>>> tracker.on_failure(Failure(FailureKind.TASK_LOST, "lost node", task="a[0]"), now=5.0)
Restart(delay_s=1.0)
>>> tracker.on_checkpoint_completed(now=9.0)  # healthy again: the budget refills
>>> tracker.on_failure(Failure(FailureKind.TASK_LOST, "lost node", task="a[1]"), now=20.0)
Restart(delay_s=0.0)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FailureKind(str, enum.Enum):
    """Why a run lost an epoch."""

    TASK_LOST = "task_lost"  # an actor or its node died
    USER_CODE = "user_code"  # a user function raised
    STUCK = "stuck"  # an epoch did not complete within its bound
    STORAGE = "storage"  # storage stayed unreachable past its deadline
    CORRUPT_STATE = "corrupt_state"  # a state file of the restored checkpoint failed its checks when fetched
    INTERNAL = "internal"  # anything else a task raised
    FATAL = "fatal"  # the flow does not fit its data: no replay can help


@dataclass(frozen=True)
class Failure:
    """One failure as the coordinator records it. ``message`` is one line
    naming the cause; ``detail`` is the rest (the user's traceback)."""

    kind: FailureKind
    message: str
    detail: str = ""
    task: str | None = None
    epoch: int | None = None
    signature: tuple = ()

    def text(self) -> str:
        return f"{self.message}\n{self.detail}" if self.detail else self.message


@dataclass(frozen=True)
class RestartPolicy:
    """How often and how fast a job restarts. Durations in seconds."""

    max_failures: int = 5
    failure_window_s: float = 600.0
    initial_delay_s: float = 1.0
    max_delay_s: float = 60.0
    multiplier: float = 2.0

    def __post_init__(self):
        problems = []
        if self.max_failures < 0:
            problems.append(f"max_failures must be >= 0, got {self.max_failures}")
        if self.failure_window_s <= 0:
            problems.append(f"failure_window_s must be > 0 seconds, got {self.failure_window_s}")
        if self.initial_delay_s < 0 or self.max_delay_s < self.initial_delay_s:
            problems.append(
                f"restart delays must satisfy 0 <= initial ({self.initial_delay_s}) <= max ({self.max_delay_s})"
            )
        if self.multiplier < 1:
            problems.append(f"restart delay multiplier must be >= 1, got {self.multiplier}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Restart:
    delay_s: float


@dataclass(frozen=True)
class GiveUp:
    """Stop the job. ``reason`` completes the failure's own first line."""

    reason: str


@dataclass
class RestartTracker:
    policy: RestartPolicy
    open_failures: list[tuple[float, Failure]] = field(default_factory=list)
    last_failure: Failure | None = None
    total: int = 0

    def on_checkpoint_completed(self, now: float) -> None:
        """The job is healthy: every failure so far is forgiven."""
        self.open_failures.clear()
        self.last_failure = None

    def on_failure(self, failure: Failure, now: float) -> Restart | GiveUp:
        self.total += 1
        previous, self.last_failure = self.last_failure, failure
        if failure.kind is FailureKind.FATAL:
            return GiveUp("no replay can fix this, so the job stopped without restarting")
        if failure.kind is FailureKind.STORAGE:
            return GiveUp("storage stayed unavailable past its deadline, so the job stopped")
        if (
            failure.kind is FailureKind.USER_CODE
            and previous is not None
            and previous.kind is FailureKind.USER_CODE
            and previous.epoch == failure.epoch
            and previous.signature == failure.signature
        ):
            return GiveUp(
                f"it failed the same way on epoch {failure.epoch} after a replay: the error is deterministic, "
                "so the job stopped"
            )
        window_start = now - self.policy.failure_window_s
        self.open_failures = [(t, f) for t, f in self.open_failures if t >= window_start]
        self.open_failures.append((now, failure))
        count = len(self.open_failures)
        if count > self.policy.max_failures:
            return GiveUp(
                f"{count} failures within {self.policy.failure_window_s:g} s without a completed checkpoint "
                f"in between spent the restart budget of {self.policy.max_failures}"
            )
        if count == 1:
            return Restart(0.0)
        delay = self.policy.initial_delay_s * self.policy.multiplier ** (count - 2)
        return Restart(min(self.policy.max_delay_s, delay))


def failure_from_exception(exc: BaseException, task: str, epoch: int | None) -> Failure:
    """Classify what a task raised. The message leads with the cause."""
    from sluiceway.checkpoint.errors import CorruptCheckpointError, StorageError
    from sluiceway.operators.errors import FlowValidationError, UserCodeError

    if isinstance(exc, FlowValidationError):
        return Failure(FailureKind.FATAL, str(exc), task=task, epoch=epoch)
    if isinstance(exc, UserCodeError):
        detail = f"Traceback of the user's code (most recent call last):\n{exc.frames}"
        where = f" (task {task}, epoch {epoch})" if epoch is not None else f" (task {task})"
        return Failure(
            FailureKind.USER_CODE, exc.headline + where, detail, task=task, epoch=epoch, signature=exc.signature
        )
    if isinstance(exc, StorageError):
        return Failure(FailureKind.STORAGE, str(exc).splitlines()[0], task=task, epoch=epoch)
    if isinstance(exc, CorruptCheckpointError):
        return Failure(FailureKind.CORRUPT_STATE, str(exc).splitlines()[0], task=task, epoch=epoch)
    import traceback

    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    first = str(exc).splitlines()[0] if str(exc) else ""
    return Failure(FailureKind.INTERNAL, f"task {task} failed: {type(exc).__name__}: {first}", detail, task, epoch)


_PRIORITY = [FailureKind.FATAL, FailureKind.USER_CODE, FailureKind.CORRUPT_STATE, FailureKind.STORAGE,
             FailureKind.INTERNAL, FailureKind.STUCK, FailureKind.TASK_LOST]


def primary(failures: list[Failure]) -> Failure:
    """The failure that explains the others: user code before a lost task (a
    task whose upstream failed looks lost or stuck too)."""
    return min(failures, key=lambda f: _PRIORITY.index(f.kind))
