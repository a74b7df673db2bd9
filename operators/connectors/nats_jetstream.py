"""NATS JetStream as a source (``pip install 'sluiceway[nats]'``).

A partition is a whole stream (``streams=[...]``) or one subject filter of
a stream (``stream=..., subjects=[...]``). JetStream numbers each stream's
messages 1, 2, 3, ...: a message of sequence ``n`` has the offset ``n - 1``,
so a planned range ``[start, stop)`` is the partition's messages of
sequence ``start + 1`` to ``stop``, read again by a throwaway consumer that
starts at that sequence (a subject's messages are sparse in its stream's
sequence: a range may hold fewer messages than offsets). The job keeps its
position in its checkpoints; JetStream keeps no consumer for it. Messages
the stream's limits deleted before the job read them stop the job, or are
skipped with ``skip_deleted=True``.

Each message's payload is a JSON object with the schema's columns;
``subject_column``, ``sequence_column`` and ``time_column`` add the
message's subject, stream sequence and publish time.
"""

from __future__ import annotations

import asyncio
import datetime
import threading

import pyarrow as pa

from sluiceway.operators.connectors import requires
from sluiceway.operators.connectors.codec import ServerDeadline, bounded_ends, call_server, check_schema, decode_json
from sluiceway.operators.errors import FlowDefinitionError, SourceError
from sluiceway.operators.sources import Lag, Source

_PAGE = 5000  # messages per fetch


def _nats():
    return requires("nats", "NATS JetStream", "nats")


async def _quiet(exc: Exception) -> None:
    """nats-py prints connection errors by default; a failed call here is retried and reported instead."""


class _Loop:
    """An event loop on a thread of its own, with one connection to the
    server, so that the synchronous source protocol can await nats-py."""

    def __init__(self, url: str, deadline_s: float):
        self.url, self.deadline_s = url, deadline_s
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="sluiceway-nats", daemon=True).start()
        self.nc = None
        self.on_wait = None

    async def _js(self):
        nats = _nats()
        if self.nc is None or self.nc.is_closed:
            # One attempt at most: nats-py reads max_reconnect_attempts=0 as "no limit" and would wait here, silent,
            # for as long as the server is down; a failure goes back to call(), which says the job waits.
            self.nc = await asyncio.wait_for(
                nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=1, reconnect_time_wait=0.05,
                             allow_reconnect=False, error_cb=_quiet), timeout=10)
        return self.nc.jetstream(timeout=10)

    def call(self, what: str, fn):
        """``await fn(jetstream)``, retried while the server cannot be reached."""
        nats = _nats()
        unreachable = (nats.errors.NoServersError, nats.errors.ConnectionClosedError, nats.errors.TimeoutError,
                       nats.errors.StaleConnectionError, nats.errors.UnexpectedEOF, nats.js.errors.ServiceUnavailableError,
                       ConnectionError, OSError, asyncio.TimeoutError)

        async def attempt():
            try:
                return await fn(await self._js())
            except unreachable:
                if self.nc is not None:
                    try:
                        await self.nc.close()
                    except Exception:  # noqa: BLE001 - the connection is gone either way
                        pass
                self.nc = None
                raise

        return call_server(what, f"NATS at {self.url}",
                           lambda: asyncio.run_coroutine_threadsafe(attempt(), self.loop).result(),
                           self.deadline_s, self.on_wait, retry_on=unreachable)


