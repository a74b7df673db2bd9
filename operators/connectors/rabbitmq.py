"""RabbitMQ queues as a source (``pip install 'sluiceway[rabbitmq]'``).

An AMQP queue hands a message to one consumer, deletes it on
acknowledgement, may deliver it again after a crash, and cannot replay. So
the source keeps a **write-ahead copy**, like Spark's receiver log: when the
coordinator plans an epoch it takes the messages the queue has for it
(unacknowledged: ``max_unacked`` at most), drops those it already holds
(recognised by their AMQP ``message_id``; without one, by a hash of the
body), and appends the rest to a log of the job's own
(``<checkpoints>/<job>/sources/<step>/wal``, the durable log of
:mod:`~sluiceway.operators.connectors.log`) before the plan names them. The
epoch's tasks read that copy, so a replay reads the same messages. A
message is acknowledged to RabbitMQ only after the checkpoint that covers
its copy completes; one delivered again after that (the job died between
the checkpoint and the acknowledgement) is acknowledged at once and never
processed twice.

The copy's partitions are the job's parallelism over one queue: its
messages are spread over ``partitions`` in turn, and the source tasks
share the work (load balancing). Several jobs that each read their own
queue bound to one exchange (``exchange=``) each get every message
(fan-out).

**Ordering.** With ``partitions=1``, messages are processed in the order
the queue delivered them; a message delivered again after a failure of
the *broker* connection comes when RabbitMQ redelivers it (later). With
several partitions there is no order between partitions.
"""

from __future__ import annotations

import hashlib
import posixpath
import time
from urllib.parse import urlsplit

import pyarrow as pa

from sluiceway.operators.connectors import requires
from sluiceway.operators.connectors.codec import ServerDeadline, call_server, check_schema, decode_json
from sluiceway.operators.errors import FlowDefinitionError, SourceError
from sluiceway.operators.sources import Source

WAL_SCHEMA = pa.schema([("message_id", pa.string()), ("body", pa.binary()), ("routing_key", pa.string()),
                        ("redelivered", pa.bool_()), ("received_at", pa.timestamp("us", "UTC"))])
_TOPIC = "messages"


def _pika():
    return requires("pika", "RabbitMQSource", "rabbitmq")


def message_key(message_id: str | None, body: bytes) -> str:
    """What recognises a message delivered again: its ``message_id``, else a hash of its body.

    >>> message_key("order-7", b"{}"), message_key(None, b"{}")[:14]
    ('order-7', 'sha256:44136fa')
    """
    return message_id if message_id else "sha256:" + hashlib.sha256(body).hexdigest()


