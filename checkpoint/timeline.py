"""The job's history that lasts: one record per run start and end, per
checkpoint (complete, failed or aborted, with the reason), per recovery and
per rescale, written to ``<root>/<job>/history/`` beside the checkpoints.
Records are never deleted by retention, so the timeline survives restarts
and the removal of state files.

Record names sort by time (``<unix ns>-f<fencing>-<seq>-<kind>.json``), so
a reader lists them in the order they happened, across runs.

>>> from sluiceway.checkpoint.storage import JobStorage
>>> storage = JobStorage("memory://timeline-doc", "clicks")
>>> log = HistoryWriter(storage, fencing=1)
>>> log.write(RecordKind.CHECKPOINT, {"id": 5, "epoch": 5, "status": "complete"}, at=100.0)
>>> log.write(RecordKind.RECOVERY, {"restored_checkpoint": 5, "failure": "task a[0] died"}, at=101.0)
>>> [r["kind"] for r in read_history(storage).records]
['checkpoint', 'recovery']
>>> read_history(storage).checkpoints()[5]["restored_by"]
[101.0]
"""

from __future__ import annotations

import enum
import itertools

from sluiceway.checkpoint.errors import CorruptCheckpointError
from sluiceway.checkpoint.storage import JobStorage


class RecordKind(str, enum.Enum):
    RUN_STARTED = "run_started"
    RUN_ENDED = "run_ended"
    CHECKPOINT = "checkpoint"  # status: complete, failed or aborted (with a reason)
    RECOVERY = "recovery"
    RESCALE = "rescale"


class HistoryWriter:
    """Appends records for one run (its fencing number names them)."""

    def __init__(self, storage: JobStorage, fencing: int):
        self.storage = storage
        self.fencing = fencing
        self._seq = itertools.count()

    def write(self, kind: RecordKind, fields: dict, at: float) -> None:
        name = f"{int(at * 1e9):020d}-f{self.fencing}-{next(self._seq):06d}-{kind.value}.json"
        self.storage.write_json(self.storage.history_path(name), {"kind": kind.value, "at": at,
                                                                  "fencing": self.fencing, **fields})


class JobHistory:
    """Every record of a job, oldest first, and views of them."""

    def __init__(self, records: list[dict]):
        self.records = records

    def of_kind(self, kind: RecordKind) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind.value]

    def checkpoints(self) -> dict[int, dict]:
        """Per checkpoint id, its latest record, with ``attempts`` (how many
        records it has: a failed attempt and a replay's complete one) and
        ``restored_by`` (when recoveries or restarts restored it)."""
        out: dict[int, dict] = {}
        for r in self.of_kind(RecordKind.CHECKPOINT):
            attempts = out.get(r["id"], {}).get("attempts", 0) + 1
            out[r["id"]] = {**r, "attempts": attempts, "restored_by": []}
        for r in self.records:
            restored = r.get("restored_checkpoint")
            if r["kind"] in (RecordKind.RECOVERY.value, RecordKind.RUN_STARTED.value) and restored in out:
                out[restored]["restored_by"].append(r["at"])
        return dict(sorted(out.items()))


def record_names(storage: JobStorage, kinds=None) -> list[str]:
    """Names of the job's history records, oldest first; with ``kinds``,
    of those kinds only (the kind ends each name: nothing is read)."""
    names = storage.history_names()
    if kinds is None:
        return names
    endings = tuple(f"-{RecordKind(k).value}.json" for k in kinds)
    return [n for n in names if n.endswith(endings)]


def read_history(storage: JobStorage, kinds=None) -> JobHistory:
    """The job's history records, oldest first (``kinds``: only those)."""
    records = []
    for name in record_names(storage, kinds):
        doc = storage.read_json(storage.history_path(name))
        if not isinstance(doc, dict) or "kind" not in doc or "at" not in doc:
            raise CorruptCheckpointError(
                f"history record {storage.url(storage.history_path(name))} is malformed; it is written by "
                "sluiceway alone: move it aside to read the rest"
            )
        records.append(doc)
    return JobHistory(records)


def history(url: str, job: str, kinds=None) -> JobHistory:
    """The history of job ``job`` in checkpoint storage ``url``, from Python
    (``kinds``: records of those kinds only)."""
    return read_history(JobStorage(url, job), kinds)


def step_sizes(state: dict, files: dict) -> dict[str, dict]:
    """Per step, the rows and bytes of state a manifest's state map refers to
    (each of its ``files`` counted once per step), for checkpoint records and
    ``checkpoints diff``."""
    out: dict[str, dict] = {}
    for step, key_groups in state.items():
        paths = {path for chain in key_groups.values() for path, _ in chain}
        entries = [files[p] for p in paths]
        out[step] = {"key_groups": len(key_groups), "files": len(paths),
                     "bytes": sum(f["size_bytes"] for f in entries), "rows": sum(f["rows"] for f in entries)}
    return out


def diff_checkpoints(a: dict, b: dict) -> dict:
    """How checkpoint record ``b`` differs from ``a``: offsets advanced per
    source partition, and state per step.

    >>> a = {"id": 2, "offsets": {"src": {"0": 10, "1": 5}}, "steps": {"agg": {"bytes": 100, "rows": 4}}}
    >>> b = {"id": 4, "offsets": {"src": {"0": 30, "1": 5}}, "steps": {"agg": {"bytes": 160, "rows": 6}}}
    >>> diff_checkpoints(a, b)["offsets"], diff_checkpoints(a, b)["steps"]["agg"]["bytes_delta"]
    ({'src': {'0': 20, '1': 0}}, 60)
    """
    offsets = {
        source: {p: o - a.get("offsets", {}).get(source, {}).get(p, 0) for p, o in parts.items()}
        for source, parts in b.get("offsets", {}).items()
    }
    steps = {}
    for step in sorted(set(a.get("steps", {})) | set(b.get("steps", {}))):
        sa, sb = a.get("steps", {}).get(step, {}), b.get("steps", {}).get(step, {})
        steps[step] = {"bytes_from": sa.get("bytes", 0), "bytes_to": sb.get("bytes", 0),
                       "bytes_delta": sb.get("bytes", 0) - sa.get("bytes", 0),
                       "rows_from": sa.get("rows", 0), "rows_to": sb.get("rows", 0),
                       "rows_delta": sb.get("rows", 0) - sa.get("rows", 0)}
    return {"from": a["id"], "to": b["id"], "offsets": offsets, "steps": steps}
