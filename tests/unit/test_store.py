"""The keyed store: what an epoch reads and writes follows its keys, not the
state; restore fetches only the key groups an epoch touches; state beyond the
budget is mapped from local disk and stays exact."""

import numpy as np
import pyarrow as pa
import pytest

from sluiceway.checkpoint.state import MemoryStateFiles
from sluiceway.operators.aggregate import Aggregate
from sluiceway.operators.base import OperatorContext
from sluiceway.operators.keys import key_groups
from sluiceway.operators.store import KeyedStore

CTX = OperatorContext("sums", 0, 1, 128)


class StoreLogic:
    """The checkpoint face of an operator, for a bare store."""

    def __init__(self, store):
        self.store = store

    def snapshot_changes(self, whole=False):
        return self.store.take_changes(whole)

    def state_written(self, path, batches, compacted=False):
        self.store.written(path, batches, compacted)

    def state_chains(self):
        return self.store.chains()


def counts(keys) -> pa.Table:
    keys = pa.array(keys, pa.int64())
    return pa.table({"k": keys, "v": pa.array(np.ones(len(keys), np.int64))})


def aggregate():
    return Aggregate("k", [("v", "sum")])


@pytest.mark.parametrize("state_keys", [10_000, 1_000_000])
def test_an_epoch_reads_and_writes_rows_of_its_keys_only_whatever_the_state(state_keys):
    logic, files = aggregate().build(CTX, None), MemoryStateFiles()
    for start in range(0, state_keys, 250_000):
        logic.process(counts(range(start, min(state_keys, start + 250_000))))
    files.checkpoint(logic)
    rng = np.random.default_rng(3)
    seen = np.zeros(state_keys * 2, bool)
    seen[:state_keys] = True
    for epoch in range(12):
        keys = np.unique(rng.integers(0, state_keys * 2, 1000))  # about half of them known
        logic.store.reset_touched()
        out = logic.process(counts(keys))
        known = int(seen[keys].sum())
        seen[keys] = True
        assert out.num_rows == len(keys)
        assert logic.store.counters.rows_read == known  # each known key's row, from one run
        assert logic.store.counters.rows_written == len(keys)
        if epoch % 4 == 3:
            logic.store.reset_touched()
            files.checkpoint(logic)
            assert logic.store.counters.rows_merged <= 16 * 4 * 1000  # small runs merged, never the state


def test_a_restored_store_fetches_only_the_key_groups_an_epoch_touches_and_continues_exactly():
    straight, logic, files = aggregate().build(CTX, None), aggregate().build(CTX, None), MemoryStateFiles()
    everyone = counts(range(50_000))
    straight.process(everyone)
    logic.process(everyone)
    files.checkpoint(logic)
    restored = files.restored()
    resumed = aggregate().build(CTX, restored)
    assert restored.fetched == []  # nothing fetched to start
    few = counts([7, 11, 7_000])
    wanted = set(key_groups(few.column("k"), 128).to_pylist())
    assert sorted(resumed.process(few).to_pylist(), key=lambda r: r["k"]) == \
        sorted(straight.process(few).to_pylist(), key=lambda r: r["k"])
    assert {kg for kg, chain in files.chains.items() for ref in chain if ref in restored.fetched} == wanted
    assert len(restored.fetched) == len(wanted)
    more = counts(range(0, 50_000, 7))
    assert sorted(resumed.process(more).to_pylist(), key=lambda r: r["k"]) == \
        sorted(straight.process(more).to_pylist(), key=lambda r: r["k"])


def test_state_beyond_the_budget_is_mapped_from_local_disk_and_stays_exact():
    store = KeyedStore(key="k", budget_bytes=64 * 1024)
    expected = {}
    rng = np.random.default_rng(5)
    files = MemoryStateFiles()
    for epoch in range(20):
        keys = np.unique(rng.integers(0, 20_000, 3_000))
        values = rng.integers(0, 100, len(keys))
        store.put(pa.table({"k": keys, "n": values}))
        expected.update(zip(keys.tolist(), values.tolist()))
        if epoch % 3 == 2:
            files.checkpoint(StoreLogic(store))
    assert any(run.mapped for run in store.runs) and store.resident_bytes() <= 64 * 1024 + 200_000
    probe = np.arange(0, 20_000, 3)
    got = store.get(pa.array(probe))
    assert dict(zip(got.column("k").to_pylist(), got.column("n").to_pylist())) == \
        {k: v for k, v in expected.items() if k % 3 == 0}
    files.checkpoint(StoreLogic(store))
    again = KeyedStore(files.restored(), key="k")
    assert sum(t.num_rows for t in again.groups.values()) == len(expected)


