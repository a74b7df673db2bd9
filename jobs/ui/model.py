"""What the web page shows, read from the same places as the CLI: a job's
checkpoint storage (its graph in ``job.json``, its epochs in the commit log,
its checkpoints, runs, failures and recoveries in the history) and, when a
cluster is reachable, the supervisors' summaries (state, placement).

A :class:`JobWatch` keeps what it has read: each poll reads only the commit
log entries and history records that are new, and remembers epochs that
retention has pruned since, so a chart covers the time the page has been
watching, not just the retained logs.

>>> from sluiceway.checkpoint.storage import JobStorage
>>> storage = JobStorage("memory://ui-model-doc", "clicks")
>>> storage.write_job({"job": "clicks", "graph": {"steps": [], "stages": []}, "max_key_groups": 128})
>>> storage.write_commit(1, {"epoch": 1, "planned_at": 10.0, "completed_at": 10.5, "duration_s": 0.5,
...                          "rows_in": 100, "rows_out": 40, "checkpoint": False})
>>> watch = JobWatch(storage)
>>> view = watch.poll()
>>> view["name"], [e["rows_in"] for e in view["epochs"]], view["epochs"][0]["rows_in_per_s"]
('clicks', [100], 200.0)
"""

from __future__ import annotations

import posixpath
import threading

from sluiceway.checkpoint.errors import CheckpointError
from sluiceway.checkpoint.storage import JobStorage, open_filesystem
from sluiceway.operators.errors import OperatorError

LATENCY_WINDOW = 20  # epochs in the sliding window of the latency percentiles
KEEP_EPOCHS = 5000  # epochs a watch remembers per job


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``.

    >>> percentile([0.1, 0.5, 0.2, 0.9], 0.5), percentile([0.1, 0.5, 0.2, 0.9], 0.99)
    (0.2, 0.9)
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def job_names(root: str) -> list[str]:
    """The jobs under a checkpoint root: the folders holding a ``job.json``."""
    fs, base = open_filesystem(root)
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return []
    names = []
    for entry in entries:
        name = posixpath.basename(entry["name"].rstrip("/"))
        if entry["type"] == "directory" and fs.exists(posixpath.join(base, name, "job.json")):
            names.append(name)
    return sorted(names)


def _epoch_row(record: dict, previous: dict | None) -> dict:
    """One epoch for the charts: rows in and out per second of its own
    duration, the input rate since the epoch before, latency, lag."""
    duration = record.get("duration_s") or 0.0
    interval = record["completed_at"] - previous["completed_at"] if previous else None
    return {
        "epoch": record["epoch"],
        "at": record["completed_at"],
        "planned_at": record.get("planned_at"),
        "rows_in": record["rows_in"],
        "rows_out": record["rows_out"],
        "rows_in_per_s": round(record["rows_in"] / duration, 1) if duration > 0 else None,
        "rows_out_per_s": round(record["rows_out"] / duration, 1) if duration > 0 else None,
        "input_rows_per_s": round(record["rows_in"] / interval, 1) if interval and interval > 0 else None,
        "latency_s": duration,
        "lag": record.get("waiting"),
        "source_lag": record.get("lag") or {},  # per source: records readable and not read, oldest unread age
        "late": record.get("late", 0),
        "dead_letters": record.get("dead_letters", 0),
        "checkpoint": record.get("checkpoint", False),
        "generation": record.get("generation"),
    }


class JobWatch:
    """One job's page data, refreshed incrementally from its storage."""

    def __init__(self, storage: JobStorage):
        self.storage = storage
        self.commits: dict[int, dict] = {}
        self.history: dict[str, dict] = {}
        self.lock = threading.Lock()

    def _read_new(self) -> None:
        for epoch in self.storage.commit_epochs():
            if epoch not in self.commits:
                record = self.storage.read_commit(epoch)
                if isinstance(record, dict) and "completed_at" in record:
                    self.commits[epoch] = record
        for old in sorted(self.commits)[:-KEEP_EPOCHS]:
            del self.commits[old]
        for name in self.storage.history_names():
            if name not in self.history:
                record = self.storage.read_json(self.storage.history_path(name))
                if isinstance(record, dict) and "kind" in record:
                    self.history[name] = record

    def poll(self, live: dict | None = None) -> dict:
        """The job as the page shows it; ``live``: the supervisor's summary, when a cluster answers."""
        with self.lock:
            self._read_new()
            job = self.storage.read_job() or {}
            records = [self.history[n] for n in sorted(self.history)]
            epochs, previous = [], None
            for epoch in sorted(self.commits):
                row = _epoch_row(self.commits[epoch], previous)
                window = [e["latency_s"] for e in epochs[-(LATENCY_WINDOW - 1):]] + [row["latency_s"]]
                row["latency_p50_s"], row["latency_p99_s"] = percentile(window, 0.5), percentile(window, 0.99)
                epochs.append(row)
                previous = self.commits[epoch]
        runs = [r for r in records if r["kind"] == "run_started"]
        retained = set(self.storage.checkpoint_ids())
        checkpoints = [
            {"id": r["id"], "epoch": r["epoch"], "status": r["status"], "reason": r.get("reason"),
             "savepoint": r.get("savepoint", False), "at": r.get("completed_at") or r["at"],
             "trigger_time": r.get("trigger_time"), "duration_s": r.get("duration_s"),
             "size_bytes": r.get("size_bytes"), "written_bytes": r.get("written_bytes"),
             "retained": r["id"] in retained}
            for r in records if r["kind"] == "checkpoint"
        ]
        recoveries = [
            {"at": r["at"], "failure": r.get("failure"), "failed_task": r.get("failed_task"),
             "failed_epoch": r.get("failed_epoch"), "restored_checkpoint": r.get("restored_checkpoint"),
             "detect_s": r.get("detect_s"), "restore_s": r.get("restore_s"),
             "replay_epochs": r.get("replay_epochs", []), "restarted_tasks": r.get("restarted_tasks", []),
             "caught_up_s": _caught_up(r, epochs)}
            for r in records if r["kind"] == "recovery"
        ]
        placement = (live or {}).get("placement") or (runs[-1].get("placement", {}) if runs else {})
        last = epochs[-1] if epochs else None
        return {
            "name": self.storage.job,
            "checkpoint_dir": self.storage.root_url,
            "state": (live or {}).get("state") or _state_from(records),
            "epoch": last["epoch"] if last else None,
            "input_rows_per_s": _recent_rate(epochs),
            "last_checkpoint": max((c["id"] for c in checkpoints if c["status"] == "complete"), default=None),
            "restarts": len(recoveries),
            "parallelism": (live or {}).get("parallelism") or (runs[-1].get("parallelism") if runs else None),
            "graph": _graph(job.get("graph") or {}, placement),
            "epochs": epochs,
            "checkpoints": checkpoints,
            "recoveries": recoveries,
            "runs": [{"at": r["at"], "run_id": r.get("run_id"), "restored_checkpoint": r.get("restored_checkpoint"),
                      "parallelism": r.get("parallelism")} for r in runs],
            "rescales": [{"at": r["at"], "from": r.get("from"), "to": r.get("to")}
                         for r in records if r["kind"] == "rescale"],
            "sources": _sources(job.get("graph") or {}, last),
            "log_lag": _log_lag(job.get("graph") or {}, self.storage.job),
            "live": live is not None,
        }