class RabbitMQSource(ServerDeadline, Source):
    """Messages of a RabbitMQ queue, each a JSON object with the schema's columns (see the module).

    ``queue`` must exist, unless ``exchange`` is given: then a durable queue
    of that name is declared and bound to the exchange (``routing_key``).
    ``id_column`` adds each message's id. Undecodable bodies become dead
    letters with their offset in the copy.
    """

    kind = "rabbitmq"

    def __init__(self, url: str, queue: str, schema, *, exchange: str | None = None, routing_key: str = "",
                 partitions: int = 1, max_unacked: int = 50_000, id_column: str | None = None,
                 wal_retention_s: float = 7 * 24 * 3600.0, connect_deadline_s: float | None = None):
        if not isinstance(url, str) or not url.startswith(("amqp://", "amqps://")):
            raise FlowDefinitionError(f"RabbitMQSource url must be amqp://user:password@host:port/vhost, got {url!r}")
        if not isinstance(queue, str) or not queue:
            raise FlowDefinitionError(f"RabbitMQSource needs a queue name, got {queue!r}")
        if not isinstance(partitions, int) or partitions < 1:
            raise FlowDefinitionError(f"RabbitMQSource partitions must be a positive integer, got {partitions!r}")
        if max_unacked < 1:
            raise FlowDefinitionError(f"RabbitMQSource max_unacked must be positive, got {max_unacked!r}")
        self.url, self.queue, self.exchange, self.routing_key = url, queue, exchange, routing_key
        self.schema = check_schema(schema, "RabbitMQSource")
        self.partitions, self.max_unacked, self.id_column = partitions, max_unacked, id_column
        self.wal_retention_s, self.connect_deadline_s = wal_retention_s, connect_deadline_s
        self._reset()

    def _reset(self) -> None:
        self._topic = None
        self._conn = self._channel = None
        self._on_wait = None
        self._held: dict[str, tuple[int, int]] | None = None  # message key -> (partition, offset) in the copy
        self._pending: dict[tuple[int, int], int] = {}  # (partition, offset) -> delivery tag not yet acknowledged
        self._released: dict[int, int] = {}  # partition -> offsets below it are covered by a checkpoint
        self._turn = 0
        self._generation = 0  # counts connections: a delivery tag is only good on the channel that received it

    def __getstate__(self):
        keep = ("url", "queue", "exchange", "routing_key", "schema", "partitions", "max_unacked", "id_column",
                "wal_retention_s", "own_deadline_s", "run_deadline_s", "_wal_url")
        return {k: v for k, v in self.__dict__.items() if k in keep}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _server(self) -> str:
        parts = urlsplit(self.url)
        return f"RabbitMQ at {parts.hostname or 'localhost'}:{parts.port or 5672}"

    # ------------------------------------------------------------ set up
    def bind(self, storage, step: str) -> None:
        from sluiceway.operators.connectors.log import Log, TopicConfig

        self._on_wait = storage.on_wait
        self._wal_url = posixpath.join(storage.root_url, storage.job, "sources", step, "wal")
        log = Log(self._wal_url)
        if _TOPIC in log.topics():
            self._topic = log.topic(_TOPIC)
        else:
            try:
                self._topic = log.create_topic(TopicConfig(_TOPIC, self.partitions,
                                                           retention_age_s=self.wal_retention_s))
            except FlowDefinitionError:  # made meanwhile by another process of this job
                self._topic = log.topic(_TOPIC)
        if self._topic.config.partitions != self.partitions:
            raise SourceError(f"RabbitMQSource: this job's copy of the queue has {self._topic.config.partitions} "
                              f"partitions; the flow asks for {self.partitions}. Keep partitions= as it was")
        self._call("check the queue on", self._declare)
        self._close()  # where the source runs as a task it never receives; the coordinator connects again

    def _declare(self, channel) -> None:
        pika = _pika()
        if self.exchange is not None:
            try:
                channel.exchange_declare(self.exchange, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                self._channel = None
                raise SourceError(f"RabbitMQ exchange {self.exchange!r} does not exist at {self._server()}: "
                                  f"declare it or fix exchange= ({exc.reply_text})") from None
            channel.queue_declare(self.queue, durable=True)
            channel.queue_bind(self.queue, self.exchange, routing_key=self.routing_key)
            return
        try:
            channel.queue_declare(self.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            raise SourceError(f"RabbitMQ queue {self.queue!r} does not exist at {self._server()}: declare it, "
                              f"fix the name, or pass exchange= to declare it bound to one ({exc.reply_text})") \
                from None

    def _call(self, what: str, fn):
        """``fn(channel)``, on a connection made on first use and again after a failure
        (whose unacknowledged messages RabbitMQ will deliver again)."""
        pika = _pika()

        def attempt():
            if self._channel is None or not self._channel.is_open:
                self._close()
                self._conn = pika.BlockingConnection(pika.URLParameters(self.url))
                self._channel = self._conn.channel()
                self._channel.basic_qos(prefetch_count=min(self.max_unacked, 65535))
                self._pending.clear()  # those tags died with the old channel
                self._generation += 1
            try:
                return fn(self._channel)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.StreamLostError,
                    pika.exceptions.ChannelWrongStateError, ConnectionError):
                self._close()
                raise

        return call_server(what, self._server(), attempt, self.connect_deadline_s, self._on_wait,
                           retry_on=(pika.exceptions.AMQPConnectionError, pika.exceptions.StreamLostError,
                                     pika.exceptions.ChannelWrongStateError, ConnectionError))

    def _close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _load_held(self) -> None:
        """The message keys already in the copy (to drop what is delivered again)."""
        self._held = {}
        for p in range(self.partitions):
            first, end = self._topic.offsets(p)
            if end > first:
                ids = self._topic.read(p, first, end).column("message_id").to_pylist()
                self._held.update((key, (p, first + i)) for i, key in enumerate(ids))

    # ---------------------------------------------------------- the copy
    def _receive(self) -> None:
        """Take what the queue has, drop what the copy holds, append the rest."""
        if self._held is None:
            self._load_held()

        def drain(channel) -> list:
            got = []
            room = self.max_unacked - len(self._pending)
            for method, props, body in channel.consume(self.queue, inactivity_timeout=0.05):
                if method is None:
                    break
                got.append((method, props, body))
                if len(got) >= room:
                    break
            channel.cancel()
            return got

        received = self._call("receive from", drain) if len(self._pending) < self.max_unacked else []
        generation = self._generation
        fresh, ack_now = [], []
        for method, props, body in received:
            key = message_key(getattr(props, "message_id", None), body)
            if key in self._held:
                where = self._held[key]
                if where[1] < self._released.get(where[0], 0):
                    ack_now.append(method.delivery_tag)  # processed and checkpointed: only the ack was lost
                else:
                    self._pending[where] = method.delivery_tag  # its copy will be checkpointed: ack then
                continue
            self._held[key] = (-1, -1)
            fresh.append((method, key, body))
        if ack_now:  # on a new connection those were handed back: they come again and are acknowledged then
            self._call("acknowledge to",
                       lambda ch: [ch.basic_ack(t) for t in ack_now] if self._generation == generation else None)
        if not fresh:
            return
        now = time.time()
        n = self.partitions
        for j in range(n):
            part = [fresh[i] for i in range(j, len(fresh), n)]
            if not part:
                continue
            p = (self._turn + j) % n
            table = pa.table({"message_id": [k for _, k, _ in part], "body": [b for _, _, b in part],
                              "routing_key": [m.routing_key for m, _, _ in part],
                              "redelivered": [bool(m.redelivered) for m, _, _ in part],
                              "received_at": pa.array([int(now * 1e6)] * len(part), pa.int64()).cast(
                                  pa.timestamp("us", "UTC"))}, schema=WAL_SCHEMA)
            first, _ = self._topic.append_partition(p, table)
            for i, (method, key, _) in enumerate(part):
                self._held[key] = (p, first + i)
                self._pending[(p, first + i)] = method.delivery_tag
        self._turn = (self._turn + 1) % n

    # ------------------------------------------------------------ source
    def partition_count(self) -> int:
        return self.partitions

    def readable(self, partition: int, now: float, started_at: float) -> tuple[int, int]:
        if partition == 0:
            self._receive()
        return self._topic.offsets(partition)

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        return self.readable(partition, now, started_at)[1]

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        return self.read_batch(partition, start, stop)[0]

    def read_batch(self, partition: int, start: int, stop: int) -> tuple[pa.Table, pa.Table | None]:
        copy = self._topic.read(partition, start, stop)
        offsets = list(range(start, start + copy.num_rows))
        rows, dead = decode_json(copy.column("body").to_pylist(), self.schema, f"rabbitmq:{self.queue}", partition,
                                 offsets)
        if self.id_column is not None:
            bad = set() if dead is None else set(dead.column("start_offset").to_pylist())
            ids = [m for m, o in zip(copy.column("message_id").to_pylist(), offsets) if o not in bad]
            rows = rows.append_column(self.id_column, pa.array(ids, pa.string()))
        return rows, dead

    def checkpointed(self, job: str, next_offsets: dict[int, int]) -> None:
        """Acknowledge every message whose copy the checkpoint covers."""
        for p, offset in next_offsets.items():
            self._released[p] = max(self._released.get(p, 0), offset)
        if self._channel is None or not self._channel.is_open:
            self._pending.clear()  # the connection died: RabbitMQ delivers them again, and they are dropped then
            return

        def ack(channel) -> None:  # what is pending now: a reconnection empties it (those tags are gone)
            done = [(where, tag) for where, tag in self._pending.items()
                    if where[1] < self._released.get(where[0], 0)]
            for _, tag in done:
                channel.basic_ack(tag)
            for where, _ in done:
                self._pending.pop(where, None)

        self._call("acknowledge to", ack)

    def queue_depth(self) -> int:
        """Messages ready in the queue (not yet delivered to the job)."""
        return self._call("measure the queue on",
                          lambda ch: ch.queue_declare(self.queue, passive=True).method.message_count)

    def describe(self) -> dict:
        return {"kind": self.kind, "partitions": self.partitions, "server": self._server(), "queue": self.queue,
                "exchange": self.exchange}
