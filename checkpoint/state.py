"""Keyed state on disk, by key group, for incremental checkpoints.

A checkpoint writes, per (step, subtask), one Arrow IPC file holding what
changed since the previous checkpoint, one record batch per key group: the
whole group, or only the rows of the keys that changed (a delta). The
manifest's ``state`` map names, for every key group of every step, its
*chain*: the ``[file, batch]`` of a full copy, then of each delta after it,
in files that earlier checkpoints may have written. Its ``files`` map gives
each referenced file's size and sha256. A restore reads any set of key
groups (the basis of rescaling), and retention keeps every file a retained
manifest names.
"""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa

from sluiceway.checkpoint.errors import CorruptCheckpointError
from sluiceway.checkpoint.storage import JobStorage

def encode_key_groups(groups: dict[int, pa.Table]) -> tuple[bytes, dict[int, int]]:
    """Arrow IPC bytes with one batch per key group, and ``{key_group: batch_index}``.

    >>> data, index = encode_key_groups({9: pa.table({"k": [1, 2]}), 3: pa.table({"k": [5]})})
    >>> index
    {3: 0, 9: 1}
    >>> data, _ = encode_key_groups({1: pa.table({"k": [1]}), 2: pa.table({"k": [2], "__deleted": [True]})})
    >>> pa.ipc.open_file(data).read_all().to_pylist()
    [{'k': 1, '__deleted': None}, {'k': 2, '__deleted': True}]
    """
    groups = {kg: t for kg, t in sorted(groups.items()) if t.num_rows}
    schema = pa.unify_schemas([t.schema for t in groups.values()], promote_options="permissive") if groups else pa.schema([])
    sink = io.BytesIO()
    index: dict[int, int] = {}
    with pa.ipc.new_file(sink, schema) as writer:
        for batch_index, (kg, table) in enumerate(groups.items()):
            writer.write_table(_conform(table, schema).combine_chunks(), max_chunksize=table.num_rows)
            index[kg] = batch_index
    return sink.getvalue(), index


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order: a column it lacks
    (a full key group beside deltas with tombstones) is null."""
    if table.schema == schema:
        return table
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


def write_key_groups(storage: JobStorage, checkpoint_id: int, step: str, subtask: int, attempt: str,
                     groups: dict[int, pa.Table]) -> dict:
    """Write one state file of changed key groups; returns its record for the
    manifest: ``path``, ``size_bytes``, ``sha256``, ``rows`` and ``key_groups``
    (``{key_group: batch_index}``)."""
    data, index = encode_key_groups(groups)
    path = storage.state_path(checkpoint_id, step, subtask, attempt)
    storage.write_bytes(path, data)
    return {
        "path": storage.relative(path),
        "checkpoint": checkpoint_id,
        "step": step,
        "subtask": subtask,
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "rows": sum(t.num_rows for t in groups.values()),
        "key_groups": {str(kg): i for kg, i in index.items()},
    }


def read_key_groups(storage: JobStorage, step_map: dict[str, list], files: dict[str, dict],
                    key_groups: range | set[int]) -> dict[int, list[pa.Table]]:
    """The chains of ``key_groups`` of one step (oldest run first), as the
    manifest's state map names them; every file read is checked against its
    size and sha256 (:class:`StateFiles`)."""
    fetch = StateFiles(storage, files)
    return {int(kg): [fetch(ref) for ref in chain] for kg, chain in step_map.items() if int(kg) in key_groups}


class StateFiles:
    """Fetches state by ``[file, batch]`` reference for a lazy restore: each
    file is read once, when a key group first needs it, and checked against
    the manifest's size and sha256 before any batch of it is used.

    ``check_present`` stats every file the chains name (no download), so a
    missing or truncated file fails the restore at once, not mid-epoch."""

    def __init__(self, storage: JobStorage, files: dict[str, dict]):
        self.storage, self.files = storage, files
        self._readers: dict[str, pa.ipc.RecordBatchFileReader] = {}

    def _meta(self, path: str) -> dict:
        meta = self.files.get(path)
        if meta is None:
            raise CorruptCheckpointError(f"state file {path} is named in the state map but not in the manifest's files")
        return meta

    def check_present(self, chains: dict) -> None:
        for path in sorted({ref[0] for chain in chains.values() for ref in chain}):
            meta = self._meta(path)
            size = self.storage.file_size(self.storage.absolute(path))
            if size is None:
                raise CorruptCheckpointError(f"state file {path} named in the manifest is missing")
            if size != meta["size_bytes"]:
                raise CorruptCheckpointError(
                    f"state file {path} fails its checksum ({size} bytes, manifest says {meta['size_bytes']})")

    def __call__(self, ref: list) -> pa.Table:
        path, batch = ref
        reader = self._readers.get(path)
        if reader is None:
            meta = self._meta(path)
            data = self.storage.read_bytes(self.storage.absolute(path))
            if data is None:
                raise CorruptCheckpointError(f"state file {path} named in the manifest is missing")
            if len(data) != meta["size_bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise CorruptCheckpointError(
                    f"state file {path} fails its checksum ({len(data)} bytes, manifest says {meta['size_bytes']})")
            reader = self._readers[path] = pa.ipc.open_file(pa.BufferReader(data))
        return pa.Table.from_batches([reader.get_batch(batch)])


class MemoryStateFiles:
    """Checkpoints of one operator's state kept in memory, through the same
    file encoding as real ones: for tests that checkpoint and restore an
    operator without a job around it.

    ``checkpoint(logic)`` writes what the logic's store changed and returns
    its chains; ``restored(chains)`` gives what ``build`` restores from."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.chains: dict[int, list] = {}

    def checkpoint(self, logic, whole: bool = False) -> dict[int, list]:
        changes = logic.snapshot_changes(whole)
        for compacted, tables in ((False, changes.runs), (True, changes.compacted)):
            if tables:
                data, index = encode_key_groups(tables)
                path = f"state-{len(self.files):04d}.arrow"
                self.files[path] = data
                logic.state_written(path, {str(kg): batch for kg, batch in index.items()}, compacted)
        self.chains = {int(kg): chain for kg, chain in logic.state_chains().items()}
        return self.chains

    def load(self, ref: list) -> pa.Table:
        path, batch = ref
        return pa.Table.from_batches([pa.ipc.open_file(pa.BufferReader(self.files[path])).get_batch(batch)])

    def restored(self, chains: dict | None = None):
        from sluiceway.operators.state import RestoredState

        return RestoredState({kg: list(c) for kg, c in (self.chains if chains is None else chains).items()}, self.load)
