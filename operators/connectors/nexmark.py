"""The Nexmark benchmark's event generator as a source: an online auction's
people, auctions and bids.

Every event is a pure function of its number ``n`` (no generator state, no
Python per event), so any offset range is read again exactly on replay. The
mix is Nexmark's: of every 50 events, 1 person, 3 auctions and 46 bids (2%,
6%, 92%). As in the reference generator, half the bids go to a "hot"
auction, most bidders and sellers are "hot" people, a bid's price is
log-uniform between $1 and $1,000,000 (in cents), and event time advances at
``event_rate`` events per second from ``base_time``; ``disorder`` moves each
event's time back by up to that much, for jobs that exercise watermarks.

Event ``n`` is in partition ``n % partitions`` at offset ``n // partitions``.
A row has ``event_type`` (0 person, 1 auction, 2 bid), ``date_time`` and
one struct column per kind (``person``, ``auction``, ``bid``; null for the
other kinds); :func:`persons`, :func:`auctions` and :func:`bids` flatten a
batch to the rows of one kind, with ``date_time``, for ``map_batches``.

>>> src = NexmarkSource(events=100, partitions=2)
>>> t = src.read(0, 0, 25)
>>> [t.column("event_type").to_pylist().count(k) for k in (0, 1, 2)]
[1, 1, 23]
>>> bids(t).column_names
['auction', 'bidder', 'price', 'channel', 'url', 'date_time', 'extra']
>>> src.read(1, 3, 5).equals(NexmarkSource(events=100, partitions=2).read(1, 3, 5))
True
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.errors import FlowDefinitionError
from sluiceway.operators.sources import Source, offsets

PERSON, AUCTION, BID = 0, 1, 2
PROPORTION = 50  # events per round: 1 person, 3 auctions, 46 bids
PERSONS_PER_ROUND, AUCTIONS_PER_ROUND = 1, 3
FIRST_ID = 1000
HOT_RATIO = 100  # hot ids are multiples of this
CATEGORIES = 5  # auction categories 10..14
DEFAULT_BASE_TIME = datetime(2026, 1, 1, tzinfo=timezone.utc)

_TIME = pa.timestamp("ms", tz="UTC")
_DICT = pa.dictionary(pa.int32(), pa.string())  # repeated strings stay dictionary-encoded: no copy per event
PERSON_TYPE = pa.struct([("id", pa.int64()), ("name", _DICT), ("email_address", _DICT),
                         ("credit_card", pa.string()), ("city", _DICT), ("state", _DICT), ("extra", _DICT)])
AUCTION_TYPE = pa.struct([("id", pa.int64()), ("item_name", pa.string()), ("description", pa.string()),
                          ("initial_bid", pa.int64()), ("reserve", pa.int64()), ("expires", _TIME),
                          ("seller", pa.int64()), ("category", pa.int64()), ("extra", _DICT)])
BID_TYPE = pa.struct([("auction", pa.int64()), ("bidder", pa.int64()), ("price", pa.int64()),
                      ("channel", _DICT), ("url", _DICT), ("extra", _DICT)])
SCHEMA = pa.schema([("event_type", pa.int8()), ("date_time", _TIME), ("person", PERSON_TYPE),
                    ("auction", AUCTION_TYPE), ("bid", BID_TYPE)])

_FIRST = ["Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter"]
_LAST = ["Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris"]
_NAMES = pa.array([f"{f} {l}" for f in _FIRST for l in _LAST])
_EMAILS = pa.array([f"{f}@{l.lower()}.example.com" for f in _FIRST for l in _LAST])
_CITIES = pa.array(["Phoenix", "Los Angeles", "San Francisco", "Boise", "Portland", "Bend", "Redmond",
                    "Seattle", "Kent", "Cheyenne"])
_STATES = pa.array(["AZ", "CA", "ID", "OR", "WA", "WY"])
_CHANNELS = pa.array(["Google", "Facebook", "Baidu", "Apple"])
_URLS = pa.array([f"https://www.nexmark.com/{c.lower()}/item.htm?query=1" for c in _CHANNELS.to_pylist()])
_EXTRA = pa.array([""])


def _mix(n: np.ndarray, salt: int) -> np.ndarray:
    """A well-mixed uint64 per event number (splitmix64), different per ``salt``."""
    x = n.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt * 0xBF58476D1CE4E5B9 % 2**64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _below(n: np.ndarray, salt: int, bound) -> np.ndarray:
    """A value in ``[0, bound)`` per event (``bound`` may be an array)."""
    return (_mix(n, salt) % np.asarray(bound, dtype=np.uint64)).astype(np.int64)


def _unit(n: np.ndarray, salt: int) -> np.ndarray:
    return (_mix(n, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _coded(values: pa.Array, codes: np.ndarray) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), values)


def _pick(values: pa.Array, n: np.ndarray, salt: int) -> pa.DictionaryArray:
    return _coded(values, _below(n, salt, len(values)))


def _extra(n: np.ndarray) -> pa.DictionaryArray:
    return _coded(_EXTRA, np.zeros(len(n), dtype=np.int32))


def _last_ids(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The newest person and auction id at event ``n`` (it included)."""
    rnd, r = np.divmod(n, PROPORTION)
    person = FIRST_ID + rnd  # the round's person is its first event
    made = np.minimum(r, AUCTIONS_PER_ROUND + PERSONS_PER_ROUND - 1)  # auctions so far in this round
    auction = FIRST_ID + np.maximum(rnd * AUCTIONS_PER_ROUND + made - 1, 0)
    return person, auction


