"""Keyed state as sorted runs: an epoch costs what it changes, not what is kept.

One step's state in one task is a stack of *runs* (an LSM tree): Arrow
tables sorted by a 64-bit *position* made from the key (its key group in the
top bits, its stable hash below), oldest first, so each run holds every key
group as one contiguous slice. The newest run that holds a key holds all of
that key's current rows; a tombstone (``__deleted``) says the key is gone.

- **Writes** (:meth:`KeyedStore.put`) become a *fresh* run of their own:
  an epoch costs one sort of its rows. The fresh runs (the changes since the
  last checkpoint, in memory) are merged when there are more than
  :data:`MAX_FRESH` of them.
- **Reads** (:meth:`KeyedStore.get`) search each run for the epoch's keys
  (``numpy.searchsorted`` on the positions, then a check of the keys
  themselves): O(keys × log state) per run, no per-row Python, and no read of
  anything else.
- **Checkpoints** (:meth:`KeyedStore.take_changes`) merge the fresh runs into
  a new run and hand it, one slice per key group, to the runtime to write. The
  new run is merged into the runs above the bottom while they are less than
  :data:`TIER_RATIO` times its size (size-tiered compaction). The bottom run
  (the oldest, nearly all of the state) is kept as segments of key groups;
  the run above it is merged into it a window of key groups per checkpoint
  (about :data:`DRAIN_ROWS` rows), so no checkpoint rewrites the state
  whole, and a row is rewritten O(log(state / changes)) times in its life.
  A key group's chain in the manifest (:meth:`KeyedStore.chains`) is its
  slice of each run.
- **Restore is lazy**: a restored store starts with the manifest's chains
  only; the first read of a key group fetches its files (through
  :class:`RestoredState`) and puts its rows into the bottom run.
- **Memory**: runs beyond the budget (``budget_bytes``) are written to a
  local file and memory-mapped, so state larger than memory stays on the
  node's disk and the operating system pages in what the searches touch.

>>> store = KeyedStore(key="k")
>>> store.put(pa.table({"k": ["b", "a"], "n": [2, 1]}))
>>> store.get(pa.array(["a", "z"])).to_pylist()
[{'k': 'a', 'n': 1}]
>>> store.delete(pa.array(["a"]))
>>> store.get(pa.array(["a", "b"])).to_pylist()
[{'k': 'b', 'n': 2}]
>>> {kg: t.to_pylist() for kg, t in store.take_changes().runs.items()}
{121: [{'k': 'b', 'n': 2}]}
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.keys import key_groups as groups_of, stable_hash
from sluiceway.operators.state import (DELETED_COLUMN, RestoredState, StateChanges, apply_chain, concat, live_rows,
                                       split_by_key_group)

TIER_RATIO = 4  # a new run is merged into the one below it while that one is under TIER_RATIO times its size
MAX_RUNS = 8  # runs per store, at most: past it the newest ones are merged whatever their sizes
DEFAULT_STATE_BUDGET_MB = 512  # state a task keeps in memory per step; the rest is mapped from local disk
DEFAULT_BUDGET_BYTES = DEFAULT_STATE_BUDGET_MB * 2**20
DRAIN_ROWS = 2_000_000  # rows of the bottom (and of the run merged into it) one checkpoint rewrites, at least
MAX_FRESH = 4  # fresh runs (epochs' writes since the last checkpoint) before they are merged into one
PREFETCH_PER_CHECKPOINT = 16  # key groups of a lazy restore fetched at each checkpoint, touched or not
POSITION = "__pos"  # the sort column: key group << 48 | the top 48 bits of the key's stable hash
_SHIFT = np.uint64(48)


@dataclass
class StoreCounters:
    """What the store touched since :meth:`KeyedStore.reset_touched`: key
    groups read and written, rows read from runs, written by the operator and
    rewritten by compaction, and state references fetched (the structural
    measure of an epoch's cost)."""

    reads: set = field(default_factory=set)
    writes: set = field(default_factory=set)
    rows_read: int = 0
    rows_written: int = 0
    rows_merged: int = 0
    fetched: int = 0


@dataclass
class _Run:
    """One sorted run: its rows, their positions (a numpy view), and per key
    group the chain of ``[file, batch]`` references that hold its slice once
    written (several for the restored bottom run)."""

    table: pa.Table
    refs: dict[int, list] = field(default_factory=dict)
    mapped: bool = False
    lo: int | None = None  # a segment of the bottom run: the key groups lo <= kg < hi it covers
    hi: int | None = None

    def __post_init__(self):
        self.table = self.table.combine_chunks()
        self.positions = _positions_of(self.table)

    @property
    def rows(self) -> int:
        return self.table.num_rows



class KeyedStore:
    """Keyed state of one step in one task (see the module's text).

    ``restored`` is a :class:`RestoredState` (fetched lazily), a
    ``{key_group: table}`` dict (in memory), or ``None``. ``key`` names the
    column that identifies state rows; several rows may share a key, and
    writing a key replaces all of its rows."""

    def __init__(self, restored: RestoredState | dict[int, pa.Table] | None = None, *, key: str,
                 max_key_groups: int = 128, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        if max_key_groups >= 2**16:
            raise ValueError(f"max_key_groups must be under 65536, got {max_key_groups}")
        self.key = key
        self.max_key_groups = max_key_groups
        self.budget_bytes = budget_bytes
        self.bottom: list[_Run] = []  # the oldest run, as segments of key groups in order
        self.upper: list[_Run] = []  # the runs above it, oldest first
        self.fresh: list[_Run] = []  # changes since the last checkpoint, oldest first, with tombstones
        self._cursor: int | None = None  # upper[0] is being merged into the bottom from this key group on
        self._top: _Run | None = None  # the runs the last take_changes handed out to write
        self._drained: _Run | None = None
        self.counters = StoreCounters()
        self._restored = restored if isinstance(restored, RestoredState) else None
        self._pending: dict[int, list] = {}  # restored key groups not fetched yet: their chains
        self._spill_dir: str | None = None
        if self._restored is not None:
            self._pending = {int(kg): chain for kg, chain in self._restored.chains.items() if chain}
            self.bottom = [self._segment(pa.table({}), {}, 0, max_key_groups)]  # filled as groups are fetched
        elif restored:
            tables = [t for t in restored.values() if t.num_rows]
            if tables:
                table = self._sorted(pa.concat_tables(tables, promote_options="permissive"))
                self.bottom = [self._segment(table, {}, 0, max_key_groups)]

    # ------------------------------------------------------------ counters
    @property
    def reads(self) -> set:
        return self.counters.reads

    @property
    def writes(self) -> set:
        return self.counters.writes

    def reset_touched(self) -> None:
        self.counters = StoreCounters()

    # --------------------------------------------------------------- keyed
    def get(self, keys: pa.Array | pa.ChunkedArray) -> pa.Table | None:
        """The current rows of ``keys`` (``None`` if none has any), searching
        each run for those keys only."""
        keys = pc.unique(_array(keys))
        if len(keys) == 0:
            return None
        positions = self._positions(keys)
        order = np.argsort(positions, kind="stable")  # sorted needles: each search starts near the last one
        keys, positions = keys.take(pa.array(order)), positions[order]
        groups = _group_starts(positions)[0].tolist()  # the needles are sorted: their groups are runs
        self._fetch(groups)
        self.counters.reads.update(groups)
        found = []
        for run in reversed(self._all_runs()):  # newest first
            if len(keys) == 0:
                break
            first, last = 0, len(keys)
            if run.lo is not None:  # a bottom segment: only the needles of its key groups
                first, last = np.searchsorted(positions, np.uint64(run.lo) << _SHIFT), \
                    np.searchsorted(positions, np.uint64(run.hi) << _SHIFT)
            if not run.rows or last <= first:
                continue
            rows, hit = _search(run.table, run.positions, self.key, keys.slice(first, last - first),
                                positions[first:last])
            if rows is not None:
                self.counters.rows_read += rows.num_rows
                found.append(rows)
                keep = np.ones(len(keys), bool)
                keep[first:last] = ~hit
                keys, positions = keys.filter(pa.array(keep)), positions[keep]
        rows = concat(found)
        rows = None if rows is None else live_rows(rows)
        return rows.drop_columns([POSITION]) if rows is not None and rows.num_rows else None

    def put(self, rows: pa.Table, keys: pa.Array | pa.ChunkedArray | None = None) -> None:
        """Make ``rows`` all the rows of ``keys`` (``keys`` defaults to the
        keys in ``rows``; a key of ``keys`` without rows is deleted)."""
        key = self.key
        if rows.num_rows == 0 and keys is None:
            return
        gone = []
        if keys is not None:  # the keys of ``keys`` that ``rows`` does not hold are deleted
            keys = pc.unique(_array(keys))
            gone = keys.filter(pc.invert(pc.is_in(keys, value_set=_array(rows.column(key)))))
        if len(gone):
            tombstones = pa.table({key: gone, DELETED_COLUMN: pa.repeat(True, len(gone))})
            rows = pa.concat_tables([rows, tombstones], promote_options="permissive")
        self.counters.rows_written += rows.num_rows
        run = _Run(self._sorted(rows))
        self.counters.writes.update(_group_starts(run.positions)[0].tolist())
        self.fresh.append(run)
        if len(self.fresh) > MAX_FRESH:
            self.fresh = [_Run(self._merged([run.table for run in self.fresh]))]
        if self.resident_bytes() > self.budget_bytes:  # changes beyond the budget between checkpoints
            self._spill()

    def delete(self, keys: pa.Array | pa.ChunkedArray) -> None:
        """Delete every row of ``keys``."""
        keys = _array(keys)
        self.put(pa.table({self.key: pa.array([], keys.type)}), keys)

    # -------------------------------------------------------- key groups
    def scan(self, kg: int) -> pa.Table | None:
        """Every current row of key group ``kg`` (reads the whole group)."""
        return self.read([kg])

    def read(self, groups) -> pa.Table | None:
        """Every current row of key groups ``groups`` as one table (``None``
        if they hold none): each run's slices of them, with one take per run."""
        groups = np.unique(np.asarray(list(groups), dtype=np.uint64))
        if len(groups) == 0:
            return None
        self._fetch(groups.tolist())
        self.counters.reads.update(groups.tolist())
        parts = []
        for run in self._all_runs():
            lo = np.searchsorted(run.positions, groups << _SHIFT)
            hi = np.searchsorted(run.positions, (groups + np.uint64(1)) << _SHIFT)
            counts = hi - lo
            if counts.any():
                parts.append(run.table.take(pa.array(_ranges(lo, counts))))
        if not parts:
            return None
        self.counters.rows_read += sum(p.num_rows for p in parts)
        table = apply_chain(parts, self.key)
        return table.drop_columns([POSITION]) if table.num_rows else None

    def write(self, tables: dict[int, pa.Table], changed: dict[int, pa.Array]) -> None:
        """Per key group, make ``tables[kg]``'s rows of the keys ``changed[kg]``
        all the rows of those keys (the rest of the table is not written)."""
        for kg, table in tables.items():
            self.rewrite({kg}, table, self.key, self.max_key_groups, changed[kg])

    def rewrite(self, groups, table: pa.Table | None, key_column: str, max_key_groups: int,
                changed: pa.Array) -> None:
        """Make ``table``'s rows of the keys ``changed`` all the rows of
        those keys (``groups`` and the rest of ``table`` are not written)."""
        changed = _array(changed)
        rows = None if table is None else table.filter(pc.is_in(table.column(self.key), value_set=changed))
        self.put(rows if rows is not None else pa.table({self.key: pa.array([], changed.type)}), changed)

    def key_groups(self) -> list[int]:
        """Key groups that may hold state."""
        groups = set(self._pending)
        for run in self._all_runs():
            groups.update(_group_starts(run.positions)[0].tolist())
        return sorted(groups)

    @property
    def groups(self) -> dict[int, pa.Table]:
        """Every key group's state (reads all of it)."""
        table = self.read(self.key_groups())
        if table is None:
            return {}
        return split_by_key_group(table, groups_of(table.column(self.key), self.max_key_groups))

    def full(self) -> dict[int, pa.Table]:
        return self.groups

    def __len__(self) -> int:
        """Rows of state (reads all of it: for tests)."""
        table = self.read(self.key_groups())
        return 0 if table is None else table.num_rows

    # --------------------------------------------------------- checkpoints
    def take_changes(self, whole: bool = False) -> StateChanges:
        """What a checkpoint writes: the new run (``runs``, one table per key
        group), and the key groups whose bottom segment was rewritten by this
        checkpoint's step of compaction (``compacted``). ``whole``: all state
        as one run, for a savepoint. After writing them the runtime calls
        :meth:`written` for each, then reads :meth:`chains`."""
        before = set(self.chains())
        self._fetch(sorted(self._pending)[:PREFETCH_PER_CHECKPOINT])  # the rest of a lazy restore, a little at a time
        self._top = self._drained = None
        changes = StateChanges()
        unwritten = any(run.rows and not run.refs for run in self.bottom + self.upper)  # restored from tables
        if whole or unwritten:
            self._fetch(list(self._pending))
            tables = [run.table for run in self._all_runs()]
            self.upper, self.fresh, self._cursor = [], [], None
            self._top = self._segment(live_rows(self._merged(tables)), {}, 0, self.max_key_groups)
            self.bottom = [self._top]
            changes.runs = _split_by_group(self._top)
        changed = 0
        if not (whole or unwritten) and self.fresh:
            new, self.fresh = self._merged([run.table for run in self.fresh]), []
            changed = new.num_rows
            # Size-tiered among the runs above the bottom; one being merged into the bottom is left alone.
            while self.upper and not (self._cursor is not None and len(self.upper) == 1) and (
                    len(self.upper) >= MAX_RUNS or self.upper[-1].rows < TIER_RATIO * new.num_rows):
                below = self.upper.pop()
                self.counters.rows_merged += below.rows + new.num_rows
                new = _merge(below.table, new, self.key)
            if not self.upper and not self._pending and not any(run.rows for run in self.bottom):
                self._top = self._segment(live_rows(new), {}, 0, self.max_key_groups)
                self.bottom = [self._top]
            else:
                self._top = _Run(new)
                self.upper.append(self._top)
            changes.runs = _split_by_group(self._top)
        if self._cursor is None and self.upper and (len(self.upper) >= MAX_RUNS or (
                not self._pending and sum(r.rows for r in self.bottom) < TIER_RATIO * self.upper[0].rows)):
            self._cursor = 0  # start merging upper[0] into the bottom, a window of key groups per checkpoint
        if self._cursor is not None:  # fast enough to finish before the run above is due: 8x the changes
            self._drained = self._drain_step(max(DRAIN_ROWS, 8 * changed))
            changes.compacted = _split_by_group(self._drained)
        changes.removed = before - set(self.chains()) - set(changes.runs) - set(changes.compacted)
        self._spill()
        return changes

    def _drain_step(self, budget: int) -> _Run:
        """Merge the next window of key groups of ``upper[0]`` into the bottom:
        about ``budget`` rows, so a checkpoint's compaction is bounded whatever
        the size of the state. Returns the window's new bottom segment. The
        merged rows stay in ``upper[0]`` too (they say the same) until it is
        merged whole and dropped."""
        source, start = self.upper[0], self._cursor
        bounds = np.arange(self.max_key_groups + 1, dtype=np.uint64) << _SHIFT
        counts = np.diff(np.searchsorted(source.positions, bounds)).astype(np.int64)
        for seg in self.bottom:
            counts += np.diff(np.searchsorted(seg.positions, bounds))
        end = start + max(1, int(np.searchsorted(np.cumsum(counts[start:]), budget, side="right")))
        end = min(end, self.max_key_groups)
        self._fetch(range(start, end))
        kept, parts, refs = [], [], {}
        for seg in self.bottom:
            if seg.hi <= start or seg.lo >= end:
                kept.append(seg)
                continue
            a, b = (int(x) for x in np.searchsorted(seg.positions, bounds[[max(seg.lo, start), min(seg.hi, end)]]))
            if seg.lo < start:
                kept.append(self._segment(seg.table.slice(0, a), seg.refs, seg.lo, start, seg.mapped))
            parts.append(seg.table.slice(a, b - a))
            if seg.hi > end:
                kept.append(self._segment(seg.table.slice(b), seg.refs, end, seg.hi, seg.mapped))
        a, b = (int(x) for x in np.searchsorted(source.positions, bounds[[start, end]]))
        below = _by_position(pa.concat_tables(parts, promote_options="permissive")) if parts else None
        above = source.table.slice(a, b - a)
        self.counters.rows_merged += (0 if below is None else below.num_rows) + above.num_rows
        merged = live_rows(above if below is None or below.num_rows == 0 else _merge(below, above, self.key))
        segment = self._segment(merged, refs, start, end)
        self.bottom = sorted(kept + [segment], key=lambda seg: seg.lo)
        self._cursor = end
        if end >= self.max_key_groups:  # upper[0] is in the bottom now, all of it
            self.upper.pop(0)
            self._cursor = None
        return segment

    def written(self, path: str, batches: dict, compacted: bool = False) -> None:
        """``path`` holds the new run (``compacted``: the rewritten bottom
        segment), key group ``kg``'s slice as batch ``batches[kg]``."""
        run = self._drained if compacted else self._top
        run.refs = {int(kg): [[path, batch]] for kg, batch in batches.items()}

    def chains(self) -> dict[int, list]:
        """Per key group, the references that rebuild its state, oldest first."""
        out: dict[int, list] = {kg: list(chain) for kg, chain in self._pending.items()}
        for run in self.bottom + self.upper:
            for kg, refs in run.refs.items():
                out.setdefault(kg, []).extend(refs)
        return out

    def _merged(self, tables: list[pa.Table]) -> pa.Table:
        """Runs (oldest first) as one: a key's rows come from the newest run that has the key."""
        new = tables[0] if tables else _by_position(pa.table({self.key: pa.array([], pa.int64())}))
        for table in tables[1:]:
            self.counters.rows_merged += new.num_rows + table.num_rows
            new = _merge(new, table, self.key)
        return new

    # ------------------------------------------------------------ internals
    def _segment(self, table: pa.Table, refs: dict, lo: int, hi: int, mapped: bool = False) -> _Run:
        return _Run(table, {kg: r for kg, r in refs.items() if lo <= kg < hi}, mapped, lo, hi)

    def _all_runs(self) -> list[_Run]:
        """Every run, oldest first: the bottom's segments, the runs above it, the fresh ones."""
        return self.bottom + self.upper + self.fresh

    def _fetch(self, groups) -> None:
        """Fetch the restored chains of ``groups`` not fetched yet into the bottom segments that cover them."""
        wanted = sorted(int(kg) for kg in groups if int(kg) in self._pending)
        if not wanted:
            return
        by_segment: dict[int, list[int]] = {}
        for kg in wanted:
            i = next(i for i, seg in enumerate(self.bottom) if seg.lo <= kg < seg.hi)
            by_segment.setdefault(i, []).append(kg)
        for i, kgs in by_segment.items():
            seg = self.bottom[i]
            tables = [seg.table] if seg.rows else []
            refs = dict(seg.refs)
            for kg in kgs:
                chain = self._pending.pop(kg)
                parts = [self._restored.load(ref) for ref in chain]
                self._restored.fetched.extend(chain)
                self.counters.fetched += len(chain)
                table = apply_chain(parts, self.key)
                if table.num_rows:
                    tables.append(self._sorted(table))
                refs[kg] = list(chain)
            merged = _by_position(pa.concat_tables(tables, promote_options="permissive")) if tables else seg.table
            self.bottom[i] = self._segment(merged, refs, seg.lo, seg.hi)

    def _positions(self, keys: pa.Array) -> np.ndarray:
        hashed = stable_hash(keys).to_numpy()
        groups = hashed % np.uint64(self.max_key_groups)
        return (groups << _SHIFT) | (hashed >> np.uint64(16))

    def _sorted(self, table: pa.Table) -> pa.Table:
        """``table`` with its positions, sorted by them (stable: a key's rows keep their order)."""
        if POSITION in table.column_names:
            table = table.drop_columns([POSITION])
        table = table.append_column(POSITION, pa.array(self._positions(_array(table.column(self.key)))))
        return _by_position(table)

    def resident_bytes(self) -> int:
        """Bytes of state held in memory (not mapped from local disk)."""
        return sum(r.table.nbytes for r in self._all_runs() if not r.mapped)

    def memory(self) -> dict:
        """Bytes of state held in memory and mapped from local disk."""
        mapped = sum(r.table.nbytes for r in self._all_runs() if r.mapped)
        return {"resident_bytes": self.resident_bytes(), "mapped_bytes": mapped}

    @property
    def runs(self) -> list[_Run]:
        """The bottom's segments and the runs above them, oldest first (not the fresh ones)."""
        return self.bottom + self.upper

    def _spill(self) -> None:
        """Move the largest runs held in memory to local memory-mapped files
        until what stays in memory is within the budget."""
        over = self.resident_bytes() - self.budget_bytes
        for run in sorted((r for r in self._all_runs() if not r.mapped and r.rows), key=lambda r: -r.table.nbytes):
            if over <= 0:
                break
            over -= run.table.nbytes
            if self._spill_dir is None:
                self._spill_dir = tempfile.mkdtemp(prefix="sluiceway-state-")
                weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
            path = os.path.join(self._spill_dir, f"run-{id(run):x}-{len(os.listdir(self._spill_dir))}.arrow")
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, run.table.schema) as writer:
                writer.write_table(run.table, max_chunksize=max(run.rows, 1))
            table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
            run.__init__(table, run.refs, True, run.lo, run.hi)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The row numbers ``starts[i] .. starts[i] + counts[i]`` of every i, in order.

    >>> _ranges(np.array([5, 0]), np.array([2, 3])).tolist()
    [5, 6, 0, 1, 2]
    """
    starts, counts = starts.astype(np.int64), counts.astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))


def _array(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _positions_of(table: pa.Table) -> np.ndarray:
    if table.num_rows == 0 or POSITION not in table.column_names:
        return np.zeros(0, np.uint64)
    return _array(table.column(POSITION)).to_numpy()


def _by_position(table: pa.Table) -> pa.Table:
    if table.num_rows <= 1 or POSITION not in table.column_names:
        return table
    return table.take(pc.sort_indices(table.column(POSITION)))


def _merge(below: pa.Table, above: pa.Table, key: str) -> pa.Table:
    """Two runs as one: ``above``'s keys replace ``below``'s; tombstones are
    kept (runs further below may still hold those keys)."""
    kept = below.filter(pc.invert(pc.is_in(below.column(key), value_set=_array(above.column(key)))))
    return _by_position(pa.concat_tables([kept, above], promote_options="permissive"))


def _group_starts(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The key groups of sorted ``positions`` and where each one's run starts.

    >>> groups, starts = _group_starts(np.array([3 << 48, 3 << 48 | 5, 9 << 48], np.uint64))
    >>> groups.tolist(), starts.tolist()
    ([3, 9], [0, 2])
    """
    groups = positions >> _SHIFT
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(groups) else np.zeros(0, np.int64)
    return groups[starts], starts


def _split_by_group(run: _Run) -> dict[int, pa.Table]:
    """A run's slice of each key group (contiguous: positions start with the group)."""
    if run.rows == 0:
        return {}
    groups, starts = _group_starts(run.positions)
    ends = np.r_[starts[1:], run.rows]
    table = run.table.drop_columns([POSITION])
    return {int(kg): table.slice(int(s), int(e - s)) for kg, s, e in zip(groups, starts, ends)}


def _same(a: pa.Array, b: pa.Array) -> np.ndarray:
    """Element-wise equality where two nulls are the same key."""
    equal = pc.fill_null(pc.equal(a, b), False)
    if a.null_count or b.null_count:
        equal = pc.or_(equal, pc.and_(pc.is_null(a), pc.is_null(b)))
    return equal.to_numpy(zero_copy_only=False)


def _search(table: pa.Table, positions: np.ndarray, key: str, keys: pa.Array, wanted: np.ndarray
            ) -> tuple[pa.Table | None, np.ndarray]:
    """The rows of a run whose key is one of ``keys`` (at ``wanted``
    positions), and which of ``keys`` the run holds."""
    lo = np.searchsorted(positions, wanted, side="left")
    hi = np.searchsorted(positions, wanted, side="right")
    counts = hi - lo
    hit = np.zeros(len(keys), dtype=bool)
    if not counts.any():
        return None, hit
    # Candidates: every row at a wanted position (two keys may share one); keep those whose key is the key.
    needle = np.repeat(np.arange(len(keys)), counts)
    rows = _ranges(lo, counts)
    column = _array(table.column(key))
    candidates = pa.array(rows)
    if column.type != keys.type:
        keys = keys.cast(column.type)
    same = _same(pc.take(column, candidates), pc.take(keys, pa.array(needle)))
    hit[needle[same]] = True
    return table.take(pa.array(rows[same])), hit
