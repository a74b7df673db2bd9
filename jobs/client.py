"""Detached jobs from Python: submit a job file to a running cluster, list
the jobs there, read a job's status and logs, stop, scale and restore it.
The ``sluiceway`` commands of the same names call these.

Every function expects this process to be connected to the cluster
(:func:`sluiceway.cluster.connect.connect`). A job is found by name: its
supervisor is the detached actor ``job:<name>`` in the ``sluiceway``
namespace (:mod:`sluiceway.cluster.supervisor`).
"""

from __future__ import annotations

import functools
import os
import time

import ray

from sluiceway.checkpoint.manifest import restorable
from sluiceway.checkpoint.storage import JobStorage, absolute_url
from sluiceway.cluster.connect import NAMESPACE
from sluiceway.cluster.options import RunOptions
from sluiceway.cluster.errors import ClusterError, JobFailedError
from sluiceway.cluster.supervisor import ACTOR_PREFIX, ENDED, STARTING, JobSpec, JobSupervisor, actor_name
from sluiceway.jobs.jobfile import load_flow
from sluiceway.jobs.runner import set_server_deadline

ANSWER_TIMEOUT_S = 10.0
WORKING_DIR_EXCLUDES = [".git", ".venv", "venv", "__pycache__", ".sluiceway", ".pytest_cache", "*.egg-info"]


def load_submitted(spec: str, name: str, submit_cwd: str | None, server_deadline_s: float | None = None):
    """Where the supervisor runs: load the job file from the uploaded
    working dir (the current directory there) as ``run`` does
    (:func:`~sluiceway.jobs.jobfile.load_flow`), then work from the
    submitter's directory when this machine has it, so that relative paths
    in the job mean what they meant to the submitter. Sources and sinks
    that wait for a server wait up to ``server_deadline_s`` (the storage
    deadline) unless they set their own."""
    here = os.getcwd()
    path, sep, attr = spec.partition(":")
    if submit_cwd and os.path.isdir(submit_cwd):
        os.chdir(submit_cwd)
    flow = load_flow(os.path.join(here, path) + sep + attr, name)
    if server_deadline_s is not None:
        set_server_deadline(flow, server_deadline_s)
    return flow


def _head_node() -> str | None:
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None


def job_runtime_env(job: str) -> dict:
    """The runtime environment a submitted job runs in: its file's folder as
    the working dir, and the submitter's ``SLUICEWAY_*`` environment
    variables. Pass it to :func:`~sluiceway.cluster.connect.connect` before
    :func:`submit` (Ray uploads a local folder only when a process connects)."""
    folder = os.path.dirname(os.path.abspath(job.partition(":")[0]))
    env = {k: v for k, v in os.environ.items() if k.startswith("SLUICEWAY_")}
    return {"working_dir": folder, "excludes": WORKING_DIR_EXCLUDES, "env_vars": env}


def submit(job: str, checkpoint_dir: str, *, name: str | None = None, parallelism: int | None = None,
           options: RunOptions | None = None, force: bool = False,
           wait_s: float = 120.0, flow=None) -> dict:
    """Start ``job`` (``path/to/job.py[:attr]``) as a detached job and return
    its summary once it runs. Connect with :func:`job_runtime_env` first.
    ``flow``: the job file's flow, if the caller loaded it already.
    ``options``: how it runs; by default as :func:`~sluiceway.jobs.run`
    runs a job: it ends once every source is read to its end."""
    flow = flow or load_flow(job, name)  # errors in the job file show here, not on the cluster
    path, sep, attr = job.partition(":")
    uploaded = ray.get_runtime_context().runtime_env  # the working dir as Ray stored it (gcs://...)
    if not uploaded.get("working_dir"):
        raise ClusterError("connect with runtime_env=job_runtime_env(job) before submit: the job's folder must "
                           "travel with it")
    existing = _find(flow.name)
    if existing is not None:
        summary = _ask(existing, "summary", flow.name)
        if summary["state"] not in ENDED:
            raise ClusterError(
                f"job {flow.name!r} is already {summary['state']} on this cluster: `sluiceway stop {flow.name}` "
                f"first (or `sluiceway scale` / `sluiceway restore` it)"
            )
        _remove(existing, flow.name)
    options = options or RunOptions(until_idle=True)  # as run(): ends when every source is read to its end
    spec = JobSpec(
        name=flow.name,
        load_flow=functools.partial(load_submitted, os.path.basename(path) + sep + attr, flow.name, os.getcwd(),
                                    options.storage_deadline_s),
        checkpoint_dir=absolute_url(checkpoint_dir),
        options=options,
        parallelism=parallelism,
        force=force,
    )
    head = _head_node()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    supervisor = JobSupervisor.options(
        name=actor_name(flow.name),
        namespace=NAMESPACE,
        lifetime="detached",
        runtime_env={"working_dir": uploaded["working_dir"], "env_vars": uploaded.get("env_vars", {})},
        # On the head: losing it ends the cluster anyway, so the supervisor adds no
        # failure of its own, and kill-node (worker nodes only) leaves it alone.
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False) if head else None,
    ).remote(spec)
    deadline = time.time() + wait_s
    while True:
        summary = _ask(supervisor, "summary", flow.name, timeout_s=max(1.0, deadline - time.time()))
        if summary["state"] != STARTING:
            break
        if time.time() > deadline:
            raise ClusterError(f"job {flow.name!r} did not start within {wait_s:g} s (`sluiceway logs {flow.name}`)")
        time.sleep(0.2)
    if summary["state"] == "failed":
        _remove(supervisor, flow.name)
        raise JobFailedError(f"job {flow.name!r} could not start: {summary['error']}")
    return summary


