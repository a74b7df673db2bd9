"""Checkpoint manifests: what makes a checkpoint complete.

A checkpoint is complete when, and only when, its MANIFEST.json exists, parses,
names this job, and every file it refers to exists with the recorded size.
State files are checked against their sha256 when they are read
(:func:`sluiceway.checkpoint.state.read_key_groups`).

Checkpoints are incremental: the manifest's ``state`` map names, per step and
key group, the file and batch holding it, and ``files`` lists every file the
map refers to, including files written by earlier checkpoints.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sluiceway.checkpoint.errors import CheckpointError, CorruptCheckpointError, StorageError
from sluiceway.checkpoint.storage import JobStorage

MANIFEST_FORMAT = 3


class CheckpointStatus(str, enum.Enum):
    """Where a checkpoint folder stands. Only COMPLETE ones are ever restored."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"  # no manifest: in progress, or abandoned by a failure
    RETIRED = "retired"  # removed by retention; its folder keeps files later checkpoints refer to
    CORRUPT = "corrupt"  # manifest present but unreadable or files missing


@dataclass(frozen=True)
class ManifestCheck:
    checkpoint_id: int
    status: CheckpointStatus
    manifest: "Manifest | None"  # parsed, when it is complete
    problem: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A complete checkpoint: ``MANIFEST.json``, the checkpoint's commit
    point. :meth:`to_json` and :meth:`from_json` are its file format
    (``format`` 3, which every release since incremental checkpoints wrote);
    the state map, the file table and the per-task rows inside are JSON data.

    >>> m = Manifest(job="clicks", id=5, epoch=5, started_at=1.0, completed_at=1.25, offsets={"s": {"0": 40}},
    ...              watermarks={}, parallelism={"s": 1}, max_key_groups=128, tasks=[], state={},
    ...              files={"c/5/a": {"checkpoint": 5, "size_bytes": 7, "sha256": "x", "rows": 1}}, sink_handles={})
    >>> Manifest.from_json(m.to_json()) == m, m.size_bytes, m.duration_s
    (True, 7, 0.25)
    >>> Manifest.from_json({**m.to_json(), "format": 2})
    Traceback (most recent call last):
    ...
    ValueError: unknown manifest format 2 (this release reads format 3)
    """

    job: str
    id: int  # the checkpoint id: the epoch it was taken at
    epoch: int
    started_at: float
    completed_at: float
    offsets: dict  # source step -> partition (text) -> the next offset to read
    watermarks: dict  # task -> its watermark (None: unknown)
    parallelism: dict  # stage -> tasks
    max_key_groups: int
    tasks: list  # per task: what it wrote and counted at this checkpoint
    state: dict  # step -> key group (text) -> chain of [file, batch]
    files: dict  # file -> {checkpoint, size_bytes, sha256, rows}: every file the state map names
    sink_handles: dict  # task -> sink step -> the handle of its pre-commit of this epoch
    fencing: int = 0
    savepoint: bool = False
    event_time: dict = field(default_factory=dict)  # event-time step -> partitions' marks and floors
    steps: dict = field(default_factory=dict)  # step -> what it was (kind, key, configuration): see cluster.evolution

    @property
    def duration_s(self) -> float:
        return round(self.completed_at - self.started_at, 6)

    @property
    def size_bytes(self) -> int:
        return sum(f["size_bytes"] for f in self.files.values())

    @property
    def written_bytes(self) -> int:
        return sum(f["size_bytes"] for f in self.files.values() if f["checkpoint"] == self.id)

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT, "job": self.job, "id": self.id, "epoch": self.epoch,
            "status": CheckpointStatus.COMPLETE.value, "savepoint": self.savepoint, "started_at": self.started_at,
            "completed_at": self.completed_at, "duration_s": self.duration_s, "offsets": self.offsets,
            "watermarks": self.watermarks, "event_time": self.event_time, "parallelism": self.parallelism,
            "max_key_groups": self.max_key_groups, "fencing": self.fencing, "size_bytes": self.size_bytes,
            "written_bytes": self.written_bytes, "tasks": self.tasks, "state": self.state, "files": self.files,
            "sink_handles": self.sink_handles, "steps": self.steps,
        }

    @classmethod
    def from_json(cls, doc) -> "Manifest":
        """Parse a manifest; ``ValueError`` names what is wrong with it."""
        if not isinstance(doc, dict):
            raise ValueError(f"it is a JSON {type(doc).__name__}, not an object")
        if doc.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {doc.get('format')!r} (this release reads format "
                             f"{MANIFEST_FORMAT})")
        kinds = {"job": str, "id": int, "epoch": int, "started_at": (int, float), "completed_at": (int, float),
                 "offsets": dict, "watermarks": dict, "parallelism": dict, "max_key_groups": int, "tasks": list,
                 "state": dict, "files": dict, "sink_handles": dict, "fencing": int, "savepoint": bool,
                 "event_time": dict, "steps": dict}
        optional = {"fencing": 0, "savepoint": False, "event_time": {}, "sink_handles": {}, "steps": {}}
        values = {}
        for name, kind in kinds.items():
            if name not in doc and name in optional:
                values[name] = optional[name]
                continue
            if name not in doc:
                raise ValueError(f"it has no {name!r}")
            if not isinstance(doc[name], kind) or (kind is int and isinstance(doc[name], bool)):
                raise ValueError(f"its {name!r} is {doc[name]!r}")
            values[name] = doc[name]
        return cls(**values)


def build_manifest(
    *,
    job: str,
    checkpoint_id: int,
    epoch: int,
    offsets: dict,
    watermarks: dict,
    tasks: list[dict],
    state: dict,
    files: dict,
    started_at: float,
    completed_at: float,
    parallelism: dict,
    max_key_groups: int,
    sink_handles: dict,
    fencing: int = 0,
    savepoint: bool = False,
    event_time: dict | None = None,
    steps: dict | None = None,
) -> Manifest:
    return Manifest(job=job, id=checkpoint_id, epoch=epoch, started_at=started_at, completed_at=completed_at,
                    offsets=offsets, watermarks=watermarks, parallelism=parallelism, max_key_groups=max_key_groups,
                    tasks=tasks, state=state, files=files, sink_handles=sink_handles, fencing=fencing,
                    savepoint=savepoint, event_time=event_time or {}, steps=steps or {})


def commit_record_from(manifest: Manifest, sinks: list[str]) -> dict:
    """The commit record of a checkpoint's epoch, rebuilt from its manifest
    (the coordinator died after the manifest, the commit point, and before
    the record): its counts and each sink's handles in task order.

    >>> m = Manifest(job="j", id=6, epoch=6, started_at=1.0, completed_at=1.5, offsets={}, watermarks={},
    ...              parallelism={}, max_key_groups=128, state={}, files={}, fencing=2,
    ...              tasks=[{"task": "t[0]", "rows_in": 3, "rows_out": 3, "dead_letters": 1},
    ...                     {"task": "t[1]", "rows_in": 2, "rows_out": 2}],
    ...              sink_handles={"t[1]": {"out": {"subtask": 1}}, "t[0]": {"out": {"subtask": 0}}})
    >>> r = commit_record_from(m, ["out"])
    >>> r["rows_in"], r["dead_letters"], r["sinks"]
    (5, 1, {'out': [{'subtask': 0}, {'subtask': 1}]})
    """
    handles = manifest.sink_handles
    return {
        "epoch": manifest.epoch,
        "planned_at": manifest.started_at,
        "completed_at": manifest.completed_at,
        "duration_s": manifest.duration_s,
        **{n: sum(t.get(n, 0) for t in manifest.tasks) for n in ("rows_in", "rows_out", "dead_letters", "late")},
        "checkpoint": True,
        "fencing": manifest.fencing,
        "sinks": {step: [handles[t["task"]][step] for t in manifest.tasks if step in handles.get(t["task"], {})]
                  for step in sinks},
        "rebuilt_from_manifest": True,
    }


def assemble_state(task_states: list[dict], new_files: list[dict], previous_files: dict) -> tuple[dict, dict]:
    """The manifest's ``state`` map and ``files`` from what each task reported
    (per step, each key group's chain of ``[file, batch]``), the files written
    now, and the previous checkpoint's files (which unchanged chains refer to).

    >>> new = [{"path": "c/2/a", "checkpoint": 2, "size_bytes": 5, "sha256": "x", "rows": 1}]
    >>> old = {"c/1/a": {"checkpoint": 1, "size_bytes": 7, "sha256": "y", "rows": 2}, "c/1/b": {"checkpoint": 1}}
    >>> state, files = assemble_state([{"agg": {"3": [["c/1/a", 0], ["c/2/a", 0]], "4": [["c/1/a", 1]]}}], new, old)
    >>> sorted(files)
    ['c/1/a', 'c/2/a']
    """
    state: dict[str, dict] = {}
    for task_state in task_states:
        for step, key_groups in task_state.items():
            state.setdefault(step, {}).update(key_groups)
    known = dict(previous_files)
    for f in new_files:
        known[f["path"]] = {k: f[k] for k in ("checkpoint", "size_bytes", "sha256", "rows")}
    files = {}
    for step, key_groups in state.items():
        for kg, chain in key_groups.items():
            for path, _ in chain:
                if path not in known:
                    raise CorruptCheckpointError(
                        f"step {step!r} key group {kg} refers to state file {path}, which no checkpoint wrote"
                    )
                files[path] = known[path]
    return state, dict(sorted(files.items()))


def check_manifest(storage: JobStorage, checkpoint_id: int) -> ManifestCheck:
    """Classify one checkpoint folder. Storage errors propagate: an unreadable
    store must never read as "no checkpoint"."""
    try:
        manifest = storage.read_manifest(checkpoint_id)
    except StorageError as exc:
        if "not valid JSON" in str(exc):
            return ManifestCheck(checkpoint_id, CheckpointStatus.CORRUPT, None, str(exc))
        raise
    if manifest is None:
        if storage.exists(storage.retired_path(checkpoint_id)):
            return ManifestCheck(checkpoint_id, CheckpointStatus.RETIRED, None)
        return ManifestCheck(checkpoint_id, CheckpointStatus.INCOMPLETE, None)
    try:
        parsed = Manifest.from_json(manifest)
    except ValueError as exc:
        return ManifestCheck(checkpoint_id, CheckpointStatus.CORRUPT, None, f"manifest is malformed: {exc}")
    problem = _manifest_problem(storage, checkpoint_id, parsed)
    if problem:
        return ManifestCheck(checkpoint_id, CheckpointStatus.CORRUPT, None, problem)
    return ManifestCheck(checkpoint_id, CheckpointStatus.COMPLETE, parsed)


def _manifest_problem(storage: JobStorage, checkpoint_id: int, manifest: Manifest) -> str | None:
    if manifest.job != storage.job or manifest.id != checkpoint_id:
        return f"manifest names job {manifest.job!r} checkpoint {manifest.id!r}"
    for path, entry in manifest.files.items():
        size = storage.file_size(storage.absolute(path))
        if size is None:
            return f"state file {path} is missing"
        if size != entry.get("size_bytes"):
            return f"state file {path} has {size} bytes, manifest says {entry.get('size_bytes')}"
    return None


def restorable(storage: JobStorage, checkpoint_id: int) -> ManifestCheck:
    """Checkpoint ``checkpoint_id``, if it can be restored; otherwise a
    :class:`CheckpointError` naming the ones that can."""
    check = check_manifest(storage, checkpoint_id)
    if check.status is CheckpointStatus.COMPLETE:
        return check
    ids = storage.checkpoint_ids()
    complete = [i for i in ids if check_manifest(storage, i).status is CheckpointStatus.COMPLETE]
    state = "does not exist" if checkpoint_id not in ids else f"is {check.status.value}, not restorable"
    raise CheckpointError(f"checkpoint {checkpoint_id} of job {storage.job!r} {state}; restorable: "
                          f"{', '.join(map(str, complete)) or 'none'} (`sluiceway checkpoints list {storage.job}`)")


def latest_complete(storage: JobStorage, skip: set[int] = frozenset()) -> tuple[ManifestCheck | None, list[ManifestCheck]]:
    """The newest complete checkpoint not in ``skip``, and the corrupt ones passed over."""
    passed_over = []
    for checkpoint_id in reversed(storage.checkpoint_ids()):
        if checkpoint_id in skip:
            continue
        check = check_manifest(storage, checkpoint_id)
        if check.status is CheckpointStatus.COMPLETE:
            return check, passed_over
        if check.status is CheckpointStatus.CORRUPT:
            passed_over.append(check)
    return None, passed_over


def require_manifest(storage: JobStorage, checkpoint_id: int) -> Manifest:
    check = check_manifest(storage, checkpoint_id)
    if check.status is CheckpointStatus.INCOMPLETE:
        raise CorruptCheckpointError(
            f"checkpoint {checkpoint_id} of job {storage.job!r} has no manifest (it never completed)"
        )
    if check.status is CheckpointStatus.RETIRED:
        raise CorruptCheckpointError(
            f"checkpoint {checkpoint_id} of job {storage.job!r} was removed by retention; its folder only keeps "
            "state files that later checkpoints refer to"
        )
    if check.status is CheckpointStatus.CORRUPT:
        raise CorruptCheckpointError(f"checkpoint {checkpoint_id} of job {storage.job!r} is corrupt: {check.problem}")
    return check.manifest
