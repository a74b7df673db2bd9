"""Barrier alignment as a pure state machine.

A task with input channels receives, per channel and in order, data for the
current epoch followed by that epoch's barrier. It may process epoch *e* only
when every channel has delivered the barrier of *e*; what a channel sends
after its barrier belongs to *e+1* and is held back.

>>> a = BarrierAligner(["up0", "up1"], first_epoch=1)
>>> a.handle(Data("up0", "rows-a"))
[]
>>> a.handle(BarrierEvent("up0", Barrier(1, checkpoint=False, watermark=5)))
[]
>>> a.handle(Data("up0", "rows-b"))  # epoch 2 arrives early on up0: held back
[]
>>> a.handle(BarrierEvent("up1", Barrier(1, checkpoint=True, watermark=3)))
[Aligned(barrier=Barrier(epoch=1, checkpoint=True, watermark=3, savepoint=False, idle=False), tables=['rows-a'], channels=['up0'])]

A channel in ``untimed`` (a table read for lookups) never holds the
watermark back: its barriers count as idle ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Hashable


class ProtocolError(Exception):
    """A channel broke the barrier protocol (a bug, never user error)."""


@dataclass(frozen=True)
class Barrier:
    """End of an epoch on a channel. ``checkpoint``: snapshot state at it.
    ``watermark``: event time in microseconds since the Unix epoch, ``None``
    while unknown; ``idle``: every input behind the channel is idle, so its
    watermark must not hold the others back."""

    epoch: int
    checkpoint: bool
    watermark: int | None = None
    savepoint: bool = False  # write state whole: the checkpoint stands alone
    idle: bool = False


@dataclass(frozen=True)
class Data:
    channel: Hashable
    table: Any


@dataclass(frozen=True)
class BarrierEvent:
    channel: Hashable
    barrier: Barrier


@dataclass(frozen=True)
class Aligned:
    """Instruction: process epoch ``barrier.epoch`` with ``tables`` (in
    channel order), each from the channel at the same place in ``channels``."""

    barrier: Barrier
    tables: list
    channels: list


def min_watermark(marks: list[int | None], idle: list[bool] | None = None) -> tuple[int | None, bool]:
    """A task's watermark: the minimum over its inputs that are not idle
    (unknown if any of theirs is), and whether all of them are idle (then
    the minimum over all of them).

    >>> min_watermark([5, 3, None], [False, False, True])
    (3, False)
    >>> min_watermark([5, None], [True, True])
    (None, True)
    """
    idle = idle or [False] * len(marks)
    live = [m for m, i in zip(marks, idle) if not i]
    all_idle = bool(marks) and not live
    considered = marks if all_idle else live
    if not considered or any(m is None for m in considered):
        return None, all_idle
    return min(considered), all_idle


class BarrierAligner:
    def __init__(self, channels: list[Hashable], first_epoch: int, untimed=()):
        if not channels:
            raise ProtocolError("a task with no input channels needs no aligner")
        self.channels = list(channels)
        self.untimed = set(untimed)
        self.next_epoch = first_epoch
        # Per channel: completed epochs as (barrier, tables), and the tables of the open epoch.
        self._closed: dict[Hashable, deque[tuple[Barrier, list]]] = {c: deque() for c in self.channels}
        self._open: dict[Hashable, list] = {c: [] for c in self.channels}
        self._last_barrier: dict[Hashable, int] = {c: first_epoch - 1 for c in self.channels}
        self._behind = len(self.channels)  # channels with no closed epoch: an epoch aligns when none is

    def handle(self, event: Data | BarrierEvent) -> list[Aligned]:
        if event.channel not in self._open:
            raise ProtocolError(f"event on unknown channel {event.channel!r}; channels are {self.channels}")
        if isinstance(event, Data):
            self._open[event.channel].append(event.table)
            return []
        expected = self._last_barrier[event.channel] + 1
        if event.barrier.epoch != expected:
            raise ProtocolError(
                f"channel {event.channel!r} sent the barrier of epoch {event.barrier.epoch}, expected {expected}"
            )
        self._last_barrier[event.channel] = event.barrier.epoch
        closed = self._closed[event.channel]
        self._behind -= not closed
        closed.append((event.barrier, self._open[event.channel]))
        self._open[event.channel] = []
        out = []
        while not self._behind:
            heads = [self._closed[c].popleft() for c in self.channels]
            self._behind = sum(not self._closed[c] for c in self.channels)
            barriers = [b for b, _ in heads]
            watermark, idle = min_watermark(
                [b.watermark for b in barriers], [b.idle or c in self.untimed for c, b in zip(self.channels, barriers)]
            )
            out.append(
                Aligned(
                    Barrier(
                        self.next_epoch,
                        checkpoint=any(b.checkpoint for b in barriers),
                        watermark=watermark,
                        savepoint=any(b.savepoint for b in barriers),
                        idle=idle,
                    ),
                    [t for _, tables in heads for t in tables],
                    [c for c, (_, tables) in zip(self.channels, heads) for _ in tables],
                )
            )
            self.next_epoch += 1
        return out

    @property
    def held_back(self) -> int:
        """Closed channel-epochs waiting for other channels, plus open data batches (for metrics)."""
        return sum(len(q) for q in self._closed.values()) + sum(len(v) for v in self._open.values())
