"""Redis Streams as a source, and Redis as an idempotent sink (``pip install 'sluiceway[redis]'``).

**Source.** Each stream key is a partition. An entry id ``<ms>-<seq>`` is
the offset ``ms * 2**20 + seq``: offsets grow with ids, and a planned range
``[start, stop)`` is read again with ``XRANGE key <start> (<stop>``, the
same entries on every replay (unless ``XTRIM``/``MAXLEN`` deleted them:
then the job stops and says so, or skips them if asked). No consumer group
is used: the job's checkpoints are its position, and Redis keeps nothing
for it. An entry's fields are the row: either one field holding a JSON
object (``json_field="data"``) or one field per column, cast to the schema.

>>> entry_offset(b"1700000000000-3"), entry_id(entry_offset("1700000000000-3"))
(1782579200000000003, '1700000000000-3')

**Sink.** ``RedisSink(url, key=..., mode="hash"|"set")`` writes each row to
the key made from its key columns: ``HSET`` of its other columns, or
``SET`` of them as one JSON object; a changelog row whose ``_op`` is
``delete`` deletes the key. A subtask writes its whole epoch in one
``MULTI``/``EXEC`` transaction that also records the epoch in a marker key,
and skips an epoch the marker already holds: a replay writes nothing new,
and a key never goes back to an older value.

The sink's key prefix is its place, as a folder is a file sink's: when a run
starts, ``claim`` records the job, job id and sink step in
``sluiceway:owner:<prefix>`` (``SET NX``), and refuses another job, another
sink step, or this job under other checkpoints (its markers would make the
new run skip its epochs), in one line. A prefix without a record whose
marker keys hold epochs of this job and step is adopted by a run with
checkpoint history and refused to one without.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.connectors import requires
from sluiceway.operators.connectors.codec import ServerDeadline, bounded_ends, call_server, check_schema, decode_json
from sluiceway.operators.errors import FlowDefinitionError, SinkError, SinkOwnershipError, SourceError
from sluiceway.operators.sink_guard import owner_record, owner_refusal, untracked_refusal
from sluiceway.operators.sinks import Sink, SinkContext, SinkOwner, SinkWriter
from sluiceway.operators.sources import Lag, Source, dead_letter

_SEQ_BITS = 20
_PAGE = 10_000  # entries per XRANGE call
_COUNT_LIMIT = 100_000  # lag counts entries up to this many, then says "at least"


def entry_offset(entry: bytes | str) -> int:
    """The offset of a stream entry id ``<ms>-<seq>``."""
    text = entry.decode() if isinstance(entry, bytes) else entry
    ms, _, seq = text.partition("-")
    n = int(seq or 0)
    if n >= 1 << _SEQ_BITS:
        raise SourceError(f"Redis entry id {text} has a sequence part over {(1 << _SEQ_BITS) - 1}: sluiceway maps "
                          "ids to offsets as ms * 2**20 + seq; let Redis make the ids (XADD key * ...)")
    return (int(ms) << _SEQ_BITS) | n


def entry_id(offset: int) -> str:
    """The entry id an offset stands for (the smallest id at or after it)."""
    return f"{offset >> _SEQ_BITS}-{offset & ((1 << _SEQ_BITS) - 1)}"


def _redis():
    return requires("redis", "Redis", "redis")


def _server(url: str) -> str:
    parts = urlsplit(url)
    return f"Redis at {parts.hostname or 'localhost'}:{parts.port or 6379}"


class _Client:
    """A connection made on first use and made again after a failure; never pickled."""

    def __init__(self, url: str, deadline_s: float):
        self.url, self.deadline_s = url, deadline_s
        self.server = _server(url)
        self.conn = None
        self.on_wait = None

    def call(self, what: str, fn):
        redis = _redis()

        def attempt():
            if self.conn is None:
                self.conn = redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=5)
            try:
                return fn(self.conn)
            except (redis.ConnectionError, redis.TimeoutError):
                self.conn = None
                raise

        return call_server(what, self.server, attempt, self.deadline_s, self.on_wait,
                           retry_on=(redis.ConnectionError, redis.TimeoutError))


class RedisStreamSource(ServerDeadline, Source):
    """Entries of Redis streams, one partition per stream key.

    ``schema`` names the columns and their types; ``json_field`` is the
    entry field holding a JSON object with them (``None``: each column is
    its own field, cast from its text). ``id_column`` adds the entry id.
    An entry that cannot be decoded becomes a dead letter with its offset.
    ``skip_trimmed=True`` lets the job go on past entries Redis trimmed
    before the job read them (they are lost to it); by default it stops.
    ``bounded=True`` reads what the streams hold when the flow is built,
    then ends; ``bounded={partition: offset}`` reads up to those offsets
    (``entry_offset(id) + 1`` of each stream's last entry to read).
    """

    kind = "redis"

    def __init__(self, url: str, streams: list[str] | str, schema, *, json_field: str | None = None,
                 id_column: str | None = "_id", skip_trimmed: bool = False, bounded: bool | dict[int, int] = False,
                 connect_deadline_s: float | None = None):
        streams = [streams] if isinstance(streams, str) else list(streams)
        if not streams or not all(isinstance(s, str) and s for s in streams):
            raise FlowDefinitionError(f"RedisStreamSource needs streams=[key, ...], got {streams!r}")
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise FlowDefinitionError(f"RedisStreamSource url must be redis://host:port[/db], got {url!r}")
        self.url, self.streams = url, streams
        self.schema = check_schema(schema, "RedisStreamSource")
        self.json_field, self.id_column = json_field, id_column
        self.skip_trimmed = skip_trimmed
        self.connect_deadline_s = connect_deadline_s
        self._client = None
        self.ends = None
        self.ends = bounded_ends(self, bounded)

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    def end_offset(self, partition: int) -> int | None:
        return None if self.ends is None else self.ends[partition]

    @property
    def client(self) -> _Client:
        if self._client is None:
            self._client = _Client(self.url, self.connect_deadline_s)
        return self._client

    def bind(self, storage, step: str) -> None:
        self.client.on_wait = storage.on_wait
        missing = [s for s in self.streams if not self.client.call("find", lambda r, s=s: r.exists(s))]
        if missing:
            raise SourceError(f"Redis stream {', '.join(missing)} does not exist at {self.client.server}: create "
                              "it (XADD, or XGROUP CREATE ... MKSTREAM) or fix the name in streams=[...]")

    def partition_count(self) -> int:
        return len(self.streams)

    def readable(self, partition: int, now: float, started_at: float) -> tuple[int, int]:
        """Offsets are sparse: the oldest readable one is past the highest id
        ever trimmed or deleted (``max-deleted-entry-id``), not the oldest entry."""
        info = self.client.call("read", lambda r: r.xinfo_stream(self.streams[partition]))
        last = info.get("last-entry")
        latest = entry_offset(last[0]) + 1 if last else 0
        if self.ends is not None:
            latest = min(latest, self.ends[partition])
        deleted = info.get("max-deleted-entry-id") or b"0-0"
        return min(entry_offset(deleted) + 1 if deleted not in (b"0-0", "0-0") else 0, latest), latest

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        return self.readable(partition, now, started_at)[1]

    def skip_gap(self, partition: int, expected: int, first: int) -> int:
        if self.skip_trimmed:
            return first
        raise SourceError(f"Redis stream {self.streams[partition]}: entries from {entry_id(expected)} up to "
                          f"{entry_id(first)} were trimmed before the job read them; keep more (MAXLEN) or "
                          "pass skip_trimmed=True to go on without them")

    def plan_stop(self, partition: int, start: int, latest: int, cap: int) -> int:
        key = self.streams[partition]
        if self.client.call("measure", lambda r: r.xlen(key)) <= cap:
            return latest  # the whole stream fits: no need to find the cap-th entry
        ids = self.client.call("read", lambda r: [i for i, _ in r.xrange(key, min=entry_id(start), count=cap)])
        return latest if len(ids) < cap else min(latest, entry_offset(ids[-1]) + 1)

    def lag(self, partition: int, start: int, latest: int, now: float) -> Lag:
        key = self.streams[partition]

        def count(r) -> tuple[int, float | None]:
            ids = [i for i, _ in r.xrange(key, min=entry_id(start), max=entry_id(latest - 1), count=_COUNT_LIMIT)]
            oldest = (now - (entry_offset(ids[0]) >> _SEQ_BITS) / 1000.0) if ids else None
            return len(ids), oldest

        records, oldest = self.client.call("measure", count)
        return Lag(records, None if oldest is None else max(0.0, oldest))

    def _entries(self, partition: int, start: int, stop: int) -> list:
        key, out, low = self.streams[partition], [], entry_id(start)
        while True:
            page = self.client.call("read", lambda r: r.xrange(key, min=low, max=f"({entry_id(stop)}", count=_PAGE))
            out.extend(page)
            if len(page) < _PAGE:
                return out
            low = f"({page[-1][0].decode()}"

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        return self.read_batch(partition, start, stop)[0]

    def read_batch(self, partition: int, start: int, stop: int) -> tuple[pa.Table, pa.Table | None]:
        entries = self._entries(partition, start, stop)
        where = f"redis:{self.streams[partition]}"
        ids = [i for i, _ in entries]
        offsets = [entry_offset(i) for i in ids]
        if self.json_field is not None:
            field = self.json_field.encode()
            rows, dead = decode_json([fields.get(field) for _, fields in entries], self.schema, where, partition,
                                     offsets)
        else:
            rows, dead = self._decode_fields(entries, where, partition, offsets)
        if self.id_column is not None:
            bad = set() if dead is None else set(dead.column("start_offset").to_pylist())
            kept = [i.decode() for i, o in zip(ids, offsets) if o not in bad]
            rows = rows.append_column(self.id_column, pa.array(kept, pa.string()))
        return rows, dead

    def _decode_fields(self, entries: list, where: str, partition: int, offsets: list[int]):
        names = [f.name.encode() for f in self.schema]
        text = {n: pa.array([fields.get(n) for _, fields in entries], pa.binary()) for n in names}
        try:
            return pa.table([pc.cast(text[n.encode()].cast(pa.string()), f.type) for n, f in
                             zip(self.schema.names, self.schema)], schema=self.schema), None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        good, dead = [], []  # the slow path, only for a batch holding an entry that does not fit the schema
        for i, (_, fields) in enumerate(entries):
            try:
                good.append(pa.table([pc.cast(pa.array([fields.get(n)], pa.binary()).cast(pa.string()), f.type)
                                      for n, f in zip(names, self.schema)], schema=self.schema))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                payload = json.dumps({k.decode(errors="replace"): v.decode(errors="replace")
                                      for k, v in fields.items()}).encode()
                dead.append(dead_letter(where, partition, offsets[i], offsets[i] + 1, where,
                                        f"entry fields do not fit the schema: {str(exc).splitlines()[0]}", payload))
        rows = pa.concat_tables(good) if good else self.schema.empty_table()
        return rows, (pa.concat_tables(dead) if dead else None)

    def describe(self) -> dict:
        return {"kind": self.kind, "partitions": len(self.streams), "streams": self.streams,
                "server": _server(self.url)}


def marker_key(job: str, step: str, subtask: int | str) -> str:
    """The key holding the last epoch a sink subtask wrote."""
    return f"sluiceway:sink:{job}:{step}:{subtask}"


class _RedisWriter(SinkWriter):
    def __init__(self, sink: "RedisSink", context: SinkContext):
        self.sink, self.context = sink, context
        self.client = _Client(sink.url, sink.connect_deadline_s)
        self.client.on_wait = context.on_wait
        self.marker = marker_key(context.job, context.step, context.subtask)  # the last epoch written

    def precommit(self, epoch: int, table: pa.Table | None) -> dict:
        redis = _redis()
        commands = self.sink.commands(table) if table is not None and table.num_rows else []

        def write(r) -> bool:
            with r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self.marker)
                        done = pipe.get(self.marker)
                        if done is not None and int(done) >= epoch:
                            pipe.unwatch()
                            return False  # a replay: this subtask wrote the epoch before
                        pipe.multi()
                        for command in commands:
                            pipe.execute_command(*command)
                        pipe.set(self.marker, epoch)
                        pipe.execute()
                        return True
                    except redis.WatchError:  # another run of this subtask wrote meanwhile: look again
                        continue

        wrote = self.client.call("write to", lambda r: write(r))
        return {"subtask": self.context.subtask, "rows": len(commands) if wrote else 0, "written": wrote}


class RedisSink(ServerDeadline, Sink):
    """Rows as Redis keys, idempotent per epoch and subtask (see the module).

    ``key`` is the column (or columns, joined by ``:``) that names each
    row's key, after ``prefix``. ``mode="hash"`` writes the other columns
    with ``HSET`` (a null leaves its field out); ``mode="set"`` writes them
    as one JSON object with ``SET``. A row whose ``_op`` column is
    ``delete`` deletes its key; ``_op`` and ``_lsn`` are not written.
    """

    kind = "redis"

    def __init__(self, url: str, key: str | list[str], *, mode: str = "hash", prefix: str = "",
                 connect_deadline_s: float | None = None):
        if mode not in ("hash", "set"):
            raise FlowDefinitionError(f"RedisSink mode must be 'hash' or 'set', got {mode!r}")
        keys = [key] if isinstance(key, str) else list(key)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise FlowDefinitionError(f"RedisSink needs key= a column name or a list of them, got {key!r}")
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise FlowDefinitionError(f"RedisSink url must be redis://host:port[/db], got {url!r}")
        self.url, self.keys, self.mode, self.prefix = url, keys, mode, prefix
        self.connect_deadline_s = connect_deadline_s

    def open(self, context: SinkContext) -> SinkWriter:
        return _RedisWriter(self, context)

    def commit(self, epoch: int, handles: list[dict]) -> None:
        """Nothing left to do: each subtask's epoch became visible in its one transaction."""

    def claim(self, owner: SinkOwner) -> None:
        """Record ``owner`` in ``sluiceway:owner:<prefix>``, or refuse it (see the module doc)."""
        key = f"sluiceway:owner:{self.prefix}"
        where = f"RedisSink key prefix {self.prefix!r} in {_server(self.url)}"
        markers = marker_key(owner.job, owner.step, "*")  # a new run would skip the epochs they hold
        start_over = f"delete the keys {self.prefix}*, {markers} and {key}"
        client = _Client(self.url, self.connect_deadline_s)
        client.on_wait = self.on_wait

        def claim(r) -> dict | None:
            found = r.get(key)
            if found is None:
                done = r.get(marker_key(owner.job, owner.step, 0))  # subtask 0 marks every epoch it writes
                if done is not None and owner.fresh:
                    output = f"the markers of job {owner.job!r} (sink step {owner.step!r}) through epoch {int(done)}"
                    raise SinkOwnershipError(untracked_refusal(where, "key prefix", output, owner, start_over))
                if r.set(key, json.dumps(owner_record(owner, self.kind)), nx=True):
                    return None
                found = r.get(key)  # another job claimed it at the same moment
            return json.loads(found)

        found = client.call("claim", claim)
        refusal = None if found is None else owner_refusal(where, "key prefix", found, owner, start_over)
        if refusal is not None:
            raise SinkOwnershipError(refusal)

    def location(self) -> str:
        parts = urlsplit(self.url)
        db = parts.path.strip("/") or "0"
        return f"redis://{parts.hostname or 'localhost'}:{parts.port or 6379}/{db}/{self.prefix}*"

    def commands(self, table: pa.Table) -> list[tuple]:
        """The Redis commands for ``table``'s rows, in order.

        >>> sink = RedisSink("redis://localhost", key="customer", prefix="total:")
        >>> sink.commands(pa.table({"customer": ["a", "b"], "sum": [10.5, None], "_op": ["insert", "delete"]}))
        [('DEL', 'total:a'), ('HSET', 'total:a', 'sum', '10.5'), ('DEL', 'total:b')]
        """
        missing = [k for k in self.keys if k not in table.column_names]
        if missing:
            raise SinkError(f"RedisSink key column {', '.join(missing)} is not in the rows (columns: "
                            f"{', '.join(table.column_names)})")
        names = [c for c in table.column_names if c not in self.keys and c not in ("_op", "_lsn")]
        keys = table.column(self.keys[0]).cast(pa.string())
        for k in self.keys[1:]:
            keys = pc.binary_join_element_wise(keys, table.column(k).cast(pa.string()), ":")
        keys = pc.binary_join_element_wise(pa.scalar(self.prefix), keys, "").to_pylist()
        ops = table.column("_op").to_pylist() if "_op" in table.column_names else [None] * table.num_rows
        values = table.select(names).to_pylist()
        out = []
        for key, op, row in zip(keys, ops, values):
            if key is None:
                raise SinkError(f"RedisSink: a row has a null key column ({', '.join(self.keys)}): {row}")
            if op == "delete":
                out.append(("DEL", key))
            elif self.mode == "set":
                out.append(("SET", key, json.dumps(row, default=str, sort_keys=True)))
            else:
                fields = [x for name, v in row.items() if v is not None for x in (name, str(v))]
                out.append(("DEL", key))  # the row replaces the hash: a field that became null goes away
                if fields:
                    out.append(("HSET", key, *fields))
        return out

    def describe(self) -> dict:
        return {"kind": self.kind, "server": _server(self.url), "key": self.keys, "mode": self.mode}


def wait_for_redis(url: str, timeout_s: float = 10.0) -> None:
    """Block until Redis at ``url`` answers PING (for scripts and tests)."""
    redis = _redis()
    deadline = time.time() + timeout_s
    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            return
        except redis.ConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
