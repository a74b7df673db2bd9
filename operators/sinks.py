"""Sinks: where a job's output becomes durable, exactly once, by two-phase commit.

The protocol, for sink authors:

1. **Pre-commit** (on each task, at the epoch's barrier):
   ``Sink.open(context)`` makes a :class:`SinkWriter`; its
   ``precommit(epoch, table)`` makes the subtask's output of the epoch
   durable but invisible and returns a **handle**: a JSON-ready dict (never a
   pickle) naming what it wrote.
2. **Commit** (on the coordinator, once every task acknowledged the epoch and
   the epoch is in the commit log): ``Sink.commit(epoch, handles)`` makes
   the epoch's output visible, all subtasks at once. It must be idempotent:
   after a failure the coordinator commits again every epoch the commit log
   holds, whether or not the first commit finished.
3. **Abort** (on the coordinator, when a job starts or recovers):
   ``Sink.abort(after_epoch, context)`` discards every pre-commit of an epoch
   after ``after_epoch`` (those never completed; they will be replayed).
4. **Claim** (on the coordinator, once per sink step when a run starts,
   before any commit, abort or pre-commit of the run):
   ``Sink.claim(owner)`` records the :class:`SinkOwner` (job, job id, sink
   step) where the sink writes, or refuses, in one line naming the owner
   found and the fix (:class:`~sluiceway.operators.errors.SinkOwnershipError`),
   a second job, a second sink step of this job, or this job under other
   checkpoints than the ones that committed there. The default does nothing
   (a sink that keeps nothing between runs). :func:`check_sink_locations`
   refuses, before anything runs, two sink steps of one flow that write one
   place (``Sink.location()``).

Epochs the commit log already holds are never pre-committed again: a replay
runs them for their state and skips the sink. The coordinator records each
epoch's handles in its commit log entry before it commits them.

:class:`ParquetSink` layout under its URL::

    data/epoch=<epoch>/part-<subtask>-<attempt>.parquet   pre-committed by each subtask
    _committed/<epoch>.json     created once by commit(): names the epoch's files
    data/compacted/<from>-<to>-<id>.parquet, _compacted/<from>-<to>.json
                                consecutive epochs merged (ParquetSink(compaction=...))
    _sluiceway/owner.json       the job and sink step that write here, created by claim()
    _sluiceway/schema.json      the schema of the committed epochs (as readers merge them), written by
                                commit() before the marker of an epoch that adds a column or promotes a type
    _sluiceway/columns/<hash>.json   a column's type, claimed by the first pre-commit of a column that
                                nothing committed has yet; removed by abort()

Files of an epoch that its marker does not name (an attempt that failed, a
run that lost its lease) are deleted once the marker exists.

Readers (:func:`read_committed`) see only files named by a commit marker or
a compaction marker, each committed epoch once, so they never see a
half-written or replayed epoch twice (:mod:`sluiceway.operators.compaction`).
They read nothing under ``_sluiceway/``.

Column types: a pre-commit whose batch has a column that readers cannot
merge with the committed epochs (string where they hold int64), or with the
type another pre-commit already wrote for a new column, fails with one line
naming the column and the epoch; the epoch never commits, and once the job
casts the column it runs on from there. Types Arrow promotes (int64 and
float64 into float64) are written, and read back merged
(:mod:`sluiceway.operators.sink_guard`).
"""

from __future__ import annotations

import io
import json
import posixpath
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from sluiceway.checkpoint.storage import StorageRetry, absolute_url, arrow_buffer, atomic_write, create_exclusive
from sluiceway.operators.connectors import lazy_exports
from sluiceway.operators.errors import FlowDefinitionError, SinkError
from sluiceway.operators.sink_guard import (
    SCHEMA,
    ColumnClaims,
    SchemaCheck,
    SinkFolder,
    claim_folder,
    footer_schema,
    merge_schemas,
    schema_from_text,
    schema_record,
    schema_text,
)

_DIGITS = 10


@dataclass(frozen=True)
class SinkContext:
    """Where a writer runs. ``attempt`` names this run and recovery of the
    job (fencing number and generation): files named with it are never
    overwritten by another run or a replay."""

    step: str
    subtask: int
    parallelism: int
    job: str
    attempt: str = "f0g0"
    on_wait: Callable[[str, str], None] | None = None  # hears when the sink's storage fails and is back


