"""``DeltaSink``: a Delta Lake table, written exactly-once with ``deltalake``
(delta-rs), on the two-phase commit of :mod:`sluiceway.operators.sinks`.

- **Pre-commit** (each task): the epoch's rows become one Parquet data file in
  the table's folder, named ``part-e<epoch>-s<subtask>-<attempt>.parquet``.
  No Delta log entry names it yet, so no reader sees it.
- **Commit** (the coordinator): one Delta transaction adds the epoch's files
  and records the application transaction ``(app id, epoch)``; the app id is
  ``sluiceway/<job>/<step>``. A commit of an epoch whose version the table
  already records for that app id is recognised and skipped: a replayed
  commit never adds the files twice. The whole epoch becomes visible at once.
- **Abort**: data files of epochs after the last committed one (no Delta
  commit can name them) are deleted.

Mode ``append`` only so far (``merge`` by key is still to come).
"""

from __future__ import annotations

import io
import json
import posixpath
import time

import pyarrow as pa
import pyarrow.parquet as pq

from sluiceway.checkpoint.storage import absolute_url, atomic_write, open_filesystem
from sluiceway.operators.errors import SinkError
from sluiceway.operators.connectors import requires
from sluiceway.operators.sinks import Sink, SinkContext, SinkWriter

PREFIX = "part-e"


def _deltalake():
    return requires("deltalake", "DeltaSink", "delta")


def app_id(job: str, step: str) -> str:
    return f"sluiceway/{job}/{step}"


def file_epoch(name: str) -> int | None:
    """The epoch in a data file's name, or None for files not ours.

    >>> file_epoch("part-e0000000012-s00001-f2g0.parquet"), file_epoch("part-00000-abc.parquet")
    (12, None)
    """
    if not name.startswith(PREFIX):
        return None
    digits = name[len(PREFIX):].split("-", 1)[0]
    return int(digits) if digits.isdigit() else None


class _DeltaWriter(SinkWriter):
    def __init__(self, sink: "DeltaSink", context: SinkContext):
        self.sink, self.context = sink, context

    def precommit(self, epoch: int, table: pa.Table | None) -> dict:
        handle = {"subtask": self.context.subtask, "app_id": app_id(self.context.job, self.context.step),
                  "path": None}
        if table is None or table.num_rows == 0:
            return handle
        fs, base = open_filesystem(self.sink.url)
        name = f"{PREFIX}{epoch:010d}-s{self.context.subtask:05d}-{self.context.attempt}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        atomic_write(fs, posixpath.join(base, name), data)
        return {**handle, "path": name, "size": len(data), "rows": table.num_rows}


class DeltaSink(Sink):
    """Append each epoch's rows to the Delta table at ``url`` (created on the
    first commit, from the data's schema), exactly once."""

    kind = "delta"

    def __init__(self, url: str, mode: str = "append"):
        if mode != "append":
            raise SinkError(f"DeltaSink mode {mode!r} is not supported yet; use mode='append'")
        self.url = absolute_url(url)
        self.mode = mode

    def open(self, context: SinkContext) -> SinkWriter:
        return _DeltaWriter(self, context)

    def commit(self, epoch: int, handles: list[dict]) -> None:
        files = sorted((h for h in handles if h.get("path")), key=lambda h: h["subtask"])
        if not files:
            return  # nothing to make visible
        deltalake = _deltalake()
        from deltalake.transaction import AddAction, CommitProperties, Transaction, create_table_with_add_actions

        app = files[0]["app_id"]
        table = self._table()
        if table is not None:
            done = table.transaction_version(app)
            if done is not None and done >= epoch:
                return  # committed before: a replayed commit changes nothing
        fs, base = open_filesystem(self.url)
        with fs.open(posixpath.join(base, files[0]["path"]), "rb") as f:
            schema = pq.read_schema(f)
        now = int(time.time() * 1000)
        actions = [AddAction(f["path"], f["size"], {}, now, True, json.dumps({"numRecords": f["rows"]}))
                   for f in files]
        properties = CommitProperties(app_transactions=[Transaction(app, epoch)],
                                      custom_metadata={"sluiceway.epoch": epoch})
        if table is None:
            create_table_with_add_actions(self.url, deltalake.Schema.from_arrow(schema), actions,
                                          mode="append", commit_properties=properties)
        else:
            table.create_write_transaction(actions, mode="append", schema=schema, commit_properties=properties)

    def abort(self, after_epoch: int, context: SinkContext) -> None:
        fs, base = open_filesystem(self.url)
        try:
            names = fs.ls(base, detail=False)
        except FileNotFoundError:
            return
        for path in names:
            epoch = file_epoch(posixpath.basename(path))
            if epoch is not None and epoch > after_epoch:
                fs.rm_file(path)

    def _table(self):
        deltalake = _deltalake()
        try:
            return deltalake.DeltaTable(self.url)
        except deltalake.exceptions.TableNotFoundError:
            return None

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url, "mode": self.mode}
