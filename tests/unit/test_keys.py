import json
import subprocess
import sys

import pyarrow as pa
import pytest

from sluiceway.checkpoint.types import key_group_range, subtask_for_key_group
from sluiceway.operators.keys import key_groups

SNIPPET = """
import json, pyarrow as pa
from sluiceway.operators.keys import key_groups
ints = pa.array([-5, 0, 1, 2, 3, 10**12, None], pa.int64())
strs = pa.array(["alice", "bob", "", None, "alice", "ünï"])
print(json.dumps([key_groups(ints, 128).to_pylist(), key_groups(strs, 1000).to_pylist()]))
"""


def run_in_subprocess(seed: str) -> list:
    env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def test_key_groups_are_identical_across_processes_and_hash_seeds():
    here = [
        key_groups(pa.array([-5, 0, 1, 2, 3, 10**12, None], pa.int64()), 128).to_pylist(),
        key_groups(pa.array(["alice", "bob", "", None, "alice", "ünï"]), 1000).to_pylist(),
    ]
    assert run_in_subprocess("1") == here
    assert run_in_subprocess("2") == here


def test_equal_keys_share_a_key_group_and_groups_are_in_range():
    values = pa.array(list(range(1000)) * 2, pa.int64())
    kg = key_groups(values, 128).to_pylist()
    assert kg[:1000] == kg[1000:]
    assert min(kg) >= 0 and max(kg) < 128
    assert len(set(kg)) > 100  # spreads over the key groups


def test_int_widths_hash_alike():
    assert key_groups(pa.array([7, 8], pa.int32()), 64).to_pylist() == key_groups(pa.array([7, 8], pa.int64()), 64).to_pylist()


def test_unsupported_key_type_names_the_fix():
    with pytest.raises(TypeError, match="cast it in map_batches"):
        key_groups(pa.array([1.5, 2.5]), 128)


@pytest.mark.parametrize("parallelism", [1, 2, 3, 7, 128])
def test_key_group_ranges_partition_all_groups(parallelism):
    owned = [kg for i in range(parallelism) for kg in key_group_range(i, parallelism, 128)]
    assert owned == list(range(128))
    for i in range(parallelism):
        assert all(subtask_for_key_group(kg, parallelism, 128) == i for kg in key_group_range(i, parallelism, 128))
