"""Opening a job for a run, shared by ``run()`` and the detached job
supervisor: check its checkpoint storage, take its lease, write or check
``job.json``; and letting it go afterwards."""

from __future__ import annotations

import os
import socket
import time
import uuid

from sluiceway.checkpoint import lease as leases
from sluiceway.checkpoint.errors import IncompatibleJobError, StorageError
from sluiceway.checkpoint.lease import Lease, LeaseHolder
from sluiceway.checkpoint.storage import NO_RETRY, JobStorage, StorageRetry
from sluiceway.cluster.graph import PhysicalPlan

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
    holder = LeaseHolder(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8], time.time())
    lease = leases.acquire(storage, holder, ttl_s=lease_ttl_s, now=time.time(), force=force)
    try:
        return storage, job_document(storage, plan), lease
    except BaseException:
        release_job(storage, lease)
        raise


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
        existing["graph"] = plan.describe()
        storage.write_job(existing)
        return existing
    import ray

    doc = {
        "format": JOB_FORMAT,
        "job": plan.job,
        "created_at": time.time(),
        "max_key_groups": plan.max_key_groups,
        "parallelism": plan.parallelism(),
        "graph": plan.describe(),
        "versions": {"ray": ray.__version__, "sluiceway": version()},
    }
    storage.write_job(doc)
    return doc


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sluiceway")
    except PackageNotFoundError:
        return "unknown"
