"""Detached jobs: a job's coordinator inside a detached, named Ray actor
that outlives the process that submitted it.

``sluiceway submit`` creates one :class:`JobSupervisor` per job, named
``job:<name>`` in the ``sluiceway`` namespace, with ``max_restarts=-1``: if
its process or node dies, Ray starts it again and it resumes the job from
checkpoint storage by itself (taking over the lease its dead predecessor
held; fencing stops that one from writing should it still be alive).

The supervisor runs the coordinator in a thread, keeps the recent epochs'
progress (fields after Spark's ``StreamingQueryProgress``), the recoveries
and a log, and carries out the commands of the CLI: stop (with or without a
savepoint), scale (savepoint, then resume with another parallelism), and
restore (resume from a chosen retained checkpoint). Every command after the
job ended starts it again, so a stopped job can be restored or rescaled.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import ray

from sluiceway.checkpoint.errors import CheckpointError
from sluiceway.checkpoint.storage import JobStorage
from sluiceway.checkpoint.timeline import RecordKind, read_history
from sluiceway.cluster.coordinator import Coordinator
from sluiceway.cluster.options import RunOptions
from sluiceway.cluster.errors import JobFailedError
from sluiceway.cluster.events import format_event, lowest_watermark
from sluiceway.operators.errors import OperatorError
from sluiceway.operators.event_time import format_watermark
from sluiceway.cluster.graph import plan as physical_plan
from sluiceway.cluster.launch import open_job, release_job
from sluiceway.cluster.placement import default_parallelism

ACTOR_PREFIX = "job:"
RUNNING, RECOVERING, STARTING = "running", "recovering", "starting"
FINISHED, FAILED, STOPPED = "finished", "failed", "stopped"
ENDED = (FINISHED, FAILED, STOPPED)
KEEP_PROGRESS = 300
KEEP_LOG_LINES = 5000


def actor_name(job: str) -> str:
    return ACTOR_PREFIX + job


@dataclass(frozen=True)
class JobSpec:
    """What a supervisor needs to run a job; data, except ``load_flow``: a
    picklable callable that builds the flow where the supervisor runs."""

    name: str
    load_flow: Callable[[], object]
    checkpoint_dir: str
    options: RunOptions
    parallelism: int | None = None
    force: bool = False


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def progress_entry(job: str, run_id: str, event: dict, previous_at: float | None) -> dict:
    """One epoch's progress, with the names Spark users know
    (``batchId``, ``numInputRows``, ``inputRowsPerSecond``, ``durationMs`` ...).

    >>> e = {"at": 10.0, "epoch": 3, "rows_in": 500, "rows_out": 40, "duration_s": 0.25, "checkpoint": None,
    ...      "savepoint": None, "replay": False, "phases": {"plan": 0.01, "process": 0.2, "align": 0.0,
    ...      "checkpoint": 0.0, "commit": 0.02}, "sources": {"bids": {"0": [0, 500]}}, "waiting": 7,
    ...      "state_bytes": 1024, "lag": {"bids": {"records": 7, "oldest_s": 1.5}}}
    >>> p = progress_entry("clicks", "ab12", e, previous_at=9.0)
    >>> p["batchId"], p["inputRowsPerSecond"], p["processedRowsPerSecond"], p["durationMs"]["process"]
    (3, 500.0, 2000.0, 200.0)
    >>> p["sources"]  # doctest: +NORMALIZE_WHITESPACE
    [{'description': 'bids', 'startOffset': {'0': 0}, 'endOffset': {'0': 500}, 'lagRecords': 7,
      'oldestUnreadSeconds': 1.5}]

    Offsets are the source's own (Redis entry ids, WAL positions): what an
    epoch read is ``numInputRows``, for all sources together.
    """
    interval = event["at"] - previous_at if previous_at is not None else None
    duration = event["duration_s"]
    return {
        "id": job,
        "runId": run_id,
        "name": job,
        "timestamp": iso(event["at"]),
        "batchId": event["epoch"],
        "numInputRows": event["rows_in"],
        "numOutputRows": event["rows_out"],
        "inputRowsPerSecond": round(event["rows_in"] / interval, 1) if interval else None,
        "processedRowsPerSecond": round(event["rows_in"] / duration, 1) if duration > 0 else None,
        "durationMs": {
            **{name: round(seconds * 1000, 3) for name, seconds in event["phases"].items()},
            "triggerExecution": round(duration * 1000, 3),
        },
        "checkpoint": event["checkpoint"],
        "savepoint": event["savepoint"],
        "replay": event["replay"],
        "stateBytes": event["state_bytes"],
        "sourceLag": event["waiting"],
        "numLateRows": event.get("late", 0),
        "eventTime": {"watermark": format_watermark(lowest_watermark(event))},
        "sources": [
            {
                "description": step,
                "startOffset": {p: span[0] for p, span in parts.items()},
                "endOffset": {p: span[1] for p, span in parts.items()},
                "lagRecords": event.get("lag", {}).get(step, {}).get("records", 0),
                "oldestUnreadSeconds": event.get("lag", {}).get(step, {}).get("oldest_s"),
            }
            for step, parts in event["sources"].items()
        ],
        "sink": {"numOutputRows": event["rows_out"]},
    }


def timestamp_seconds(timestamp: str) -> float:
    return dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def input_rate(progress: list[dict], window_s: float = 10.0) -> float | None:
    """Rows per second read over the newest fresh (not replayed) epochs
    spanning about ``window_s``: each epoch's rows arrived since the one before.

    >>> p = [{"timestamp": iso(t), "numInputRows": n, "replay": False} for t, n in [(0, 9), (1, 100), (2, 300)]]
    >>> input_rate(p)
    200.0
    """
    fresh = [(timestamp_seconds(p["timestamp"]), p["numInputRows"]) for p in progress if not p["replay"]]
    if len(fresh) < 2:
        return None
    end = start = fresh[-1][0]
    rows = 0
    for i in range(len(fresh) - 1, 0, -1):
        if end - fresh[i - 1][0] > window_s:
            break
        rows += fresh[i][1]
        start = fresh[i - 1][0]
    return round(rows / (end - start), 1) if end > start else None


class _Command:
    """A CLI command for the supervisor's thread: stop, scale or restore."""

    def __init__(self, kind: str, **args):
        self.kind, self.args = kind, args


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=64)
class JobSupervisor:
    """See the module doc. Its methods answer at once; long work happens in
    the supervisor's own thread."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.state = STARTING
        self.error: str | None = None
        self.coordinator: Coordinator | None = None
        self.progress: deque[dict] = deque(maxlen=KEEP_PROGRESS)
        self.failures_open: list[dict] = []
        self.placement: dict[str, str] = {}  # task -> node id
        self.storage: JobStorage | None = None  # the current run's checkpoint storage
        self.lines: deque[tuple[int, str]] = deque(maxlen=KEEP_LOG_LINES)
        self.seq = 0
        self.restarts = 0
        self.runs = 0
        self.parallelism = spec.parallelism
        self.savepoints: list[int] = []
        self.last_epoch = 0
        self.last_checkpoint = 0
        self.run_id: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: _Command | None = None
        self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        self.me = ray.get_runtime_context().current_actor
        threading.Thread(target=self._main, name="supervisor", daemon=True).start()

    # ------------------------------------------------------------ queries
    def summary(self) -> dict:
        """One line's worth, for ``sluiceway jobs``."""
        progress = list(self.progress)
        return {
            "name": self.spec.name,
            "state": self.state,
            "epoch": self.last_epoch,
            "input_rows_per_s": input_rate(progress),
            "last_checkpoint": self.last_checkpoint or None,
            "restarts": self.restarts,
            "parallelism": self.parallelism,
            "error": self.error,
            "checkpoint_dir": self.spec.checkpoint_dir,
            "placement": dict(self.placement),
            "savepoints": list(self.savepoints),
            "run_id": self.run_id,
            "runs": self.runs,
            "supervisor": {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                           "restarted": self.reconstructed},
        }

    def status(self, epochs: int = 10) -> dict:
        """The summary, the newest ``epochs`` progress entries, and the
        recoveries (read from the job's history, so they outlive this process)."""
        return {**self.summary(), "recentProgress": list(self.progress)[-epochs:], "recoveries": self._recoveries(),
                "failing": list(self.failures_open)}

    def _recoveries(self, keep: int = 50) -> list[dict]:
        storage = self.storage
        if storage is None:
            return []
        try:
            records = read_history(storage, [RecordKind.RECOVERY]).records[-keep:]
        except CheckpointError:
            return []
        return [{"at": iso(r["at"]), "failure": r["failure"], "detect_s": r.get("detect_s"),
                 "restore_s": r.get("restore_s"), "restored_checkpoint": r.get("restored_checkpoint"),
                 "replay_epochs": r.get("replay_epochs"), "restarted_tasks": r.get("restarted_tasks")}
                for r in records]

    def logs(self, after: int = 0, task_offsets: dict | None = None) -> dict:
        """The supervisor's log lines numbered above ``after``, and what each
        task printed since ``task_offsets``."""
        own = [(n, line) for n, line in list(self.lines) if n > after]
        offsets = dict(task_offsets or {})
        tasks = {}
        coordinator = self.coordinator
        if coordinator is not None:
            refs = {name.rsplit("/", 1)[-1]: a.log_lines.remote(offsets.get(name.rsplit("/", 1)[-1], {}))
                    for name, a in list(coordinator.executors.items())}
            for task, ref in refs.items():
                try:
                    lines, offsets[task] = ray.get(ref, timeout=5)
                except Exception:  # noqa: BLE001 - a dead or busy task: its lines next time
                    continue
                tasks[task] = lines
        return {"lines": own, "last": self.seq, "tasks": tasks, "task_offsets": offsets}

    # ----------------------------------------------------------- commands
    def stop(self, savepoint: bool = False) -> str:
        return self._command(_Command("stop", savepoint=savepoint))

    def scale(self, parallelism: int) -> str:
        return self._command(_Command("scale", parallelism=parallelism))

    def restore(self, checkpoint: int, parallelism: int | None = None) -> str:
        return self._command(_Command("restore", checkpoint=checkpoint, parallelism=parallelism))

    def _command(self, command: _Command) -> str:
        with self._wake:
            if self._pending is not None:
                return f"busy: a {self._pending.kind} is under way"
            if command.kind == "stop" and self.state in ENDED:
                return "ended"
            self._pending = command
            coordinator = self.coordinator
            if coordinator is not None and self.state not in ENDED:
                coordinator.request_stop(savepoint=command.kind == "scale" or command.args.get("savepoint", False))
            self._wake.notify_all()
        self._log(f"command: {command.kind} {command.args}")
        return "accepted"

    # ---------------------------------------------- tasks call these (as "coordinator")
    def ack(self, ack) -> None:
        if self.coordinator is not None:
            self.coordinator.ack(ack)

    def task_failed(self, task, generation, failure) -> None:
        if self.coordinator is not None:
            self.coordinator.task_failed(task, generation, failure)

    def storage_event(self, who: str, kind: str, message: str) -> None:
        if self.coordinator is not None:
            self.coordinator.storage_event(who, kind, message)

    # --------------------------------------------------------------- main
    def _log(self, line: str) -> None:
        stamped = f"{iso(time.time())} {line}"
        with self._lock:
            self.seq += 1
            self.lines.append((self.seq, stamped))
        print(stamped, flush=True)

    def _main(self) -> None:
        try:
            flow = self.spec.load_flow()
        except Exception as exc:  # noqa: BLE001 - the user's job file: shown whole
            self._end(FAILED, str(exc))
            flow = None
        force, restore, run = self.spec.force or self.reconstructed, None, flow is not None
        if flow is not None and self.reconstructed:
            self._log("the supervisor was restarted by Ray (its process or node died): resuming from storage")
            run = self._adopt_stored_state(flow)
        while flow is not None:
            if run:
                summary = self._run_once(flow, restore, force)
                force = False
                with self._wake:
                    command, self._pending = self._pending, None
                if summary is not None and (command is None or command.kind == "stop"):
                    done = command is None and summary["stopped"] in ("idle", "epochs")
                    self._end(FINISHED if done else STOPPED, None)
            else:
                command = self._next_command()
            restore, run = None, command is not None and command.kind != "stop"
            if command is not None and command.kind == "scale":
                self._log(f"scaling from {self.parallelism} to {command.args['parallelism']} tasks per step")
                self.parallelism = command.args["parallelism"]
            elif command is not None and command.kind == "restore":
                restore = command.args["checkpoint"]
                self.parallelism = command.args["parallelism"] or self.parallelism

    def _next_command(self) -> _Command:
        """An ended job waits here: scale or restore starts it again."""
        with self._wake:
            while self._pending is None or self._pending.kind == "stop":
                self._pending = None
                self._wake.wait()
            command, self._pending = self._pending, None
            return command

    def _adopt_stored_state(self, flow) -> bool:
        """After a restart: the parallelism the job last ran with (a scale may
        have changed it), and whether it should run at all (a stopped job
        stays stopped)."""
        try:
            doc = JobStorage(self.spec.checkpoint_dir, flow.name).read_job() or {}
        except CheckpointError:
            return True
        if isinstance(doc.get("requested_parallelism"), int):
            self.parallelism = doc["requested_parallelism"]
        self.restarts = int(doc.get("restarts", 0)) + 1  # this restart of the supervisor counts too
        if doc.get("supervisor_state") in ENDED:
            self.state = doc["supervisor_state"]
            return False
        return True

    def _run_once(self, flow, restore: int | None, force: bool) -> dict | None:
        """One run of the coordinator; None if it failed (state and error set)."""
        self.state, self.error = STARTING, None
        storage = lease = None
        try:
            plan = physical_plan(flow.graph, self.parallelism or flow.graph.parallelism or default_parallelism())
            sinks = plan.sinks()
            for step, sink in sinks.items():  # a sink claiming its output may wait for its server: say so
                sink.on_wait = self._sink_waits(step)
            try:
                storage, job_doc, lease = open_job(plan, self.spec.checkpoint_dir,
                                                   storage_deadline_s=self.spec.options.storage_deadline_s,
                                                   force=force, lease_ttl_s=self.spec.options.lease_ttl_s)
            finally:
                for sink in sinks.values():
                    sink.on_wait = None  # the coordinator sets its own
        except Exception as exc:  # noqa: BLE001 - shown as the job's error
            self._end(FAILED, str(exc))
            return None
        try:
            job_doc["requested_parallelism"] = self.parallelism
            job_doc["supervisor_state"] = RUNNING
            job_doc["restarts"] = self.restarts
            storage.write_job(job_doc)
            self.storage = storage
            options = replace(self.spec.options, restore_checkpoint=restore)
            coordinator = Coordinator(plan, storage, options, job_doc, lease)
            self.coordinator, self.run_id, self.runs = coordinator, lease.holder.run_id, self.runs + 1
            self.parallelism = self.parallelism or max(plan.parallelism().values())
            with self._wake:
                pending = self._pending
            if pending is not None and pending.kind == "stop":  # asked to stop while starting
                coordinator.request_stop(pending.args.get("savepoint", False))
            ended = threading.Event()
            pump = threading.Thread(target=self._pump, args=(coordinator, ended), daemon=True)
            pump.start()
            try:
                summary = coordinator.run(self.me)
            finally:
                ended.set()
                pump.join(timeout=5)
                self._drain(coordinator)
            if summary.get("savepoint"):
                self.savepoints.append(summary["savepoint"])
            self._log(f"run {self.run_id} ended ({summary['stopped']}): last epoch {summary['last_epoch']}, "
                      f"last checkpoint {summary['last_checkpoint']}"
                      + (f", savepoint {summary['savepoint']}" if summary.get("savepoint") else ""))
            return summary
        except (JobFailedError, CheckpointError, OperatorError) as exc:  # their first line names the cause
            self._end(FAILED, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug of ours: shown whole
            self._end(FAILED, f"the supervisor of job {flow.name!r} failed: {type(exc).__name__}: {exc}\n"
                              f"{traceback.format_exc()}")
        finally:
            if lease is not None:
                release_job(storage, lease)
        return None

    def _end(self, state: str, error: str | None) -> None:
        self.state = state
        self.error = error
        self._log(f"job {self.spec.name!r} {state}" + (f": {error}" if error else ""))
        storage = self.storage
        if storage is not None:  # remembered, so that a restarted supervisor leaves an ended job alone
            try:
                doc = storage.read_job() or {}
                doc["supervisor_state"] = state
                storage.write_job(doc)
            except CheckpointError:
                pass

    def _pump(self, coordinator: Coordinator, ended: threading.Event) -> None:
        while not ended.wait(0.2):
            self._drain(coordinator)

    def _sink_waits(self, step: str):
        """An ``on_wait`` for a sink's wait before the coordinator runs, logged as the coordinator's are."""

        def on_wait(kind: str, message: str) -> None:
            if kind == "waiting":
                self._on_event({"type": "storage_waiting", "at": time.time(), "who": f"sink {step}",
                                "error": message, "deadline_s": self.spec.options.storage_deadline_s})
            else:
                self._on_event({"type": "storage_resumed", "at": time.time(), "who": f"sink {step}",
                                "message": message})

        return on_wait

    def _drain(self, coordinator: Coordinator) -> None:
        for event in coordinator.drain_events():
            self._on_event(event)

    def _on_event(self, event: dict) -> None:
        kind = event["type"]
        line = format_event(event)
        if line:
            self._log(line)
        if kind == "epoch":
            previous = self.progress[-1] if self.progress else None
            previous_at = timestamp_seconds(previous["timestamp"]) if previous else None
            self.progress.append(progress_entry(self.spec.name, self.run_id, event, previous_at))
            self.last_epoch = max(self.last_epoch, event["epoch"])
            self.last_checkpoint = event["last_checkpoint"]
        elif kind in ("started", "recovered"):
            self.placement = dict(event["tasks"])
            self.state = RUNNING
            if kind == "recovered":
                self.failures_open = []
        elif kind == "failure":
            if event.get("delay_s") is not None:
                self.state = RECOVERING
                self.restarts += 1
            self.failures_open.append({"at": iso(event["at"]), "error": event["error"].splitlines()[0]})
