"""``run()``: run a flow on Ray from Python, blocking until it ends."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import time
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
    resumes when storage answers again. So are the servers of sources and
    sinks that set no ``connect_deadline_s`` of their own
    (:func:`set_server_deadline`). An epoch that takes longer than
    ``epoch_timeout_s`` (default: 10 times the slowest recent epoch, at
    least 60 s) counts as stuck: the tasks that did not finish it are named
    and restarted, and the job recovers.

    Ctrl-C (``KeyboardInterrupt``) stops the job after its epochs in flight
    and a final checkpoint, and returns the summary; while the job waits for
    storage or a server, or is still starting, or at a second Ctrl-C, it
    stops at once and ``KeyboardInterrupt`` is raised again, saying what the
    job was doing (nothing is lost: the next run continues from the last
    checkpoint).

    Whatever stops the job is raised with its cause in the first line:
    :class:`JobFailedError` for a failure of the job, ``StorageError`` when
    the checkpoint dir cannot be used, ``ValueError`` for a ``parallelism``
    below 1 or an empty ``checkpoint_dir``.
    """
    if parallelism is not None and (isinstance(parallelism, bool) or not isinstance(parallelism, int)
                                    or parallelism < 1):
        raise ValueError(f"parallelism must be a whole number of tasks per step, 1 or more (None: the flow's, "
                         f"else one per CPU), got {parallelism!r}")
    if checkpoint_dir is not None and not str(checkpoint_dir).strip():
        raise ValueError("checkpoint_dir is empty: give a path or fsspec URL (None: $SLUICEWAY_CHECKPOINT_DIR, "
                         f"else ./{DEFAULT_CHECKPOINT_DIR})")
    if restart_policy is not None:
        settings["restart"] = restart_policy
    if options is None:
        options = RunOptions(until_idle=settings.get("epochs") is None)
    options = options.with_settings(**settings)
    if options.epochs is not None and options.until_idle:
        options = options.with_settings(until_idle=False)
    plan = physical_plan(flow.graph, parallelism or flow.graph.parallelism or default_parallelism())
    set_server_deadline(flow, options.storage_deadline_s)
    for step, sink in plan.sinks().items():
        if getattr(sink, "in_process_only", False):
            raise FlowDefinitionError(
                f"sink {step!r} ({type(sink).__name__}) only works with run_local; on Ray use ParquetSink"
            )
    _ship_user_modules(plan)
    progress = _Progress(on_event, options.storage_deadline_s)
    try:
        storage, job_doc, lease = _open(plan, default_checkpoint_dir() if checkpoint_dir is None else checkpoint_dir,
                                        options, force, progress)
        try:
            embedded = not ray.is_initialized()
            if embedded:
                init_embedded()
            try:
                coordinator = CoordinatorActor.options(
                    scheduling_strategy=pinned(ray.get_runtime_context().get_node_id())
                ).remote(plan, storage, options, job_doc, lease)
                # The executors' processes start beside the coordinator's, not after it.
                executors = start_executors(plan, storage, options, lease.holder.run_id, coordinator,
                                            worker_node_cpus())
                if on_started is not None:
                    on_started(coordinator)
                return _wait(coordinator, progress, executors)
            finally:
                if embedded:
                    ray.shutdown()
        finally:
            release_job(storage, lease)
    except KeyboardInterrupt as exc:  # before the job ran, or said by _wait: what the job was doing
        if str(exc):
            raise
        raise KeyboardInterrupt(f"{progress.why_now()}; {AFTER_STOP}") from None


def _open(plan: PhysicalPlan, checkpoint_dir: str, options: RunOptions, force: bool, progress: "_Progress"):
    """:func:`open_job`, with what its sinks wait for (a server, as they
    claim their output) reported as the coordinator's waits are."""
    sinks = plan.sinks()
    for step, sink in sinks.items():
        sink.on_wait = progress.listener(f"sink {step}")
    try:
        return open_job(plan, checkpoint_dir, storage_deadline_s=options.storage_deadline_s, force=force,
                        lease_ttl_s=options.lease_ttl_s)
    finally:
        for sink in sinks.values():
            sink.on_wait = None  # the coordinator sets its own


def set_server_deadline(flow, deadline_s: float) -> None:
    """Sources and sinks that wait for a server (they have ``run_deadline_s``)
    and were given no ``connect_deadline_s`` of their own wait up to the
    run's storage deadline (``--storage-deadline``): one deadline for every
    wait of a job. Set before the flow's parts travel to the cluster."""
    for step in flow.graph.steps.values():
        part = step.source or step.sink
        if part is not None and hasattr(part, "run_deadline_s"):
            part.run_deadline_s = deadline_s