def _find(name: str):
    try:
        return ray.get_actor(actor_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


def _remove(actor, name: str) -> None:
    ray.kill(actor, no_restart=True)
    deadline = time.time() + 30
    while _find(name) is not None and time.time() < deadline:
        time.sleep(0.1)


def _ask(actor, method: str, name: str, *args, timeout_s: float = ANSWER_TIMEOUT_S):
    try:
        return ray.get(getattr(actor, method).remote(*args), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"job {name!r} did not answer within {timeout_s:g} s: its supervisor may be "
                           "restarting after a failure; try again in a moment") from None
    except ray.exceptions.RayActorError as exc:
        raise ClusterError(f"job {name!r}: its supervisor is gone ({type(exc).__name__})") from None


def job_names() -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(n["name"][len(ACTOR_PREFIX):] for n in names
                  if n["namespace"] == NAMESPACE and n["name"].startswith(ACTOR_PREFIX))


def supervisor(name: str):
    """The job's supervisor, or a :class:`ClusterError` naming the jobs there are."""
    actor = _find(name)
    if actor is None:
        known = job_names()
        there = f"jobs on this cluster: {', '.join(known)}" if known else "no job runs on this cluster"
        raise ClusterError(f"no job named {name!r} on this cluster ({there}; `sluiceway jobs`)")
    return actor


def list_jobs() -> list[dict]:
    """Every job's summary; a job whose supervisor does not answer shows as ``restarting``."""
    out = []
    for name in job_names():
        actor = _find(name)
        if actor is None:
            continue
        try:
            out.append(_ask(actor, "summary", name, timeout_s=5.0))
        except ClusterError as exc:
            out.append({"name": name, "state": "restarting", "epoch": None, "input_rows_per_s": None,
                        "last_checkpoint": None, "restarts": None, "error": str(exc), "placement": {}})
    return out


def status(name: str, epochs: int = 10) -> dict:
    return _ask(supervisor(name), "status", name, epochs)


def logs(name: str, after: int = 0, task_offsets: dict | None = None) -> dict:
    return _ask(supervisor(name), "logs", name, after, task_offsets or {}, timeout_s=30.0)


def _wait(actor, name: str, done, timeout_s: float, what: str) -> dict:
    deadline = time.time() + timeout_s
    while True:
        try:
            summary = _ask(actor, "summary", name)
        except ClusterError:
            summary = None  # restarting: ask again
        if summary is not None and done(summary):
            return summary
        if time.time() > deadline:
            raise ClusterError(f"job {name!r}: {what} did not finish within {timeout_s:g} s "
                               f"(state {summary['state'] if summary else 'unknown'}; `sluiceway status {name}`)")
        time.sleep(0.2)


def _send(actor, name: str, method: str, *args) -> None:
    answer = _ask(actor, method, name, *args)
    if answer.startswith("busy"):
        raise ClusterError(f"job {name!r} is {answer}; wait for it to finish")


def stop(name: str, *, savepoint: bool = False, timeout_s: float = 300.0) -> dict:
    """Stop the job after its epochs in flight and a final checkpoint (a
    savepoint with ``savepoint``). A job that already ended is removed from
    the cluster instead; its checkpoints stay."""
    actor = supervisor(name)
    summary = _ask(actor, "summary", name)
    if summary["state"] in ENDED:
        _remove(actor, name)
        return {**summary, "removed": True}
    _send(actor, name, "stop", savepoint)
    return {**_wait(actor, name, lambda s: s["state"] in ENDED, timeout_s, "stopping"), "removed": False}


def scale(name: str, parallelism: int, *, timeout_s: float = 300.0) -> dict:
    """Savepoint, stop the tasks, resume from the savepoint with
    ``parallelism`` tasks per step (key groups reassigned)."""
    if parallelism < 1:
        raise ClusterError(f"cannot scale job {name!r} to {parallelism} tasks: parallelism must be 1 or more")
    actor = supervisor(name)
    before = _ask(actor, "summary", name)
    _send(actor, name, "scale", parallelism)
    after = _wait(actor, name, lambda s: s["runs"] > before["runs"] and s["state"] != STARTING, timeout_s, "scaling")
    if after["state"] == "failed":
        raise JobFailedError(f"job {name!r} failed after scaling: {after['error']}")
    return {**after, "from": before["parallelism"]}


def restore(name: str, checkpoint: int, *, parallelism: int | None = None, timeout_s: float = 300.0) -> dict:
    """Run the job again from retained checkpoint or savepoint ``checkpoint``."""
    actor = supervisor(name)
    before = _ask(actor, "summary", name)
    restorable(JobStorage(before["checkpoint_dir"], name), checkpoint)
    if parallelism is not None and parallelism < 1:
        raise ClusterError(f"cannot restore job {name!r} with {parallelism} tasks: parallelism must be 1 or more")
    _send(actor, name, "restore", checkpoint, parallelism)
    after = _wait(actor, name, lambda s: s["runs"] > before["runs"] and s["state"] != STARTING, timeout_s, "restoring")
    if after["state"] == "failed":
        raise JobFailedError(f"job {name!r} failed to restore checkpoint {checkpoint}: {after['error']}")
    return after
