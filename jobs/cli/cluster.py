"""``sluiceway up``, ``down``, ``workers add|remove``, ``nodes``,
``kill-node``: a local multi-node cluster
(:mod:`sluiceway.cluster.devcluster`)."""

from __future__ import annotations

import json

from sluiceway.cluster.errors import ClusterError
from sluiceway.jobs.cli.common import env, env_arg, json_arg, nonnegative_int, positive_int


def address_arg(p) -> None:
    p.add_argument("--address", default=env("RAY_ADDRESS"),
                   help="the cluster, HOST:PORT (env RAY_ADDRESS; default: the one `sluiceway up` started)")


def register(sub) -> None:
    p = sub.add_parser("up", help="start a local cluster: a head and worker nodes, in the background")
    p.set_defaults(func=cmd_up)
    env_arg(p, "--workers", "SLUICEWAY_WORKERS", "2", nonnegative_int, "worker nodes to start")
    env_arg(p, "--cpus-per-worker", "SLUICEWAY_CPUS_PER_WORKER", "1", positive_int, "CPUs each worker node offers")
    env_arg(p, "--memory-per-node-mb", "SLUICEWAY_NODE_MEMORY_MB", "2048", positive_int,
            "memory each node offers to tasks, in MiB")
    env_arg(p, "--object-store-mb", "SLUICEWAY_OBJECT_STORE_MB", "256", positive_int,
            "object store size of each node, in MiB")
    p.add_argument("--host", default=env("SLUICEWAY_HOST", "127.0.0.1"),
                   help="address the cluster's ports listen on (env SLUICEWAY_HOST; default 127.0.0.1: this "
                        "machine only). Another address lets other machines reach the cluster; token "
                        "authentication is what keeps them out")
    env_arg(p, "--port", "SLUICEWAY_PORT", "0", nonnegative_int, "the head's port (0: any free port)")

    p = sub.add_parser("down", help="stop the cluster `sluiceway up` started (only its processes)")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("workers", help="add or remove worker nodes of the local cluster")
    wsub = p.add_subparsers(dest="workers_command", required=True)
    a = wsub.add_parser("add", help="start N more worker nodes")
    a.set_defaults(func=cmd_workers_add)
    a.add_argument("count", type=positive_int)
    env_arg(a, "--cpus-per-worker", "SLUICEWAY_CPUS_PER_WORKER", "1", positive_int, "CPUs each new node offers")
    r = wsub.add_parser("remove", help="stop one worker node gracefully")
    r.set_defaults(func=cmd_workers_remove)
    r.add_argument("node", help="node name (worker-2) or id (or its first 6+ characters)")

    p = sub.add_parser("nodes", help="the cluster's nodes: alive or dead, CPUs, the job tasks each hosts")
    p.set_defaults(func=cmd_nodes)
    address_arg(p)
    json_arg(p, "the nodes")

    p = sub.add_parser("kill-node", help="SIGKILL every process of one worker node (an abrupt machine loss)")
    p.set_defaults(func=cmd_kill_node)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("node", nargs="?", help="node name (worker-2) or id")
    which.add_argument("--random", action="store_true", help="a random live worker node")
    register_chaos(sub)


def _state():
    from sluiceway.cluster.devcluster import load_state, state_path

    state = load_state()
    if state is None:
        raise ClusterError(f"no cluster was started with `sluiceway up` (no {state_path()}): start one first")
    return state


def _started(node) -> None:
    """A node ``up`` or ``workers add`` started, printed as soon as it runs."""
    what = "head (no CPUs for tasks)" if node.head else f"{node.cpus} CPU(s)"
    print(f"started {node.name:<10} {node.node_id[:12]}  {what}", flush=True)


def cmd_up(args) -> int:
    from sluiceway.cluster import devcluster

    state = devcluster.up(args.workers, args.cpus_per_worker, host=args.host, port=args.port,
                          memory=args.memory_per_node_mb * 1024**2, object_store_memory=args.object_store_mb * 1024**2,
                          on_node=_started)
    print(f"cluster up at {state.address} (token authentication on; token in {state.token_file}, mode 0600)")
    print(f"state: {devcluster.state_path()}; `sluiceway down` stops it")
    return 0


