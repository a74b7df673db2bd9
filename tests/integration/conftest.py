"""One embedded Ray cluster for the whole integration session, in a session
folder of its own that is removed afterwards."""

import os
import shutil
import tempfile

import pytest
import ray

from sluiceway.cluster.local import init_embedded


@pytest.fixture(scope="session")
def ray_cluster():
    previous = os.environ.get("RAY_TMPDIR")
    tmpdir = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sluiceway-ray-")
    try:
        init_embedded(num_cpus=2)
        yield
    finally:
        ray.shutdown()
        if previous is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(tmpdir, ignore_errors=True)
