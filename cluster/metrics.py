"""A job's metrics for Prometheus, through ``ray.util.metrics``.

The coordinator turns each of its progress events into metric updates here;
Ray's metrics agent on every node exports them on the node's Prometheus
endpoint (``ray[default]``, that is ``pip install "sluiceway[metrics]"``;
the minimal ``ray`` records them and exports nothing). Every metric carries
a ``job`` tag.

:class:`JobMetrics` is pure: it maps an event to ``(name, value)`` updates
and hands them to a recorder. :class:`RayRecorder` is the Ray edge.

>>> seen = []
>>> metrics = JobMetrics("clicks", lambda name, value: seen.append((name, value)))
>>> metrics.on_event({"type": "epoch", "at": 10.0, "rows_in": 4000, "rows_out": 2, "late": 0,
...                   "dead_letters": 0, "duration_s": 0.25, "waiting": 1200, "checkpoint": 3,
...                   "checkpoint_s": 0.2, "checkpoint_bytes": 2048, "state_bytes": 8192, "replay": False,
...                   "watermark": {}, "lag": {"orders": {"records": 1200, "oldest_s": 0.8}}})
>>> seen[:4]
[('sluiceway_epochs_total', 1), ('sluiceway_rows_in_total', 4000), ('sluiceway_rows_out_total', 2), \
('sluiceway_epoch_latency_seconds', 0.25)]
>>> [name for name, _ in seen[4:]]  # doctest: +NORMALIZE_WHITESPACE
['sluiceway_source_lag_rows', 'sluiceway_source_oldest_unread_seconds', 'sluiceway_checkpoints_total', 'sluiceway_checkpoint_duration_seconds',
 'sluiceway_checkpoint_size_bytes', 'sluiceway_state_size_bytes']

A failure the job restarts from, its recovery, and a replayed epoch (its
rows were counted the first time):

>>> seen.clear()
>>> metrics.on_event({"type": "failure", "error": "node lost", "restarts": 1, "delay_s": 0.0})
>>> metrics.on_event({"type": "recovered", "duration_s": 3.5})
>>> metrics.on_event({"type": "epoch", "at": 11.0, "rows_in": 4000, "rows_out": 2, "duration_s": 0.5,
...                   "replay": True, "checkpoint": None, "waiting": 0, "watermark": {"bids": 9_000_000}})
>>> seen
[('sluiceway_restarts_total', 1), ('sluiceway_recovery_duration_seconds', 3.5), \
('sluiceway_epoch_latency_seconds', 0.5), ('sluiceway_source_lag_rows', 0), ('sluiceway_event_time_lag_seconds', 2.0)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sluiceway.cluster.events import lowest_watermark
from sluiceway.operators.event_time import MAX_WATERMARK

Recorder = Callable[[str, float], None]

#: Histogram buckets in seconds: from a fast epoch to a slow recovery.
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter | gauge | histogram
    description: str


METRICS = (
    Metric("sluiceway_epochs_total", "counter", "Epochs committed (a replay after a recovery does not count again)."),
    Metric("sluiceway_rows_in_total", "counter", "Rows the sources read in committed epochs."),
    Metric("sluiceway_rows_out_total", "counter", "Rows the sinks committed."),
    Metric("sluiceway_late_rows_total", "counter", "Rows a window dropped or sent aside as late."),
    Metric("sluiceway_dead_letters_total", "counter", "Malformed rows set aside as dead letters."),
    Metric("sluiceway_epoch_latency_seconds", "histogram", "From planning an epoch to committing it."),
    Metric("sluiceway_source_lag_rows", "gauge", "Rows readable in the sources but not yet planned."),
    Metric("sluiceway_source_oldest_unread_seconds", "gauge",
           "Age of the oldest record readable in any source and not yet planned (sources that know it)."),
    Metric("sluiceway_event_time_lag_seconds", "gauge", "Wall clock minus the lowest watermark of any step."),
    Metric("sluiceway_checkpoints_total", "counter", "Checkpoints completed."),
    Metric("sluiceway_checkpoint_duration_seconds", "histogram", "From triggering a checkpoint to its manifest."),
    Metric("sluiceway_checkpoint_size_bytes", "gauge", "Bytes the last checkpoint wrote (incremental)."),
    Metric("sluiceway_state_size_bytes", "gauge", "Bytes of state the last checkpoint refers to in all."),
    Metric("sluiceway_restarts_total", "counter", "Failures the job restarted from (a task, a node, storage)."),
    Metric("sluiceway_recovery_duration_seconds", "histogram", "From noticing a failure to running again."),
)
SPECS = {m.name: m for m in METRICS}


class JobMetrics:
    """Metric updates from one job's coordinator events."""

    def __init__(self, job: str, record: Recorder):
        self.job = job
        self.record = record

    def on_event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "epoch":
            self._epoch(event)
        elif kind == "failure" and event.get("delay_s") is not None:  # None: the job gives up
            self.record("sluiceway_restarts_total", 1)
        elif kind == "recovered":
            self.record("sluiceway_recovery_duration_seconds", event["duration_s"])

    def _epoch(self, e: dict) -> None:
        if not e.get("replay"):
            self.record("sluiceway_epochs_total", 1)
            self.record("sluiceway_rows_in_total", e["rows_in"])
            self.record("sluiceway_rows_out_total", e["rows_out"])
            if e.get("late"):
                self.record("sluiceway_late_rows_total", e["late"])
            if e.get("dead_letters"):
                self.record("sluiceway_dead_letters_total", e["dead_letters"])
        self.record("sluiceway_epoch_latency_seconds", e["duration_s"])
        if e.get("waiting") is not None:
            self.record("sluiceway_source_lag_rows", e["waiting"])
        ages = [lag["oldest_s"] for lag in (e.get("lag") or {}).values() if lag.get("oldest_s") is not None]
        if e.get("lag") is not None:
            self.record("sluiceway_source_oldest_unread_seconds", max(ages, default=0.0))
        mark = lowest_watermark(e)
        if mark is not None and mark != MAX_WATERMARK:  # an ended input's watermark is infinite: no lag to show
            self.record("sluiceway_event_time_lag_seconds", max(0.0, e["at"] - mark / 1e6))
        if e.get("checkpoint"):
            self.record("sluiceway_checkpoints_total", 1)
            if e.get("checkpoint_s") is not None:
                self.record("sluiceway_checkpoint_duration_seconds", e["checkpoint_s"])
            if e.get("checkpoint_bytes") is not None:
                self.record("sluiceway_checkpoint_size_bytes", e["checkpoint_bytes"])
        if e.get("state_bytes") is not None:
            self.record("sluiceway_state_size_bytes", e["state_bytes"])


class RayRecorder:
    """Records into ``ray.util.metrics`` objects, made on first use, tagged with the job."""

    def __init__(self, job: str):
        self.job = job
        self._metrics: dict[str, object] = {}

    def __call__(self, name: str, value: float) -> None:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = self._make(name)
        tags = {"job": self.job}
        kind = SPECS[name].kind
        if kind == "counter":
            metric.inc(value, tags=tags)
        elif kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)

    @staticmethod
    def _make(name: str):
        from ray.util import metrics as ray_metrics

        spec = SPECS[name]
        if spec.kind == "counter":
            return ray_metrics.Counter(name, spec.description, tag_keys=("job",))
        if spec.kind == "gauge":
            return ray_metrics.Gauge(name, spec.description, tag_keys=("job",))
        return ray_metrics.Histogram(name, spec.description, boundaries=list(SECONDS_BUCKETS), tag_keys=("job",))


def ray_metrics(job: str) -> JobMetrics:
    """The metrics a coordinator records on its Ray cluster."""
    return JobMetrics(job, RayRecorder(job))
