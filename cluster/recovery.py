"""The failure half of the :class:`~sluiceway.cluster.controller.JobController`:
stuck epochs, task failures and losses, sinks that cannot commit, and the
recovery that follows (restart policy, a new generation, the restart delay,
finding the dead); and the reports that keep a waiting run from being
silent (an epoch in flight for long, no input). Pure, as the controller:
events in, instructions out.
"""

from __future__ import annotations

import enum

from sluiceway.checkpoint.types import TaskId  # noqa: F401 - names() doctest
from sluiceway.cluster import protocol as p
from sluiceway.cluster import records
from sluiceway.cluster.epochs import EpochBook
from sluiceway.cluster.restart import Failure, FailureKind, GiveUp, primary

STUCK_FLOOR_S = 60.0  # an epoch is stuck after 10x the slowest recent epoch, and never sooner than this
STUCK_BEFORE_FIRST_EPOCH_S = 120.0  # no epoch of the run completed yet: nothing to compare with
REPORT_AFTER_S = 10.0  # an epoch in flight this long is reported, naming the tasks it waits for
NAMES_SHOWN = 8  # tasks named in one line; the rest are counted


class Phase(str, enum.Enum):
    RESTORING = "restoring"  # waiting for the restore point, the sinks to settle, the tasks to reset
    RUNNING = "running"
    DELAYING = "delaying"  # a failure happened: waiting out the restart delay
    FINDING = "finding"  # probing for dead tasks
    ENDED = "ended"


def names(tasks, shown: int = NAMES_SHOWN) -> str:
    """Task names for one line: the first few, then how many more.

    >>> names([TaskId("w", i) for i in range(3)]), names([TaskId("w", i) for i in range(12)], shown=2)
    ('w[0], w[1], w[2]', 'w[0], w[1] and 10 more')
    """
    tasks = [str(t) for t in tasks]
    more = f" and {len(tasks) - shown} more" if len(tasks) > shown else ""
    return ", ".join(tasks[:shown]) + more