def _state_from(records: list[dict]) -> str:
    """A job's state as its history tells it, with no cluster to ask."""
    for r in reversed(records):
        if r["kind"] == "run_ended":
            return {"failed": "failed", "idle": "finished", "epochs": "finished"}.get(r.get("reason"), "stopped")
        if r["kind"] == "run_started":
            return "running (or its process died)"
    return "never ran"


def _recent_rate(epochs: list[dict]) -> float | None:
    rates = [e["input_rows_per_s"] for e in epochs[-10:] if e["input_rows_per_s"] is not None]
    return round(sum(rates) / len(rates), 1) if rates else None


def _caught_up(recovery: dict, epochs: list[dict]) -> float | None:
    """Seconds from the failure's recovery to the first epoch after it that
    read fresh input with nothing waiting (the job had caught up)."""
    after = [e for e in epochs if e["planned_at"] is not None and e["planned_at"] >= recovery["at"]]
    for e in after:
        if e["lag"] == 0 and e["rows_in"] > 0:
            return round(e["at"] - recovery["at"], 3)
    return None


def _graph(graph: dict, placement: dict) -> dict:
    """Steps, stages with their parallelism, and the node of each task."""
    stages = []
    for stage in graph.get("stages", []):
        tasks = [{"task": f"{stage['id']}[{i}]", "node": placement.get(f"{stage['id']}[{i}]")}
                 for i in range(stage["parallelism"])]
        stages.append({**stage, "tasks": tasks})
    return {"steps": graph.get("steps", []), "stages": stages}


def _sources(graph: dict, last: dict | None) -> list[dict]:
    """Each source of the job with its lag as of the latest epoch: records
    readable and not yet read, and how long the oldest of them has waited.

    >>> graph = {"steps": [{"id": "orders", "kind": "source", "config": {"kind": "postgres-cdc"}},
    ...                    {"id": "totals", "kind": "aggregate"}]}
    >>> _sources(graph, {"source_lag": {"orders": {"records": 12, "oldest_s": 3.5}}})
    [{'source': 'orders', 'kind': 'postgres-cdc', 'records': 12, 'oldest_s': 3.5}]
    >>> _sources(graph, None)[0]["records"] is None
    True
    """
    lag = (last or {}).get("source_lag") or {}
    return [{"source": step["id"], "kind": (step.get("config") or {}).get("kind"),
             "records": lag.get(step["id"], {}).get("records"), "oldest_s": lag.get(step["id"], {}).get("oldest_s")}
            for step in graph.get("steps", []) if step.get("kind") == "source"]


def _log_lag(graph: dict, job: str) -> list[dict]:
    """For each source reading a log topic: each partition's end and this job's position in it."""
    out = []
    for step in graph.get("steps", []):
        config = step.get("config") or {}
        if step.get("kind") != "source" or config.get("kind") != "log":
            continue
        try:
            from sluiceway.operators.connectors.log import Log

            described = Log(config["log"]).topic(config["topic"]).describe()
        except (OperatorError, CheckpointError, OSError, KeyError, ValueError) as exc:
            out.append({"source": step["id"], "topic": config.get("topic"), "error": str(exc).splitlines()[0]})
            continue
        consumer = described["consumers"].get(job, {})
        partitions = [{"partition": p["partition"], "end": p["end_offset"],
                       "position": consumer.get("offsets", {}).get(p["partition"]),
                       "lag": consumer.get("lag", {}).get(p["partition"])}
                      for p in described["partitions"]]
        out.append({"source": step["id"], "topic": config["topic"], "partitions": partitions})
    return out


class Watches:
    """A :class:`JobWatch` per job seen, under one checkpoint root or per cluster job."""

    def __init__(self):
        self.watches: dict[tuple[str, str], JobWatch] = {}
        self.lock = threading.Lock()

    def get(self, root: str, job: str) -> JobWatch:
        with self.lock:
            key = (root, job)
            if key not in self.watches:
                self.watches[key] = JobWatch(JobStorage(root, job))
            return self.watches[key]
