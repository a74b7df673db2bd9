"""Where actors go: tasks spread over live nodes that offer CPUs, with hard
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
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    return sorted(n["NodeID"] for n in nodes)


def pinned(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def spread(count: int, nodes: list[str], offset: int = 0) -> list[str]:
    """Round-robin ``count`` placements over ``nodes``.

    >>> spread(5, ["a", "b"])
    ['a', 'b', 'a', 'b', 'a']
    """
    if not nodes:
        raise RuntimeError(
            "no live Ray node offers CPUs to run tasks on (none joined within 60 s); "
            "add a worker node or give the head node CPUs"
        )
    return [nodes[(offset + i) % len(nodes)] for i in range(count)]
