"""A durable partitioned log on any fsspec storage: the embedded default for
unbounded input, readable again from any offset.

A **topic** has a fixed number of partitions. Each partition is a sequence
of records with gapless offsets ``0, 1, 2, ...``, stored as **segments**:
Arrow IPC files named by their first offset. A producer appends a batch to a
partition by creating the segment that starts at the partition's end offset,
only if no such file exists; when another producer got there first, it
lists again and retries at the new end. So several processes can produce at
once, nothing is lost and no two records share an offset.

Layout under the log folder (``--log-dir``, ``SLUICEWAY_LOG_DIR``, default
``./.sluiceway-log``)::

    <log>/<topic>/
      topic.json                        partitions, key column, retention, compaction
      schema.arrow                      the records' schema, fixed by the first append
      partitions/<p>/<first>.arrow      segments, <first> zero-padded to 20 digits
      consumers/<job>.json              each reading job's next offsets at its last checkpoint

Retention deletes whole segments, oldest first, by age and by size per
partition; compaction keeps the latest record of each key and drops
tombstones (records whose columns other than the key are all null) once
they are older than the topic's tombstone delay. Neither touches a
partition's newest segment, so the end offset is never lost. A compacted
segment carries each record's offset in an ``__offset`` column: offsets
keep their meaning, with holes where records were compacted away.

>>> import tempfile, pyarrow as pa
>>> log = Log(tempfile.mkdtemp())
>>> topic = log.create_topic(TopicConfig("clicks", partitions=2, key="user"))
>>> topic.append(pa.table({"user": ["a", "d", "a"], "n": [1, 2, 3]}))
{0: (0, 1), 1: (0, 2)}
>>> topic.offsets(1), topic.read(1, 0, 2).to_pylist()
((0, 2), [{'user': 'a', 'n': 1}, {'user': 'a', 'n': 3}])
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from sluiceway.checkpoint.storage import (
    StorageRetry,
    absolute_url,
    atomic_write,
    call_with_retry,
    create_exclusive,
    open_filesystem,
)
from sluiceway.operators.connectors import DEFAULT_LOG_DIR  # noqa: F401 - the log's default, named here too
from sluiceway.operators.errors import FlowDefinitionError, SourceError
from sluiceway.operators.keys import key_groups
from sluiceway.operators.sources import DEAD_LETTER_SCHEMA, Source, dead_letter, offsets

_DIGITS = 20
_OFFSET = "__offset"
_META_FIRST, _META_END, _META_CREATED = b"sluiceway.first", b"sluiceway.end", b"sluiceway.created"
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def default_log_dir() -> str:
    """The log folder when none is given: ``$SLUICEWAY_LOG_DIR``, else ``./.sluiceway-log``."""
    return absolute_url(os.environ.get("SLUICEWAY_LOG_DIR") or DEFAULT_LOG_DIR)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] == ".":
        raise FlowDefinitionError(f"topic name {name!r} must be letters, digits, '-', '_' or '.' (it names a folder)")
    return name


@dataclass(frozen=True)
class TopicConfig:
    """A topic's settings. ``key`` is the column producers partition by (and
    compaction keeps the latest record of); retention applies per partition.

    >>> TopicConfig("t", partitions=0)
    Traceback (most recent call last):
    ...
    sluiceway.operators.errors.FlowDefinitionError: topic 't' needs at least one partition, got 0
    """

    name: str
    partitions: int
    key: str | None = None
    retention_age_s: float | None = None
    retention_bytes: int | None = None
    tombstone_delay_s: float = 24 * 3600.0

    def __post_init__(self):
        _check_name(self.name)
        if not isinstance(self.partitions, int) or isinstance(self.partitions, bool) or self.partitions < 1:
            raise FlowDefinitionError(f"topic {self.name!r} needs at least one partition, got {self.partitions!r}")
        for field_name in ("retention_age_s", "retention_bytes"):
            value = getattr(self, field_name)
            if value is not None and value <= 0:
                raise FlowDefinitionError(f"topic {self.name!r}: {field_name} must be positive or None, got {value!r}")
        if self.tombstone_delay_s < 0:
            raise FlowDefinitionError(f"topic {self.name!r}: tombstone_delay_s must be >= 0")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "TopicConfig":
        known = {k: doc[k] for k in ("name", "partitions", "key", "retention_age_s", "retention_bytes",
                                     "tombstone_delay_s") if k in doc}
        return cls(**known)


@dataclass(frozen=True)
class Segment:
    """One segment file: records of offsets ``[first, end)`` (``rows`` of
    them; fewer than ``end - first`` once compacted)."""

    path: str
    first: int
    end: int
    rows: int
    size: int
    created: float
    compacted: bool
    error: str | None = None  # the file cannot be decoded: why


def span(segments: list[Segment]) -> tuple[int, int]:
    """``(first offset, end offset)`` that ``segments`` (in order) cover; ``(0, 0)`` for none."""
    return (segments[0].first, segments[-1].end) if segments else (0, 0)


def _segment_bytes(table: pa.Table, first: int, end: int, created: float) -> bytes:
    meta = {_META_FIRST: str(first).encode(), _META_END: str(end).encode(), _META_CREATED: repr(created).encode()}
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=_WRITE_OPTIONS) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _arrow_file(data: bytes | str) -> pa.ipc.RecordBatchFileReader:
    return pa.ipc.open_file(pa.memory_map(data) if isinstance(data, str) else pa.py_buffer(data))


class Log:
    """A folder of topics on any fsspec URL."""

    def __init__(self, url: str | None = None, retry: StorageRetry = StorageRetry()):
        self.url = absolute_url(url) if url else default_log_dir()
        self.fs, self.root = open_filesystem(self.url)
        self.retry = retry
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Log({self.url!r})"

    def call(self, what: str, path: str, fn, *args, **kwargs):
        """A storage call retried with backoff until the retry deadline."""
        return call_with_retry(what, self.fs.unstrip_protocol(path), lambda: fn(*args, **kwargs), self.retry)

    def create_topic(self, config: TopicConfig) -> "Topic":
        """Create a topic; a clear error if it exists already."""
        path = posixpath.join(self.root, config.name, "topic.json")
        data = json.dumps(config.to_json(), indent=1, sort_keys=True).encode()
        try:
            self.call("create", path, create_exclusive, self.fs, path, data)
        except FileExistsError:
            existing = self.topic(config.name).config
            raise FlowDefinitionError(
                f"topic {config.name!r} already exists in {self.url} with {existing.partitions} partition(s); "
                "pick another name or use the existing topic"
            ) from None
        for p in range(config.partitions):
            self.call("create", path, self.fs.makedirs, self._partition_dir(config.name, p), exist_ok=True)
        return Topic(self, config)

    def _partition_dir(self, topic: str, partition: int) -> str:
        return posixpath.join(self.root, topic, "partitions", str(partition))

    def topics(self) -> list[str]:
        try:
            entries = self.call("list", self.root, self.fs.ls, self.root, detail=False)
        except FileNotFoundError:
            return []
        names = sorted(posixpath.basename(e.rstrip("/")) for e in entries)
        return [n for n in names if self.fs.exists(posixpath.join(self.root, n, "topic.json"))]

    def topic(self, name: str) -> "Topic":
        """An existing topic; :class:`SourceError` naming the known topics if it does not exist."""
        path = posixpath.join(self.root, _check_name(name), "topic.json")
        try:
            doc = json.loads(self.call("read", path, self.fs.cat_file, path))
        except FileNotFoundError:
            known = self.topics()
            raise SourceError(
                f"topic {name!r} does not exist in log {self.url} "
                f"({'topics: ' + ', '.join(known) if known else 'it has no topics'}); "
                f"create it with: sluiceway log create {name} --partitions N --log-dir {self.url}"
            ) from None
        return Topic(self, TopicConfig.from_json(doc))


class Topic:
    """One topic: produce, read, retention, compaction, consumer positions."""

    def __init__(self, log: Log, config: TopicConfig):
        self.log = log
        self.config = config
        self.name = config.name
        self.dir = posixpath.join(log.root, config.name)
        self._schema: pa.Schema | None = None
        self._infos: dict[tuple, Segment] = {}  # (path, size, modified) -> what its footer says
        self._loaded: dict[str, tuple[tuple, pa.Table]] = {}  # path -> (path, end, size), its decoded records
        self._round_robin = 0

    def __repr__(self) -> str:
        return f"Topic({self.log.url!r}, {self.name!r}, partitions={self.config.partitions})"

    def _check_partition(self, partition: int) -> None:
        if not 0 <= partition < self.config.partitions:
            raise SourceError(f"topic {self.name!r} has partitions 0..{self.config.partitions - 1}, not {partition}")

    # ------------------------------------------------------------- schema
    @property
    def schema_path(self) -> str:
        return posixpath.join(self.dir, "schema.arrow")

    def schema(self) -> pa.Schema | None:
        """The records' schema; ``None`` until the first append."""
        if self._schema is None:
            try:
                data = self.log.call("read", self.schema_path, self.log.fs.cat_file, self.schema_path)
            except FileNotFoundError:
                return None
            self._schema = pa.ipc.read_schema(pa.py_buffer(data))
        return self._schema

    def _conform(self, table: pa.Table | pa.RecordBatch) -> pa.Table:
        """``table`` in the topic's schema (fixing it at the first append),
        or a clear error naming the columns that do not fit."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        schema = self.schema()
        if schema is None:
            if self.config.key is not None and self.config.key not in table.column_names:
                raise SourceError(f"topic {self.name!r} is keyed by {self.config.key!r}, which the records lack "
                                  f"(columns: {', '.join(table.column_names)})")
            data = table.schema.remove_metadata().serialize().to_pybytes()
            try:
                self.log.call("create", self.schema_path, create_exclusive, self.log.fs, self.schema_path, data)
            except FileExistsError:
                pass  # another producer fixed it first: conform to theirs
            self._schema = None
            schema = self.schema()
        missing = [n for n in schema.names if n not in table.column_names]
        extra = [n for n in table.column_names if n not in schema.names]
        if missing or extra:
            raise SourceError(
                f"records do not fit topic {self.name!r}: "
                + "; ".join(x for x in (f"missing columns {missing}" if missing else "",
                                        f"unknown columns {extra}" if extra else "") if x)
                + f" (the topic's columns: {', '.join(schema.names)})"
            )
        table = table.select(schema.names)
        if table.schema.remove_metadata().equals(schema):
            return table
        try:
            return table.cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            wrong = [f"{f.name}: {table.schema.field(f.name).type} (topic: {f.type})"
                     for f in schema if table.schema.field(f.name).type != f.type]
            raise SourceError(f"records do not fit topic {self.name!r}: column types {', '.join(wrong)} "
                              f"cannot be cast ({str(exc).splitlines()[0]})") from None

    # ------------------------------------------------------------ segments
    def _info(self, entry: dict) -> Segment:
        path, size = entry["name"], int(entry.get("size") or 0)
        modified = entry.get("mtime") or entry.get("LastModified") or entry.get("created")
        cache_key = (path, size, str(modified))
        info = self._infos.get(cache_key)
        if info is None:
            info = self.log.call("read", path, self._probe, path, size)
            self._infos[cache_key] = info
        return info

    def _probe(self, path: str, size: int) -> Segment:
        """What a segment's footer says. A file that cannot be decoded is a
        segment with an ``error``; a failing storage call raises (and is retried)."""
        first = int(posixpath.basename(path).split(".")[0])

        def describe(reader: pa.ipc.RecordBatchFileReader) -> Segment:
            meta = reader.schema.metadata or {}
            end = int(meta[_META_END])
            compacted = _OFFSET in reader.schema.names
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)) \
                if compacted else end - first
            return Segment(path, first, end, rows, size, float(meta[_META_CREATED]), compacted)

        try:
            if self.log.local:
                return describe(_arrow_file(path))
            with self.log.fs.open(path, "rb") as f:
                return describe(pa.ipc.open_file(f))
        except (pa.ArrowInvalid, KeyError) as exc:  # not an IO failure: the bytes are wrong
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no sluiceway metadata'}"
            return Segment(path, first, first, 0, size, 0.0, False, error=why)

    def segments(self, partition: int) -> list[Segment]:
        """The partition's segments in offset order, as storage holds them now.
        A segment a compaction has replaced (its offsets lie inside an
        earlier segment) is left out; an unreadable one is listed with its
        ``error`` and covers the offsets up to the next segment."""
        self._check_partition(partition)
        folder = self.log._partition_dir(self.name, partition)
        for _ in range(5):
            try:
                entries = self.log.call("list", folder, self.log.fs.ls, folder, detail=True)
            except FileNotFoundError:
                return []
            entries = sorted((e for e in entries if e["name"].endswith(".arrow")),
                             key=lambda e: int(posixpath.basename(e["name"]).split(".")[0]))
            try:
                infos = [self._info(e) for e in entries]
            except FileNotFoundError:
                continue  # a compaction or retention removed a file while we listed: list again
            break
        else:
            raise SourceError(f"partition {partition} of topic {self.name!r} kept changing while it was listed")
        out: list[Segment] = []
        for i, info in enumerate(infos):
            if out and info.first < out[-1].end:
                continue
            if info.error is not None:
                following = infos[i + 1].first if i + 1 < len(infos) else info.first + 1
                info = Segment(info.path, info.first, following, 0, info.size, info.created, False, info.error)
            out.append(info)
        return out

    def offsets(self, partition: int) -> tuple[int, int]:
        """``(first retained offset, end offset)`` of a partition."""
        return span(self.segments(partition))

    # ------------------------------------------------------------- produce
    def append(self, table: pa.Table | pa.RecordBatch, key: str | None = None,
               now: float | None = None) -> dict[int, tuple[int, int]]:
        """Append records: to the partition of each record's key (a stable hash
        of ``key``, default the topic's key column), or, without a key, in
        contiguous slices over the partitions in turn. Returns the offsets
        ``[first, end)`` each partition got."""
        table = self._conform(table)
        key = key or self.config.key
        n = self.config.partitions
        if table.num_rows == 0:
            return {}
        if key is not None:
            if key not in table.column_names:
                raise SourceError(f"cannot partition by {key!r}: topic {self.name!r} has columns "
                                  f"{', '.join(table.column_names)}")
            groups = key_groups(table.column(key), n) if n > 1 else None
            parts = {p: (table if groups is None else table.filter(pc.equal(groups, p))) for p in range(n)}
        else:
            rows = table.num_rows
            bounds = [rows * j // n for j in range(n + 1)]
            start = self._round_robin
            self._round_robin = (self._round_robin + 1) % n
            parts = {(start + j) % n: table.slice(bounds[j], bounds[j + 1] - bounds[j]) for j in range(n)}
        return {p: self._append(p, part, now) for p, part in sorted(parts.items()) if part.num_rows}

    def append_partition(self, partition: int, table: pa.Table | pa.RecordBatch,
                         now: float | None = None) -> tuple[int, int]:
        """Append ``table`` to one partition as one segment; ``(first, end)``."""
        return self._append(partition, self._conform(table), now)

    def _append(self, partition: int, table: pa.Table, now: float | None) -> tuple[int, int]:
        """Append records already in the topic's schema."""
        now = time.time() if now is None else now
        folder = self.log._partition_dir(self.name, partition)
        for _ in range(10_000):
            segments = self.segments(partition)
            if segments and segments[-1].error is not None:
                raise SourceError(f"cannot append to partition {partition} of topic {self.name!r}: its newest "
                                  f"segment {self.log.fs.unstrip_protocol(segments[-1].path)} is unreadable "
                                  f"({segments[-1].error}); move that file away to continue")
            first = segments[-1].end if segments else 0
            path = posixpath.join(folder, f"{first:0{_DIGITS}d}.arrow")
            data = _segment_bytes(table, first, first + table.num_rows, now)
            try:
                self.log.call("create", path, create_exclusive, self.log.fs, path, data)
            except FileExistsError:
                continue  # another producer took this offset: append after theirs
            self.apply_retention(partition, now, segments + [Segment(path, first, first + table.num_rows,
                                                                     table.num_rows, len(data), now, False)])
            return first, first + table.num_rows
        raise SourceError(f"partition {partition} of topic {self.name!r}: could not find a free offset")

    # ---------------------------------------------------------------- read
    def _load(self, segment: Segment) -> pa.Table:
        version = (segment.path, segment.end, segment.size)  # a compaction rewrites a segment in place
        cached = self._loaded.get(segment.path)
        if cached is not None and cached[0] == version:
            return cached[1]

        def read() -> pa.Table | pa.ArrowInvalid:
            try:
                source = segment.path if self.log.local else self.log.fs.cat_file(segment.path)
                return _arrow_file(source).read_all()
            except pa.ArrowInvalid as exc:  # the bytes are wrong: returned, not retried
                return exc

        table = self.log.call("read", segment.path, read)
        if isinstance(table, pa.ArrowInvalid):
            raise table
        table = table.replace_schema_metadata(None)
        if len(self._loaded) > 4:
            self._loaded.clear()
        self._loaded[segment.path] = (version, table)
        return table

    def read_with_dead_letters(self, partition: int, start: int, stop: int,
                               with_offsets: bool = False) -> tuple[pa.Table, pa.Table | None]:
        """The records of offsets ``[start, stop)`` of a partition, and dead
        letters for the offsets of segments that cannot be decoded.
        ``with_offsets`` adds each record's offset as column ``__offset``."""
        segments = self.segments(partition)
        first, end = span(segments)
        if stop > end:
            raise SourceError(f"partition {partition} of topic {self.name!r} ends at offset {end}; "
                              f"offsets up to {stop} were planned (was the topic deleted and created again?)")
        if start < first:
            raise SourceError(
                f"partition {partition} of topic {self.name!r}: offsets {start}..{first - 1} were deleted by "
                f"retention before this job read them ({first - start} records behind the oldest retained "
                "offset); replaying them is impossible. Restore a later checkpoint, or read the topic with "
                "LogSource(..., on_retention_gap='skip') to continue from the oldest retained offset"
            )
        parts, dead = [], []
        for segment in segments:
            if segment.end <= start or segment.first >= stop:
                continue
            lo, hi = max(start, segment.first), min(stop, segment.end)
            error = segment.error
            if error is None:
                try:
                    table = self._load(segment)
                except pa.ArrowInvalid as exc:  # the bytes are wrong; a storage failure raises and is retried
                    error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if error is not None:
                dead.append(dead_letter(f"log:{self.name}", partition, lo, hi,
                                        self.log.fs.unstrip_protocol(segment.path),
                                        f"segment cannot be decoded: {error}"))
                continue
            if segment.compacted:
                offset = table.column(_OFFSET)
                part = table.filter(pc.and_(pc.greater_equal(offset, lo), pc.less(offset, hi)))
                parts.append(part if with_offsets else part.drop_columns([_OFFSET]))
            else:
                part = table.slice(lo - segment.first, hi - lo)
                parts.append(part.append_column(_OFFSET, offsets(lo, hi)) if with_offsets else part)
        schema = self.schema()
        if not parts:
            table = schema.empty_table() if schema is not None else pa.table({})
            if with_offsets:
                table = table.append_column(_OFFSET, pa.array([], pa.int64()))
        else:
            table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        return table, (pa.concat_tables(dead) if dead else None)

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        """The records of offsets ``[start, stop)`` (fewer where compacted away)."""
        return self.read_with_dead_letters(partition, start, stop)[0]

    # ---------------------------------------------------------- maintenance
    def _delete(self, segment: Segment) -> None:
        try:
            self.log.call("delete", segment.path, self.log.fs.rm, segment.path)
        except FileNotFoundError:
            pass

    def apply_retention(self, partition: int, now: float | None = None,
                        segments: list[Segment] | None = None) -> list[Segment]:
        """Delete the partition's oldest segments past the age or size limit
        (never the newest). Returns what it deleted."""
        now = time.time() if now is None else now
        cfg = self.config
        if cfg.retention_age_s is None and cfg.retention_bytes is None:
            return []
        segments = self.segments(partition) if segments is None else segments
        total = sum(s.size for s in segments)
        deleted = []
        for segment in segments[:-1]:
            too_old = cfg.retention_age_s is not None and segment.created < now - cfg.retention_age_s
            too_big = cfg.retention_bytes is not None and total > cfg.retention_bytes
            if not (too_old or too_big):
                break
            self._delete(segment)
            total -= segment.size
            deleted.append(segment)
        return deleted

    def compact(self, key: str | None = None, now: float | None = None) -> dict[int, dict]:
        """Keep only the latest record of each key in every partition's closed
        segments (all but the newest), merged into one segment; drop
        tombstones older than the tombstone delay. Run one compaction of a
        topic at a time. Returns, per partition, records before and after."""
        key = key or self.config.key
        if key is None:
            raise FlowDefinitionError(f"topic {self.name!r} has no key column: compact it with --key COLUMN")
        schema = self.schema()
        if schema is None:
            return {}
        if key not in schema.names:
            raise FlowDefinitionError(f"cannot compact topic {self.name!r} by {key!r}: its columns are "
                                      f"{', '.join(schema.names)}")
        now = time.time() if now is None else now
        report = {}
        for partition in range(self.config.partitions):
            segments = self.segments(partition)
            closed = segments[:-1]
            if not closed or any(s.error for s in closed):
                report[partition] = {"records_before": sum(s.rows for s in closed), "records_after": None,
                                     "skipped": "unreadable segment" if closed else "nothing closed"}
                continue
            tables = []
            for s in closed:
                table = self._load(s)
                if not s.compacted:
                    table = table.append_column(_OFFSET, offsets(s.first, s.end))
                tables.append(table.append_column("__created", pa.repeat(pa.scalar(s.created), table.num_rows)))
            merged = pa.concat_tables(tables)
            latest = merged.group_by(key, use_threads=False).aggregate([(_OFFSET, "max")]).column(f"{_OFFSET}_max")
            keep = pc.is_in(merged.column(_OFFSET), value_set=latest)
            values = [n for n in schema.names if n != key]
            if values:
                tombstone = functools.reduce(pc.and_, [pc.is_null(merged.column(n)) for n in values])
                expired = pc.less(merged.column("__created"), now - self.config.tombstone_delay_s)
                keep = pc.and_(keep, pc.invert(pc.and_(tombstone, expired)))
            result = merged.filter(keep).drop_columns(["__created"])
            data = _segment_bytes(result, closed[0].first, closed[-1].end, max(s.created for s in closed))
            self.log.call("write", closed[0].path, atomic_write, self.log.fs, closed[0].path, data)
            for s in closed[1:]:
                self._delete(s)
            self._loaded.clear()
            report[partition] = {"records_before": merged.num_rows, "records_after": result.num_rows,
                                 "segments_merged": len(closed)}
        return report

    # ----------------------------------------------------------- consumers
    def record_consumer(self, job: str, next_offsets: dict[int, int], now: float | None = None) -> None:
        """Record how far ``job`` has read (its offsets at its last checkpoint)."""
        path = posixpath.join(self.dir, "consumers", f"{job}.json")
        doc = {"job": job, "updated_at": time.time() if now is None else now,
               "offsets": {str(p): o for p, o in sorted(next_offsets.items())}}
        self.log.call("write", path, atomic_write, self.log.fs, path, json.dumps(doc, sort_keys=True).encode())

    def consumers(self) -> dict[str, dict]:
        folder = posixpath.join(self.dir, "consumers")
        try:
            names = self.log.call("list", folder, self.log.fs.ls, folder, detail=False)
        except FileNotFoundError:
            return {}
        out = {}
        for name in sorted(names):
            if name.endswith(".json"):
                try:
                    doc = json.loads(self.log.call("read", name, self.log.fs.cat_file, name))
                except (FileNotFoundError, ValueError):
                    continue
                out[doc.get("job") or posixpath.basename(name)[:-5]] = doc
        return out

    def describe(self) -> dict:
        """Partitions with offsets and segment sizes, and each reading job's lag."""
        partitions = []
        ends = {}
        for p in range(self.config.partitions):
            segments = self.segments(p)
            first, end = span(segments)
            ends[p] = end
            partitions.append({"partition": p, "first_offset": first, "end_offset": end,
                               "segments": len(segments), "bytes": sum(s.size for s in segments),
                               "unreadable_segments": [s.path for s in segments if s.error]})
        consumers = {}
        for job, doc in self.consumers().items():
            positions = {int(p): o for p, o in doc.get("offsets", {}).items()}
            lag = {p: max(0, ends[p] - positions.get(p, 0)) for p in ends}
            consumers[job] = {"offsets": positions, "lag": lag, "total_lag": sum(lag.values()),
                              "updated_at": doc.get("updated_at")}
        schema = self.schema()
        return {"topic": self.name, "log": self.log.url, "config": self.config.to_json(),
                "columns": None if schema is None else [f"{f.name}: {f.type}" for f in schema],
                "partitions": partitions, "consumers": consumers}


