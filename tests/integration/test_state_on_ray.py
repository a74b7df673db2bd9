"""Keyed state by key group on Ray: incremental checkpoints refer to older
files, and a job restarted with another parallelism restores from the chain."""

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sluiceway.checkpoint import JobStorage
from sluiceway.checkpoint.timeline import history
from sluiceway.jobs import Dataflow, run
from sluiceway.jobs.testing import compare_exactly_once
from sluiceway.operators.sinks import ParquetSink, read_committed
from sluiceway.operators.sources import GeneratorSource
from sluiceway.operators.tables import last_per_key

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]

ROWS = 8000


def readings(partition, start, stop):
    """Sensor readings: the first 2,000 of each partition come from 2,000
    sensors (a large first checkpoint); after them the sensor id moves on
    every 500 offsets, so each later epoch changes a few sensors' totals."""
    offset = pa.array(range(start, stop), pa.int64())
    sensor = pc.if_else(pc.less(offset, 2000), offset, pc.divide(offset, 500))
    return pa.record_batch({
        "sensor": pc.add(sensor, partition * 100_000),
        "value": pc.remainder(offset, 7),
    })


def flow(out, parallelism):
    f = Dataflow("sensors")
    totals = f.source(GeneratorSource(readings, 2, 1e9, ROWS)).key_by("sensor", parallelism=parallelism) \
        .aggregate([("value", "sum"), ("value", "count")], name="totals")
    totals.sink(ParquetSink(out))
    return f


def expected():
    table = pa.Table.from_batches([readings(p, 0, ROWS) for p in range(2)])
    return table.group_by("sensor").aggregate([("value", "sum"), ("value", "count")]).select(
        ["sensor", "value_sum", "value_count"])


def last_per_sensor(changelog):
    return last_per_key(changelog, "sensor").select(["sensor", "value_sum", "value_count"])


def test_incremental_chain_restores_exactly_after_rescaling(tmp_path):
    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    first = run(flow(out, 2), ckpt, epochs=4, trigger_s=0, max_records_per_epoch=2000, checkpoint_every=1,
                keep_checkpoints=5)
    assert first["last_checkpoint"] == 4
    manifest = JobStorage(ckpt, "sensors").read_manifest(4)
    sources = {f["checkpoint"] for f in manifest["files"].values()}
    assert max(sources) == 4 and min(sources) < 4, sources  # checkpoint 4 wrote the changes, kept the earlier files
    assert manifest["written_bytes"] < manifest["size_bytes"]
    events = []
    second = run(flow(out, 3), ckpt, trigger_s=0, max_records_per_epoch=2000, checkpoint_every=1,
                 on_event=events.append)
    started = [e for e in events if e["type"] == "started"][0]
    assert started["resume_checkpoint"] == 4 and len(started["tasks"]) == 2 + 3
    assert second["stopped"] == "idle"
    verdict = compare_exactly_once(last_per_sensor(read_committed(out)), expected())
    assert verdict.exactly_once, verdict.line()
    rescales = [r for r in history(ckpt, "sensors").records if r["kind"] == "rescale"]
    assert len(rescales) == 1 and rescales[0]["restored_checkpoint"] == 4
    assert sorted(rescales[0]["from"].values()) == [2, 2] and sorted(rescales[0]["to"].values()) == [2, 3]


KEYS = 150_000  # per partition: each task holds about 150,000 keys, several MiB against a 1 MiB budget


def many_keys(partition, start, stop):
    offset = pa.array(range(start, stop), pa.int64())
    return pa.record_batch({"sensor": pc.add(pc.remainder(offset, KEYS), partition * 1_000_000),
                            "value": pc.remainder(offset, 7)})


def big_state_flow(out, parallelism):
    f = Dataflow("big_state", state_budget_mb=1)
    # 300,000 rows per partition at 200,000 a second: the job is still reading when the kill lands, however fast.
    f.source(GeneratorSource(many_keys, 2, 200_000, 2 * KEYS)).key_by("sensor", parallelism=parallelism, name="by_sensor") \
        .aggregate([("value", "sum"), ("value", "count")], name="totals").sink(ParquetSink(out))
    return f


def test_state_several_times_the_budget_through_a_task_kill_and_a_rescale_exactly_once(tmp_path):
    from sluiceway.jobs.testing import TaskKiller

    out, ckpt = str(tmp_path / "out"), str(tmp_path / "ckpt")
    killer = TaskKiller("by_sensor[1]", after_epoch=2)
    first = run(big_state_flow(out, 2), ckpt, trigger_s=0, max_records_per_epoch=60_000, checkpoint_every=2,
                on_event=killer)  # until the input is read
    assert killer.killed.is_set() and first["restarts"] == 1
    manifest = JobStorage(ckpt, "big_state").read_manifest(first["last_checkpoint"])
    state_bytes = sum(f["size_bytes"] for f in manifest["files"].values())
    assert state_bytes > 4 * 2**20, state_bytes  # several times the 1 MiB budget per task
    checkpoint = [r for r in history(ckpt, "big_state").records if r["kind"] == "checkpoint"][-1]
    memory = [t["state_memory"]["totals"] for t in checkpoint["tasks"] if t["task"].startswith("by_sensor")]
    assert len(memory) == 2 and all(m["mapped_bytes"] > 2**20 for m in memory), memory  # beyond it: on disk
    assert all(m["resident_bytes"] <= 2**20 + 200_000 for m in memory), memory
    second = run(big_state_flow(out, 3), ckpt, trigger_s=0, max_records_per_epoch=60_000, checkpoint_every=2)
    assert second["stopped"] == "idle"
    table = pa.Table.from_batches([many_keys(p, 0, 2 * KEYS) for p in range(2)])
    want = table.group_by("sensor").aggregate([("value", "sum"), ("value", "count")]).select(
        ["sensor", "value_sum", "value_count"])
    verdict = compare_exactly_once(last_per_sensor(read_committed(out)), want)
    assert verdict.exactly_once, verdict.line()
