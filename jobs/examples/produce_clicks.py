"""Feed the log topic ``clicks`` with the example's click events, at a rate.

    python -m sluiceway.jobs.examples.produce_clicks [--rows-per-partition N] [--rate R] [--log-dir URL]

Events are those of :func:`sluiceway.jobs.examples.clicks.clicks`: event
``i`` of partition ``p`` is the same in every run, so the job's output can
be checked against an independent computation. The topic is created (two
partitions) when missing. ``--start`` resumes a producer that stopped.
"""

from __future__ import annotations

import argparse
import sys
import time

from sluiceway.jobs.examples.clicks import PARTITIONS, clicks
from sluiceway.operators.connectors.log import Log, Topic, TopicConfig
from sluiceway.operators.errors import OperatorError, SourceError

TOPIC = "clicks"


def topic(log_dir: str | None = None) -> Topic:
    log = Log(log_dir)
    try:
        return log.topic(TOPIC)
    except SourceError:
        return log.create_topic(TopicConfig(TOPIC, partitions=PARTITIONS))


def produce(log_dir: str | None = None, rows_per_partition: int = 20_000, rate: float = 4000.0,
            batch: int = 1000, start: int = 0, log=print) -> int:
    """Append events ``[start, rows_per_partition)`` of each partition, about
    ``rate`` events per second in all. Returns how many were appended."""
    t = topic(log_dir)
    began, done = time.time(), 0
    for first in range(start, rows_per_partition, batch):
        stop = min(rows_per_partition, first + batch)
        for p in range(PARTITIONS):
            t.append_partition(p, clicks(p, first, stop))
            done += stop - first
        ahead = began + done / rate - time.time()
        if ahead > 0:
            time.sleep(ahead)
    log(f"produced {done} click events to topic {TOPIC} in {t.log.url} ({time.time() - began:.1f} s)")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="produce_clicks", description=__doc__.splitlines()[0])
    p.add_argument("--rows-per-partition", type=int, default=20_000)
    p.add_argument("--rate", type=float, default=4000.0, help="events per second, all partitions (default 4000)")
    p.add_argument("--batch", type=int, default=1000, help="events per append and partition (default 1000)")
    p.add_argument("--start", type=int, default=0, help="first event of each partition (default 0)")
    p.add_argument("--log-dir", default=None, help="the log (default $SLUICEWAY_LOG_DIR or ./.sluiceway-log)")
    args = p.parse_args(argv)
    try:
        produce(args.log_dir, args.rows_per_partition, args.rate, args.batch, args.start)
    except OperatorError as exc:
        print(f"produce_clicks: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
