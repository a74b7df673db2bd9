"""Files as sources: a fixed set of Parquet files (:class:`ParquetFilesSource`),
and files arriving in a folder (:class:`FileSource`).

In :class:`ParquetFilesSource` each file is a partition; a record's offset is its row number in the file,
so a planned range ``[start, stop)`` always reads the same rows. The file
list and row counts are fixed when the source is built (the footers are
read once, on the driver; from object stores several at a time), so every task and every
replay agrees on them. The files are a backlog read in order: each source
task reads one file at a time, its lowest unfinished one
(:attr:`~sluiceway.operators.sources.Source.reads_in_order`), so an epoch
opens at most one file per task whatever the number of files. Reads decode
only the row groups that overlap the range and keep a row group only while
it is partly read, and a file is closed once read to its end: memory and
open files follow the tasks, not the files.

>>> import os, tempfile, pyarrow as pa, pyarrow.parquet as pq
>>> folder = tempfile.mkdtemp()
>>> for i in range(2):
...     pq.write_table(pa.table({"n": list(range(i * 10, i * 10 + 10))}), os.path.join(folder, f"part-{i}.parquet"),
...                    row_group_size=4)
>>> src = ParquetFilesSource(folder)
>>> src.partition_count(), src.end_offset(1)
(2, 10)
>>> src.read(1, 3, 6).column("n").to_pylist()
[13, 14, 15]
"""

from __future__ import annotations

import bisect
import posixpath
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from sluiceway.checkpoint.storage import (JobStorage, StorageRetry, absolute_url, arrow_buffer, call_with_retry,
                                         open_filesystem)
from sluiceway.operators.errors import FlowDefinitionError, SourceError
from sluiceway.operators.sources import Source, dead_letter


class ParquetFilesSource(Source):
    """A bounded set of Parquet files: a folder (every ``*.parquet`` below
    it), a glob (``s3://bucket/bids/*.parquet``) or a list of paths/URLs.
    ``columns`` reads only those columns."""

    kind = "parquet_files"
    reads_in_order = True
    FOOTER_THREADS = 16  # footers read at once when the source is built (object stores answer slowly, in parallel)

    def __init__(self, files: str | list[str], columns: list[str] | None = None):
        try:
            fs, _ = url_to_fs(files if isinstance(files, str) else files[0])
        except (ValueError, ImportError, IndexError) as exc:
            raise FlowDefinitionError(f"ParquetFilesSource cannot open {files!r}: {exc}") from None
        if isinstance(files, str):
            _, path = url_to_fs(files)
            if any(c in path for c in "*?["):
                paths = fs.glob(path)
            elif fs.isdir(path):
                paths = [p for p in fs.find(path) if p.endswith(".parquet")]
            else:
                paths = [path]
        else:
            paths = [url_to_fs(f)[1] for f in files]
        paths = sorted(paths)
        if not paths:
            raise FlowDefinitionError(f"ParquetFilesSource found no Parquet files at {files!r}")
        self.urls = [fs.unstrip_protocol(p) for p in paths]
        self.columns = columns

        local = isinstance(fs, LocalFileSystem)

        def row_groups(path: str) -> list[int]:
            if local:
                meta = pq.read_metadata(path)
            else:
                with fs.open(path, "rb") as f:
                    meta = pq.read_metadata(f)
            return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

        if local:  # about 80 us a file; threads only add lock contention
            sizes = [row_groups(path) for path in paths]
        else:  # an object store answers each footer request slowly: several at a time
            with ThreadPoolExecutor(min(self.FOOTER_THREADS, len(paths))) as pool:
                sizes = list(pool.map(row_groups, paths))
        self.row_group_starts: list[list[int]] = []
        self.rows: list[int] = []
        for groups in sizes:
            starts, total = [], 0
            for rows in groups:
                starts.append(total)
                total += rows
            self.row_group_starts.append(starts)
            self.rows.append(total)
        self._cache: dict[int, tuple[int, pa.Table]] = {}
        self._open_files: dict[int, pq.ParquetFile] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_open_files"] = {}, {}
        return state

    def _file(self, partition: int) -> pq.ParquetFile:
        """The partition's file, opened once per process (local files with
        Arrow's own reader, others through fsspec)."""
        reader = self._open_files.get(partition)
        if reader is None:
            fs, path = url_to_fs(self.urls[partition])
            if isinstance(fs, LocalFileSystem):
                reader = pq.ParquetFile(path, memory_map=True)
            else:
                reader = pq.ParquetFile(fs.open(path, "rb"))
            self._open_files[partition] = reader
        return reader

    def partition_count(self) -> int:
        return len(self.urls)

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        return self.rows[partition]

    def end_offset(self, partition: int) -> int | None:
        return self.rows[partition]

    def _row_group(self, partition: int, index: int) -> pa.Table:
        cached = self._cache.get(partition)
        if cached is not None and cached[0] == index:
            return cached[1]
        table = self._file(partition).read_row_group(index, columns=self.columns)
        self._cache[partition] = (index, table)
        return table

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        starts = self.row_group_starts[partition]
        first = bisect.bisect_right(starts, start) - 1
        last = bisect.bisect_right(starts, stop - 1) - 1
        parts = []
        for index in range(first, last + 1):
            group = self._row_group(partition, index)
            lo = max(start - starts[index], 0)
            hi = min(stop - starts[index], group.num_rows)
            parts.append(group.slice(lo, hi - lo))
        if self._cache.get(partition, (None,))[0] == last and hi == group.num_rows:
            del self._cache[partition]  # read to its end: a later epoch starts in the next row group
        if stop >= self.rows[partition]:  # the file is read to its end: close it
            self._cache.pop(partition, None)
            self._open_files.pop(partition, None)
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def held(self) -> tuple[int, int]:
        """Row groups kept decoded and files kept open, now (bounded by the partitions being read)."""
        return len(self._cache), len(self._open_files)

    def describe(self) -> dict:
        return {"kind": self.kind, "files": len(self.urls), "rows": sum(self.rows),
                "first": posixpath.basename(self.urls[0])}


