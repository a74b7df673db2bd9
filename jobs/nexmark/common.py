"""What the Nexmark jobs share: the source and its settings, read from the
environment so that ``sluiceway run jobs/nexmark/qN.py`` needs no flags.

- ``SLUICEWAY_NEXMARK_EVENTS``: events in all (default 100 000; ``0``: unbounded);
- ``SLUICEWAY_NEXMARK_PARTITIONS``: source partitions (default 2);
- ``SLUICEWAY_NEXMARK_RATE``: events per second of wall clock (default: all at once);
- ``SLUICEWAY_NEXMARK_EVENT_RATE``: events per second of event time (default 10 000, Nexmark's);
- ``SLUICEWAY_NEXMARK_OUTPUT``: where the queries write (default ``.sluiceway-output/nexmark``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from sluiceway.jobs import Dataflow
from sluiceway.jobs.dataflow import Stream
from sluiceway.operators.connectors.nexmark import NexmarkSource

DISORDER = timedelta(seconds=1)  # how far back the generator moves an event's time ...
OUT_OF_ORDERNESS = timedelta(seconds=1)  # ... and what the watermark allows: nothing is late


@dataclass(frozen=True)
class Settings:
    events: int | None = 100_000
    partitions: int = 2
    rate: float | None = None
    event_rate: float = 10_000
    output: str = ".sluiceway-output/nexmark"

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        events = int(env("SLUICEWAY_NEXMARK_EVENTS", "100000"))
        rate = env("SLUICEWAY_NEXMARK_RATE")
        return cls(events=events or None, partitions=int(env("SLUICEWAY_NEXMARK_PARTITIONS", "2")),
                   rate=float(rate) if rate else (None if events else 10_000.0),
                   event_rate=float(env("SLUICEWAY_NEXMARK_EVENT_RATE", "10000")),
                   output=env("SLUICEWAY_NEXMARK_OUTPUT", ".sluiceway-output/nexmark"))

    def source(self) -> NexmarkSource:
        return NexmarkSource(self.events, partitions=self.partitions, rate=self.rate, event_rate=self.event_rate,
                             disorder=DISORDER)


def source(flow: Dataflow, settings: Settings) -> Stream:
    """The Nexmark events with ``date_time`` as event time."""
    return flow.source(settings.source(), name="nexmark").with_event_time(
        "date_time", max_out_of_orderness=OUT_OF_ORDERNESS, name="event_time")
