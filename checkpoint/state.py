"""Keyed state on disk: one Arrow IPC file per (checkpoint, step, subtask),
one record batch per key group, so a restore can read any set of key groups
(the basis of rescaling) without tiny files.

State is a table with a ``__key_group`` column (int32). The file's entry in
the manifest records its size, its sha256, and which batch holds which key
group.
"""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.checkpoint.errors import CorruptCheckpointError
from sluiceway.checkpoint.storage import JobStorage

KEY_GROUP_COLUMN = "__key_group"


def encode_state(table: pa.Table) -> tuple[bytes, dict[int, int]]:
    """Arrow IPC bytes with one batch per key group, and ``{key_group: batch_index}``."""
    if KEY_GROUP_COLUMN not in table.column_names:
        raise ValueError(f"keyed state needs a {KEY_GROUP_COLUMN!r} column, got {table.column_names}")
    table = table.sort_by(KEY_GROUP_COLUMN)
    key_groups = table.column(KEY_GROUP_COLUMN)
    index: dict[int, int] = {}
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        if table.num_rows:
            runs = pc.run_end_encode(key_groups.combine_chunks())
            ends = runs.run_ends.to_pylist()
            values = runs.values.to_pylist()
            start = 0
            for batch_index, (kg, end) in enumerate(zip(values, ends)):
                writer.write_table(table.slice(start, end - start), max_chunksize=end - start)
                index[int(kg)] = batch_index
                start = end
    return sink.getvalue(), index


def write_state(storage: JobStorage, checkpoint_id: int, step: str, subtask: int, table: pa.Table,
                attempt: str = "f0g0") -> dict:
    """Write one state file; returns its manifest entry."""
    data, index = encode_state(table)
    path = storage.state_path(checkpoint_id, step, subtask, attempt)
    storage.write_bytes(path, data)
    return {
        "path": storage.relative(path),
        "step": step,
        "subtask": subtask,
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "rows": table.num_rows,
        "key_groups": {str(kg): i for kg, i in index.items()},
    }


def read_state(storage: JobStorage, entry: dict, key_groups: range | set[int]) -> list[pa.Table]:
    """The parts of one state file that hold ``key_groups``, checksums verified."""
    wanted = [(int(kg), i) for kg, i in entry["key_groups"].items() if int(kg) in key_groups]
    if not wanted:
        return []
    path = storage.absolute(entry["path"])
    data = storage.read_bytes(path)
    if data is None:
        raise CorruptCheckpointError(f"state file {entry['path']} named in the manifest is missing")
    if len(data) != entry["size_bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CorruptCheckpointError(
            f"state file {entry['path']} fails its checksum ({len(data)} bytes, manifest says {entry['size_bytes']})"
        )
    reader = pa.ipc.open_file(pa.BufferReader(data))
    return [pa.Table.from_batches([reader.get_batch(i)]) for _, i in sorted(wanted)]