def cmd_down(args) -> int:
    from sluiceway.cluster import devcluster

    state = _state()
    stopped = devcluster.down(state)
    print(f"cluster at {state.address} is down: stopped {stopped} node(s)")
    return 0


def cmd_workers_add(args) -> int:
    from sluiceway.cluster import devcluster

    devcluster.add_workers(_state(), args.count, args.cpus_per_worker, on_node=_started)
    return 0


def cmd_workers_remove(args) -> int:
    from sluiceway.cluster import devcluster

    node = devcluster.remove_worker(_state(), args.node)
    print(f"stopped {node.name} ({node.node_id[:12]})")
    return 0


def cmd_kill_node(args) -> int:
    from sluiceway.cluster import devcluster

    node, killed = devcluster.kill_node(_state(), None if args.random else args.node)
    print(f"killed {node.name} ({node.node_id[:12]}): SIGKILL to {killed} process(es)")
    return 0


def node_rows() -> list[dict]:
    """Every node the cluster knows (live and dead), with the job tasks on it."""
    import ray

    from sluiceway.cluster.devcluster import load_state
    from sluiceway.jobs.client import list_jobs

    tasks: dict[str, list[str]] = {}
    for job in list_jobs():
        for task, node in (job.get("placement") or {}).items():
            tasks.setdefault(node, []).append(f"{job['name']}:{task}")
    state = load_state()
    names = {n.node_id: n.name for n in state.nodes} if state else {}
    rows = []
    for node in ray.nodes():
        resources = node.get("Resources", {})
        rows.append({
            "node_id": node["NodeID"],
            "name": names.get(node["NodeID"]) or node.get("NodeName"),
            "alive": bool(node.get("Alive")),
            "head": "node:__internal_head__" in resources,
            "cpus": int(resources.get("CPU", 0)),
            "tasks": sorted(tasks.get(node["NodeID"], [])),
        })
    return sorted(rows, key=lambda r: (not r["alive"], not r["head"], r["name"] or ""))


def cmd_nodes(args) -> int:
    from sluiceway.cluster.connect import connect

    connect(args.address)
    rows = node_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'node':<10} {'id':<12} {'state':<6} {'cpus':>4}  tasks")
    for r in rows:
        state = "alive" if r["alive"] else "dead"
        role = "head" if r["head"] else r["name"]
        print(f"{role:<10} {r['node_id'][:12]:<12} {state:<6} {r['cpus']:>4}  {', '.join(r['tasks']) or '-'}")
    return 0



def register_chaos(sub) -> None:
    p = sub.add_parser("chaos", help="kill random worker nodes while a job runs, then report each recovery")
    p.set_defaults(func=cmd_chaos)
    p.add_argument("job_name")
    env_arg(p, "--kill-every", "SLUICEWAY_KILL_EVERY", "10", _seconds_positive, "seconds between kills")
    env_arg(p, "--duration", "SLUICEWAY_CHAOS_DURATION", "30", _seconds_positive, "seconds of chaos")
    p.add_argument("--replace", action="store_true", help="add a fresh worker node after each kill")
    address_arg(p)
    json_arg(p, "the report")


def _seconds_positive(text: str) -> float:
    import argparse

    from sluiceway.jobs.cli.common import seconds

    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0 seconds")
    return value


def cmd_chaos(args) -> int:
    from sluiceway.cluster.connect import connect
    from sluiceway.jobs.chaos import run_chaos

    connect(args.address)
    if args.kill_every > args.duration:
        raise ClusterError(f"--kill-every {args.kill_every:g} is longer than --duration {args.duration:g}: "
                           "nothing would be killed")
    r = run_chaos(args.job_name, kill_every_s=args.kill_every, duration_s=args.duration, replace=args.replace,
                  log=(lambda line: None) if args.json else (lambda line: print(line, flush=True)))
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"\nchaos report for job {args.job_name!r}: {len(r['kills'])} kill(s)")
        for line in r["lines"]:
            print(f"  {line}")
        print(f"job still running: {'yes' if r['still_running'] else 'no'} ({r['state']})"
              + (f": {r['error']}" if r["error"] else ""))
    return 0 if r["state"] != "failed" else 1
