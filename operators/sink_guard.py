"""What keeps a sink's committed output whole: who writes it, and which column types it holds.

Two jobs, or two sink steps of one job, writing one folder would each take
the other's commit markers for their own (rows lost); a job whose checkpoint
history was deleted would find its old markers and skip, or write again, what
they name (rows lost or duplicated). And a batch whose column types readers
cannot merge with what is committed would leave output nobody can read.
This module keeps both out, for the sinks whose bookkeeping is files in a
folder: a :class:`~sluiceway.operators.sinks.ParquetSink`'s, and a
:class:`~sluiceway.operators.connectors.delta.DeltaSink`'s beside its Delta
log. Delta and file readers ignore ``_``-prefixed folders::

    <folder>/_sluiceway/owner.json           who writes here (job, job id, sink step), created once
    <folder>/_sluiceway/schema.json          ParquetSink: the schema of what it committed, promoted as it grows
    <folder>/_sluiceway/columns/<hash>.json  the type of a column nothing committed has yet, claimed by the
                                             first pre-commit that writes it; removed by the sink's abort

**Owners.** :func:`claim_folder` is a sink's ``claim(owner)``: it creates the
owner record if there is none (only if absent: of two jobs starting at once,
one wins) and otherwise refuses, in one line (:func:`owner_refusal`), any
writer other than the recorded job, job id and step. A folder with committed
output and no record (written before sinks recorded their owner) is adopted
by a job with checkpoint history, and refused to a job without
(:func:`untracked_refusal`): its epochs are not that history's. PostgresSink
and RedisSink keep their records in their own systems, with the same rules
and messages.

**Column types.** Each writer checks its batches with a :class:`SchemaCheck`
before it writes them: against the committed schema, read once and again only
when a batch brings a type the last read did not absorb (so a steady job reads
nothing more per epoch), and, for a column nothing committed has, against the
type the first pre-commit claimed for it (:class:`ColumnClaims`), so that
subtasks and overlapping epochs cannot write types that cannot be merged
either. A batch that does not fit fails its pre-commit with a
:class:`~sluiceway.operators.errors.FlowValidationError` naming the column
and the epoch: the epoch never commits, and nothing is lost.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

import pyarrow as pa

from sluiceway.checkpoint.storage import (
    StorageRetry,
    arrow_buffer,
    atomic_write,
    call_with_retry,
    create_exclusive,
    open_filesystem,
)
from sluiceway.operators.errors import FlowValidationError, SinkError, SinkOwnershipError

if TYPE_CHECKING:
    from sluiceway.operators.sinks import SinkOwner

OWNER = "_sluiceway/owner.json"
SCHEMA = "_sluiceway/schema.json"
COLUMNS = "_sluiceway/columns"


class SinkFolder:
    """A sink's folder on any fsspec URL; every call retried like checkpoint storage's."""

    def __init__(self, url: str, retry: StorageRetry = StorageRetry(), on_wait=None):
        self.url = url
        self.fs, self.base = open_filesystem(url)
        self.retry = retry
        self.on_wait = on_wait

    @property
    def address(self) -> str:
        """The folder as a URL, for messages: ``file:///data/out``, ``s3://bucket/out``."""
        return self.fs.unstrip_protocol(self.base)

    def path(self, relative: str) -> str:
        return posixpath.join(self.base, relative)

    def call(self, what: str, path: str, fn):
        return call_with_retry(what, self.fs.unstrip_protocol(path), fn, self.retry, self.on_wait)

    def read_json(self, path: str) -> dict | None:
        """The JSON object at ``path``, None when absent; a malformed one is a :class:`SinkError`."""
        try:
            doc = json.loads(self.call("read", path, lambda: self.fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise SinkError(f"{self.fs.unstrip_protocol(path)} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise SinkError(f"{self.fs.unstrip_protocol(path)} is not a JSON object")
        return doc

    def create_json(self, path: str, doc: dict) -> bool:
        """Create ``path`` holding ``doc`` only if absent; False when something was there."""
        data = json.dumps(doc, indent=1).encode()
        try:
            self.call("create", path, lambda: create_exclusive(self.fs, path, data))
        except FileExistsError:
            return False
        return True

    def write_json(self, path: str, doc: dict) -> None:
        data = json.dumps(doc, indent=1).encode()
        self.call("write", path, lambda: atomic_write(self.fs, path, data))

    def names(self, folder: str) -> list[str]:
        """Paths in ``folder``; none when it is absent."""
        try:
            return self.call("list", folder, lambda: self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return []

    def delete_folder(self, path: str) -> None:
        """Delete ``path`` and what it holds; gone already is fine."""
        try:
            self.call("delete", path, lambda: self.fs.rm(path, recursive=True))
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------- owners
def owner_record(owner: "SinkOwner", sink: str) -> dict:
    """The owner record a sink keeps (JSON): its format, the sink's kind, the owner, when it was made."""
    return {"format": 1, "sink": sink, "job": owner.job, "job_id": owner.job_id, "step": owner.step,
            "checkpoints": owner.checkpoints, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def owner_refusal(where: str, noun: str, found: dict, owner: "SinkOwner", start_over: str | None = None) -> str | None:
    """Why ``owner`` may not write ``where`` (its sink's ``noun``: folder, table) that ``found`` owns, in
    one line; None when ``found`` is ``owner`` (the same job resumed or restarted). ``start_over``: how to
    start the job's output over (default: a new ``noun``, or delete this one).

    >>> from sluiceway.operators.sinks import SinkOwner
    >>> found = {"job": "a", "job_id": "1f0c", "step": "out", "checkpoints": "file:///ckpt/a"}
    >>> owner_refusal("ParquetSink folder file:///x/out", "folder", found, SinkOwner("a", "1f0c", "out", "", False))
    >>> print(owner_refusal("ParquetSink folder file:///x/out", "folder", found,
    ...                     SinkOwner("b", "77aa", "out", "file:///ckpt/b", True)))
    ParquetSink folder file:///x/out belongs to job 'a' (sink step 'out'); job 'b' cannot write there: give this sink its own folder
    """
    job, job_id, step = found.get("job"), found.get("job_id"), found.get("step")
    if job != owner.job:
        return (f"{where} belongs to job {job!r} (sink step {step!r}); job {owner.job!r} cannot write there: "
                f"give this sink its own {noun}")
    if job_id == owner.job_id and step == owner.step:
        return None
    if job_id == owner.job_id:
        return (f"{where} belongs to sink step {step!r} of job {job!r}; its sink step {owner.step!r} cannot "
                f"write there too: give each sink its own {noun}")
    earlier = found.get("checkpoints") or "checkpoints that are gone"
    return (f"{where} holds output of job {job!r} (sink step {step!r}) committed under other checkpoints "
            f"({earlier}, job id {job_id}), not the ones at {owner.checkpoints} (job id {owner.job_id}); "
            f"running on would write it again: restore those checkpoints, or "
            f"{start_over or _start_over(noun)} to start over")


def untracked_refusal(where: str, noun: str, output: str, owner: "SinkOwner", start_over: str | None = None) -> str:
    """The refusal of a fresh checkpoint history (``owner.fresh``) at a place with committed output and no
    owner record (written before sinks recorded their owner), in one line."""
    return (f"{where} already holds {output}, and job {owner.job!r} starts with no checkpoints "
            f"({owner.checkpoints} is new); running would write that output again: restore the checkpoints "
            f"that wrote it, or {start_over or _start_over(noun)} to start over")


def _start_over(noun: str) -> str:
    return f"point the sink at a new {noun} (or delete this one)"


def claim_folder(folder: SinkFolder, owner: "SinkOwner", where: str, noun: str, sink: str,
                 committed_output: Callable[[], str | None]) -> None:
    """``Sink.claim`` for a sink whose bookkeeping is in ``folder`` (see the module doc).
    ``committed_output()`` says what output is committed there ("12 committed epochs"), or None: asked only
    when there is no owner record, to tell a folder written before this release from an empty one."""
    path = folder.path(OWNER)
    found = folder.read_json(path)
    if found is None:
        output = committed_output()
        if output and owner.fresh:
            raise SinkOwnershipError(untracked_refusal(where, noun, output, owner))
        if folder.create_json(path, owner_record(owner, sink)):
            return
        found = folder.read_json(path)  # another job claimed it at the same moment
        if found is None:
            raise SinkOwnershipError(f"{where}: its owner record {folder.address}/{OWNER} was created and "
                                     "deleted while this job claimed it; start the job again")
    if not all(isinstance(found.get(k), str) for k in ("job", "job_id", "step")):
        raise SinkError(f"{folder.address}/{OWNER} is malformed (it needs 'job', 'job_id' and 'step'); it is "
                        "written by sluiceway alone: delete it, and the next run records its owner again")
    if (found["job"], found["job_id"]) == (owner.job, owner.job_id) and found["step"] in owner.previous:
        folder.write_json(path, owner_record(owner, sink))  # the step was renamed (flow.renamed): it owns it now
        return
    refusal = owner_refusal(where, noun, found, owner)
    if refusal is not None:
        if (found["job"], found["job_id"]) == (owner.job, owner.job_id):
            refusal += (f" (if {owner.step!r} is {found['step']!r} renamed, declare "
                        f"flow.renamed({found['step']!r}, {owner.step!r}))")
        raise SinkOwnershipError(refusal)


# ---------------------------------------------------------------- column types
def promoted(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type readers merge columns of types ``a`` and ``b`` into (Arrow's permissive promotion, as
    :func:`~sluiceway.operators.sinks.read_committed` merges files), or None when they cannot.

    >>> promoted(pa.int64(), pa.float64()), promoted(pa.null(), pa.string()), promoted(pa.int64(), pa.string())
    (DataType(double), DataType(string), None)

    Arrow unifies int64 and decimal128(10, 2) into decimal128(20, 2), which cannot hold an int64: a reader
    fails to cast; so does this.

    >>> promoted(pa.int64(), pa.decimal128(10, 2)) is None
    True
    """
    if a == b:
        return a
    try:
        unified = pa.unify_schemas([pa.schema([pa.field("c", a)]), pa.schema([pa.field("c", b)])],
                                   promote_options="permissive").field(0).type
        for t in (a, b):  # what a reader does next: cast each file's column (a null shows a type that cannot)
            pa.nulls(1, t).cast(unified)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    return unified


def schema_text(schema: pa.Schema) -> str:
    """A schema as text for a JSON document (Arrow IPC, base64): handles and records carry it."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_text(text: str) -> pa.Schema:
    return pa.ipc.read_schema(arrow_buffer(base64.b64decode(text)))


def merge_schemas(schemas: list[pa.Schema]) -> tuple[pa.Schema, tuple | None]:
    """The schema readers see over files of ``schemas`` (columns in order of first appearance, each
    promoted), and the first column that cannot merge: ``(name, type so far, type)``, or None.

    >>> merged, conflict = merge_schemas([pa.schema([("a", pa.int64())]),
    ...                                   pa.schema([("b", pa.string()), ("a", pa.float64())])])
    >>> merged.names, merged.field("a").type, conflict
    (['a', 'b'], DataType(double), None)
    >>> merge_schemas([pa.schema([("a", pa.int64())]), pa.schema([("a", pa.string())])])[1]
    ('a', DataType(int64), DataType(string))
    """
    types: dict[str, pa.DataType] = {}
    for schema in schemas:
        for field in schema:
            have = types.get(field.name)
            if have is None:
                types[field.name] = field.type
                continue
            merged = promoted(have, field.type)
            if merged is None:
                return pa.schema(list(types.items())), (field.name, have, field.type)
            types[field.name] = merged
    return pa.schema(list(types.items())), None


def schema_record(schema: pa.Schema, epoch: int | None) -> dict:
    """A committed schema's record (``_sluiceway/schema.json``): the schema (Arrow IPC, base64), its columns
    for people to read, the epoch that last changed it (None: read from the files of a folder written before
    schemas were recorded)."""
    return {"format": 1, "schema": schema_text(schema), "columns": {f.name: str(f.type) for f in schema},
            "epoch": epoch, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def footer_schema(fs, path: str) -> pa.Schema:
    """The schema of the Parquet file at ``path``, from its footer alone."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


class ColumnClaims:
    """The types of columns that pre-committed epochs hold and nothing committed has yet: the first
    pre-commit that writes such a column claims its type (created only if absent); the others must agree.
    The sink's abort removes them all (it runs when no pre-commit is under way, after every epoch of the
    commit log is committed, so the committed schema holds what the claims were for)."""

    def __init__(self, folder: SinkFolder):
        self.folder = folder

    def _path(self, column: str) -> str:
        return self.folder.path(posixpath.join(COLUMNS, hashlib.sha1(column.encode()).hexdigest()[:20] + ".json"))

    def claim(self, field: pa.Field, epoch: int, subtask: int) -> tuple[pa.DataType, dict]:
        """The type claimed for ``field``'s column, and the claim's record: this pre-commit's own when it
        is the first (it claims the column now), else the first one's."""
        doc = {"column": field.name, "type": str(field.type), "field": schema_text(pa.schema([field])),
               "epoch": epoch, "subtask": subtask}
        path = self._path(field.name)
        for _ in range(3):  # an abort may remove a claim between our create and our read
            if self.folder.create_json(path, doc):
                return field.type, doc
            found = self.folder.read_json(path)
            if found is not None:
                return schema_from_text(found["field"]).field(0).type, found
        raise SinkError(f"the claim of column {field.name!r} at {self.folder.fs.unstrip_protocol(path)} keeps "
                        "vanishing: is another run aborting this sink?")

    def types(self) -> dict[str, pa.DataType]:
        """Every claimed column's type."""
        out = {}
        for name in self.folder.names(self.folder.path(COLUMNS)):
            if name.endswith(".json"):
                doc = self.folder.read_json(name)
                if doc is not None:
                    out[doc["column"]] = schema_from_text(doc["field"]).field(0).type
        return out

    def clear(self) -> None:
        self.folder.delete_folder(self.folder.path(COLUMNS))


class SchemaCheck:
    """One writer's check of its batches' column types (see the module doc).

    ``load()`` reads the committed schema (None: nothing committed). ``exact``: the committed type must
    hold the batch's as it is (a Delta table's columns keep their type: int32 fits int64, float64 does not
    fit int64); otherwise readers' promotion is enough (int64 and float64 merge into float64). ``normalize``
    maps a batch's type to the one the sink stores (Delta: large_string is string)."""

    def __init__(self, step: str, where: str, noun: str, load: Callable[[], pa.Schema | None],
                 claims: ColumnClaims, exact: bool, normalize: Callable[[pa.DataType], pa.DataType] = lambda t: t):
        self.step, self.where, self.noun = step, where, noun
        self.load, self.claims, self.exact, self.normalize = load, claims, exact, normalize
        self.committed: dict[str, pa.DataType] | None = None
        self.absorbed: set[tuple[str, pa.DataType]] = set()  # committed types hold these for good: types only grow

    def check(self, epoch: int, subtask: int, schema: pa.Schema) -> bool:
        """Raise :class:`FlowValidationError` when a batch of ``schema`` must not be written as ``epoch``;
        return whether its handle must carry the schema for the commit (it brings a column or a type that
        the committed schema does not hold yet)."""
        fields = [f for f in schema if f.type != pa.null()]  # an all-null column merges with anything
        if self.committed is not None and all((f.name, f.type) in self.absorbed for f in fields):
            return False  # the steady state: no read
        loaded = self.load()
        self.committed = None if loaded is None else {f.name: f.type for f in loaded}
        carry = self.committed is None
        for field in fields:
            mine = self.normalize(field.type)
            have = (self.committed or {}).get(field.name)
            if have is not None and have != pa.null():
                merged = promoted(have, mine)
                if merged == have:
                    self.absorbed.add((field.name, field.type))
                    continue
                if merged is None or self.exact:
                    raise self._refusal(epoch, field.name, mine, have, f"in {self._committed_phrase()}")
                carry = True  # a promotion (int64 to float64): the commit records it
                continue
            claimed, doc = self.claims.claim(pa.field(field.name, mine), epoch, subtask)
            merged = promoted(claimed, mine)
            if merged is None or (self.exact and merged != claimed):
                raise self._refusal(epoch, field.name, mine, claimed,
                                    f"in epoch {doc['epoch']} (subtask {doc['subtask']}), pre-committed to "
                                    f"{self.where} and not committed yet")
            carry = True
        return carry

    def _committed_phrase(self) -> str:
        return f"{self.where}, which cannot hold it" if self.exact else \
            f"the epochs {self.where} already committed, and readers cannot merge the two"

    def _refusal(self, epoch: int, column: str, mine, theirs, there: str) -> FlowValidationError:
        return FlowValidationError(self.step, "sink", (
            f"cannot write epoch {epoch}: column {column!r} is {mine} here but {theirs} {there}; cast the "
            f"column in the job (pyarrow.compute.cast in a map_batches step), or write to a new {self.noun}"))
