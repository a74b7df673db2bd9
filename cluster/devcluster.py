"""A local multi-node Ray cluster for development, demos and tests:
``sluiceway up``, ``down``, ``workers add|remove``, ``kill-node``.

Each node is one :mod:`sluiceway.cluster.node` process leading a session of
its own; every Ray process of the node (GCS, raylet, agents, the workers
that run tasks) belongs to that session. The cluster's state file records
each node's process id, which is its session id, so ``down`` and
``kill-node`` stop exactly the processes of this cluster (never ``ray
stop``, which stops every Ray process on the machine).

The state lives in ``$SLUICEWAY_HOME`` (default ``~/.sluiceway``), readable
by the user only: ``cluster.json`` (address, nodes, process ids) and
``auth_token``, the token every connection presents (Ray's token
authentication stays on). Ports listen on ``127.0.0.1`` unless ``up --host``
names another address of this machine.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from sluiceway.cluster.errors import ClusterError

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
NODE_START_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def home() -> str:
    """Where sluiceway keeps the local cluster's state: ``$SLUICEWAY_HOME`` or ``~/.sluiceway``."""
    return os.path.abspath(os.environ.get("SLUICEWAY_HOME") or os.path.join(os.path.expanduser("~"), ".sluiceway"))


@dataclass
class NodeRecord:
    name: str  # "head", "worker-1", ...
    pid: int  # the node process; also its session id
    node_id: str
    cpus: int
    log: str
    head: bool = False


@dataclass
class ClusterState:
    """What ``up`` started: enough to connect, and to stop it by process id."""

    address: str
    host: str
    token_file: str
    ray_tmpdir: str
    started_at: float
    memory: int
    object_store_memory: int
    nodes: list[NodeRecord] = field(default_factory=list)
    next_worker: int = 1

    def worker(self, ident: str) -> NodeRecord:
        """The node named ``ident`` (``worker-2``) or whose id starts with it."""
        matches = [n for n in self.nodes if n.name == ident or (len(ident) >= 6 and n.node_id.startswith(ident))]
        if len(matches) != 1:
            known = ", ".join(f"{n.name} ({n.node_id[:12]})" for n in self.nodes) or "none"
            what = "matches several nodes" if matches else "is not a node of this cluster"
            raise ClusterError(f"node {ident!r} {what}; nodes: {known} (`sluiceway nodes`)")
        return matches[0]

    @property
    def workers(self) -> list[NodeRecord]:
        return [n for n in self.nodes if not n.head]


# ------------------------------------------------------------------ state file
def state_path(where: str | None = None) -> str:
    return os.path.join(where or home(), STATE_FILE)


def load_state(where: str | None = None) -> ClusterState | None:
    path = state_path(where)
    try:
        with open(path) as f:
            doc = json.load(f)
        nodes = [NodeRecord(**n) for n in doc.pop("nodes")]
        return ClusterState(**doc, nodes=nodes)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as exc:
        raise ClusterError(
            f"cluster state file {path} is malformed ({exc}); it is written by `sluiceway up`: "
            "stop leftover processes by hand and remove the file"
        ) from None


def save_state(state: ClusterState, where: str | None = None) -> None:
    path = state_path(where)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f, indent=1)
    os.replace(tmp, path)


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _write_token(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)


# ----------------------------------------------------------------- processes
def session_members(sid: int) -> list[int]:
    """Process ids of every live process in session ``sid`` (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            members.append(int(entry))
    return members


def is_our_node(pid: int) -> bool:
    """``pid`` still runs a sluiceway node (and is not a reused process id)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"sluiceway.cluster.node" in f.read()
    except OSError:
        return False


def kill_session(sid: int) -> int:
    """SIGKILL every process of session ``sid``; how many there were."""
    members = session_members(sid)
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(members)