class LogSource(Source):
    """Read a topic of the log: each partition is a source partition and
    offsets are the log's, so a planned range reads the same records on every
    replay. ``bounded=True`` reads what the topic holds when the flow is
    built, then ends (a batch job over the log); ``bounded={partition:
    offset}`` reads up to those offsets, waiting for producers to get there.
    Several jobs may read one topic; each records its position at every
    checkpoint (``sluiceway log describe`` shows the lag).

    When records the job has not read yet were deleted by retention, the
    job stops with an error saying how far behind it was, unless
    ``on_retention_gap="skip"``: then it continues from the oldest retained
    offset and the gap is recorded in the offsets log and the job's events.
    """

    kind = "log"

    def __init__(self, topic: str, log_dir: str | None = None, *, bounded: bool | dict[int, int] = False,
                 on_retention_gap: str = "fail"):
        if on_retention_gap not in ("fail", "skip"):
            raise FlowDefinitionError(f"on_retention_gap must be 'fail' or 'skip', got {on_retention_gap!r}")
        self.log_dir = absolute_url(log_dir) if log_dir else default_log_dir()
        self.topic_name = topic
        self.on_retention_gap = on_retention_gap
        try:
            handle = Log(self.log_dir).topic(topic)
        except SourceError as exc:
            raise FlowDefinitionError(str(exc)) from None
        self.partitions = handle.config.partitions
        if isinstance(bounded, dict):
            if sorted(bounded) != list(range(self.partitions)):
                raise FlowDefinitionError(f"LogSource bounded= needs an offset for each partition 0..{self.partitions - 1} "
                                          f"of topic {topic!r}, got {sorted(bounded)}")
            self.ends = [int(bounded[p]) for p in range(self.partitions)]
        else:
            self.ends = [handle.offsets(p)[1] for p in range(self.partitions)] if bounded else None
        self._topic: Topic | None = handle

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_topic"] = None
        return state

    @property
    def topic(self) -> Topic:
        if self._topic is None:
            self._topic = Log(self.log_dir).topic(self.topic_name)
        return self._topic

    def partition_count(self) -> int:
        return self.partitions

    def readable(self, partition: int, now: float, started_at: float) -> tuple[int, int]:
        first, end = self.topic.offsets(partition)
        if self.ends is not None:
            end = min(end, self.ends[partition])
        return first, end

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        return self.readable(partition, now, started_at)[1]

    def end_offset(self, partition: int) -> int | None:
        return None if self.ends is None else self.ends[partition]

    def skip_gap(self, partition: int, expected: int, first: int) -> int:
        if self.on_retention_gap == "skip":
            return first
        raise SourceError(
            f"partition {partition} of topic {self.topic_name!r}: the job's next offset {expected} was deleted by "
            f"retention (the oldest retained offset is {first}: {first - expected} records were never read). "
            "Read the topic with LogSource(..., on_retention_gap='skip') to continue from the oldest retained "
            "offset and record the gap"
        )

    def read_batch(self, partition: int, start: int, stop: int) -> tuple[pa.Table, pa.Table | None]:
        return self.topic.read_with_dead_letters(partition, start, stop)

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        return self.read_batch(partition, start, stop)[0]

    def checkpointed(self, job: str, next_offsets: dict[int, int]) -> None:
        self.topic.record_consumer(job, next_offsets)

    def describe(self) -> dict:
        return {"kind": self.kind, "log": self.log_dir, "topic": self.topic_name, "partitions": self.partitions,
                "bounded": self.ends is not None, "on_retention_gap": self.on_retention_gap}
