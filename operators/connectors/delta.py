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
- **Claim** (when a run starts): the job, job id and sink step that write
  the table are recorded in ``_sluiceway/owner.json`` beside its Delta log
  (Delta readers and ``VACUUM`` ignore ``_``-prefixed folders); another job,
  another sink step, or this job under other checkpoints is refused in one
  line (:mod:`sluiceway.operators.sink_guard`). A table with no record whose
  log holds this job and step's application transaction (written before
  sinks recorded their owner) is adopted by a run with checkpoint history and
  refused to one without: its epochs would be taken for the new run's and
  skipped.

**Column types.** A Delta table's columns keep their type, and readers cast
each file to it: a pre-commit checks its batch against the table's schema
(read once per writer, again only when a batch brings a type it did not
hold) and refuses, naming the column and the epoch, a column the table's
type cannot hold (float64 in an int64 column; int32 fits int64). A column
the table does not have yet is claimed by the first pre-commit that writes
it (``_sluiceway/columns/``), the others must fit that type, and the commit
adds it to the table (``ALTER TABLE ADD COLUMNS``) before its files: a
column is never dropped silently. The first commit makes the table with
the types of its files and of the claims.

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

import functools

from sluiceway.checkpoint.storage import absolute_url, arrow_buffer, atomic_write, open_filesystem
from sluiceway.operators.errors import SinkError
from sluiceway.operators.connectors import requires
from sluiceway.operators.sink_guard import (
    ColumnClaims,
    SchemaCheck,
    SinkFolder,
    claim_folder,
    footer_schema,
    merge_schemas,
    promoted,
    schema_from_text,
    schema_text,
)
from sluiceway.operators.sinks import Sink, SinkContext, SinkOwner, SinkWriter

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


@functools.lru_cache(maxsize=256)
def delta_type(t: pa.DataType) -> pa.DataType:
    """The Arrow type a Delta table stores a column of type ``t`` as (``t`` itself when Delta has none:
    making the table says why).

    >>> delta_type(pa.large_string()), delta_type(pa.uint32())
    (DataType(string), DataType(int32))
    """
    deltalake = _deltalake()
    try:
        schema = deltalake.Schema.from_arrow(pa.schema([pa.field("c", t)]))
        return pa.schema(schema.to_arrow()).field(0).type
    except Exception:  # noqa: BLE001 - a type Delta cannot store: compared as it is, refused where it matters
        return t


def fits(table_type: pa.DataType, t: pa.DataType) -> bool:
    """Whether a Delta column of ``table_type`` holds values of type ``t`` (readers cast the file's column).

    >>> fits(pa.int64(), pa.int32()), fits(pa.float64(), pa.int64()), fits(pa.int64(), pa.float64())
    (True, True, False)
    """
    return t == pa.null() or promoted(table_type, delta_type(t)) == table_type


