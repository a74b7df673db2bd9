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

Mode ``merge`` (by ``key``): pre-commit stages the epoch's rows in
``_sluiceway_staging/`` under the table's folder; the commit is one Delta
MERGE of the epoch's rows (the last row per key wins) that updates rows with
a matching key and inserts the others (a changelog's ``_op = 'delete'``
deletes the key's row, so a table sunk here stays an exact copy), carrying the same application
transaction, so a replayed commit is skipped there too. Staged files are
deleted once their epoch is committed.

``storage_options`` go to delta-rs as they are; on S3-protocol servers
delta-rs also reads ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_ALLOW_HTTP`` from the environment.
"""

from __future__ import annotations

import io
import json
import posixpath
import time

import pyarrow as pa
import pyarrow.parquet as pq

from sluiceway.checkpoint.storage import absolute_url, arrow_buffer, atomic_write, open_filesystem
from sluiceway.operators.errors import SinkError
from sluiceway.operators.connectors import requires
from sluiceway.operators.sinks import Sink, SinkContext, SinkWriter

PREFIX = "part-e"
STAGING = "_sluiceway_staging"


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
        if self.sink.mode == "merge":
            name = posixpath.join(STAGING, name)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        atomic_write(fs, posixpath.join(base, name), data)
        return {**handle, "path": name, "size": len(data), "rows": table.num_rows}


class DeltaSink(Sink):
    """Write each epoch's rows to the Delta table at ``url`` (created on the
    first commit, from the data's schema), exactly once: ``mode="append"``
    adds them; ``mode="merge"`` upserts them by the ``key`` columns."""

    kind = "delta"

    def __init__(self, url: str, mode: str = "append", key: list[str] | str | None = None,
                 storage_options: dict[str, str] | None = None):
        if mode not in ("append", "merge"):
            raise SinkError(f"DeltaSink mode must be 'append' or 'merge', got {mode!r}")
        key = [key] if isinstance(key, str) else list(key or [])
        if mode == "merge" and not key:
            raise SinkError("DeltaSink mode='merge' needs key=[...]: the columns that identify a row")
        if mode == "append" and key:
            raise SinkError("DeltaSink key= only applies to mode='merge'")
        self.url = absolute_url(url)
        self.mode = mode
        self.key = key
        self.storage_options = dict(storage_options or {})

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
                self._drop_staged(files)
                return  # committed before: a replayed commit changes nothing
        if self.mode == "merge":
            self._merge(table, epoch, files, CommitProperties(app_transactions=[Transaction(app, epoch)],
                                                              custom_metadata={"sluiceway.epoch": epoch}))
            return
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
                                          mode="append", commit_properties=properties,
                                          storage_options=self.storage_options or None)
        else:
            table.create_write_transaction(actions, mode="append", schema=schema, commit_properties=properties)

    def _merge(self, table, epoch: int, files: list[dict], properties) -> None:
        """One MERGE of the epoch's staged rows, the last per key, into the table."""
        deltalake = _deltalake()
        fs, base = open_filesystem(self.url)
        parts = []
        for f in files:
            with fs.open(posixpath.join(base, f["path"]), "rb") as handle:
                parts.append(pq.read_table(arrow_buffer(handle.read())))
        rows = pa.concat_tables(parts, promote_options="permissive")
        missing = [k for k in self.key if k not in rows.column_names]
        if missing:
            raise SinkError(f"DeltaSink merge key {missing} is not among the stream's columns "
                            f"({', '.join(rows.column_names)})")
        from sluiceway.operators.tables import split_changes

        live, gone = split_changes(rows, self.key)  # the last change per key; without _op every row is an upsert
        if table is None:
            deltalake.write_deltalake(self.url, live, mode="append", commit_properties=properties,
                                      storage_options=self.storage_options or None)
        else:
            predicate = " AND ".join(f'target."{k}" = source."{k}"' for k in self.key)
            if gone.num_rows:
                flags = pa.concat_arrays([pa.repeat(pa.scalar(False), live.num_rows),
                                          pa.repeat(pa.scalar(True), gone.num_rows)])
                source = pa.concat_tables([live, gone], promote_options="permissive").append_column("__gone", flags)
            else:
                source = live.append_column("__gone", pa.repeat(pa.scalar(False), live.num_rows))
            columns = {f'"{c}"': f'source."{c}"' for c in live.column_names}
            (table.merge(source, predicate, source_alias="source", target_alias="target",
                         commit_properties=properties)
                  .when_matched_delete(predicate="source.__gone")
                  .when_matched_update(updates=columns, predicate="NOT source.__gone")
                  .when_not_matched_insert(updates=columns, predicate="NOT source.__gone")
                  .execute())
        self._drop_staged(files)

    def _drop_staged(self, files: list[dict]) -> None:
        if self.mode != "merge":
            return
        fs, base = open_filesystem(self.url)
        for f in files:
            try:
                fs.rm_file(posixpath.join(base, f["path"]))
            except FileNotFoundError:
                pass

    def abort(self, after_epoch: int, context: SinkContext) -> None:
        fs, base = open_filesystem(self.url)
        folder = posixpath.join(base, STAGING) if self.mode == "merge" else base
        try:
            names = fs.ls(folder, detail=False)
        except FileNotFoundError:
            return
        for path in names:
            epoch = file_epoch(posixpath.basename(path))
            if epoch is not None and epoch > after_epoch:
                fs.rm_file(path)

    def _table(self):
        deltalake = _deltalake()
        try:
            return deltalake.DeltaTable(self.url, storage_options=self.storage_options or None)
        except deltalake.exceptions.TableNotFoundError:
            return None

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url, "mode": self.mode, "key": self.key}
