"""Parquet files as a replayable source.

Each file is a partition; a record's offset is its row number in the file,
so a planned range ``[start, stop)`` always reads the same rows. The file
list and row counts are fixed when the source is built (the footers are
read once, on the driver), so every task and every replay agrees on them.
Reads decode only the row groups that overlap the range, and keep the last
decoded row group of each partition, so epochs that walk through a file in
slices decode each row group once.

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

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from sluiceway.operators.errors import FlowDefinitionError
from sluiceway.operators.sources import Source


class ParquetFilesSource(Source):
    """A bounded set of Parquet files: a folder (every ``*.parquet`` below
    it), a glob (``s3://bucket/bids/*.parquet``) or a list of paths/URLs.
    ``columns`` reads only those columns."""

    kind = "parquet_files"

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
        self.row_group_starts: list[list[int]] = []
        self.rows: list[int] = []
        for path in paths:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            starts, total = [], 0
            for i in range(meta.num_row_groups):
                starts.append(total)
                total += meta.row_group(i).num_rows
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
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def describe(self) -> dict:
        return {"kind": self.kind, "files": len(self.urls), "rows": sum(self.rows),
                "first": posixpath.basename(self.urls[0])}
