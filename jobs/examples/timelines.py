"""Example job: home timelines, a table-table join kept up to date.

Two changelogs (2 partitions each, deterministic): *tweets* (posted,
edited, deleted) and *follows* (follow, unfollow). Each becomes a table
that retracts its updates; their join on ``author == followee`` is the
home timelines: one row per (tweet, follow), so a tweet fans out to every
follower of its author, an unfollow or a deleted tweet takes entries out,
and an edit updates them. The view's changelog goes to
``<output>/timelines`` (``_op`` per row; sink it into PostgreSQL with
``PostgresSink(mode="upsert", key=["tweet", "follow"])`` to keep the
timelines as a table). ``expected_timelines`` joins the final tables in
plain pyarrow; ``final_timelines`` applies the committed changelog.

Run it: ``sluiceway run jobs/examples/timelines.py --until-idle``
(``$SLUICEWAY_EXAMPLE_ROWS`` changes per partition of each, default 20,000).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.sources import GeneratorSource, offsets

PARTITIONS, USERS, TWEETS = 2, 40, 500
ROWS_PER_PARTITION = int(os.environ.get("SLUICEWAY_EXAMPLE_ROWS", "20000"))
ROWS_PER_SECOND = int(os.environ.get("SLUICEWAY_EXAMPLE_RATE", "20000"))
OUTPUT = os.environ.get("SLUICEWAY_EXAMPLE_OUTPUT", ".sluiceway-output")
NAMES = pa.array([f"user{i:02d}" for i in range(USERS)])


def tweets(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Changes of tweet ``(offset % 250) * 2 + partition`` (a tweet's changes
    all come from one partition, in order): one in ten a delete, the rest a
    post or an edit, which may change the author too."""
    o = np.asarray(offsets(start, stop))
    tweet = (o % (TWEETS // PARTITIONS)) * PARTITIONS + partition
    delete = (o * 7 + partition) % 10 == 0
    return pa.record_batch({
        "tweet": pa.array(tweet),
        "author": pc.take(NAMES, pa.array((o * 31 + partition * 17 + o // 250) % USERS)),
        "text": pa.array([f"tweet {t} version {v}" for t, v in zip(tweet.tolist(), o.tolist())]),
        "_op": pa.array(np.where(delete, "delete", "update")),
    })


def follows(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Follows of ``follower`` (of this partition's parity) to ``followee``;
    one change in four an unfollow."""
    o = np.asarray(offsets(start, stop))
    follower = ((o * 7) % (USERS // PARTITIONS)) * PARTITIONS + partition
    followee = (o * 13 + o // 40) % USERS
    names = np.asarray(NAMES.to_pylist(), dtype=object)
    return pa.record_batch({
        "follow": pa.array([f"{a}>{b}" for a, b in zip(names[follower], names[followee])]),
        "follower": pa.array(names[follower].tolist()),
        "followee": pa.array(names[followee].tolist()),
        "_op": pa.array(np.where((o // 3) % 4 == 0, "delete", "insert")),
    })


def build(output: str = OUTPUT, rows_per_partition: int = ROWS_PER_PARTITION,
          rows_per_second: float = ROWS_PER_SECOND) -> Dataflow:
    flow = Dataflow("timelines")
    add_to(flow, output, rows_per_partition, rows_per_second)
    return flow


def add_to(flow: Dataflow, output: str, rows_per_partition: int, rows_per_second: float, prefix: str = "") -> None:
    posted = (flow.source(GeneratorSource(tweets, PARTITIONS, rows_per_second, rows_per_partition),
                          name=f"{prefix}tweets")
              .to_table("tweet", updates="retract", name=f"{prefix}tweet_table"))
    following = (flow.source(GeneratorSource(follows, PARTITIONS, rows_per_second, rows_per_partition),
                             name=f"{prefix}follows")
                 .to_table("follow", updates="retract", name=f"{prefix}follow_table"))
    timelines = posted.join(following, on="author", right_on="followee", name=f"{prefix}timelines")
    timelines.sink(ParquetSink(f"{output}/timelines"), name=f"{prefix}timelines_out")


def _final(changes: pa.Table, key: str) -> pa.Table:
    from sluiceway.operators.tables import split_changes

    live, _ = split_changes(changes, [key])
    return live


def expected_timelines(rows_per_partition: int = ROWS_PER_PARTITION) -> set[tuple]:
    """(tweet, follower, author, text) of the final tables joined, in plain pyarrow."""
    t = _final(pa.Table.from_batches([tweets(p, 0, rows_per_partition) for p in range(PARTITIONS)]), "tweet")
    f = _final(pa.Table.from_batches([follows(p, 0, rows_per_partition) for p in range(PARTITIONS)]), "follow")
    joined = t.join(f, "author", right_keys="followee")
    return set(zip(joined["tweet"].to_pylist(), joined["follower"].to_pylist(), joined["author"].to_pylist(),
                   joined["text"].to_pylist()))


def final_timelines(changelog: pa.Table) -> set[tuple]:
    """The committed changelog applied in order (epoch order, then row order)."""
    view: dict = {}
    for r in changelog.to_pylist():
        pair = (r["tweet"], r["follow"])
        if r["_op"] == "delete":
            view.pop(pair, None)
        else:
            view[pair] = (r["tweet"], r["follower"], r["author"], r["text"])
    return set(view.values())


flow = build()