def unbounded_sources(flow) -> list[str]:
    """The steps of ``flow``'s sources that never end (a live broker, a
    folder that is watched, a generator without an end). A run without
    ``epochs`` stops by itself only when this is empty: once every source
    is read to its end (as Flink ends a job whose sources are all bounded).

    >>> from sluiceway.jobs.dataflow import Dataflow
    >>> from sluiceway.operators.sources import GeneratorSource, ListSource
    >>> flow = Dataflow("doc")
    >>> _ = flow.source(ListSource([{"x": 1}]), name="rows")
    >>> _ = flow.source(GeneratorSource(lambda p, a, b: None, 1, 10.0), name="ticks")
    >>> unbounded_sources(flow)
    ['ticks']
    """
    out = []
    for name, step in flow.graph.steps.items():
        source = step.source
        if source is None:
            continue
        flag = getattr(source, "bounded", None)  # a source whose end is found once it runs (a folder's files)
        bounded = flag if isinstance(flag, bool) else all(
            source.end_offset(p) is not None for p in range(source.partition_count()))
        if not bounded:
            out.append(name)
    return out


class _Progress:
    """What a run learns from its events (those of the coordinator, and the
    waits of this process while the job opens): whether the job started its
    tasks, and who waits for storage or a server now."""

    def __init__(self, on_event: Callable[[dict], None] | None, deadline_s: float):
        self.on_event, self.deadline_s = on_event, deadline_s
        self.started = False
        self.waiting: dict[str, str] = {}  # who -> what it waits for

    def deliver(self, event: dict) -> None:
        kind = event["type"]
        if kind in ("started", "recovered"):
            self.started = True
        elif kind == "storage_waiting":
            self.waiting[event["who"]] = str(event["error"]).splitlines()[0]
        elif kind == "storage_resumed":
            self.waiting.pop(event["who"], None)
        if self.on_event is not None:
            self.on_event(event)

    def listener(self, who: str) -> Callable[[str, str], None]:
        """An ``on_wait`` for a wait in this process, told as the coordinator tells its own."""

        def on_wait(kind: str, message: str) -> None:
            if kind == "waiting":
                self.deliver({"type": "storage_waiting", "at": time.time(), "who": who, "error": message,
                              "deadline_s": self.deadline_s})
            else:
                self.deliver({"type": "storage_resumed", "at": time.time(), "who": who, "message": message})

        return on_wait

    def pump(self, coordinator, done) -> bool:
        """Deliver the coordinator's events of the last quarter second; True once the run ended."""
        ready, _ = ray.wait([done], timeout=0.25)
        for event in ray.get(coordinator.events.remote()):
            self.deliver(event)
        return bool(ready)

    def why_now(self) -> str:
        """What the job was doing when Ctrl-C stopped it at once."""
        if self.waiting:
            who, what = next(iter(self.waiting.items()))
            return f"the job was waiting ({who}): {what}"
        return "the job was starting" if not self.started else "the job was running"

    def stops_cleanly(self) -> bool:
        """Whether a Ctrl-C can wait for a final checkpoint: not while the job
        waits for storage or a server (so would the checkpoint), nor before
        it started its tasks (there is nothing to checkpoint)."""
        return self.started and not self.waiting


AFTER_STOP = "nothing is lost: running the job again continues from its last checkpoint"


def _result(done) -> dict:
    try:
        return ray.get(done)
    except RayTaskError as exc:  # show the cause, not Ray's wrapper
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if cause is None:
            raise
        raise cause from None


def _wait(coordinator, progress: _Progress, executors: dict | None = None) -> dict:
    """Deliver the job's events until it ends; its summary, or its error.

    Ctrl-C stops the job after the epochs in flight and a final checkpoint;
    when it waits for storage or a server, or is still starting, or at a
    second Ctrl-C, at once: ``KeyboardInterrupt`` saying what it was doing."""
    done = coordinator.run.remote(executors)
    try:
        try:
            while not progress.pump(coordinator, done):
                pass
        except KeyboardInterrupt:
            if not progress.stops_cleanly():
                raise KeyboardInterrupt(f"{progress.why_now()}; {AFTER_STOP}") from None
            coordinator.stop.remote()
            try:
                while not progress.pump(coordinator, done):
                    pass
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"stopped at once by a second Ctrl-C, without a final checkpoint; "
                                        f"{AFTER_STOP}") from None
        return _result(done)
    finally:
        ray.kill(coordinator, no_restart=True)
        for actor, _ in (executors or {}).values():  # the coordinator kills them too, unless it never ran
            ray.kill(actor, no_restart=True)
