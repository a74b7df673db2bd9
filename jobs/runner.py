"""``run()``: run a flow on Ray from Python, blocking until it ends."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from typing import Callable

import ray
from ray.exceptions import RayTaskError

from sluiceway.cluster.coordinator import CoordinatorActor, start_executors
from sluiceway.cluster.options import RunOptions
from sluiceway.cluster.launch import open_job, release_job
from sluiceway.cluster.restart import RestartPolicy
from sluiceway.cluster.graph import PhysicalPlan
from sluiceway.cluster.graph import plan as physical_plan
from sluiceway.cluster.local import init_embedded
from sluiceway.cluster.placement import default_parallelism, pinned, worker_node_cpus
from sluiceway.jobs.jobfile import ship_by_value
from sluiceway.operators.errors import FlowDefinitionError

DEFAULT_CHECKPOINT_DIR = ".sluiceway"


def default_checkpoint_dir() -> str:
    return os.environ.get("SLUICEWAY_CHECKPOINT_DIR", DEFAULT_CHECKPOINT_DIR)


def _ship_user_modules(plan: PhysicalPlan) -> None:
    """Workers cannot import the user's own modules (a test file, a script
    beside the job): ship the modules of user functions by value. Installed
    packages are imported on workers as usual."""
    installed = {os.path.realpath(p) for p in site.getsitepackages() + [sysconfig.get_paths()["stdlib"]]}
    for step in plan.graph.steps.values():
        part = step.operator or step.source or step.sink
        for value in [part, *vars(part).values()] if part is not None else ():  # its class, its functions
            module = sys.modules.get(getattr(value, "__module__", None) or "")
            path = os.path.realpath(getattr(module, "__file__", None) or "")
            if module is None or not path or module.__name__ == "__main__":
                continue
            if not any(path.startswith(root + os.sep) for root in installed) and not module.__name__.startswith(
                "sluiceway."
            ):
                ship_by_value(module)


def run(
    flow,
    checkpoint_dir: str | None = None,
    options: RunOptions | None = None,
    *,
    parallelism: int | None = None,
    force: bool = False,
    on_event: Callable[[dict], None] | None = None,
    on_started: Callable[[object], None] | None = None,
    restart_policy: RestartPolicy | None = None,
    **settings,
) -> dict:
    """Run ``flow`` on the Ray cluster this process is connected to, or on an
    embedded one (started here and stopped at the end) when there is none.

    How it runs is a :class:`~sluiceway.cluster.options.RunOptions`, the
    same the CLI and ``submit`` use: pass one as ``options``, or name its
    fields as keywords (``trigger_s=0.5``, ``epochs=10``,
    ``checkpoint_every=2``, ``max_records_per_epoch``, ``epoch_timeout_s``,
    ``storage_deadline_s``, ``lease_ttl_s`` ...), or both (keywords win).
    ``restart_policy`` is the ``restart`` field. Without ``options`` the run
    stops once its bounded sources are exhausted (``until_idle``), unless
    ``epochs`` is given.

    Blocks until the job ends: its bounded sources are exhausted
    (``until_idle``), ``epochs`` new epochs ran, or it fails. A job started
    again on the same ``checkpoint_dir`` continues where it stopped. Returns a
    summary: epochs, rows_in, rows_out, checkpoints, restarts, ...

    Steps that set no parallelism get ``parallelism``, else the flow's,
    else one task per CPU of the cluster (:func:`default_parallelism`).

    ``on_event`` receives progress events (epoch completed, failure,
    recovery) as dicts; ``on_started`` receives the coordinator actor handle.
    ``restart_policy`` says how often and how fast the job restarts after a
    failure (:class:`~sluiceway.cluster.restart.RestartPolicy`).

    A run owns its job through a lease in ``checkpoint_dir``, renewed while
    it runs: a second run of a live job raises ``LeaseHeldError`` naming
    the holder. ``force`` takes the job over regardless (the older run then
    stops writing); a lease not renewed within ``lease_ttl_s`` expires.

    Checkpoint storage that fails is retried with backoff for up to
    ``storage_deadline_s``: the job pauses (``storage_waiting`` events) and
    resumes when storage answers again. An epoch that takes longer than
    ``epoch_timeout_s`` (default: 10 times the slowest recent epoch, at
    least 60 s) counts as stuck: the tasks that did not finish it are named
    and restarted, and the job recovers.

    Whatever stops the job is raised with its cause in the first line:
    :class:`JobFailedError` for a failure of the job, ``StorageError`` when
    the checkpoint dir cannot be used.
    """
    if restart_policy is not None:
        settings["restart"] = restart_policy
    if options is None:
        options = RunOptions(until_idle=settings.get("epochs") is None)
    options = options.with_settings(**settings)
    if options.epochs is not None and options.until_idle:
        options = options.with_settings(until_idle=False)
    plan = physical_plan(flow.graph, parallelism or flow.graph.parallelism or default_parallelism())
    for step, sink in plan.sinks().items():
        if getattr(sink, "in_process_only", False):
            raise FlowDefinitionError(
                f"sink {step!r} ({type(sink).__name__}) only works with run_local; on Ray use ParquetSink"
            )
    _ship_user_modules(plan)
    storage, job_doc, lease = open_job(plan, checkpoint_dir or default_checkpoint_dir(),
                                       storage_deadline_s=options.storage_deadline_s, force=force,
                                       lease_ttl_s=options.lease_ttl_s)
    try:
        embedded = not ray.is_initialized()
        if embedded:
            init_embedded()
        try:
            coordinator = CoordinatorActor.options(
                scheduling_strategy=pinned(ray.get_runtime_context().get_node_id())
            ).remote(plan, storage, options, job_doc, lease)
            # The executors' processes start beside the coordinator's, not after it.
            executors = start_executors(plan, storage, options, lease.holder.run_id, coordinator, worker_node_cpus())
            if on_started is not None:
                on_started(coordinator)
            return _wait(coordinator, on_event, executors)
        finally:
            if embedded:
                ray.shutdown()
    finally:
        release_job(storage, lease)


def _wait(coordinator, on_event, executors: dict | None = None) -> dict:
    done = coordinator.run.remote(executors)
    try:
        while True:
            ready, _ = ray.wait([done], timeout=0.25)
            events = ray.get(coordinator.events.remote())
            for event in events:
                if on_event is not None:
                    on_event(event)
            if ready:
                try:
                    return ray.get(done)
                except RayTaskError as exc:  # show the cause, not Ray's wrapper
                    cause = exc.cause if isinstance(exc.cause, BaseException) else None
                    if cause is None:
                        raise
                    raise cause from None
    except KeyboardInterrupt:
        coordinator.stop.remote()
        return ray.get(done)
    finally:
        ray.kill(coordinator, no_restart=True)
        for actor, _ in (executors or {}).values():  # the coordinator kills them too, unless it never ran
            ray.kill(actor, no_restart=True)