class Recovery:
    """Mixed into :class:`~sluiceway.cluster.controller.JobController`, whose state it shares."""

    def _check_stuck(self, now: float, silent: dict) -> list[p.Instruction]:
        """An epoch overdue while storage answers fails the run, naming the
        tasks that have not acknowledged it; one in flight for long is reported."""
        if self.storage_waits:
            return []  # waiting for storage is a pause, not a hang
        bound = self.epoch_bound_s()
        overdue = self.book.overdue(now, min(bound, REPORT_AFTER_S))
        if overdue is None:
            return []
        epoch, missing = overdue
        waited = now - self.book.dispatched_at[epoch]
        if waited <= bound:
            if now - self._reported.get(epoch, -1e18) < REPORT_AFTER_S:
                return []
            self._reported[epoch] = now
            return [self._emit("waiting_for", epoch=epoch, waited_s=round(waited, 3), tasks=len(self.tasks),
                               missing=[str(t) for t in missing[:NAMES_SHOWN]], missing_count=len(missing),
                               bound_s=bound)]
        hung = [t for t in missing if silent.get(t, 0.0) > bound / 2]
        self.known_dead.update(hung)
        restart = f"; restarting {names(hung)}, which stopped answering" if hung else ""
        self.pending_failures.append(Failure(
            FailureKind.STUCK, f"epoch {epoch} did not complete within {bound:g} s: {names(missing)} have not "
            f"acknowledged it{restart}", epoch=epoch))
        return []


    def _on_sink_commit_failed(self, event: p.SinkCommitFailed) -> list[p.Instruction]:
        if self.phase is Phase.RESTORING:  # settling: the commit log says it completed, and it cannot commit
            self.phase = Phase.ENDED
            return [p.Fail(event.failure.message, event.failure.detail)]
        self._completing.clear()
        self._completion = {}
        self.pending_failures.append(event.failure)
        return self._recover(self.clock())


    def _on_task_failed(self, event: p.TaskFailed) -> list[p.Instruction]:
        if event.generation == self.generation and self.phase is Phase.RUNNING:
            self.pending_failures.append(event.failure)
        return []

    def _on_task_lost(self, event: p.TaskLost) -> list[p.Instruction]:
        self.known_dead.add(event.task)
        if self.phase is Phase.RUNNING:
            where = f"its executor {event.executor}" if event.executor else "its process"
            self.pending_failures.append(Failure(
                FailureKind.TASK_LOST, f"task {event.task} died: {where} or its node was lost", task=str(event.task)))
        return []

    def _recover(self, now: float) -> list[p.Instruction]:
        """Decide on the failures heard of: give up, or halt (a new generation
        makes every message in flight stale) and restart after the delay."""
        failure = primary(self.pending_failures)
        self.pending_failures = []
        self.failures.append(failure.text())
        decision = self.tracker.on_failure(failure, now)
        giving_up = isinstance(decision, GiveUp)
        self.restarts += not giving_up
        out: list[p.Instruction] = [self._emit(
            "failure", error=failure.message, failure_kind=failure.kind.value, restarts=self.restarts,
            delay_s=None if giving_up else decision.delay_s)]
        if giving_up:
            self.phase = Phase.ENDED
            return out + self._checkpoints_lost("aborted", f"the job stopped: {failure.message}", now) + [p.Fail(
                failure.message,
                f"job {self.plan.job!r} stopped: {decision.reason}; committed output stays as of epoch "
                f"{self.last_completed}" + (f"\n{failure.detail}" if failure.detail else ""))]
        out += self._checkpoints_lost("failed", failure.message, now)
        if failure.kind is FailureKind.CORRUPT_STATE and self.restore_manifest is not None:
            # A lazily fetched state file of the restored checkpoint failed its checks: that checkpoint, and
            # every one completed since (their chains may name the same file), is no restore point.
            bad = range(self.restore_manifest.id, self.last_checkpoint + 1)
            self.bad_checkpoints.update(bad)
            out += [self._emit("corrupt_checkpoint", checkpoint=c, problem=failure.message) for c in bad]
        self.generation += 1
        self.book = EpochBook(self.tasks, self.generation)
        self._completing.clear()
        self._reported.clear()
        self._recovery = {"failure": failure, "at": now, "delay_s": decision.delay_s,
                          "resume_at": now + decision.delay_s}
        self.phase = Phase.DELAYING
        return out + (self._find_dead() if decision.delay_s <= 0 else [])

    def _find_dead(self) -> list[p.Instruction]:
        self.phase = Phase.FINDING
        return [p.FindDead(frozenset(self.known_dead))]

    def _on_dead_found(self, event: p.DeadFound) -> list[p.Instruction]:
        dead = tuple(sorted(event.dead | self.known_dead))
        self.known_dead = set()
        self.storage_waits.clear()
        self._recovery["restarted"] = dead
        self._to_start = dead
        return self._read_restore_point()

    def _checkpoints_lost(self, status: str, reason: str, now: float) -> list[p.Instruction]:
        return [p.WriteHistory(records.CheckpointNotCompleted.of(plan, acked, status, reason, now), now)
                for plan, acked in self.book.pending_checkpoints()]


    def _on_storage_wait(self, event: p.StorageWait) -> list[p.Instruction]:
        if event.waiting:
            self.storage_waits.setdefault(event.who, self.clock())
        else:
            self.storage_waits.pop(event.who, None)
        return []

    def _report_no_input(self, now: float) -> list[p.Instruction]:
        """No source has new records: said after 10 s, then at doubling
        intervals (at most every 5 minutes), with where each source stands,
        so a run that waits for input it will never get is not silent."""
        if self.book.in_flight or self.stop_reason is not None:
            return []
        since, next_at = self._no_input or (now, now + REPORT_AFTER_S)
        self._no_input = (since, next_at)
        if now < next_at:
            return []
        self._no_input = (since, now + min(300.0, 2 * (next_at - since)))
        return [self._emit("waiting_for_input", idle_s=round(now - since, 3),
                           epochs_planned=self.epochs_planned_this_run, epochs=self.options.epochs,
                           next_offsets={s: {str(k): o for k, o in parts.items()}
                                         for s, parts in self.next_offsets.items()})]
