"""Event-time windows on keyed streams: tumbling, hopping, sliding, session.

``keyed.window(Tumbling(timedelta(seconds=10))).aggregate([("price", "sum")])``
emits, per key and window, the key column, ``window_start`` and
``window_end`` (``timestamp[us, UTC]``) and the aggregates named as pyarrow
names them (``price_sum``). The four kinds:

- :class:`Tumbling` ``(size)``: fixed, non-overlapping ``[start, start + size)``,
  starts aligned to multiples of ``size`` since the Unix epoch;
- :class:`Hopping` ``(size, hop)``: fixed size, a new window every ``hop``;
  an event is in every window that covers it;
- :class:`Sliding` ``(size)``: as Kafka Streams defines sliding windows: the
  windows are the distinct sets of a key's events within ``size`` of each
  other, each ``[t - size, t]`` ending at an event, or starting just after one;
  both ends are included, and ``window_end`` is the last instant in it;
- :class:`Session` ``(gap)``: per key, events less than ``gap`` apart share a
  session ``[first, last + gap)``; a late event that bridges two sessions
  merges them.

A window fires once, with its final result, when the watermark reaches its
end plus the allowed lateness (``emit="final"``, the default); with
``emit="updates"`` it emits its current result every epoch an event lands in
it instead (an upsert changelog keyed by key and ``window_start``). An event
that arrives after a window it belongs to has fired goes to the ``late()``
stream (still counted in the windows it is not late for), and is counted in
the epoch's ``late`` metric: nothing is dropped silently.

Everything is vectorized over the epoch: window ids are computed with
numpy/Arrow kernels and one ``TableGroupBy`` groups by key and window.
Tumbling, hopping and session aggregates keep one row of accumulators per key
and window; sliding windows and user reducers (``reduce``, ``fold``) keep the
window's events until it fires. State lives in key groups, and closed
windows are purged, so it stays bounded on an unbounded stream.

>>> import pyarrow as pa
>>> from datetime import datetime, timezone
>>> from sluiceway.operators.base import OperatorContext
>>> t = [datetime(2026, 1, 1, 0, 0, s, tzinfo=timezone.utc) for s in (1, 4, 12)]
>>> op = Window("user", "ts", Tumbling(timedelta(seconds=10)), aggregate=[("n", "sum")])
>>> logic = op.build(OperatorContext("w", 0, 1, 128), None)
>>> logic.process(pa.table({"user": ["a", "a", "a"], "ts": t, "n": [1, 2, 3]}))
>>> fired = logic.on_epoch_end(1, to_micros(datetime(2026, 1, 1, 0, 0, 10, tzinfo=timezone.utc)))
>>> [(r["user"], r["window_start"].second, r["window_end"].second, r["n_sum"]) for r in fired.to_pylist()]
[('a', 0, 10, 3)]
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.aggregate import Accumulators
from sluiceway.operators.base import KeyedLogic, Operator, OperatorContext, OperatorLogic, Outputs
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError, missing_columns
from sluiceway.operators.event_time import event_micros, micros, to_timestamps
from sluiceway.operators.state import earliest_per_group
from sluiceway.operators.store import KeyedStore

FIRE_GROUPS = 256  # due key groups read, fired and written back together, at most ...
FIRE_ROWS = 1_000_000  # ... and fewer once a batch held more state rows than this (state beyond memory)
START, END, TIME = "__start", "__end", "__t"  # state columns: window bounds ([start, end)), an event's time
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def to_micros(moment: datetime) -> int:
    """A timezone-aware datetime as microseconds since the Unix epoch (a watermark)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


# ----------------------------------------------------------------- the kinds
class _Kind:
    """A window kind: its durations are checked when the flow is built."""

    kind = "window"

    def __post_init__(self):
        for name, value in vars(self).items():
            if micros(value, f"{type(self).__name__} {name}") <= 0:
                raise FlowDefinitionError(f"{type(self).__name__} {name} must be positive, got {value}")


