"""Ray clusters on one machine: the embedded one ``run()`` starts, and the
head-plus-workers cluster of the demo and the chaos tests.

Both use a fast health check so a killed node is noticed in about a second
instead of ~14 s (RAY_NOTES.md): the GCS pings each raylet every 500 ms and
declares it dead after 2 missed pings of 500 ms.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

FAST_HEALTH_CHECK = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 2,
}

QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def quiet_environment() -> None:
    """Environment for isolated local clusters: no usage stats, no token auth."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def init_embedded(num_cpus: int | None = None, object_store_memory: int | None = 512 * 1024**2) -> None:
    """Start an embedded single-node Ray for this process (never joins a
    cluster named by ``ray_current_cluster``)."""
    import ray

    quiet_environment()
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 2,
        object_store_memory=object_store_memory,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        _system_config=FAST_HEALTH_CHECK,
    )


@dataclass
class LocalCluster:
    """A head and worker nodes on this machine, this process connected.
    :meth:`stop` ends every process and removes the session folder it made."""

    cluster: object  # ray.cluster_utils.Cluster
    workers: list
    tmpdir: str | None  # RAY_TMPDIR made for this cluster, or None if the caller set one

    def stop(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()
        if self.tmpdir is not None:
            if os.environ.get("RAY_TMPDIR") == self.tmpdir:
                del os.environ["RAY_TMPDIR"]
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_local_cluster(workers: int = 2, cpus_per_worker: int = 2,
                        object_store_memory: int = 256 * 1024**2) -> LocalCluster:
    """A ``ray.cluster_utils.Cluster`` with a head that offers no CPUs to jobs
    and ``workers`` worker nodes, and connect this process to it. Call
    :meth:`LocalCluster.stop` when done."""
    import ray
    from ray.cluster_utils import Cluster

    quiet_environment()
    tmpdir = None
    if "RAY_TMPDIR" not in os.environ:
        tmpdir = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sluiceway-ray-")
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": object_store_memory,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECK,
        },
    )
    nodes = [cluster.add_node(num_cpus=cpus_per_worker, object_store_memory=object_store_memory) for _ in range(workers)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    return LocalCluster(cluster, nodes, tmpdir)
