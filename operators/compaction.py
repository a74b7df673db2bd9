"""Compaction of a :class:`~sluiceway.operators.sinks.ParquetSink`'s small files.

At a one-second trigger a sink with 16 subtasks writes 16 files a second.
Compaction merges the files of consecutive committed epochs into one larger
file, in the background, without touching what readers rely on:

- Epoch commit markers (``_committed/<epoch>.json``) are never changed.
- A compaction writes ``data/compacted/<from>-<to>-<id>.parquet`` (the
  rows of epochs ``from..to`` in epoch then subtask order, as
  :func:`~sluiceway.operators.sinks.read_committed` reads them), then
  creates ``_compacted/<from>-<to>.json`` only if absent: the compaction's
  commit point. It names the file and each epoch's rows.
- Compactions only ever take committed epochs after the last compaction,
  so their ranges do not overlap; a reader that finds two that do (two
  compactors at once) uses the first by ``from`` and reads the other
  epochs from their own files.
- A reader reads each committed epoch once: from the compaction that covers
  it, else from the files its marker names.
- The epoch folders a compaction replaced are deleted once the compaction
  is older than ``keep_inputs_s`` (ten minutes by default): a reader that
  listed the markers before the compaction existed still finds its files
  for that long. A reader that takes longer gets a ``FileNotFoundError``
  and :func:`~sluiceway.operators.sinks.read_committed` lists again.

:class:`Compaction` is the policy: merge once at least ``min_files``
uncompacted files are committed, into files of about ``target_mb``.
``ParquetSink(url, compaction=Compaction())`` runs it in a thread of the
coordinator after commits; :func:`compact` runs it once, from anywhere, on a
sink's URL.
"""

from __future__ import annotations

import io
import json
import posixpath
import threading
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from sluiceway.checkpoint.storage import arrow_buffer, atomic_write, create_exclusive

DIGITS = 20


@dataclass(frozen=True)
class Compaction:
    """When and how far to compact (see module doc)."""

    min_files: int = 64  # uncompacted committed files that start a compaction
    target_mb: int = 128  # about how large a compacted file grows
    keep_inputs_s: float = 600.0  # how long the replaced epoch folders stay for readers that listed them earlier

    def __post_init__(self):
        if self.min_files < 2 or self.target_mb < 1 or self.keep_inputs_s < 0:
            raise ValueError(f"Compaction needs min_files >= 2, target_mb >= 1 and keep_inputs_s >= 0, got {self}")


@dataclass(frozen=True)
class Compacted:
    """A compaction's marker: epochs ``first..last`` are in ``path`` (relative to the sink's folder)."""

    first: int
    last: int
    path: str
    epochs: list  # [[epoch, rows], ...] in order
    created_at: float

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.epochs)


def marker_path(base: str, first: int, last: int) -> str:
    return posixpath.join(base, "_compacted", f"{first:0{DIGITS}d}-{last:0{DIGITS}d}.json")


def _layout(sink):
    """A sink's URL, or its layout, as its layout."""
    if isinstance(sink, str):
        from sluiceway.operators.sinks import _ParquetLayout

        return _ParquetLayout(sink)
    return sink