def _people(n: np.ndarray, last: np.ndarray, salt: int) -> np.ndarray:
    """A person for each event: three in four times a hot one, else one of the last 1000."""
    hot = _below(n, salt, 4) > 0
    hot_id = np.maximum(FIRST_ID, (last // HOT_RATIO) * HOT_RATIO + 1)
    hot_id = np.minimum(hot_id, last)
    recent = np.maximum(FIRST_ID, last - _below(n, salt + 1, np.minimum(last - FIRST_ID + 1, 1000)))
    return np.where(hot, hot_id, recent)


def _persons(n: np.ndarray, when: pa.Array) -> pa.StructArray:
    ids = FIRST_ID + n // PROPORTION
    who = _below(n, 11, len(_NAMES))
    card = pc.cast(pa.array(1000_0000_0000_0000 + _below(n, 13, 9000_0000_0000_0000)), pa.string())
    return pa.StructArray.from_arrays(
        [pa.array(ids), _coded(_NAMES, who), _coded(_EMAILS, who), card, _pick(_CITIES, n, 14),
         _pick(_STATES, n, 15), _extra(n)], fields=list(PERSON_TYPE))


def _auctions(n: np.ndarray, when: pa.Array) -> pa.StructArray:
    rnd, r = np.divmod(n, PROPORTION)
    ids = FIRST_ID + rnd * AUCTIONS_PER_ROUND + (r - PERSONS_PER_ROUND)
    person, _ = _last_ids(n)
    initial = np.round(10 ** (_unit(n, 21) * 4) * 100).astype(np.int64)
    reserve = initial + np.round(10 ** (_unit(n, 22) * 3) * 100).astype(np.int64)
    millis = pc.cast(pc.cast(when, pa.timestamp("ms", tz="UTC")), pa.int64())
    expires = pc.add(millis, pa.array(10_000 + _below(n, 23, 50_000))).cast(_TIME)
    item = pc.binary_join_element_wise(pa.repeat("item", len(n)), pc.cast(pa.array(ids), pa.string()), "-")
    return pa.StructArray.from_arrays(
        [pa.array(ids), item, pc.binary_join_element_wise(item, pa.repeat("for sale", len(n)), " "),
         pa.array(initial), pa.array(reserve), expires, pa.array(_people(n, person, 24)),
         pa.array(10 + _below(n, 26, CATEGORIES)), _extra(n)], fields=list(AUCTION_TYPE))


def _bids(n: np.ndarray, when: pa.Array) -> pa.StructArray:
    person, auction = _last_ids(n)
    hot = _below(n, 31, 2) > 0
    hot_auction = np.maximum(FIRST_ID, (auction // HOT_RATIO) * HOT_RATIO)
    recent = np.maximum(FIRST_ID, auction - _below(n, 32, np.minimum(auction - FIRST_ID + 1, 100)))
    price = np.round(10 ** (_unit(n, 33) * 6) * 100).astype(np.int64)
    channel = _below(n, 34, len(_CHANNELS))
    return pa.StructArray.from_arrays(
        [pa.array(np.where(hot, hot_auction, recent)), pa.array(_people(n, person, 35)), pa.array(price),
         _coded(_CHANNELS, channel), _coded(_URLS, channel), _extra(n)], fields=list(BID_TYPE))


def events(n: np.ndarray, *, event_rate: float, base_ms: int, disorder_ms: int = 0) -> pa.Table:
    """The events numbered ``n`` (an int64 array), as a table of :data:`SCHEMA`."""
    n = np.asarray(n, dtype=np.int64)
    r = n % PROPORTION
    kind = np.where(r < PERSONS_PER_ROUND, PERSON, np.where(r < PERSONS_PER_ROUND + AUCTIONS_PER_ROUND, AUCTION, BID))
    millis = base_ms + np.floor(n * (1000.0 / event_rate)).astype(np.int64)
    if disorder_ms:
        millis = millis - _below(n, 41, disorder_ms + 1)
    when = pa.array(millis, pa.int64()).cast(_TIME)
    columns = {"event_type": pa.array(kind.astype(np.int8)), "date_time": when}
    for name, code, build, kind_type in (("person", PERSON, _persons, PERSON_TYPE),
                                          ("auction", AUCTION, _auctions, AUCTION_TYPE),
                                          ("bid", BID, _bids, BID_TYPE)):
        rows = np.flatnonzero(kind == code)
        part = build(n[rows], when.take(pa.array(rows))) if len(rows) else pa.array([], kind_type)
        position = np.full(len(n), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        columns[name] = part.take(pa.array(position, mask=position < 0))
    return pa.table(columns, schema=SCHEMA)


def _flatten(table: pa.Table, name: str, code: int) -> pa.Table:
    rows = table.filter(pc.equal(table.column("event_type"), code))
    inner = rows.column(name).combine_chunks() if rows.num_rows else pa.array([], SCHEMA.field(name).type)
    fields = {f.name: pc.struct_field(inner, f.name) for f in SCHEMA.field(name).type}
    extra = fields.pop("extra")
    return pa.table({**fields, "date_time": rows.column("date_time"), "extra": extra})


def persons(batch) -> pa.Table:
    """The person events of a batch, flattened: id, name, ..., date_time, extra."""
    return _flatten(pa.table(batch), "person", PERSON)


def auctions(batch) -> pa.Table:
    """The auction events of a batch, flattened: id, item_name, ..., date_time, extra."""
    return _flatten(pa.table(batch), "auction", AUCTION)


def bids(batch) -> pa.Table:
    """The bid events of a batch, flattened: auction, bidder, price, channel, url, date_time, extra."""
    return _flatten(pa.table(batch), "bid", BID)


class NexmarkSource(Source):
    """Nexmark's events over ``partitions`` partitions: ``events`` in all
    (``None``: unbounded), readable at ``rate`` events per second of wall
    clock from the job's first start (``None``: all at once, a backlog;
    required when unbounded). ``event_rate`` is how fast event time advances."""

    kind = "nexmark"

    def __init__(self, events: int | None = None, *, partitions: int = 1, rate: float | None = None,
                 event_rate: float = 10_000, base_time: datetime = DEFAULT_BASE_TIME,
                 disorder: timedelta = timedelta(0)):
        if events is not None and (not isinstance(events, int) or events < 0):
            raise FlowDefinitionError(f"NexmarkSource events must be a non-negative integer or None, got {events!r}")
        if events is None and rate is None:
            raise FlowDefinitionError("an unbounded NexmarkSource (events=None) needs a rate (events per second)")
        if not isinstance(partitions, int) or partitions < 1:
            raise FlowDefinitionError(f"NexmarkSource partitions must be a positive integer, got {partitions!r}")
        if rate is not None and rate <= 0 or event_rate <= 0:
            raise FlowDefinitionError(f"NexmarkSource rate and event_rate must be positive, got {rate!r}, {event_rate!r}")
        if base_time.tzinfo is None:
            raise FlowDefinitionError("NexmarkSource base_time must be timezone-aware (datetime(..., tzinfo=timezone.utc))")
        self.events, self.partitions, self.rate, self.event_rate = events, partitions, rate, float(event_rate)
        self.base_ms = int(base_time.timestamp() * 1000)
        self.disorder_ms = disorder // timedelta(milliseconds=1)

    def partition_count(self) -> int:
        return self.partitions

    def end_offset(self, partition: int) -> int | None:
        if self.events is None:
            return None
        return max(0, -(-(self.events - partition) // self.partitions))

    def latest_offset(self, partition: int, now: float, started_at: float) -> int:
        end = self.end_offset(partition)
        if self.rate is None:
            return end
        paced = math.floor(max(0.0, now - started_at) * self.rate / self.partitions)
        return paced if end is None else min(end, paced)

    def read(self, partition: int, start: int, stop: int) -> pa.Table:
        n = np.asarray(offsets(start, stop)) * self.partitions + partition
        return events(n, event_rate=self.event_rate, base_ms=self.base_ms, disorder_ms=self.disorder_ms)

    def all_events(self) -> pa.Table:
        """Every event of a bounded source in event-number order: for oracles and baselines."""
        if self.events is None:
            raise ValueError("an unbounded NexmarkSource has no 'all events'")
        return events(np.arange(self.events), event_rate=self.event_rate, base_ms=self.base_ms,
                      disorder_ms=self.disorder_ms)

    def describe(self) -> dict:
        return {"kind": self.kind, "partitions": self.partitions, "events": self.events, "rate": self.rate,
                "event_rate": self.event_rate, "disorder_s": self.disorder_ms / 1000}
