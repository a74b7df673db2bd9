"""The per-process data plane: tasks spread over executors give the same
output as one process, and the messages an epoch costs follow the
executors, not the tasks."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from sluiceway.cluster.executor import Executor, Message, interleave, place
from sluiceway.cluster.inprocess import InProcessDriver
from sluiceway.jobs.dataflow import Dataflow
from sluiceway.cluster.graph import plan as physical_plan
from sluiceway.jobs.testing import CollectSink, run_local
from sluiceway.operators.sources import ListSource
from sluiceway.operators.windows import Tumbling

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def bids(n: int, keys: int = 50) -> list[dict]:
    return [{"auction": (i * 7919) % keys, "price": i % 97, "ts": T0 + timedelta(milliseconds=37 * i)}
            for i in range(n)]


def keyed_flow(rows, parallelism: int, partitions: int):
    flow, totals, windows = Dataflow("spread"), CollectSink(), CollectSink()
    stream = flow.source(ListSource(rows, partitions=partitions), parallelism=parallelism) \
        .with_event_time("ts", max_out_of_orderness=timedelta(seconds=1))
    stream.key_by("auction", parallelism=parallelism).aggregate([("price", "sum"), ([], "count_all")]).sink(totals)
    stream.key_by("auction", parallelism=parallelism).window(Tumbling(timedelta(seconds=5))) \
        .aggregate([("price", "sum")]).sink(windows)
    return flow, totals, windows


def last_per_key(rows, key="auction"):
    return {r[key]: r for r in rows}


@pytest.mark.parametrize("executors", [2, 3, 8])
def test_tasks_spread_over_executors_give_what_one_process_gives(executors):
    rows = bids(3000)
    flow, totals, windows = keyed_flow(rows, parallelism=6, partitions=6)
    run_local(flow, max_records_per_epoch=400)
    flow2, totals2, windows2 = keyed_flow(rows, parallelism=6, partitions=6)
    run_local(flow2, max_records_per_epoch=400, executors=executors)
    assert last_per_key(totals2.rows()) == last_per_key(totals.rows())
    key = lambda r: (r["auction"], r["window_start"])  # noqa: E731
    assert sorted(windows2.rows(), key=key) == sorted(windows.rows(), key=key)
    assert sum(r["price_sum"] for r in windows.rows()) == sum(r["price"] for r in rows)


def traffic(tasks: int, executors: int, epochs: int = 6) -> dict:
    """Messages per epoch of a source -> key_by -> aggregate job of ``tasks`` tasks per step on ``executors``."""
    rows = bids(600 * epochs)
    flow, _, _ = keyed_flow(rows, parallelism=tasks, partitions=tasks)
    driver = InProcessDriver(physical_plan(flow.graph, None), max_records_per_epoch=600, max_epochs=epochs,
                             start_time=0.0, trigger_s=1.0, executors=executors)
    assert driver.run() == epochs
    sent = [x.traffic for x in driver.executors.values()]
    return {"batches": sum(t.batches for t in sent) / epochs, "task_messages": sum(t.remote_messages for t in sent) / epochs,
            "ack_calls": driver.ack_calls / epochs, "acks": sum(t.acks for t in sent) / epochs}


def test_messages_per_epoch_follow_the_executors_not_the_tasks():
    executors = 4
    small, large = traffic(tasks=4, executors=executors), traffic(tasks=32, executors=executors)
    # Task to task: two exchanges (the aggregate's and the window's), each about tasks^2 channels.
    assert large["task_messages"] > 30 * small["task_messages"] / 2
    assert large["acks"] == 8 * small["acks"]
    # Calls between processes: one batch per (executor, other executor) and exchange round, one ack call per
    # executor and round, whatever the number of tasks.
    bound = executors * (executors - 1)
    for t in (small, large):
        assert t["batches"] <= bound and t["ack_calls"] <= 2 * executors, t
    assert large["batches"] == small["batches"] and large["ack_calls"] == small["ack_calls"]


def test_placement_fills_the_emptiest_executor_and_alternates_nodes():
    order = interleave({"n1": ["a", "b"], "n2": ["c", "d"]})
    assert order == ["a", "c", "b", "d"]
    assert list(place(range(6), {}, order).values()) == ["a", "c", "b", "d", "a", "c"]
    # A recovery: the two lost tasks go to the emptiest live executors.
    assert place(["t1", "t2"], {"a": 3, "c": 1, "d": 2}, ["a", "c", "d"]) == {"t1": "c", "t2": "c"}


def test_a_message_for_a_task_that_moved_away_is_dropped():
    flow, _, _ = keyed_flow(bids(10), parallelism=2, partitions=2)
    plan = physical_plan(flow.graph, None)
    sent = []
    executor = Executor(plan, None, "x0", transmit=lambda where, m: sent.append(where), acknowledge=sent.append,
                        report=lambda *a: sent.append(a))
    gone = plan.tasks()[-1]
    executor.deliver([Message(gone, 0, (plan.tasks()[0], 0), pa.table({"a": [1]}), None)])
    assert sent == [] and executor.tasks == []