class NatsJetStreamSource(ServerDeadline, Source):
    """Messages of JetStream streams, a partition per stream or per subject (see the module)."""

    kind = "nats"

    def __init__(self, url: str, schema, *, stream: str | None = None, subjects: list[str] | None = None,
                 streams: list[str] | None = None, subject_column: str | None = None,
                 sequence_column: str | None = None, time_column: str | None = None, skip_deleted: bool = False,
                 bounded: bool | dict[int, int] = False, connect_deadline_s: float | None = None):
        if (stream is None) == (streams is None):
            raise FlowDefinitionError("NatsJetStreamSource needs stream='NAME' (with subjects=[...] for a "
                                      "partition per subject) or streams=['A', 'B'] (a partition per stream)")
        if streams is not None:
            if subjects is not None:
                raise FlowDefinitionError("NatsJetStreamSource: subjects=[...] go with stream=, not with streams=")
            self.partitions = [(s, None) for s in streams]
        else:
            self.partitions = [(stream, s) for s in subjects] if subjects else [(stream, None)]
        if not self.partitions or not all(isinstance(s, str) and s for s, _ in self.partitions):
            raise FlowDefinitionError(f"NatsJetStreamSource needs stream names, got {stream or streams!r}")
        if not isinstance(url, str) or not url.startswith(("nats://", "tls://")):
            raise FlowDefinitionError(f"NatsJetStreamSource url must be nats://host:port, got {url!r}")
        self.url = url
        self.schema = check_schema(schema, "NatsJetStreamSource")
        self.subject_column, self.sequence_column, self.time_column = subject_column, sequence_column, time_column
        self.skip_deleted = skip_deleted
        self.connect_deadline_s = connect_deadline_s
        self._loop = None
        self.ends = None
        self.ends = bounded_ends(self, bounded)

    def __getstate__(self):
        return {**self.__dict__, "_loop": None}

    @property
    def client(self) -> _Loop:
        if self._loop is None:
            self._loop = _Loop(self.url, self.connect_deadline_s)
        return self._loop

    def _name(self, partition: int) -> str:
        stream, subject = self.partitions[partition]
        return stream if subject is None else f"{stream} ({subject})"

    def bind(self, storage, step: str) -> None:
        nats = _nats()
        self.client.on_wait = storage.on_wait
        for stream, subject in self.partitions:
            async def check(js, stream=stream):
                try:
                    return await js.stream_info(stream)
                except nats.js.errors.NotFoundError:
                    return None
            info = self.client.call("find stream on", check)
            if info is None:
                raise SourceError(f"NATS JetStream stream {stream!r} does not exist at {self.url}: create it "
                                  "(nats stream add, or JetStreamManager.add_stream) or fix the name")

    def partition_count(self) -> int:
        return len(self.partitions)

    async def _first_last(self, js, partition: int) -> tuple[int, int]:
        nats = _nats()
        stream, subject = self.partitions[partition]
        state = (await js.stream_info(stream)).state
        first = state.first_seq - 1 if state.messages else state.last_seq  # what the limits deleted is before it
        if subject is None:
            return first, state.last_seq
        try:
            last = await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return first, first  # nothing on this subject now
        return first, last.seq

    def readable(self, partition: int, now: float, started_at: float) -> tuple[int, int]:
        first, latest = self.client.call("read", lambda js: self._first_last(js, partition))
        if self.ends is not None:
            latest = min(latest, self.ends[partition])
        return min(first, latest), latest

    def end_offset(self, partition: int) -> int | None:
        return None if self.ends is None else self.ends[partition]

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        return self.readable(partition, now, started_at)[1]

    def skip_gap(self, partition: int, expected: int, first: int) -> int:
        if self.skip_deleted:
            return first
        raise SourceError(f"NATS stream {self._name(partition)}: messages of sequence {expected + 1} to {first} "
                          "were deleted by the stream's limits before the job read them; raise the limits or "
                          "pass skip_deleted=True to go on without them")

    async def _consumer(self, js, partition: int, start: int):
        """A throwaway consumer of ``partition`` from offset ``start`` (sequence ``start + 1``)."""
        api = _nats().js.api
        stream, subject = self.partitions[partition]
        info = await js.add_consumer(stream, api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start + 1,
            ack_policy=api.AckPolicy.NONE, filter_subject=subject, inactive_threshold=30.0))
        return info

    def lag(self, partition: int, start: int, latest: int, now: float) -> Lag:
        nats = _nats()
        stream, subject = self.partitions[partition]

        async def measure(js):
            info = await self._consumer(js, partition, start)
            await js.delete_consumer(stream, info.name)
            if info.num_pending == 0:
                return Lag(0)
            try:  # the oldest one's publish time
                first = await js.get_msg(stream, seq=start + 1, subject=subject, next=subject is not None)
            except nats.js.errors.NotFoundError:  # deleted meanwhile
                return Lag(info.num_pending)
            return Lag(info.num_pending, max(0.0, now - first.time.timestamp()))

        return self.client.call("measure", measure)

    async def _fetch(self, js, partition: int, start: int, stop: int) -> list:
        stream, _ = self.partitions[partition]
        info = await self._consumer(js, partition, start)
        if info.num_pending == 0:
            await js.delete_consumer(stream, info.name)
            return []
        sub = await js.pull_subscribe_bind(info.name, stream=stream)
        out = []
        try:
            while True:
                # The server holds more of the range (the consumer counts it pending): a fetch that times out
                # is a server that did not answer, retried, never the end of the range.
                batch = await sub.fetch(min(_PAGE, max(1, stop - start)), timeout=5)
                for msg in batch:
                    if msg.metadata.sequence.stream > stop:
                        return out
                    out.append(msg)
                last = batch[-1].metadata
                if last.sequence.stream >= stop or last.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
            await js.delete_consumer(stream, info.name)
        return out

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        return self.read_batch(partition, start, stop)[0]

    def read_batch(self, partition: int, start: int, stop: int) -> tuple[pa.Table, pa.Table | None]:
        msgs = self.client.call("read", lambda js: self._fetch(js, partition, start, stop))
        seqs = [m.metadata.sequence.stream for m in msgs]
        rows, dead = decode_json([m.data for m in msgs], self.schema, f"nats:{self._name(partition)}", partition,
                                 [s - 1 for s in seqs])
        if dead is not None:
            bad = set(dead.column("start_offset").to_pylist())
            msgs = [m for m, s in zip(msgs, seqs) if s - 1 not in bad]
        if self.subject_column:
            rows = rows.append_column(self.subject_column, pa.array([m.subject for m in msgs], pa.string()))
        if self.sequence_column:
            rows = rows.append_column(self.sequence_column,
                                      pa.array([m.metadata.sequence.stream for m in msgs], pa.int64()))
        if self.time_column:
            rows = rows.append_column(self.time_column, pa.array(
                [m.metadata.timestamp.astimezone(datetime.timezone.utc).replace(tzinfo=None) for m in msgs],
                pa.timestamp("us")))
        return rows, dead

    def describe(self) -> dict:
        return {"kind": self.kind, "partitions": len(self.partitions), "server": self.url,
                "streams": [self._name(p) for p in range(len(self.partitions))]}
