"""How a job runs: one :class:`RunOptions` for ``run()``, the CLI (``run``
and ``submit``), :func:`sluiceway.jobs.client.submit` and the supervisor."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from sluiceway.checkpoint.lease import DEFAULT_TTL_S
from sluiceway.checkpoint.storage import StorageRetry
from sluiceway.cluster.restart import RestartPolicy


@dataclass(frozen=True)
class RunOptions:
    """How a job runs. Durations in seconds."""

    trigger_s: float = 1.0
    checkpoint_every: int = 5
    max_epochs_in_flight: int = 2
    max_records_per_epoch: int = 1_000_000
    keep_checkpoints: int = 3
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    until_idle: bool = False
    lease_ttl_s: float = DEFAULT_TTL_S
    epoch_timeout_s: float | None = None  # None: 10x the slowest recent epoch, at least 60 s
    epochs: int | None = None  # stop after this many new epochs in this run
    restore_checkpoint: int | None = None  # start from this retained checkpoint, not the latest
    storage_deadline_s: float = StorageRetry.deadline_s  # retry failing checkpoint storage this long (the job pauses)
    executors_per_node: int | None = None  # processes that run the job's tasks on each node (None: its CPUs)
    allow_dropped_state: bool = False  # restore even when a change of the flow leaves state without its step

    def __post_init__(self):
        problems = []
        if self.trigger_s < 0:
            problems.append(f"trigger must be >= 0 seconds, got {self.trigger_s}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1 epoch, got {self.checkpoint_every}")
        if self.max_epochs_in_flight < 1:
            problems.append(f"max_epochs_in_flight must be >= 1, got {self.max_epochs_in_flight}")
        if self.max_records_per_epoch < 1:
            problems.append(f"max_records_per_epoch must be >= 1, got {self.max_records_per_epoch}")
        if self.keep_checkpoints < 1:
            problems.append(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.epoch_timeout_s is not None and self.epoch_timeout_s <= 0:
            problems.append(f"epoch_timeout_s must be > 0 seconds or None, got {self.epoch_timeout_s}")
        if self.lease_ttl_s <= 0:
            problems.append(f"lease_ttl_s must be > 0 seconds, got {self.lease_ttl_s}")
        if self.restore_checkpoint is not None and self.restore_checkpoint < 1:
            problems.append(f"restore_checkpoint must be a checkpoint id (>= 1), got {self.restore_checkpoint}")
        if self.storage_deadline_s < 0:
            problems.append(f"storage_deadline_s must be >= 0 seconds, got {self.storage_deadline_s}")
        if self.executors_per_node is not None and self.executors_per_node < 1:
            problems.append(f"executors_per_node must be >= 1 or None, got {self.executors_per_node}")
        if self.epochs is not None and self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if problems:
            raise ValueError("; ".join(problems))

    def with_settings(self, **settings) -> "RunOptions":
        """These options with some fields replaced; an unknown name is an
        error that lists the known ones.

        >>> RunOptions().with_settings(trigger_s=0.5).trigger_s
        0.5
        >>> RunOptions().with_settings(trigger=0.5)
        Traceback (most recent call last):
        ...
        TypeError: unknown run option 'trigger'; the options are: allow_dropped_state, checkpoint_every, epoch_timeout_s, epochs, executors_per_node, keep_checkpoints, lease_ttl_s, max_epochs_in_flight, max_records_per_epoch, restart, restore_checkpoint, storage_deadline_s, trigger_s, until_idle
        """
        known = {f.name for f in fields(self)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown run option {', '.join(map(repr, unknown))}; the options are: "
                            f"{', '.join(sorted(known))}")
        return replace(self, **settings)