@dataclass(frozen=True)
class Tumbling(_Kind):
    """Fixed, non-overlapping windows of ``size``."""

    size: timedelta
    kind = "tumbling"


@dataclass(frozen=True)
class Hopping(_Kind):
    """Windows of ``size`` starting every ``hop`` (overlapping when ``hop < size``)."""

    size: timedelta
    hop: timedelta
    kind = "hopping"


@dataclass(frozen=True)
class Sliding(_Kind):
    """Kafka Streams' sliding windows: every distinct set of a key's events within ``size`` of each other."""

    size: timedelta
    kind = "sliding"


@dataclass(frozen=True)
class Session(_Kind):
    """Per key, a session closes after ``gap`` without events."""

    gap: timedelta
    kind = "session"


WINDOW_KINDS = (Tumbling, Hopping, Sliding, Session)


def fixed_windows(t: np.ndarray, size: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``[start, start + size)`` with ``start`` a multiple of ``hop``
    that covers each time in ``t``: ``(index into t, start)`` pairs.

    >>> idx, start = fixed_windows(np.array([5, 10]), size=10, hop=5)
    >>> list(zip(idx.tolist(), start.tolist()))
    [(0, 0), (0, 5), (1, 5), (1, 10)]
    """
    last = np.floor_divide(t, hop)
    first = np.floor_divide(t - size, hop) + 1
    counts = np.maximum(last - first + 1, 0)
    idx = np.repeat(np.arange(len(t)), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return idx, (np.repeat(first, counts) + within) * hop


def _key_runs(keys: pa.Array) -> np.ndarray:
    """For keys sorted so equal keys are adjacent: True where a new key begins."""
    n = len(keys)
    change = np.ones(n, dtype=bool)
    if n > 1:
        differs = pc.fill_null(pc.not_equal(keys.slice(1), keys.slice(0, n - 1)), True)
        change[1:] = np.asarray(differs)
    return change


def _stacked(rank: np.ndarray, values: list[np.ndarray], low: int, span: int) -> list[np.ndarray]:
    """Times of different keys moved into disjoint ranges (``rank * span``), so
    one sorted array and one running maximum serve every key at once."""
    if (int(rank[-1]) + 1) * span >= 2**62:
        raise FlowValidationError(None, "window", f"{int(rank[-1]) + 1} keys over {span} µs of event time do not "
                                  "fit one pass; use fewer keys per task (a higher parallelism) or shorter windows")
    base = rank.astype(np.int64) * span
    return [base + (v - low) for v in values]


def session_groups(keys: pa.Array, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Group ids of intervals ``[start, end)`` sorted by key then start: one
    id per run of overlapping intervals of the same key (touching ones do not merge).

    >>> session_groups(pa.array(["a", "a", "a", "b"]), np.array([0, 5, 20, 6]), np.array([10, 15, 30, 16])).tolist()
    [0, 0, 1, 2]
    """
    n = len(start)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.cumsum(_key_runs(keys)) - 1
    low = int(start.min())
    adj_start, adj_end = _stacked(rank, [start, end], low, int(end.max()) - low + 1)
    reach = np.maximum.accumulate(adj_end)
    new = np.ones(n, dtype=bool)
    new[1:] = adj_start[1:] >= reach[:-1]
    return np.cumsum(new) - 1


def sliding_windows(keys: pa.Array, t: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kafka Streams' sliding windows over events sorted by key then time:
    per window, the index of its first event (its key), ``start`` and
    ``last`` (both included); then the events of each window come from
    :func:`window_members`.

    >>> first, start, last = sliding_windows(pa.array(["a"] * 3), np.array([0, 5, 12]), 10)
    >>> sorted(zip(start.tolist(), last.tolist()))
    [(-10, 0), (-5, 5), (1, 11), (2, 12), (6, 16)]
    """
    runs = _key_runs(keys)
    distinct = runs.copy()
    distinct[1:] |= t[1:] != t[:-1]
    pos = np.flatnonzero(distinct)  # first event of each distinct (key, time)
    dt = t[pos]
    new_key = runs[pos]
    # Left windows: one ending at each distinct time.
    starts, lasts, owners = [dt - size], [dt], [pos]
    # Right windows: starting just after a time, when the key has a later event within size + 1.
    has_next = np.zeros(len(pos), dtype=bool)
    has_next[:-1] = ~new_key[1:] & (dt[1:] <= dt[:-1] + 1 + size)
    starts.append(dt[has_next] + 1)
    lasts.append(dt[has_next] + 1 + size)
    owners.append(pos[has_next])
    owner = np.concatenate(owners)
    start, last = np.concatenate(starts), np.concatenate(lasts)
    # A right window may be some event's left window too: keep each (key, start, last) once.
    rank = (np.cumsum(runs) - 1)[owner]
    order = np.lexsort((last, start, rank))
    rank, start, last, owner = rank[order], start[order], last[order], owner[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = (rank[1:] != rank[:-1]) | (start[1:] != start[:-1]) | (last[1:] != last[:-1])
    return owner[keep], start[keep], last[keep]


def window_members(keys: pa.Array, t: np.ndarray, owner: np.ndarray, start: np.ndarray,
                   last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(window, event)`` index pairs: the events (sorted by key then time)
    of each window's key with ``start <= t <= last``."""
    if len(owner) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rank = np.cumsum(_key_runs(keys)) - 1
    low = int(min(t.min(), start.min()))
    span = int(max(t.max(), last.max())) - low + 1
    stacked, = _stacked(rank, [t], low, span)
    w_rank = rank[owner]
    lo_key, hi_key = _stacked(w_rank, [np.maximum(start, low), last], low, span)
    lo = np.searchsorted(stacked, lo_key, side="left")
    hi = np.searchsorted(stacked, hi_key, side="right")
    counts = hi - lo
    window = np.repeat(np.arange(len(owner)), counts)
    event = np.repeat(lo, counts) + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
    return window, event


# ------------------------------------------------------------- the operator
EMIT_MODES = ("final", "updates")


class Window(Operator):
    """Windows over a keyed stream with one of three ways to reduce them:
    ``aggregate`` pairs, ``reduce(fn)`` (``fn(rows: pyarrow.Table) -> dict``
    or a table of result rows, called once per key and window with the
    window's events in time order), or ``fold=(init, fn)`` (``fn(acc, record)
    -> acc`` per event, ``acc`` a dict of output columns: the slow path)."""

    kind = "window"
    stateful = True

    def __init__(self, key: str, time_column: str, spec, *, aggregate=None, reduce: Callable | None = None,
                 fold: tuple | None = None, allowed_lateness: timedelta = timedelta(0), emit: str = "final",
                 rate: bool = False):
        if not isinstance(spec, WINDOW_KINDS):
            raise FlowDefinitionError(
                f"window takes Tumbling(size), Hopping(size, hop), Sliding(size) or Session(gap), got {spec!r}"
            )
        if sum(x is not None for x in (aggregate, reduce, fold)) != 1:
            raise FlowDefinitionError("a window needs exactly one of aggregate pairs, reduce(fn) or fold(init, fn)")
        if emit not in EMIT_MODES:
            raise FlowDefinitionError(f"emit must be 'final' or 'updates', got {emit!r}")
        self.key, self.time_column, self.spec, self.emit, self.rate = key, time_column, spec, emit, rate
        self.lateness = micros(allowed_lateness, "allowed_lateness")
        self.acc = Accumulators(aggregate) if aggregate is not None else None
        if reduce is not None and not callable(reduce):
            raise FlowDefinitionError(f"reduce needs a function rows -> dict, got {reduce!r}")
        if fold is not None and not (isinstance(fold, tuple) and len(fold) == 2 and callable(fold[1])):
            raise FlowDefinitionError("fold needs (init, fn) with fn(acc, record) -> acc")
        self.reduce, self.fold = reduce, fold
        # Tumbling, hopping and session aggregates keep accumulators; the rest keep events.
        self.incremental = self.acc is not None and not isinstance(spec, Sliding)
        if emit == "updates" and not self.incremental:
            raise FlowDefinitionError(
                "emit='updates' works with aggregate(...) on Tumbling, Hopping and Session windows; "
                "sliding windows and reduce/fold emit final results only"
            )
        if self.acc is not None:
            taken = {key, "window_start", "window_end"} & set(self.acc.output_names)
            if taken:
                raise FlowDefinitionError(f"aggregate output column(s) {sorted(taken)} collide with the window's")
        if isinstance(spec, (Tumbling, Hopping)):
            self.size = micros(spec.size, "size")
            self.hop = micros(spec.hop, "hop") if isinstance(spec, Hopping) else self.size
        elif isinstance(spec, Sliding):
            self.size = micros(spec.size, "size")
        else:
            self.gap = micros(spec.gap, "gap")

    @property
    def state_key(self) -> str:
        return self.key

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        return WindowLogic(self, context, restored)

    def describe(self) -> dict:
        spec = {k: v.total_seconds() for k, v in vars(self.spec).items()}
        d = {"kind": self.kind, "key": self.key, "time": self.time_column, "window": self.spec.kind, **spec,
             "allowed_lateness_s": self.lateness / 1e6, "emit": self.emit}
        if self.acc is not None:
            d["pairs"] = [[c, f] for c, f in self.acc.pairs]
        else:
            d["reducer"] = getattr(self.reduce or self.fold[1], "__qualname__", "fn")
        return d

    # Times (µs) each kind derives from an event time t.
    def first_close(self, t: np.ndarray) -> np.ndarray:
        """When the earliest window holding an event at ``t`` closes (before lateness)."""
        if isinstance(self.spec, (Tumbling, Hopping)):
            return (np.floor_divide(t - self.size, self.hop) + 1) * self.hop + self.size
        if isinstance(self.spec, Sliding):
            return t + 1
        return t + self.gap

    def last_close(self, t: np.ndarray) -> np.ndarray:
        """When the latest window that may hold an event at ``t`` closes (sessions: see the logic)."""
        if isinstance(self.spec, (Tumbling, Hopping)):
            return np.floor_divide(t, self.hop) * self.hop + self.size
        return t + self.size + 2  # sliding: its right window ends at t + 1 + size, closes one µs later


class WindowLogic(KeyedLogic):
    """One task's windows: state per key group, the watermark in force, and
    per key group the earliest time anything in it can close (so an epoch
    only opens key groups with something to fire)."""

    def __init__(self, op: Window, context: OperatorContext, restored: dict[int, pa.Table] | None):
        self.op = op
        self.context = context
        self.store = KeyedStore(restored, key=op.key, max_key_groups=context.max_key_groups,
                                budget_bytes=context.state_budget_bytes)
        self.watermark = context.watermark
        self.due: dict[int, int] = {kg: self._due(table) for kg, table in self.store.groups.items()}

    # ---------------------------------------------------------------- input
    def process(self, table: pa.Table) -> Outputs | None:
        if table.num_rows == 0:
            return None
        op = self.op
        wanted = op.acc.wanted(op.key, op.time_column) if op.acc is not None else [op.key, op.time_column]
        if any(c not in table.column_names for c in wanted):
            raise missing_columns(self.context.step, "window", wanted, table.column_names,
                                  "fix the column names in key_by(...), with_event_time(...) or aggregate(...)")
        t, valid = event_micros(table, op.time_column, self.context.step)
        late = [table.filter(pa.array(~valid))] if not valid.all() else []
        if not valid.all():
            table, t = table.filter(pa.array(valid)), t[valid]
        if op.incremental:
            main, late_rows = self._accumulate(table, t)
        else:
            main, late_rows = None, self._keep_events(table, t)
        if late_rows is not None and late_rows.num_rows:
            late.append(late_rows)
        side = {"late": pa.concat_tables(late, promote_options="permissive")} if late else {}
        return Outputs(main, side) if main is not None or side else None

    def _closed(self, close: np.ndarray) -> np.ndarray:
        """Which of these closing times the watermark in force has passed."""
        if self.watermark is None:
            return np.zeros(len(close), dtype=bool)
        return close + self.op.lateness <= self.watermark

    def _touched_state(self, rows: pa.Table) -> list[pa.Table]:
        """The state rows of the keys in ``rows`` (only those: the store
        searches its runs for them, whatever the size of the groups)."""
        old = self.store.get(rows.column(self.op.key))
        return [] if old is None else [old]

    def _write_back(self, merged: pa.Table, keys_of: pa.Table) -> None:
        """Make ``merged`` all the rows of the keys in ``keys_of``, and bring
        their key groups' due times forward to what they now hold."""
        self.store.put(merged, keys_of.column(self.op.key))
        column = END if self.op.incremental else TIME
        for kg, first in earliest_per_group(merged, self.op.key, column, self.context.max_key_groups).items():
            due = self._due_at(first)
            self.due[kg] = min(self.due.get(kg, due), due)

    def _accumulate(self, table: pa.Table, t: np.ndarray) -> tuple[pa.Table | None, pa.Table | None]:
        """Tumbling, hopping, session aggregates: accumulators per key and window."""
        op, key = self.op, self.op.key
        if isinstance(op.spec, Session):
            values = table.select(op.acc.wanted(key))
            rows = pa.table({key: values.column(key), START: t, END: t + op.gap, **op.acc.per_row(values),
                             "__new": pa.repeat(pa.scalar(1, pa.int8()), table.num_rows),
                             "__row": np.arange(table.num_rows)})
            previous = self._touched_state(rows)
            state = [p.append_column("__new", pa.repeat(pa.scalar(0, pa.int8()), p.num_rows))
                     .append_column("__row", pa.repeat(pa.scalar(-1, pa.int64()), p.num_rows)) for p in previous]
            merged, late_idx = self._merge_sessions(pa.concat_tables([rows] + [s.select(rows.column_names)
                                                                               for s in state],
                                                                              promote_options="permissive"))
            late = table.take(pa.array(late_idx)) if len(late_idx) else None
            changed = merged.filter(pc.greater(merged.column("__new"), 0))
            merged = merged.drop_columns(["__new"])
            self._write_back(merged, rows)
            updates = changed.drop_columns(["__new"]) if op.emit == "updates" else None
            return (self._finalize(updates) if updates is not None and updates.num_rows else None), late
        idx, start = fixed_windows(t, op.size, op.hop)
        end = start + op.size
        closed = self._closed(end)
        late_idx = np.unique(idx[closed])
        keep = ~closed
        pairs = table.select(op.acc.wanted(key)).take(pa.array(idx[keep]))
        pairs = pairs.append_column(START, pa.array(start[keep])).append_column(END, pa.array(end[keep]))
        late = table.take(pa.array(late_idx)) if len(late_idx) else None
        if pairs.num_rows == 0:
            return None, late
        partial = op.acc.partial(pairs, [key, START, END])
        previous = self._touched_state(partial)
        if previous:
            combined = pa.concat_tables([partial] + [p.select(partial.column_names) for p in previous],
                                        promote_options="permissive")
            merged = op.acc.merge(combined, [key, START, END])
        else:
            merged = partial
        self._write_back(merged, partial)
        if op.emit != "updates":
            return None, late
        touched = merged.join(partial.select([key, START]), keys=[key, START], join_type="left semi")
        return self._finalize(touched), late

    def _merge_sessions(self, rows: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """Sessions (new events and the open sessions of their keys) merged
        where they overlap; events whose merged session has already closed
        are late (open sessions never have: closed ones were purged)."""
        op, key = self.op, self.op.key
        rows = rows.sort_by([(key, "ascending"), (START, "ascending")])
        start = rows.column(START).to_numpy()
        end = rows.column(END).to_numpy()
        gid = session_groups(rows.column(key).combine_chunks(), start, end)
        firsts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
        group_end = np.maximum.reduceat(end, firsts)[gid]
        late = self._closed(group_end)
        late_rows = rows.column("__row").to_numpy()[late]
        rows = rows.filter(pa.array(~late)).append_column("__gid", pa.array(gid[~late]))
        merged = op.acc.merge(rows, [key, "__gid"], extra=[(START, "min", START), (END, "max", END),
                                                        ("__new", "max", "__new")])
        return merged.drop_columns(["__gid"]), np.sort(late_rows)

    def _keep_events(self, table: pa.Table, t: np.ndarray) -> pa.Table | None:
        """Sliding windows and reducers: keep each event until its windows close."""
        op, key = self.op, self.op.key
        kept_columns = table.column_names if op.acc is None else op.acc.wanted(key)
        rows = table.select(kept_columns).append_column(TIME, pa.array(t))
        if isinstance(op.spec, Session):
            late = self._late_for_sessions(rows)
        else:
            late = self._closed(op.first_close(t))
        late_rows = table.filter(pa.array(late)) if late.any() else None
        rows = rows.filter(pa.array(~late))
        if rows.num_rows:
            previous = self._touched_state(rows)
            merged = pa.concat_tables([p.select(rows.column_names) for p in previous] + [rows],
                                      promote_options="permissive")
            self._write_back(merged, rows)
        return late_rows

    def _late_for_sessions(self, rows: pa.Table) -> np.ndarray:
        """Events of this epoch whose session, merged with the kept events of
        their key, has closed already."""
        op, key = self.op, self.op.key
        n = rows.num_rows
        if self.watermark is None:
            return np.zeros(n, dtype=bool)
        candidates = self._closed(rows.column(TIME).to_numpy() + op.gap)
        if not candidates.any():
            return candidates
        previous = self._touched_state(rows.filter(pa.array(candidates)))
        both = pa.concat_tables(
            [pa.table({key: rows.column(key), TIME: rows.column(TIME), "__row": np.arange(n)})]
            + [pa.table({key: p.column(key), TIME: p.column(TIME), "__row": pa.repeat(pa.scalar(-1, pa.int64()),
                                                                                     p.num_rows)})
               for p in previous],
            promote_options="permissive",
        ).sort_by([(key, "ascending"), (TIME, "ascending")])
        t = both.column(TIME).to_numpy()
        gid = session_groups(both.column(key).combine_chunks(), t, t + op.gap)
        firsts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
        group_end = np.maximum.reduceat(t + op.gap, firsts)[gid]
        late = np.zeros(n, dtype=bool)
        row = both.column("__row").to_numpy()
        hit = self._closed(group_end) & (row >= 0)
        late[row[hit]] = True
        return late

    # --------------------------------------------------------------- firing
    def _due(self, table: pa.Table) -> int:
        """The earliest watermark at which something in this group closes."""
        if table.num_rows == 0:
            return 2**63 - 1
        return self._due_at(int(pc.min(table.column(END if self.op.incremental else TIME)).as_py()))

    def _due_at(self, first: int) -> int:
        """The watermark at which a group whose earliest end (or event time) is ``first`` has something to close."""
        if self.op.incremental:
            return first + self.op.lateness
        return int(self.op.first_close(np.asarray([first]))[0]) + self.op.lateness

    def on_epoch_end(self, epoch: int, watermark: int | None) -> pa.Table | None:
        if watermark is None or (self.watermark is not None and watermark <= self.watermark):
            return None
        previous, self.watermark = self.watermark, watermark
        fired = []
        due = sorted(kg for kg, at in self.due.items() if at <= watermark)
        # The due key groups a batch at a time: one read and one write per batch, whatever the groups; batches
        # shrink when their state is large, so a watermark that closes everything never reads all state at once.
        batch, first = FIRE_GROUPS, 0
        while first < len(due):
            groups = due[first:first + batch]
            first += len(groups)
            out, rows = self._fire(groups, previous, watermark)
            if out is not None and out.num_rows:
                fired.append(out)
            if rows > FIRE_ROWS:
                batch = max(1, batch * FIRE_ROWS // rows)
        if not fired or self.op.emit == "updates":
            return None
        out = pa.concat_tables(fired, promote_options="permissive")
        return out.sort_by([("window_end", "ascending"), ("window_start", "ascending"), (self.op.key, "ascending")])

    def _fire(self, groups: list[int], previous: int | None, watermark: int) -> tuple[pa.Table | None, int]:
        """Fire what closed in key groups ``groups``, purge it, and say when each group is due next. Returns
        what fired and how many state rows the groups held."""
        op = self.op
        for kg in groups:
            self.due.pop(kg, None)
        table = self.store.read(groups)
        if table is None:
            return None, 0
        rows = table.num_rows
        if op.incremental:
            out, closed = self._fire_accumulated(table, watermark)
        else:
            table = table.sort_by([(op.key, "ascending"), (TIME, "ascending")])
            out, closed = self._fire_events(table, previous, watermark)
        if closed.any():  # purge: the keys that lost rows go into the next delta
            gone = pc.unique(table.column(op.key).filter(pa.array(closed)).combine_chunks())
            table = table.filter(pa.array(~closed))
            self.store.rewrite(groups, table, op.key, self.context.max_key_groups, changed=gone)
        column = END if op.incremental else TIME
        for kg, first in earliest_per_group(table, op.key, column, self.context.max_key_groups).items():
            self.due[kg] = self._due_at(first)
        return out, rows

    def _fire_accumulated(self, table: pa.Table, watermark: int) -> tuple[pa.Table | None, np.ndarray]:
        """Windows whose end plus lateness the watermark reached: their results, and which rows they were."""
        closed = table.column(END).to_numpy() + self.op.lateness <= watermark
        done = table.filter(pa.array(closed))
        return (self._finalize(done) if done.num_rows else None), closed

    def _fire_events(self, table: pa.Table, previous: int | None, watermark: int) -> tuple[pa.Table | None,
                                                                                            np.ndarray]:
        """Windows over the kept events that close at this watermark (and had
        not closed at the one before), and which events no window still
        open needs. ``table`` is sorted by key then time first, and stays so."""
        op, key = self.op, self.op.key
        t = table.column(TIME).to_numpy()
        keys = table.column(key).combine_chunks()
        if isinstance(op.spec, (Tumbling, Hopping)):
            event, start = fixed_windows(t, op.size, op.hop)
            window_of_pair = _pair_windows(np.cumsum(_key_runs(keys))[event], start)
            w_start = _first_per_window(window_of_pair, start)
            w_end = w_start + op.size
            w_owner = _first_per_window(window_of_pair, event)
            pair_window, pair_event = window_of_pair, event
            last_shown = w_end
            needed_until = op.last_close(t)
        elif isinstance(op.spec, Sliding):
            w_owner, w_start, w_last = sliding_windows(keys, t, op.size)
            pair_window, pair_event = window_members(keys, t, w_owner, w_start, w_last)
            w_end = w_last + 1
            last_shown = w_last
            needed_until = op.last_close(t)
        else:
            gid = session_groups(keys, t, t + op.gap)
            firsts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
            w_owner, w_start = firsts, t[firsts]
            w_end = np.maximum.reduceat(t + op.gap, firsts)
            pair_window, pair_event = gid, np.arange(len(t))
            last_shown = w_end
            needed_until = w_end[gid]
        close = w_end + op.lateness
        due = (close <= watermark) & ((close > previous) if previous is not None else True)
        done = needed_until + op.lateness <= watermark
        if not due.any():
            return None, done
        take = due[pair_window]
        pair_window, pair_event = pair_window[take], pair_event[take]
        return self._reduce(table, keys, w_owner, w_start, last_shown, due, pair_window, pair_event), done

    def _reduce(self, table, keys, w_owner, w_start, w_shown, due, pair_window, pair_event) -> pa.Table:
        op, key = self.op, self.op.key
        ids = np.flatnonzero(due)
        remap = np.full(len(due), -1, dtype=np.int64)
        remap[ids] = np.arange(len(ids))
        pw = remap[pair_window]
        heads = pa.table({key: keys.take(pa.array(w_owner[ids])), "window_start": to_timestamps(w_start[ids]),
                          "window_end": to_timestamps(w_shown[ids])})
        if op.acc is not None:
            pairs = table.select(op.acc.inputs).take(pa.array(pair_event)).append_column("__w", pa.array(pw))
            grouped = op.acc.partial(pairs, ["__w"]).sort_by("__w")
            present = grouped.column("__w").to_numpy()
            out = heads.take(pa.array(present))
            for name, column in zip(op.acc.output_names, op.acc.finalize(grouped, []).columns):
                out = out.append_column(name, column)
            return self._rated(out)
        order = np.lexsort((pair_event, pw))
        pw, pe = pw[order], pair_event[order]
        bounds = np.flatnonzero(np.r_[True, pw[1:] != pw[:-1], True]) if len(pw) else np.zeros(1, dtype=np.int64)
        events = table.drop_columns([TIME])
        rows = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            w = int(pw[a])
            members = events.take(pa.array(pe[a:b]))
            head = {key: heads.column(key)[w].as_py(), "window_start": heads.column("window_start")[w].as_py(),
                    "window_end": heads.column("window_end")[w].as_py()}
            for result in self._call_reducer(members):
                rows.append({**head, **result})
        if not rows:
            return None
        return pa.Table.from_pylist(rows)

    def _call_reducer(self, members: pa.Table) -> list[dict]:
        op = self.op
        if op.reduce is not None:
            result = op.reduce(members)
        else:
            init, fn = op.fold
            result = init() if callable(init) else dict(init)
            for record in members.to_pylist():
                result = fn(result, record)
        if isinstance(result, dict):
            return [result]
        if isinstance(result, pa.Table):
            return result.to_pylist()
        if isinstance(result, list) and all(isinstance(r, dict) for r in result):
            return result
        raise TypeError(f"a window reducer must return a dict (one row), a list of dicts or a pyarrow.Table, "
                        f"got {type(result).__name__}")

    def _finalize(self, merged: pa.Table) -> pa.Table:
        op = self.op
        out = op.acc.finalize(merged, [op.key, START, END])
        out = out.set_column(1, "window_start", pc.cast(out.column(START), pa.int64()).cast(pa.timestamp("us", tz="UTC")))
        out = out.set_column(2, "window_end", pc.cast(out.column(END), pa.int64()).cast(pa.timestamp("us", tz="UTC")))
        return self._rated(out)

    def _rated(self, out: pa.Table) -> pa.Table:
        """With ``rate``: events per second of each window (its count over its length)."""
        if not self.op.rate:
            return out
        seconds = pc.divide(pc.cast(pc.subtract(pc.cast(out.column("window_end"), pa.int64()),
                                                pc.cast(out.column("window_start"), pa.int64())), pa.float64()), 1e6)
        return out.append_column("events_per_s", pc.divide(pc.cast(out.column("count_all"), pa.float64()), seconds))


def _pair_windows(rank: np.ndarray, start: np.ndarray) -> np.ndarray:
    """A dense id per distinct (key rank, start) of ``(event, window)`` pairs."""
    order = np.lexsort((start, rank))
    r, s = rank[order], start[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (r[1:] != r[:-1]) | (s[1:] != s[:-1])
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids


def _first_per_window(window: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` of the first pair of each window id (ids dense from 0)."""
    out = np.empty(int(window.max()) + 1 if len(window) else 0, dtype=values.dtype)
    out[window[::-1]] = values[::-1]
    return out