@dataclass(frozen=True)
class SinkOwner:
    """Who writes a sink: the job, its identity, the sink step."""

    job: str          # the job's name
    job_id: str       # job.json's "id": a uuid made when the job's checkpoint history was created
    step: str         # the sink step's id
    checkpoints: str  # the job's checkpoint folder as a URL, for messages
    fresh: bool       # True when this run created job.json (the job has no checkpoint history)
    previous: tuple[str, ...] = ()  # ids this step had, declared with flow.renamed(old, new)


class SinkWriter:
    """One subtask's side of a sink."""

    def precommit(self, epoch: int, table: pa.Table | None) -> dict:
        """Make ``epoch``'s output of this subtask durable, not yet visible;
        return a JSON-ready handle for :meth:`Sink.commit`."""
        raise NotImplementedError


class Sink:
    """The picklable configuration of a sink, and its coordinator side.

    On the coordinator, ``on_wait`` is set before any commit: a sink whose
    commit waits for its system (retrying a connection, a storage outage)
    calls ``on_wait("waiting", cause)`` and ``on_wait("resumed", message)``
    so the job shows the wait instead of looking stuck."""

    kind = "sink"
    on_wait: Callable[[str, str], None] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("on_wait", None)  # the coordinator's own listener never travels
        return state

    def open(self, context: SinkContext) -> SinkWriter:
        raise NotImplementedError

    def commit(self, epoch: int, handles: list[dict]) -> None:
        """Make the pre-committed output of ``epoch`` visible. Idempotent."""
        raise NotImplementedError

    def abort(self, after_epoch: int, context: SinkContext) -> None:
        """Discard pre-commits of epochs after ``after_epoch`` (they never
        completed). ``context`` names the job and step (subtask -1). The
        default does nothing: right for sinks whose pre-commits are
        invisible files that a later commit never names."""

    def claim(self, owner: SinkOwner) -> None:
        """Record ``owner`` where this sink writes, or refuse it with a
        :class:`~sluiceway.operators.errors.SinkOwnershipError` whose one line
        names the place, the owner found and the fix (see the module doc).
        Called once per sink step when a run starts, on the coordinator. The
        default does nothing: right for sinks that keep nothing between runs."""

    def location(self) -> str | None:
        """Where this sink writes, normalized (a folder's URL, a table's
        identity), for :func:`check_sink_locations`; None when no other sink
        can write there."""
        return None

    def describe(self) -> dict:
        return {"kind": self.kind}


def _inside(inner: str, outer: str) -> bool:
    """Whether folder URL ``inner`` is ``outer`` or a folder under it (not for tables or key spaces)."""
    if inner == outer:
        return True
    return "://" in outer and not outer.startswith(("postgresql://", "redis://")) and \
        inner.startswith(outer.rstrip("/") + "/")


def check_sink_locations(sinks: dict[str, Sink]) -> None:
    """Refuse, before anything runs, two sink steps of one flow that write one
    place (or a folder inside the other's): each would take the other's
    commits for its own. ``sinks``: step id -> sink.

    >>> check_sink_locations({"a": ParquetSink("/data/out"), "b": ParquetSink("/data/out/")})
    Traceback (most recent call last):
    ...
    sluiceway.operators.errors.FlowDefinitionError: sink steps 'a' (ParquetSink) and 'b' (ParquetSink) both write file:///data/out; give each sink its own folder
    """
    seen: list[tuple[str, str, Sink]] = []
    for step, sink in sinks.items():
        here = sink.location()
        if here is None:
            continue
        for other, there, first in seen:
            if not (_inside(here, there) or _inside(there, here)):
                continue
            noun = {"postgresql": "table", "redis": "key prefix"}.get(here.split("://")[0], "folder")
            a, b = f"{other!r} ({type(first).__name__})", f"{step!r} ({type(sink).__name__})"
            if here == there:
                raise FlowDefinitionError(f"sink steps {a} and {b} both write {here}; give each sink its own {noun}")
            outer, inner = (there, here) if _inside(here, there) else (here, there)
            raise FlowDefinitionError(f"sink steps {a} and {b} write {outer} and {inner}, one folder inside "
                                      f"the other; give each sink a folder of its own, outside the other's")
        seen.append((step, here, sink))