def test_deletes_and_several_rows_per_key_replace_what_older_runs_hold():
    store = KeyedStore(key="k")
    store.put(pa.table({"k": [1, 1, 2, 3], "w": [10, 11, 20, 30]}))
    store.take_changes()
    store.written("a", {})
    store.put(pa.table({"k": [1], "w": [12]}))  # key 1's two rows become one
    store.delete(pa.array([2]))
    store.put(pa.table({"k": [None], "w": [0]}, schema=pa.schema([("k", pa.int64()), ("w", pa.int64())])))
    got = store.get(pa.array([1, 2, 3, None], pa.int64()))
    assert sorted(got.to_pylist(), key=lambda r: (r["k"] is None, r["k"] or 0)) == \
        [{"k": 1, "w": 12}, {"k": 3, "w": 30}, {"k": None, "w": 0}]


@pytest.mark.parametrize("seed", range(6))
def test_compaction_a_window_at_a_time_restores_exactly_at_every_checkpoint(seed, monkeypatch):
    import sluiceway.operators.store as store_module

    monkeypatch.setattr(store_module, "DRAIN_ROWS", 700)  # the bottom is rewritten a few key groups at a time
    rng = np.random.default_rng(seed)
    store, files, expected = KeyedStore(key="k"), MemoryStateFiles(), {}
    store.put(pa.table({"k": np.arange(0, 16_000, 2), "n": np.zeros(8_000, np.int64)}))
    expected.update(dict.fromkeys(range(0, 16_000, 2), 0))
    windows = 0
    for epoch in range(90):
        keys = np.unique(rng.integers(0, 16_000, int(rng.integers(1, 200))))
        values = rng.integers(0, 1000, len(keys))
        dead = keys[values < 150]  # some keys are deleted
        live = keys[values >= 150]
        store.put(pa.table({"k": live, "n": values[values >= 150]}))
        store.delete(pa.array(dead))
        expected.update(zip(live.tolist(), values[values >= 150].tolist()))
        for k in dead.tolist():
            expected.pop(k, None)
        if epoch % 3 == 2:
            store.reset_touched()
            files.checkpoint(StoreLogic(store))
            windows += store._drained is not None and store._drained.hi - store._drained.lo < 128
            assert store.counters.rows_merged <= 4 * 3 * 200 * 4 + 8 * 3 * 200 + 8_000 * (epoch == 2)  # never all again
            assert len(store.runs) <= 10
            if epoch in (41, 74):  # start again from this checkpoint, fetching lazily
                store = KeyedStore(files.restored(), key="k")
        probe = pa.array(rng.integers(0, 16_000, 300))
        got = store.get(probe)
        got = {} if got is None else dict(zip(got.column("k").to_pylist(), got.column("n").to_pylist()))
        assert got == {k: expected[k] for k in set(probe.to_pylist()) if k in expected}
    assert sum(t.num_rows for t in store.groups.values()) == len(expected)
    assert windows >= 1  # the bottom was rewritten a window of key groups at a time


def test_changes_beyond_the_budget_between_checkpoints_go_to_local_disk_too():
    store = KeyedStore(key="k", budget_bytes=256 * 1024)
    rng = np.random.default_rng(9)
    expected = {}
    for epoch in range(40):  # no checkpoint: every change stays in fresh runs
        keys = np.unique(rng.integers(0, 200_000, 5_000))
        store.put(pa.table({"k": keys, "n": np.full(len(keys), epoch)}))
        expected.update(dict.fromkeys(keys.tolist(), epoch))
        assert store.resident_bytes() <= 256 * 1024 + 5_000 * 24 * 5  # the budget, and the runs since a merge
    assert any(run.mapped for run in store.fresh)
    got = store.get(pa.array(list(expected)))
    assert dict(zip(got.column("k").to_pylist(), got.column("n").to_pylist())) == expected
