"""Opening a job for a run, shared by ``run()`` and the detached job
supervisor: check its checkpoint storage, take its lease, write or check
``job.json``; and letting it go afterwards."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from sluiceway.checkpoint import lease as leases
from sluiceway.checkpoint.errors import IncompatibleJobError, StorageError
from sluiceway.checkpoint.lease import Lease, LeaseHolder
from sluiceway.checkpoint.storage import NO_RETRY, JobStorage, StorageRetry
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.operators.sinks import SinkOwner, check_sink_locations

JOB_FORMAT = 1


def open_job(plan: PhysicalPlan, checkpoint_dir: str, *, storage_deadline_s: float, force: bool,
             lease_ttl_s: float) -> tuple[JobStorage, dict, Lease]:
    """Storage checked, the lease taken and ``job.json`` current; release the
    lease with :func:`release_job` when the run ends."""
    storage = JobStorage(checkpoint_dir, plan.job, StorageRetry(deadline_s=storage_deadline_s))
    try:
        storage.check_access()
    except StorageError as exc:
        raise StorageError(f"checkpoint dir {storage.root_url!r} is not usable: {exc}") from exc
    check_sink_locations(plan.sinks())
    holder = LeaseHolder(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8], time.time())
    lease = leases.acquire(storage, holder, ttl_s=lease_ttl_s, now=time.time(), force=force)
    try:
        fresh = storage.read_job() is None
        doc = job_document(storage, plan)
        claim_sinks(plan, storage, doc, fresh)
        return storage, doc, lease
    except BaseException:
        release_job(storage, lease)
        raise


def claim_sinks(plan: PhysicalPlan, storage: JobStorage, doc: dict, fresh: bool) -> None:
    """Each sink records this job (name, checkpoint history, step) as its
    owner, or refuses to be written by it: before the run commits, aborts or
    writes anything (:meth:`Sink.claim <sluiceway.operators.sinks.Sink.claim>`)."""
    renamed = plan.graph.renamed
    for step, sink in plan.sinks().items():
        previous = tuple(old for old, new in renamed.items() if new == step)
        sink.claim(SinkOwner(plan.job, doc["id"], step, storage.root_url, fresh, previous))


def release_job(storage: JobStorage, lease: Lease) -> None:
    """Let the next run start at once. Best effort, without retries: a lease
    that cannot be released expires by itself within its time to live, and
    a failure here must not hide why the job ended."""
    try:
        leases.release(JobStorage(storage.root_url, storage.job, NO_RETRY), lease, now=time.time())
    except StorageError:
        pass


def job_document(storage: JobStorage, plan: PhysicalPlan) -> dict:
    """Create job.json on first run; on later runs check the flow still fits it."""
    existing = storage.read_job()
    if existing is not None:
        if not isinstance(existing, dict) or not isinstance(existing.get("max_key_groups"), int):
            raise IncompatibleJobError(
                f"{storage.url(storage.job_path)} is malformed (it has no whole-number 'max_key_groups'); it is "
                "written by sluiceway alone: restore it from a backup, or use a new checkpoint dir"
            )
        if existing.get("max_key_groups") != plan.max_key_groups:
            raise IncompatibleJobError(
                f"job {plan.job!r} in {storage.root_url} was created with max_key_groups "
                f"{existing.get('max_key_groups')}, this flow has {plan.max_key_groups}; "
                "key groups are fixed for a job's life: keep the old value or use a new checkpoint dir"
            )
        existing["parallelism"] = plan.parallelism()
        existing.setdefault("id", uuid.uuid4().hex)  # job.json written before ids were kept
        storage.write_job(existing)  # the graph is recorded once the run restored its checkpoint: record_graph
        return existing
    import ray

    doc = {
        "format": JOB_FORMAT,
        "job": plan.job,
        "id": uuid.uuid4().hex,  # this checkpoint history's identity: sinks record it as their owner
        "created_at": time.time(),
        "max_key_groups": plan.max_key_groups,
        "parallelism": plan.parallelism(),
        "graph": plan.describe(),
        "versions": {"ray": ray.__version__, "sluiceway": version()},
    }
    storage.write_job(doc)
    return doc


GRAPH_HISTORY = 50  # earlier graphs job.json keeps


def record_graph(doc: dict, plan: PhysicalPlan, now: float) -> bool:
    """Put the flow's graph in ``doc`` (job.json) as the one the job runs
    with, the graph it replaces in ``graph_history`` (with when it stopped
    being used); ``False`` when the shape of the flow did not change (a new
    parallelism, or a source's file count, is not a new graph).

    >>> from sluiceway.cluster.graph import plan as physical_plan
    >>> from sluiceway.jobs.dataflow import Dataflow
    >>> from sluiceway.jobs.testing import CollectSink
    >>> from sluiceway.operators.sources import ListSource
    >>> flow, doc = Dataflow("j"), {}
    >>> stream = flow.source(ListSource([{"x": 1}]))
    >>> stream.sink(CollectSink())
    >>> record_graph(doc, physical_plan(flow.graph, 1), 1.0), record_graph(doc, physical_plan(flow.graph, 2), 2.0)
    (True, False)
    >>> stream.map(dict).sink(CollectSink())
    >>> record_graph(doc, physical_plan(flow.graph, 1), 3.0), doc["graph_history"][0]["until"]
    (True, 3.0)
    """
    graph = json.loads(json.dumps(plan.describe(), default=str))
    if doc.get("graph") is not None and _shape(doc["graph"]) == _shape(graph):
        doc["graph"] = graph
        return False
    if doc.get("graph") is not None:
        history = doc.setdefault("graph_history", [])
        history.append({"until": now, "graph": doc["graph"]})
        del history[:-GRAPH_HISTORY]
    doc["graph"] = graph
    return True


def _shape(graph: dict) -> list:
    """A graph without what changes between runs of one flow."""
    shape = []
    for step in graph.get("steps", []):
        config = step.get("config") or {}
        if step.get("kind") in ("source", "sink"):
            config = {"kind": config.get("kind")}
        shape.append({**{k: v for k, v in step.items() if k not in ("parallelism", "config")}, "config": config})
    return shape


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sluiceway")
    except PackageNotFoundError:
        return "unknown"