def list_compactions(sink) -> list[Compacted]:
    """Every compaction marker under a sink's folder (its URL, or its layout), by first epoch."""
    layout = _layout(sink)
    folder = posixpath.join(layout.base, "_compacted")
    try:
        names = layout.call("list", folder, lambda: layout.fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(n for n in names if n.endswith(".json")):
        doc = json.loads(layout.call("read", name, lambda n=name: layout.fs.cat_file(n)))
        found.append(Compacted(doc["first"], doc["last"], doc["path"], doc["epochs"], doc["created_at"]))
    return sorted(found, key=lambda c: (c.first, c.last))


def usable(compactions: list[Compacted], committed: set[int]) -> list[Compacted]:
    """The compactions a reader uses: non-overlapping (the first by ``first`` wins), every epoch committed.

    >>> c = lambda a, b: Compacted(a, b, "", [], 0.0)
    >>> [(x.first, x.last) for x in usable([c(1, 4), c(3, 6), c(5, 8)], set(range(1, 9)))]
    [(1, 4), (5, 8)]
    """
    chosen, through = [], -1
    for c in compactions:
        if c.first > through and all(e in committed for e in range(c.first, c.last + 1)):
            chosen.append(c)
            through = c.last
    return chosen


def compact(sink, policy: Compaction, now: float | None = None, seen: dict | None = None) -> Compacted | None:
    """Compact a sink's folder (its URL, or its layout) once, if the policy says so: the committed epochs after
    the last compaction, oldest first, until about ``target_mb``; then delete the folders of epochs compacted
    more than ``keep_inputs_s`` ago. ``seen``: epoch -> files of markers read before (markers never change).
    Returns the new compaction, or None."""
    layout = _layout(sink)
    now = time.time() if now is None else now
    seen = {} if seen is None else seen
    compactions = list_compactions(layout)
    made = None
    through = max((c.last for c in compactions), default=0)
    for epoch in [e for e in seen if e <= through]:
        del seen[epoch]
    epochs = [e for e in layout.committed_epochs() if e > through]
    for epoch in epochs:
        if epoch not in seen:
            seen[epoch] = layout.read_marker(epoch)["files"]
    markers = [(e, seen[e]) for e in epochs]
    files = sum(len(f) for _, f in markers)
    if files >= policy.min_files:
        made = _merge(layout, markers, policy.target_mb * 2**20, now)
        if made is not None:
            compactions.append(made)
    _remove_replaced(layout, compactions, policy.keep_inputs_s, now)
    return made


def _merge(layout, markers: list, target_bytes: int, now: float) -> Compacted | None:
    tables, epochs, size = [], [], 0
    for epoch, files in markers:
        rows = 0
        for entry in files:
            path = posixpath.join(layout.base, entry["path"])
            data = layout.call("read", path, lambda p=path: layout.fs.cat_file(p))
            table = pq.read_table(arrow_buffer(data))
            tables.append(table)
            rows += table.num_rows
            size += len(data)
        epochs.append([epoch, rows])
        if size >= target_bytes:
            break
    first, last = epochs[0][0], epochs[-1][0]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    relative = posixpath.join("data", "compacted", f"{first:0{DIGITS}d}-{last:0{DIGITS}d}-{uuid.uuid4().hex[:8]}.parquet")
    path = posixpath.join(layout.base, relative)
    layout.call("write", path, lambda: atomic_write(layout.fs, path, buf.getvalue()))
    made = Compacted(first, last, relative, epochs, now)
    doc = json.dumps({"first": first, "last": last, "path": relative, "epochs": epochs, "rows": made.rows,
                      "created_at": now}, indent=1).encode()
    marker = marker_path(layout.base, first, last)
    try:
        layout.call("commit", marker, lambda: create_exclusive(layout.fs, marker, doc))
    except FileExistsError:  # another compactor made the same range first: theirs stands
        layout.call("delete", path, lambda: layout.fs.rm(path))
        return None
    return made


def _remove_replaced(layout, compactions: list[Compacted], keep_s: float, now: float) -> None:
    """Delete the epoch folders of compactions older than ``keep_s`` (the markers stay)."""
    old = usable(compactions, set(layout.committed_epochs()))
    replaced = {e for c in old if now - c.created_at >= keep_s for e in range(c.first, c.last + 1)}
    if not replaced:
        return
    for epoch, folder in layout.epoch_folders().items():
        if epoch in replaced:
            layout.delete_folder(folder)


class Compactor:
    """Runs :func:`compact` in a thread of its own after commits, one run at a time (the coordinator's side
    of a ParquetSink with a compaction policy). A failed run is retried after the next commit; it never
    fails the job: the output stays readable from the epochs' own files."""

    def __init__(self, policy: Compaction, layout_factory):
        self.policy = policy
        self.layout_factory = layout_factory
        self._thread: threading.Thread | None = None
        self._seen: dict = {}
        self.runs = 0
        self.last_error: str | None = None

    def after_commit(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name="parquet-compaction", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            compact(self.layout_factory(), self.policy, seen=self._seen)
            self.runs += 1
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - compaction is an optimization: said, retried, never fatal
            self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