def stop_node(node: NodeRecord, grace_s: float = STOP_GRACE_S) -> None:
    """Ray's graceful shutdown of the node, then SIGKILL whatever is left of its session."""
    if is_our_node(node.pid):
        try:
            os.kill(node.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + grace_s
        while time.time() < deadline and is_our_node(node.pid):
            time.sleep(0.1)
    deadline = time.time() + 5
    while session_members(node.pid) and time.time() < deadline:
        kill_session(node.pid)
        time.sleep(0.1)


def _start_node(state_dir: str, name: str, *, head: bool, cpus: int, host: str, address: str | None, port: int,
                memory: int, object_store_memory: int, env: dict) -> tuple[NodeRecord, str]:
    log = os.path.join(state_dir, "nodes", f"{name}.log")
    ready = os.path.join(state_dir, "nodes", f"{name}.ready")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    if os.path.exists(ready):
        os.unlink(ready)
    cmd = [sys.executable, "-m", "sluiceway.cluster.node", "--name", name, "--cpus", str(cpus), "--host", host,
           "--memory", str(memory), "--object-store-memory", str(object_store_memory), "--ready-file", ready]
    cmd += ["--head", "--port", str(port)] if head else ["--address", address]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + NODE_START_TIMEOUT_S
    while not os.path.exists(ready):
        if proc.poll() is not None or time.time() > deadline:
            kill_session(proc.pid)
            tail = _tail(log)
            raise ClusterError(f"node {name} did not start ({'it exited' if proc.poll() is not None else 'timed out'});"
                               f" its log {log} ends:\n{tail}")
        time.sleep(0.05)
    with open(ready) as f:
        info = json.load(f)
    os.unlink(ready)
    return NodeRecord(name, proc.pid, info["node_id"], cpus, log, head), info["address"]


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def node_environment(state: ClusterState) -> dict:
    """Environment of the cluster's processes: token authentication on, with the cluster's token."""
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=state.token_file, RAY_TMPDIR=state.ray_tmpdir,
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    if state.host in LOOPBACK:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps Ray from swapping 127.0.0.1 for a routable address
    return env


# ------------------------------------------------------------------ commands
def up(workers: int, cpus_per_worker: int, *, host: str = "127.0.0.1", port: int = 0,
       memory: int = 2 * 1024**3, object_store_memory: int = 256 * 1024**2,
       state_dir: str | None = None, on_node=None) -> ClusterState:
    """Start a head (no CPUs for tasks) and ``workers`` worker nodes in the
    background; record them in the state file; return the state."""
    from sluiceway.cluster.connect import answers

    state_dir = state_dir or home()
    existing = load_state(state_dir)
    if existing is not None:
        if answers(existing.address) or any(is_our_node(n.pid) for n in existing.nodes):
            raise ClusterError(
                f"a cluster started by `sluiceway up` is already running at {existing.address} "
                f"(state in {state_path(state_dir)}): use it, or `sluiceway down` first"
            )
        _forget(existing, state_dir)  # a stale record: nothing of it runs any more
    if workers < 0 or cpus_per_worker < 1:
        raise ClusterError(f"--workers must be >= 0 and --cpus-per-worker >= 1 (got {workers}, {cpus_per_worker})")
    _private_dir(state_dir)
    token_file = os.path.join(state_dir, TOKEN_FILE)
    _write_token(token_file)
    state = ClusterState(address="", host=host, token_file=token_file,
                         ray_tmpdir=tempfile.mkdtemp(prefix="sluiceway-ray-"), started_at=time.time(),
                         memory=memory, object_store_memory=object_store_memory)
    env = node_environment(state)
    try:
        head, state.address = _start_node(state_dir, "head", head=True, cpus=0, host=host, address=None, port=port,
                                          memory=memory, object_store_memory=object_store_memory, env=env)
        state.nodes.append(head)
        save_state(state, state_dir)
        if on_node:
            on_node(head)
        add_workers(state, workers, cpus_per_worker, state_dir=state_dir, on_node=on_node)
    except BaseException:
        down(state, state_dir)
        raise
    return state


def add_workers(state: ClusterState, count: int, cpus: int, *, state_dir: str | None = None,
                on_node=None) -> list[NodeRecord]:
    """Start ``count`` worker nodes (one after the other: Ray mixes up nodes
    of one machine that register at the same moment)."""
    state_dir = state_dir or home()
    env = node_environment(state)
    added = []
    for _ in range(count):
        name = f"worker-{state.next_worker}"
        state.next_worker += 1
        node, _ = _start_node(state_dir, name, head=False, cpus=cpus, host=state.host, address=state.address, port=0,
                              memory=state.memory, object_store_memory=state.object_store_memory, env=env)
        state.nodes.append(node)
        save_state(state, state_dir)
        added.append(node)
        if on_node:
            on_node(node)
    return added


def remove_worker(state: ClusterState, ident: str, *, state_dir: str | None = None) -> NodeRecord:
    """Stop one worker node gracefully (its tasks fail over like after a kill)."""
    node = state.worker(ident)
    if node.head:
        raise ClusterError(f"{node.name} is the head node: it holds the cluster together; use `sluiceway down`")
    stop_node(node)
    state.nodes.remove(node)
    save_state(state, state_dir)
    return node


def kill_node(state: ClusterState, ident: str | None, *, state_dir: str | None = None,
              rng: random.Random | None = None) -> tuple[NodeRecord, int]:
    """SIGKILL every process of one worker node (``ident``, or a random live
    one when None): an abrupt machine loss. Returns the node and how many
    processes died."""
    if ident is None:
        alive = [n for n in state.workers if is_our_node(n.pid)]
        if not alive:
            raise ClusterError("no live worker node to kill: `sluiceway workers add 1` first")
        node = (rng or random).choice(alive)
    else:
        node = state.worker(ident)
        if node.head:
            raise ClusterError(f"{node.name} is the head node; kill-node kills worker nodes only "
                               "(the head holds the cluster's state; `sluiceway down` stops it)")
    killed = kill_session(node.pid)
    if not killed:
        raise ClusterError(f"node {node.name} ({node.node_id[:12]}) is not running: nothing to kill")
    state.nodes.remove(node)
    save_state(state, state_dir)
    return node, killed


def down(state: ClusterState, state_dir: str | None = None) -> int:
    """Stop every node ``up`` started (workers first), remove its session
    folder and the state file. Returns how many nodes it stopped."""
    state_dir = state_dir or home()
    stopped = 0
    for node in sorted(state.nodes, key=lambda n: n.head):
        if session_members(node.pid):
            stopped += 1
        stop_node(node)
    _forget(state, state_dir)
    return stopped


def _forget(state: ClusterState, state_dir: str) -> None:
    for node in state.nodes:
        if is_our_node(node.pid):
            kill_session(node.pid)
    shutil.rmtree(state.ray_tmpdir, ignore_errors=True)
    for name in (STATE_FILE, TOKEN_FILE):
        try:
            os.unlink(os.path.join(state_dir, name))
        except FileNotFoundError:
            pass
