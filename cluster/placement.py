"""Where actors go: executors on live nodes that offer CPUs, with hard
node affinity (soft affinity did not stick, RAY_NOTES.md); the coordinator
on the driver's node."""

from __future__ import annotations

import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def default_parallelism() -> int:
    """Parallelism of steps that set none: the CPUs of the cluster this
    process is connected to, or of this machine for an embedded cluster
    (a source never gets more tasks than it has partitions)."""
    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 0)))
    return os.cpu_count() or 2


def worker_nodes() -> list[str]:
    """Ids of live nodes that offer CPUs to jobs, in a stable order."""
    return sorted(worker_node_cpus())


def worker_node_cpus() -> dict[str, int]:
    """Live nodes that offer CPUs to jobs: id -> CPUs."""
    return {n["NodeID"]: int(n["Resources"]["CPU"]) for n in ray.nodes()
            if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0}


def pinned(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