_SUFFIXES = {"parquet": (".parquet",), "csv": (".csv",), "json": (".json", ".jsonl", ".ndjson")}
_PAYLOAD_LIMIT = 1 << 20  # dead letters carry the bytes of files up to 1 MiB


def _parse(data: bytes, fmt: str, schema: pa.Schema | None) -> pa.Table:
    """One file's records; with ``schema``, in that schema (or an error saying why not)."""
    buffer = arrow_buffer(data)
    if fmt == "parquet":
        table = pq.read_table(buffer)
    elif fmt == "csv":
        convert = pcsv.ConvertOptions(column_types=schema) if schema is not None else None
        table = pcsv.read_csv(buffer, convert_options=convert)
    else:
        parse = pjson.ParseOptions(explicit_schema=schema) if schema is not None else None
        table = pjson.read_json(buffer, parse_options=parse)
    if schema is None:
        return table
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"it lacks column(s) {', '.join(missing)} of the source's schema ({', '.join(schema.names)})")
    return table.select(schema.names).cast(schema)


class FileSource(Source):
    """Files arriving under a folder (any fsspec URL), each read exactly once.

    The offsets of a partition are the files it was given, in the order they
    were found: when the coordinator plans an epoch it lists the folder, and
    files it has not seen are recorded, in order of modification time and
    name, in the job's checkpoint storage (``sources/<step>/``) before any
    plan names them. So a replay reads the same files, and a restarted job
    reads only files it never planned. A file lands in partition
    ``crc32(path) % partitions``.

    ``format`` is ``"parquet"``, ``"csv"`` or ``"json"`` (JSON lines); names
    starting with ``.`` or ``_`` are ignored, so write a file under such a
    name (or elsewhere) and rename it when complete. Every file is read in
    ``schema``; without one, the schema of the first file that parses is
    recorded and used for all. A file that cannot be read in it becomes one
    **dead letter** (``stream.dead_letters()``) with the reason, and the job
    goes on. ``bounded=True`` reads the files present when the job starts,
    then ends; ``max_files_per_epoch`` caps an epoch's files per partition.
    """

    kind = "files"

    def __init__(self, url: str, format: str = "parquet", *, partitions: int = 1, schema: pa.Schema | None = None,
                 bounded: bool = False, max_files_per_epoch: int | None = None, min_age_s: float = 0.0):
        if format not in _SUFFIXES:
            raise FlowDefinitionError(f"FileSource format must be one of {', '.join(_SUFFIXES)}, got {format!r}")
        if not isinstance(partitions, int) or partitions < 1:
            raise FlowDefinitionError(f"FileSource partitions must be a positive integer, got {partitions!r}")
        if max_files_per_epoch is not None and max_files_per_epoch < 1:
            raise FlowDefinitionError(f"max_files_per_epoch must be positive or None, got {max_files_per_epoch!r}")
        self.url = absolute_url(url)
        fs, path = open_filesystem(self.url)
        if not fs.isdir(path):
            raise FlowDefinitionError(f"FileSource folder {self.url} does not exist (or is not a folder); "
                                      "create it, or fix the URL")
        self.format = format
        self.partitions = partitions
        self.schema = schema
        self.bounded = bounded
        self.max_offsets_per_epoch = max_files_per_epoch
        self.min_age_s = min_age_s
        self._reset()

    def _reset(self) -> None:
        self._storage: JobStorage | None = None
        self._step: str | None = None
        self._files: list[list[dict]] = [[] for _ in range(self.partitions)]  # the ledger, per partition
        self._known: set[str] = set()
        self._schema: pa.Schema | None = self.schema
        self._discovered_at: float | None = None
        self._ends: list[int] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in ("_storage", "_step", "_files", "_known", "_schema", "_discovered_at", "_ends"):
            state.pop(name)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------- ledger
    def bind(self, storage: JobStorage, step: str) -> None:
        self._storage, self._step = storage, step
        self._load()

    def _ledger(self, partition: int) -> str:
        return self._storage.source_path(self._step, f"p{partition}")

    def _load(self) -> None:
        """Read what the ledger holds beyond what we have."""
        if self._storage is None:
            raise SourceError("FileSource was used before it was bound to a job's storage")
        for p in range(self.partitions):
            have = len(self._files[p])
            for first in self._storage.numbered(self._ledger(p), ".json"):
                if first < have:
                    continue
                entry = self._storage.read_json(posixpath.join(self._ledger(p), f"{first:010d}.json"))
                self._files[p].extend(entry["files"])
            self._known.update(f["path"] for f in self._files[p])
        if self._schema is None:
            data = self._storage.read_bytes(self._storage.source_path(self._step, "schema.arrow"))
            if data is not None:
                self._schema = pa.ipc.read_schema(pa.py_buffer(data))

    def _discover(self, now: float) -> None:
        """List the folder and record, partition by partition, the files never
        seen (oldest first); then fix the schema if none is known yet."""
        fs, root = open_filesystem(self.url)
        listing = call_with_retry("list", self.url, lambda: fs.find(root, detail=True), StorageRetry())
        new = []
        for path, info in listing.items():
            name = posixpath.basename(path)
            if name.startswith((".", "_")) or not name.endswith(_SUFFIXES[self.format]):
                continue
            url = fs.unstrip_protocol(path)
            modified = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            modified = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
            if url not in self._known and (self.min_age_s <= 0 or now - modified >= self.min_age_s):
                new.append((modified, url, int(info.get("size") or 0)))
        by_partition: dict[int, list[dict]] = {}
        for _, url, size in sorted(new):
            by_partition.setdefault(zlib.crc32(url.encode()) % self.partitions, []).append({"path": url, "size": size})
        for p, files in sorted(by_partition.items()):
            path = posixpath.join(self._ledger(p), f"{len(self._files[p]):010d}.json")
            try:
                self._storage.create_json(path, {"files": files})
            except FileExistsError:  # another run of this job recorded files there first: take its ledger
                self._load()
                continue  # files it did not record are found again next time
            self._files[p].extend(files)
            self._known.update(f["path"] for f in files)
        if self._schema is None:
            self._infer_schema()

    def _infer_schema(self) -> None:
        """Record the schema of the first recorded file that parses."""
        path = self._storage.source_path(self._step, "schema.arrow")
        for files in self._files:
            for file in files:
                try:
                    schema = _parse(self._fetch(file["path"]), self.format, None).schema.remove_metadata()
                except (pa.ArrowInvalid, ValueError):
                    continue
                try:
                    self._storage.create_bytes(path, schema.serialize().to_pybytes())
                except FileExistsError:  # recorded by another run: use theirs
                    schema = pa.ipc.read_schema(pa.py_buffer(self._storage.read_bytes(path)))
                self._schema = schema
                return

    def _fetch(self, url: str) -> bytes:
        fs, path = open_filesystem(url)
        return call_with_retry("read", url, lambda: fs.cat_file(path), StorageRetry())

    # ------------------------------------------------------------- source
    def partition_count(self) -> int:
        return self.partitions

    def readable(self, partition: int, now: float, started_at: float) -> tuple[int, int]:
        if self._discovered_at != now and (self._ends is None or not self.bounded):
            self._discover(now if now != float("inf") else time.time())
            self._discovered_at = now
            if self.bounded:
                self._ends = [len(f) for f in self._files]
        return 0, len(self._files[partition])

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        return self.readable(partition, now, started_at)[1]

    def end_offset(self, partition: int) -> int | None:
        if not self.bounded:
            return None
        if self._ends is None:
            self.readable(partition, time.time(), 0.0)
        return self._ends[partition]

    def read_batch(self, partition: int, start: int, stop: int) -> tuple[pa.Table, pa.Table | None]:
        if stop > len(self._files[partition]) or self._schema is None:
            self._load()
        files = self._files[partition][start:stop]
        if len(files) != stop - start:
            raise SourceError(f"FileSource {self.url} partition {partition}: the plan names files {start}..{stop - 1} "
                              f"but the job's file ledger holds {len(self._files[partition])}")
        tables, dead = [], []
        for offset, file in zip(range(start, stop), files):
            data = self._fetch(file["path"])
            try:
                tables.append(_parse(data, self.format, self._schema))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                reason = f"{self.format} file cannot be read: {type(exc).__name__}: {exc}".splitlines()[0]
                dead.append(dead_letter(f"files:{self.url}", partition, offset, offset + 1, file["path"], reason,
                                        data if len(data) <= _PAYLOAD_LIMIT else None))
        if tables:
            table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        else:
            table = (self._schema or pa.schema([])).empty_table()
        return table, (pa.concat_tables(dead) if dead else None)

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        return self.read_batch(partition, start, stop)[0]

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url, "format": self.format, "partitions": self.partitions,
                "bounded": self.bounded, "files": sum(len(f) for f in self._files)}
