"""One embedded Ray cluster for the whole integration session."""

import pytest
import ray

from sluiceway.cluster.local import init_embedded


@pytest.fixture(scope="session")
def ray_cluster():
    init_embedded(num_cpus=2)
    yield
    ray.shutdown()