class _ParquetLayout(SinkFolder):
    """Paths of a ParquetSink, and its reads, retried like every storage call."""

    def data_path(self, epoch: int, subtask: int, attempt: str) -> str:
        name = f"part-{subtask:05d}-{attempt}.parquet"
        return posixpath.join(self.base, "data", f"epoch={epoch:0{_DIGITS}d}", name)

    def marker_path(self, epoch: int) -> str:
        return posixpath.join(self.base, "_committed", f"{epoch:0{_DIGITS}d}.json")

    def committed_epochs(self) -> list[int]:
        folder = posixpath.join(self.base, "_committed")
        try:
            names = self.call("list", folder, lambda: self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return []
        stems = (posixpath.basename(n)[: -len(".json")] for n in names if n.endswith(".json"))
        return sorted(int(s) for s in stems if s.isdigit())

    def epoch_folders(self) -> dict[int, str]:
        """Each epoch's data folder present now (``data/epoch=<n>``): epoch -> path."""
        folder = posixpath.join(self.base, "data")
        try:
            names = self.call("list", folder, lambda: self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return {}
        stems = {name: posixpath.basename(name.rstrip("/")) for name in names}
        return {int(s[len("epoch="):]): name for name, s in stems.items()
                if s.startswith("epoch=") and s[len("epoch="):].isdigit()}

    def read_marker(self, epoch: int) -> dict | None:
        path = self.marker_path(epoch)
        try:
            doc = json.loads(self.call("read", path, lambda: self.fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise SinkError(f"commit marker {self.fs.unstrip_protocol(path)} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
            raise SinkError(f"commit marker {self.fs.unstrip_protocol(path)} is malformed: it lists no 'files'")
        return doc

    def committed_files(self) -> list[str]:
        """What readers read (paths relative to the folder): each compaction they use, and the files of the
        committed epochs no such compaction covers."""
        from sluiceway.operators.compaction import list_compactions, usable

        epochs = self.committed_epochs()
        compactions = usable(list_compactions(self), set(epochs))
        covered = {e for c in compactions for e in range(c.first, c.last + 1)}
        return [c.path for c in compactions] + \
            [f["path"] for e in epochs if e not in covered for f in self.read_marker(e)["files"]]

    def committed_schema(self) -> pa.Schema | None:
        """The schema readers see over the committed epochs; None when nothing is committed. A folder
        committed to before its schema was recorded gets the record now, once, from its files' footers."""
        path = self.path(SCHEMA)
        doc = self.read_json(path)
        if doc is not None:
            if not isinstance(doc.get("schema"), str):
                raise SinkError(f"{self.fs.unstrip_protocol(path)} is malformed: it holds no 'schema'")
            return schema_from_text(doc["schema"])
        if not self.committed_epochs():
            return None
        schemas = []
        for relative in self.committed_files():
            file = self.path(relative)
            schemas.append(self.call("read", file, lambda f=file: footer_schema(self.fs, f)))
        schema, conflict = merge_schemas(schemas)
        if conflict is not None:
            name, a, b = conflict
            raise SinkError(f"ParquetSink folder {self.address} already holds committed epochs that readers cannot "
                            f"merge: column {name!r} is {a} in some files and {b} in others; move the folder "
                            "aside and write to a new one")
        self.create_json(path, schema_record(schema, None))  # if another did meanwhile, it wrote the same
        return schema

    def write_schema(self, schema: pa.Schema, epoch: int) -> None:
        self.write_json(self.path(SCHEMA), schema_record(schema, epoch))


class _ParquetWriter(SinkWriter):
    def __init__(self, layout: _ParquetLayout, context: SinkContext):
        self.layout = layout
        self.context = context
        self.types = SchemaCheck(context.step, f"ParquetSink folder {layout.address}", "folder",
                                 layout.committed_schema, ColumnClaims(layout), exact=False)

    def precommit(self, epoch: int, table: pa.Table | None) -> dict:
        subtask = self.context.subtask
        marker = self.layout.read_marker(epoch)
        if marker is not None:  # committed by a run whose commit log entry was lost: keep what readers saw
            return {"subtask": subtask, "already_committed": True, "rows": 0, "path": None}
        if table is None or table.num_rows == 0:
            return {"subtask": subtask, "rows": 0, "path": None}
        carry = self.types.check(epoch, subtask, table.schema)  # before anything is written
        buf = io.BytesIO()
        pq.write_table(table, buf)
        path = self.layout.data_path(epoch, subtask, self.context.attempt)
        data = buf.getvalue()
        self.layout.call("write", path, lambda: atomic_write(self.layout.fs, path, data))
        handle = {"subtask": subtask, "rows": table.num_rows, "path": posixpath.relpath(path, self.layout.base)}
        if carry:  # a column or type the committed schema lacks: the commit records it
            handle["schema"] = schema_text(table.schema.remove_metadata())
        return handle


class ParquetSink(Sink):
    """Parquet files on any fsspec URL, one per (epoch, subtask), made visible
    per epoch by a commit marker. With ``compaction`` (a
    :class:`~sluiceway.operators.compaction.Compaction`), the coordinator
    merges committed epochs into larger files in the background."""

    kind = "parquet"

    def __init__(self, url: str, retry: StorageRetry = StorageRetry(), compaction=None):
        self.url = absolute_url(url)  # the same folder from every worker's working directory
        self.retry = retry
        self.compaction = compaction
        self._compactor = None
        _ParquetLayout(url)  # fail at build time on an unknown protocol

    def __getstate__(self):
        state = super().__getstate__()
        state["_compactor"] = None  # the coordinator's thread stays there
        return state

    def wait_for_compaction(self, timeout_s: float | None = None) -> dict:
        """Wait for the background compaction under way in this process, if any; how it went: ``runs``
        completed and the ``last_error`` (None when the last run succeeded)."""
        if self._compactor is None:
            return {"runs": 0, "last_error": None}
        self._compactor.wait(timeout_s)
        return {"runs": self._compactor.runs, "last_error": self._compactor.last_error}

    def _after_commit(self) -> None:
        if self.compaction is None:
            return
        if self._compactor is None:
            from sluiceway.operators.compaction import Compactor

            self._compactor = Compactor(self.compaction, lambda: _ParquetLayout(self.url, self.retry))
        self._compactor.after_commit()

    def open(self, context: SinkContext) -> SinkWriter:
        return _ParquetWriter(_ParquetLayout(self.url, self.retry, context.on_wait), context)

    def commit(self, epoch: int, handles: list[dict]) -> None:
        layout = _ParquetLayout(self.url, self.retry, self.on_wait)
        marker = layout.read_marker(epoch)
        if marker is not None:  # committed before (a commit again from the log, or a replay): keep what readers saw
            self._remove_unnamed(layout, epoch, marker)
            return
        files = sorted(
            ({"subtask": h["subtask"], "path": h["path"], "rows": h["rows"]} for h in handles if h.get("path")),
            key=lambda f: f["subtask"],
        )
        carried = [schema_from_text(h["schema"]) for h in handles if h.get("path") and h.get("schema")]
        if carried:
            self._record_schema(layout, epoch, carried)
        marker = {"epoch": epoch, "files": files, "rows": sum(f["rows"] for f in files), "committed_at": time.time()}
        data, path = json.dumps(marker, indent=1).encode(), layout.marker_path(epoch)
        try:  # created only if absent: a marker never names another run's files
            layout.call("commit", path, lambda: create_exclusive(layout.fs, path, data))
        except FileExistsError:
            marker = layout.read_marker(epoch)
        self._remove_unnamed(layout, epoch, marker)
        self._after_commit()

    def _record_schema(self, layout: _ParquetLayout, epoch: int, carried: list[pa.Schema]) -> None:
        """Before the epoch's marker: the committed schema grows by the columns and promotions its files
        bring. Pre-commits checked each file against it; a mix they could not see (an edge of Arrow's
        promotion) refuses the commit and leaves the files in place, never visible."""
        committed = layout.committed_schema()
        merged, conflict = merge_schemas(([] if committed is None else [committed]) + carried)
        if conflict is not None:
            name, a, b = conflict
            raise SinkError(f"ParquetSink folder {layout.address} cannot commit epoch {epoch}: column {name!r} is "
                            f"{b} in one of its files but {a} in the others or in the epochs committed before, and "
                            "readers cannot merge the two; its files stay, not committed: make the job give the "
                            "column one type, and write to a new folder")
        if committed is None or not merged.equals(committed):
            layout.write_schema(merged, epoch)

    def abort(self, after_epoch: int, context: SinkContext) -> None:
        """Delete the files of epochs after ``after_epoch`` that no marker names, and the column types
        their pre-commits claimed."""
        layout = _ParquetLayout(self.url, self.retry, context.on_wait)
        for epoch, folder in layout.epoch_folders().items():
            if epoch > after_epoch and layout.read_marker(epoch) is None:
                layout.delete_folder(folder)
        ColumnClaims(layout).clear()

    def claim(self, owner: SinkOwner) -> None:
        """Record ``owner`` in ``_sluiceway/owner.json``, or refuse it (see the module doc). A folder with
        committed epochs and no owner record (written before sinks recorded one) is adopted by a job with
        checkpoint history, and refused to a job without (those epochs are not its)."""
        layout = _ParquetLayout(self.url, self.retry, self.on_wait)

        def committed_output() -> str | None:
            epochs = layout.committed_epochs()
            if not epochs:
                return None
            return f"committed epoch {epochs[0]}" if len(epochs) == 1 else \
                f"{len(epochs)} committed epochs ({epochs[0]} to {epochs[-1]})"

        claim_folder(layout, owner, f"ParquetSink folder {layout.address}", "folder", self.kind, committed_output)
        layout.committed_schema()  # a folder written before its schema was recorded: record it now, once

    def location(self) -> str:
        return _ParquetLayout(self.url).address

    def _remove_unnamed(self, layout: _ParquetLayout, epoch: int, marker: dict) -> None:
        """Once an epoch is committed, files in its folder that the marker does
        not name (a failed attempt's, a stale run's) are never read: delete them."""
        folder = posixpath.dirname(layout.data_path(epoch, 0, "-"))
        named = {posixpath.join(layout.base, f["path"]) for f in marker["files"]}
        try:
            present = layout.call("list", folder, lambda: layout.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return
        for name in present:
            if name not in named:
                try:
                    layout.call("delete", name, lambda n=name: layout.fs.rm_file(n))
                except FileNotFoundError:
                    pass

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url}


def read_committed(url: str, include_epoch: bool = False) -> pa.Table:
    """Every committed row of a :class:`ParquetSink`, exactly once, in epoch
    then subtask order (compacted epochs from their compaction's file).
    ``include_epoch`` adds an ``epoch`` column."""
    layout = _ParquetLayout(url)
    for attempt in range(3):
        try:
            return _read_committed(layout, include_epoch)
        except FileNotFoundError:  # an epoch folder removed after a compaction this read did not see: list again
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _read_committed(layout: _ParquetLayout, include_epoch: bool) -> pa.Table:
    from sluiceway.operators.compaction import list_compactions, usable

    def read(relative: str) -> pa.Table:
        with layout.fs.open(posixpath.join(layout.base, relative), "rb") as f:
            # Whole, then parsed from Arrow's memory: Arrow's reader threads never call back into
            # Python (a file object, or a buffer of Python bytes, released by one of them as the
            # interpreter exits aborts the process).
            return pq.read_table(arrow_buffer(f.read()))

    epochs = layout.committed_epochs()
    compacted = {c.first: c for c in usable(list_compactions(layout), set(epochs))}
    tables, skip_through = [], 0
    for epoch in epochs:
        if epoch <= skip_through:
            continue
        if epoch in compacted:
            c = compacted[epoch]
            table, skip_through = read(c.path), c.last
            if include_epoch:
                column = pa.array([e for e, rows in c.epochs for _ in range(rows)], pa.int64())
                table = table.append_column("epoch", column)
            tables.append(table)
            continue
        for entry in layout.read_marker(epoch)["files"]:
            table = read(entry["path"])
            if include_epoch:
                table = table.append_column("epoch", pa.array([epoch] * table.num_rows, pa.int64()))
            tables.append(table)
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


__getattr__ = lazy_exports(__name__, {
    "Compaction": "sluiceway.operators.compaction",
    "DeltaSink": "sluiceway.operators.connectors.delta",
    "PostgresSink": "sluiceway.operators.connectors.postgres",
    "RedisSink": "sluiceway.operators.connectors.redis_streams",
})
