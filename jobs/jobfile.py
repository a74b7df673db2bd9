"""Job files: a Python file defining a Dataflow, named ``path/to/job.py``
(attribute ``flow``) or ``path/to/job.py:attr``."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import traceback


from sluiceway.jobs.dataflow import Dataflow
from sluiceway.jobs.errors import JobFileError


def ship_by_value(module) -> None:
    """Pickle ``module``'s functions by value, for both the standalone
    cloudpickle and the copy Ray vendors (which is the one Ray uses)."""
    import cloudpickle
    import ray.cloudpickle

    for pickler in (cloudpickle, ray.cloudpickle):
        if module.__name__ not in pickler.list_registry_pickle_by_value():
            pickler.register_pickle_by_value(module)


def load_flow(spec: str, job_name: str | None = None) -> Dataflow:
    """The Dataflow a job file defines; ``job_name`` renames it (the job's name
    in checkpoint storage and on the cluster)."""
    path, _, attr = spec.partition(":")
    attr = attr or "flow"
    if not path.endswith(".py"):
        raise JobFileError(f"job {spec!r}: name a Python file, as path/to/job.py or path/to/job.py:attribute")
    if not os.path.isfile(path):
        raise JobFileError(f"job file {path!r} does not exist (looked in {os.getcwd()})")
    name = "sluiceway_job_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - the user's error, shown whole
        del sys.modules[name]
        raise JobFileError(f"job file {path!r} raised while loading:\n{traceback.format_exc()}") from None
    # Workers cannot import this module by name: ship its functions by value.
    ship_by_value(module)
    flow = getattr(module, attr, None)
    if not isinstance(flow, Dataflow):
        found = [k for k, v in vars(module).items() if isinstance(v, Dataflow)]
        hint = f"; it defines {', '.join(found)}: use {path}:{found[0]}" if found else ""
        what = "is missing" if flow is None else f"is a {type(flow).__name__}, not a Dataflow"
        raise JobFileError(f"job file {path!r} defines no Dataflow named {attr!r} ({attr!r} {what}){hint}")
    if job_name is not None and job_name != flow.name:
        if not job_name or not all(c.isalnum() or c in "-_" for c in job_name):
            raise JobFileError(f"job name {job_name!r} must be letters, digits, '-' or '_' (it names a folder)")
        flow.name = flow.graph.name = job_name
    return flow
