"""One Ray node of a local cluster, as one process: ``python -m
sluiceway.cluster.node``. ``sluiceway up`` and ``workers add`` start it in a
session of its own, so that every process of the node (raylet, agents, the
Ray workers that run tasks) shares one session id: ``down`` and
``kill-node`` stop exactly those processes, found by that id.

It does what ``ray start --block`` does, with one difference that matters
here: the node advertises and listens on the address it is given. ``ray
start`` rewrites ``127.0.0.1`` to the machine's routable address, and its
servers then listen on every interface.

SIGTERM stops the node gracefully (Ray's own shutdown of its processes);
SIGKILL of the whole session is what ``kill-node`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading


def _params(args):
    from ray._private.parameter import RayParams

    from sluiceway.cluster.local import FAST_HEALTH_CHECK

    params = RayParams(
        node_ip_address=args.host,
        num_cpus=args.cpus,
        num_gpus=0,
        memory=args.memory,
        object_store_memory=args.object_store_memory,
        include_dashboard=False,
        min_worker_port=0,
        max_worker_port=0,
        resources={},
        labels={},
        node_name=args.name,
    )
    if args.head:
        params.update(gcs_server_port=args.port, _system_config=FAST_HEALTH_CHECK)
    else:
        params.update(gcs_address=args.address, node_manager_port=0, include_log_monitor=False)
    return params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sluiceway.cluster.node")
    p.add_argument("--head", action="store_true")
    p.add_argument("--address", help="the head's GCS address (worker nodes)")
    p.add_argument("--port", type=int, default=0, help="GCS port (head; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--cpus", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--memory", type=int, required=True)
    p.add_argument("--object-store-memory", type=int, required=True)
    p.add_argument("--ready-file", required=True, help="written once the node runs: node id, address, pid")
    args = p.parse_args(argv)

    from ray._private.node import Node

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node = Node(_params(args), head=args.head, shutdown_at_exit=False, spawn_reaper=False)
    ready = {"node_id": node.node_id, "address": node.gcs_address, "pid": os.getpid(), "name": args.name}
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ready, f)
    os.replace(tmp, args.ready_file)
    while not stop.wait(1.0):
        if not node.remaining_processes_alive():
            print(f"node {args.name}: a Ray process of this node exited; stopping the node", file=sys.stderr)
            break
    node.kill_all_processes(check_alive=False, allow_graceful=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
