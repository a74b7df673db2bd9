"""What the broker sources share: JSON payloads decoded into Arrow in one
pass (dead letters for those that cannot be), and calls to a server that
wait for it with backoff while it is down.

>>> import pyarrow as pa
>>> schema = pa.schema([("sensor", pa.string()), ("value", pa.float64())])
>>> good, bad = decode_json([b'{"sensor": "a", "value": 1.5}', b'not json', b'{"sensor": "b", "value": 2}'],
...                         schema, "redis:readings", 0, [10, 11, 12])
>>> good.to_pylist()
[{'sensor': 'a', 'value': 1.5}, {'sensor': 'b', 'value': 2.0}]
>>> bad.select(["start_offset", "payload"]).to_pylist()
[{'start_offset': 11, 'payload': b'not json'}]
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.json as pajson

from sluiceway.checkpoint.storage import StorageRetry, call_with_retry
from sluiceway.operators.errors import FlowDefinitionError, SourceError
from sluiceway.operators.sources import DEAD_LETTER_SCHEMA, dead_letter

MAX_DEAD_PAYLOAD = 64 * 1024  # a dead letter carries the payload up to this size


def check_schema(schema, who: str) -> pa.Schema:
    """``schema`` as a :class:`pyarrow.Schema`, or a clear error at build time."""
    if isinstance(schema, dict):
        schema = pa.schema(list(schema.items()))
    if not isinstance(schema, pa.Schema) or len(schema) == 0:
        raise FlowDefinitionError(f"{who} needs schema=pa.schema([...]) naming the payload's fields and types, "
                                  f"got {schema!r}")
    return schema


def _parse(payloads: list[bytes], schema: pa.Schema) -> pa.Table:
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    table = pajson.read_json(pa.BufferReader(b"\n".join(payloads)), parse_options=options,
                             read_options=pajson.ReadOptions(use_threads=False))
    if table.num_rows != len(payloads):  # an empty line, or a line holding two objects
        raise pa.ArrowInvalid(f"{len(payloads)} payloads gave {table.num_rows} rows")
    return table.select(schema.names)


def decode_json(payloads: list[bytes | None], schema: pa.Schema, source: str, partition: int,
                offsets: list[int]) -> tuple[pa.Table, pa.Table | None]:
    """One JSON object per payload, read by Arrow's JSON reader in one call.

    When the batch does not parse, halves are parsed until each payload that
    cannot be (not JSON, not an object, a value of the wrong type) is found
    alone: it becomes a dead letter with its offset; the others are decoded
    in order. Returns ``(rows, dead letters or None)`` with
    ``len(rows) + len(dead letters) == len(payloads)``.
    """
    cleaned = [p.replace(b"\n", b" ").replace(b"\r", b" ") if p and (b"\n" in p or b"\r" in p) else p
               for p in payloads]  # a newline outside a string is whitespace; inside one it is invalid JSON
    tables: list[pa.Table] = []
    dead: list[pa.Table] = []

    def visit(lo: int, hi: int) -> None:
        chunk = cleaned[lo:hi]
        if not chunk:
            return
        if all(p for p in chunk):
            try:
                tables.append(_parse(chunk, schema))
                return
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                reason = str(exc).splitlines()[0]
        else:
            reason = "empty payload"
        if hi - lo == 1:
            raw = payloads[lo]
            why = "empty payload" if not raw else f"cannot decode as JSON of schema {_short(schema)}: {reason}"
            dead.append(dead_letter(source, partition, offsets[lo], offsets[lo] + 1, source, why,
                                    raw if raw is not None and len(raw) <= MAX_DEAD_PAYLOAD else None))
            return
        mid = (lo + hi) // 2
        visit(lo, mid)
        visit(mid, hi)

    visit(0, len(payloads))
    rows = pa.concat_tables(tables) if tables else schema.empty_table()
    return rows, (pa.concat_tables(dead) if dead else None)


def bounded_ends(source, bounded: bool | dict[int, int]) -> list[int] | None:
    """The end offsets of a broker source's partitions: ``None`` (unbounded),
    where each partition is now (``True``), or as given (a dict)."""
    n = source.partition_count()
    if isinstance(bounded, dict):
        if sorted(bounded) != list(range(n)):
            raise FlowDefinitionError(f"{type(source).__name__} bounded= needs an offset for each partition "
                                      f"0..{n - 1}, got {sorted(bounded)}")
        return [int(bounded[p]) for p in range(n)]
    if bounded:
        return [source.readable(p, 0.0, 0.0)[1] for p in range(n)]
    return None


def _short(schema: pa.Schema) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "}"


def empty_dead_letters() -> pa.Table:
    return DEAD_LETTER_SCHEMA.empty_table()


class ServerDeadline:
    """For a source or sink that waits for a server: how long it retries
    connecting. ``connect_deadline_s`` when the user gave one, else the
    run's storage deadline (``--storage-deadline``, which
    :func:`sluiceway.jobs.runner.set_server_deadline` sets as
    ``run_deadline_s``): one deadline for every wait of a job.

    >>> class Server(ServerDeadline):
    ...     def __init__(self, connect_deadline_s=None):
    ...         self.connect_deadline_s = connect_deadline_s
    >>> s = Server(); s.run_deadline_s = 5.0
    >>> s.connect_deadline_s, Server(30.0).connect_deadline_s
    (5.0, 30.0)
    """

    own_deadline_s: float | None = None
    run_deadline_s: float = StorageRetry.deadline_s

    @property
    def connect_deadline_s(self) -> float:
        return self.run_deadline_s if self.own_deadline_s is None else self.own_deadline_s

    @connect_deadline_s.setter
    def connect_deadline_s(self, value: float | None) -> None:
        self.own_deadline_s = value


def call_server(what: str, server: str, fn, deadline_s: float, on_wait=None, *, retry_on=Exception,
                error=SourceError, address: str = "URL"):
    """``fn()``, retried with backoff (0.1 s doubling to 5 s) while ``server``
    cannot be reached; ``on_wait`` hears "waiting" and "resumed", so the job
    shows what it waits for. Past ``deadline_s``: ``error`` naming the
    server, the cause and what to check (the server, and its ``address``)."""

    def give_up(cause: str, waited_s: float) -> Exception:
        return error(f"{cause.splitlines()[0]} (kept failing for {waited_s:.0f} s, past the {deadline_s:g} s "
                     f"connect deadline: --storage-deadline, or the connector's connect_deadline_s); check that the "
                     f"server runs and the {address} is right")

    return call_with_retry(what, server, fn, StorageRetry(deadline_s, 0.1, 5.0), on_wait,
                           retry_on=retry_on, give_up=give_up)