def _conform(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """``rows`` with the columns and types of ``schema`` (a column they lack, all null).

    >>> _conform(pa.table({"k": pa.array([1], pa.int32())}), pa.schema([("k", pa.int64()), ("v", pa.string())]))
    pyarrow.Table
    k: int64
    v: string
    ----
    k: [[1]]
    v: [[null]]
    """
    return pa.table({f.name: rows.column(f.name).cast(f.type) if f.name in rows.column_names
                     else pa.nulls(rows.num_rows, f.type) for f in schema})


class _DeltaWriter(SinkWriter):
    def __init__(self, sink: "DeltaSink", context: SinkContext):
        self.sink, self.context = sink, context
        folder = SinkFolder(sink.url)
        self.types = SchemaCheck(context.step, f"DeltaSink table {folder.address}", "table", sink.table_schema,
                                 ColumnClaims(folder), exact=True, normalize=delta_type)

    def precommit(self, epoch: int, table: pa.Table | None) -> dict:
        handle = {"subtask": self.context.subtask, "app_id": app_id(self.context.job, self.context.step),
                  "path": None}
        if table is None or table.num_rows == 0:
            return handle
        stored = self.sink.stored_schema(table.schema)
        carry = self.types.check(epoch, self.context.subtask, stored)  # before anything is written
        fs, base = open_filesystem(self.sink.url)
        name = f"{PREFIX}{epoch:010d}-s{self.context.subtask:05d}-{self.context.attempt}.parquet"
        if self.sink.mode == "merge":
            name = posixpath.join(STAGING, name)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        atomic_write(fs, posixpath.join(base, name), data)
        handle = {**handle, "path": name, "size": len(data), "rows": table.num_rows}
        if carry:  # a column the table does not have yet (or no table yet): the commit adds it
            handle["schema"] = schema_text(stored.remove_metadata())
        return handle


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
            table = self._add_columns(table, epoch, files)
        if self.mode == "merge":
            self._merge(table, epoch, files, CommitProperties(app_transactions=[Transaction(app, epoch)],
                                                              custom_metadata={"sluiceway.epoch": epoch}))
            return
        schema = self._new_table_schema(files, epoch) if table is None else pa.schema(table.schema().to_arrow())
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

    def stored_schema(self, schema: pa.Schema) -> pa.Schema:
        """The columns of a batch of ``schema`` that the table stores (a merge stores no ``_op``)."""
        if self.mode == "merge" and "_op" in schema.names:
            return schema.remove(schema.get_field_index("_op"))
        return schema

    def table_schema(self) -> pa.Schema | None:
        """The table's schema, as Arrow types; None when there is no table yet."""
        table = self._table()
        return None if table is None else pa.schema(table.schema().to_arrow())

    def _file_schemas(self, files: list[dict]) -> list[pa.Schema]:
        """Each file's schema: from its handle, else (a handle from before handles carried it) its footer."""
        fs, base = open_filesystem(self.url)
        return [schema_from_text(f["schema"]) if f.get("schema") else
                self.stored_schema(footer_schema(fs, posixpath.join(base, f["path"]))) for f in files]

    def _merged(self, schemas: list[pa.Schema], epoch: int, claimed: dict) -> pa.Schema:
        """The columns of ``schemas``, each of the type that holds all of them and the type claimed for it."""
        extra = [pa.schema([(name, t)]) for name, t in claimed.items()]
        merged, conflict = merge_schemas([pa.schema([(f.name, delta_type(f.type)) for f in s]) for s in schemas]
                                         + extra)
        if conflict is not None:
            name, a, b = conflict
            raise SinkError(f"DeltaSink table {SinkFolder(self.url).address} cannot commit epoch {epoch}: column "
                            f"{name!r} is {b} in one of its files but {a} in the others, and a Delta column has one "
                            "type; its files stay, not committed: make the job give the column one type, and write "
                            "to a new table")
        return merged

    def _new_table_schema(self, files: list[dict], epoch: int) -> pa.Schema:
        """The first commit makes the table: the columns of its files and those other pre-commits claimed."""
        claimed = ColumnClaims(SinkFolder(self.url)).types()
        return self._merged(self._file_schemas(files), epoch, claimed)

    def _add_columns(self, table, epoch: int, files: list[dict]):
        """Columns of the epoch's files the table lacks are added to it (of the claimed type) before the
        files: Delta readers would drop them. A type the table cannot hold is refused; its files stay."""
        carried = [schema_from_text(f["schema"]) for f in files if f.get("schema")]
        if not carried:
            return table
        have = pa.schema(table.schema().to_arrow())
        where = f"DeltaSink table {SinkFolder(self.url).address}"
        for schema in carried:
            for field in schema:
                index = have.get_field_index(field.name)
                if index >= 0 and not fits(have.field(index).type, field.type):
                    raise SinkError(f"{where} cannot commit epoch {epoch}: column {field.name!r} is {field.type} "
                                    f"in one of its files, and the table's {have.field(index).type} cannot hold it; "
                                    "its files stay, not committed: cast the column in the job, and write to a "
                                    "new table")
        new = [s for s in carried if any(have.get_field_index(f.name) < 0 and f.type != pa.null() for f in s)]
        if not new:
            return table
        claimed = ColumnClaims(SinkFolder(self.url)).types()
        merged = self._merged(new, epoch, claimed)
        added = [f for f in merged if have.get_field_index(f.name) < 0 and f.type != pa.null()
                 and any(s.get_field_index(f.name) >= 0 for s in new)]
        deltalake = _deltalake()
        table.alter.add_columns(list(deltalake.Schema.from_arrow(pa.schema(added)).fields))
        return self._table()

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
            live = _conform(live, self._new_table_schema(files, epoch))
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
            names = []
        for path in names:
            epoch = file_epoch(posixpath.basename(path))
            if epoch is not None and epoch > after_epoch:
                fs.rm_file(path)
        ColumnClaims(SinkFolder(self.url, on_wait=context.on_wait)).clear()

    def claim(self, owner: SinkOwner) -> None:
        """Record ``owner`` beside the table's log, or refuse it (see the module doc)."""
        folder = SinkFolder(self.url, on_wait=self.on_wait)

        def committed_output() -> str | None:
            table = self._table()
            done = None if table is None else table.transaction_version(app_id(owner.job, owner.step))
            return None if done is None else \
                f"epochs through {done} committed by job {owner.job!r} (sink step {owner.step!r})"

        claim_folder(folder, owner, f"DeltaSink table {folder.address}", "table", self.kind, committed_output)

    def location(self) -> str:
        return SinkFolder(self.url).address

    def _table(self):
        deltalake = _deltalake()
        try:
            return deltalake.DeltaTable(self.url, storage_options=self.storage_options or None)
        except deltalake.exceptions.TableNotFoundError:
            return None

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url, "mode": self.mode, "key": self.key}
