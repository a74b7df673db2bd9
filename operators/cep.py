"""Complex event processing: per-key patterns over event time.

A :class:`Pattern` is a sequence of steps, each a condition (a pyarrow
compute expression) that an event must satisfy, ``times`` times (other
events may come between: relaxed contiguity), optionally ended by a step
that must *not* happen within a time bound of the last event
(``not_followed_by``)::

    fraud = (Pattern.begin("declined", pc.field("status") == "declined", times=3)
                    .then("approved", pc.field("status") == "approved"))
    keyed.match(fraud, within=timedelta(minutes=5))

**Semantics.** Per key, events are taken in event-time order (ties in the
order they came) once the watermark has passed them, so out-of-order input
gives the same matches as sorted input. Every event satisfying the first
condition starts a run; a run advances on each event satisfying its current
step's condition, and dies once its next event would be more than
``within`` after its first. When a run completes, the match is emitted and
every other run of the key is dropped: matching resumes after the match's
last event (Flink's *skip past last event*), so matches never share events.
With ``not_followed_by(name, condition, within)`` a run whose positive steps
are complete waits: an event satisfying ``condition`` within ``within``
after its last event kills it; once the watermark passes that bound, it
matches. Events behind the watermark when they arrive go to ``late()``.

**Output.** One row per event of a match, in match order: the event's
columns, ``match_start`` and ``match_end`` (the event times of its first and
last event, which with the key name the match) and ``match_step`` (the
step's name).

**Cost.** Every condition is evaluated over the epoch with Arrow, and only
events that satisfy one are kept; a key's runs are advanced event by event
(Python) over those only, when the watermark passes them. State: the kept
events of the last ``within`` (plus the negation's bound) per key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.operators.base import KeyedLogic, Operator, OperatorContext, OperatorLogic, Outputs
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError, missing_columns
from sluiceway.operators.event_time import micros, split_late
from sluiceway.operators.keys import key_groups
from sluiceway.operators.state import GroupStore, as_struct, rows_of


KEY, TIME, SEQ, ROW = "__key", "__t", "__seq", "__row"


@dataclass(frozen=True)
class PatternStep:
    name: str
    condition: pc.Expression
    times: int = 1


class Pattern:
    """A sequence of steps; build it with :meth:`begin`, :meth:`then` and
    :meth:`not_followed_by`.

    >>> p = Pattern.begin("order", pc.field("kind") == "order").not_followed_by(
    ...     "payment", pc.field("kind") == "payment", within=timedelta(minutes=10))
    >>> [s.name for s in p.steps], p.negation.name, p.negation_us
    (['order'], 'payment', 600000000)
    """

    def __init__(self, steps: tuple[PatternStep, ...], negation: PatternStep | None = None, negation_us: int = 0):
        self.steps, self.negation, self.negation_us = steps, negation, negation_us

    @staticmethod
    def _step(name: str, condition, times: int) -> PatternStep:
        if not isinstance(name, str) or not name:
            raise FlowDefinitionError(f"a pattern step needs a name, got {name!r}")
        if not isinstance(condition, pc.Expression):
            raise FlowDefinitionError(
                f"pattern step {name!r} needs a pyarrow compute expression (pc.field('status') == 'declined'), "
                f"got {type(condition).__name__}")
        if not isinstance(times, int) or times < 1:
            raise FlowDefinitionError(f"pattern step {name!r}: times must be a positive integer, got {times!r}")
        return PatternStep(name, condition, times)

    @classmethod
    def begin(cls, name: str, condition, *, times: int = 1) -> "Pattern":
        return cls((cls._step(name, condition, times),))

    def then(self, name: str, condition, *, times: int = 1) -> "Pattern":
        """The next step: ``times`` events satisfying ``condition`` after the previous step's."""
        if self.negation is not None:
            raise FlowDefinitionError("not_followed_by ends a pattern: put then(...) before it")
        if name in [s.name for s in self.steps]:
            raise FlowDefinitionError(f"pattern step name {name!r} is used twice")
        return Pattern(self.steps + (self._step(name, condition, times),))

    def not_followed_by(self, name: str, condition, *, within: timedelta) -> "Pattern":
        """No event satisfying ``condition`` within ``within`` after the last
        event of the steps before: the match is emitted once the watermark
        passes that bound."""
        if self.negation is not None:
            raise FlowDefinitionError("a pattern takes one not_followed_by, at its end")
        bound = micros(within, "not_followed_by(within=...)")
        if bound <= 0:
            raise FlowDefinitionError("not_followed_by(within=...) must be positive")
        return Pattern(self.steps, self._step(name, condition, 1), bound)

    @property
    def conditions(self) -> list[pc.Expression]:
        return [s.condition for s in self.steps] + ([self.negation.condition] if self.negation else [])

    def describe(self) -> dict:
        return {"steps": [[s.name, str(s.condition), s.times] for s in self.steps],
                "not_followed_by": None if self.negation is None else [self.negation.name, str(self.negation.condition),
                                                                       self.negation_us / 1e6]}


class Match(Operator):
    """``keyed.match(pattern, within=...)``: see the module's text.

    >>> from datetime import datetime, timezone
    >>> t = [datetime(2026, 1, 1, 0, m, tzinfo=timezone.utc) for m in range(5)]
    >>> fraud = (Pattern.begin("declined", pc.field("status") == "declined", times=2)
    ...                 .then("approved", pc.field("status") == "approved"))
    >>> logic = Match("card", "ts", fraud, timedelta(minutes=5)).build(OperatorContext("m", 0, 1, 128), None)
    >>> logic.process(pa.table({"card": [1] * 5, "ts": t,
    ...                         "status": ["declined", "ok", "declined", "approved", "approved"]}))
    >>> out = logic.on_epoch_end(1, 2**62)
    >>> [(r["ts"].minute, r["match_step"]) for r in out.to_pylist()]
    [(0, 'declined'), (2, 'declined'), (3, 'approved')]
    """

    kind = "match"
    stateful = True
    state_key = None  # several rows per key: changed key groups are written whole

    def __init__(self, key: str, time_column: str, pattern: Pattern, within: timedelta | None):
        if not isinstance(pattern, Pattern):
            raise FlowDefinitionError(f"match needs a Pattern (Pattern.begin(...).then(...)), got {pattern!r}")
        if within is None and (len(pattern.steps) > 1 or pattern.steps[0].times > 1):
            raise FlowDefinitionError("match needs within=timedelta(...) for a pattern of more than one event: "
                                      "it bounds how long a partial match (and its state) is kept")
        self.key, self.time_column, self.pattern = key, time_column, pattern
        self.within = None if within is None else micros(within, "match(within=...)")
        if self.within is not None and self.within < 0:
            raise FlowDefinitionError("match(within=...) must not be negative")

    @property
    def horizon(self) -> int:
        """How far back from the watermark a kept event can still matter."""
        return (self.within or 0) + self.pattern.negation_us

    def build(self, context: OperatorContext, restored: dict[int, pa.Table] | None) -> OperatorLogic:
        return MatchLogic(self, context, restored)

    def describe(self) -> dict:
        return {"kind": self.kind, "key": self.key, "time_column": self.time_column,
                "within_s": None if self.within is None else self.within / 1e6, **self.pattern.describe()}


def _flag(i: int) -> str:
    return f"__c{i}"


class MatchLogic(KeyedLogic):
    """State per key group: the events that satisfy a condition (their
    time, arrival number, which conditions they satisfy, the event itself),
    from the last match's last event of their key on, and no older than the
    pattern's horizon behind the watermark. A key's runs are computed anew
    from its events whenever it has work (an event the watermark passed, a
    negation's bound): the events decide them, so a restore needs nothing else.
    ``due``: per key group, the first watermark past which it has work."""

    def __init__(self, op: Match, context: OperatorContext, restored: dict[int, pa.Table] | None):
        self.op, self.context = op, context
        self.store = GroupStore(restored, max_key_groups=context.max_key_groups)
        self.watermark = context.watermark
        self.n_conditions = len(op.pattern.conditions)
        restored_groups = self.store.groups  # read whole: restored sequence numbers, row type and due times
        self.next_seq = 1 + max((int(pc.max(t.column(SEQ)).as_py() or 0) for t in restored_groups.values()),
                                default=0)
        self.row_type: pa.DataType | None = None
        for table in restored_groups.values():
            self.row_type = table.schema.field(ROW).type
        # key group -> work once the watermark passes this; restored, every group may have a pending negation
        self.due: dict[int, int] = dict.fromkeys(restored_groups, -2**62)

    # ---------------------------------------------------------------- input
    def process(self, table: pa.Table) -> Outputs | None:
        if table.num_rows == 0:
            return None
        op = self.op
        for column in (op.key, op.time_column):
            if column not in table.column_names:
                raise missing_columns(self.context.step, "match", [op.key, op.time_column], table.column_names,
                                      "fix the column names in key_by(...) or with_event_time(...)")
        table, t, late = split_late(table, op.time_column, self.watermark, self.context.step)
        flags = []
        for i, condition in enumerate(op.pattern.conditions):
            try:
                flags.append(np.asarray(pc.fill_null(_evaluate(table, condition), False)))
            except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as exc:
                name = (op.pattern.steps + ((op.pattern.negation,) if op.pattern.negation else ()))[i].name
                raise FlowValidationError(self.context.step, "match",
                                          f"the condition of pattern step {name!r} ({condition}) does not fit the "
                                          f"stream ({exc}); its columns: {', '.join(table.column_names)}") from None
        if table.num_rows:
            relevant = np.logical_or.reduce(flags) if flags else np.zeros(table.num_rows, dtype=bool)
            if relevant.any():
                self._keep(table.filter(pa.array(relevant)), t[relevant], [f[relevant] for f in flags])
        return Outputs(None, {"late": late}) if late is not None else None

    def _keep(self, table: pa.Table, t: np.ndarray, flags: list[np.ndarray]) -> None:
        n = table.num_rows
        rows = table.combine_chunks()
        struct = as_struct(rows)
        if self.row_type is None:
            self.row_type = struct.type
        elif struct.type != self.row_type:
            struct = struct.cast(self.row_type)
        columns = {KEY: rows.column(self.op.key).combine_chunks(), TIME: pa.array(t, pa.int64()),
                   SEQ: pa.array(np.arange(self.next_seq, self.next_seq + n, dtype=np.int64))}
        self.next_seq += n
        for i, f in enumerate(flags):
            columns[_flag(i)] = pa.array(f)
        columns[ROW] = struct
        new = pa.table(columns)
        max_kg = self.context.max_key_groups
        groups = set(pc.unique(key_groups(new.column(KEY), max_kg)).to_pylist())
        old = self.store.read(groups)
        both = new if old is None else pa.concat_tables([old, new], promote_options="permissive").combine_chunks()
        self.store.rewrite(groups, both, KEY, max_kg)
        self._due_by(new, KEY, TIME, plus=-1)

    # --------------------------------------------------------------- firing
    def on_epoch_end(self, epoch: int, watermark: int | None) -> pa.Table | None:
        if not self._take_watermark(watermark):
            return None
        groups = {kg for kg, due in self.due.items() if due < watermark}
        state = self.store.read(groups) if groups else None
        for kg in groups:
            self.due.pop(kg, None)
        if state is None:
            return None
        state = state.sort_by([(KEY, "ascending"), (TIME, "ascending"), (SEQ, "ascending")])
        t = state.column(TIME).to_numpy()
        seq = state.column(SEQ).to_numpy()
        flags = [state.column(_flag(i)).to_numpy(zero_copy_only=False) for i in range(self.n_conditions)]
        ends = pc.run_end_encode(state.column(KEY).combine_chunks()).run_ends.to_pylist()
        keep = t >= watermark - self.op.horizon  # older events can be in no match to come
        found, due, start = [], {}, 0
        for end in ends:
            matched, last, pending = _advance(self.op, start, end, t, seq, flags, watermark)
            found += matched
            if last is not None:  # matching resumes after the last match's last event
                keep[start:end] &= np.arange(start, end) > last
            if pending is not None:
                due[start] = pending
            start = end
        out = None
        if found:
            rows = rows_of(state.column(ROW).take(pa.array([i for i, _, _, _ in found])))
            ts = pa.timestamp("us", tz="UTC")
            out = (rows.append_column("match_start", pa.array([s for _, s, _, _ in found], pa.int64()).cast(ts))
                       .append_column("match_end", pa.array([e for _, _, e, _ in found], pa.int64()).cast(ts))
                       .append_column("match_step", pa.array([n for _, _, _, n in found], pa.string())))
        max_kg = self.context.max_key_groups
        kept = state.filter(pa.array(keep))
        self.store.rewrite(groups, kept, KEY, max_kg)
        if due:
            rows = pa.table({KEY: state.column(KEY).take(pa.array(list(due), pa.int64())),
                             TIME: pa.array(list(due.values()), pa.int64())})
            self._due_by(rows, KEY, TIME)
        return out


class _Run:
    """A partial match: the step it is at, how many events that step has,
    its events (row, step name), and once its positive steps are complete
    and it waits out a negation, the bound it waits for."""

    __slots__ = ("step", "count", "members", "deadline")

    def __init__(self, row: int, name: str):
        self.step, self.count, self.members, self.deadline = 0, 1, [(row, name)], None


def _advance(op: Match, start: int, end: int, t: np.ndarray, seq: np.ndarray, flags: list[np.ndarray],
             watermark: int) -> tuple[list, int | None, int | None]:
    """Run the pattern over one key's events (rows ``start..end``, in
    event-time order) up to the watermark. Returns the matched events as
    ``(row, first time, last time, step name)``, the row of the last
    match's last event (``None``: no match), and the first watermark past
    which the key has work again (an event not yet passed, a negation's bound)."""
    pattern, within = op.pattern, op.within
    steps = pattern.steps
    negation = len(steps) if pattern.negation is not None else None
    runs: list[_Run] = []
    found: list = []
    last = None
    pending = None

    def emit(run: _Run) -> None:
        nonlocal runs, last
        first_t, last_t = int(t[run.members[0][0]]), int(t[run.members[-1][0]])
        found.extend((row, first_t, last_t, name) for row, name in run.members)
        last = run.members[-1][0]
        runs = [r for r in runs if r.members[0][0] > last]  # skip past the match's last event

    def settle(before: int) -> None:
        """Emit, earliest bound first, the waiting runs whose bound is behind ``before``."""
        while True:
            ripe = [r for r in runs if r.deadline is not None and r.deadline < before]
            if not ripe:
                return
            emit(min(ripe, key=lambda r: (r.deadline, r.members[0][0])))

    def complete_step(run: _Run, ti: int) -> bool:
        """The run's step has all its events: move on; True if it matched outright."""
        run.step, run.count = run.step + 1, 0
        if run.step < len(steps):
            return False
        if negation is None:
            return True
        run.deadline = ti + pattern.negation_us
        return False

    for i in range(start, end):
        if last is not None and i <= last:
            continue
        ti = int(t[i])
        if ti > watermark:
            pending = ti - 1  # to be taken once the watermark reaches it
            break
        settle(ti)
        if negation is not None and flags[negation][i]:
            runs = [r for r in runs if r.deadline is None]  # a waiting run saw what must not come
        matched = None
        alive = []
        for run in runs:
            if run.deadline is None:
                if within is not None and ti - int(t[run.members[0][0]]) > within:
                    continue  # its next event would be too late: the run dies
                if flags[run.step][i]:
                    run.members.append((i, steps[run.step].name))
                    run.count += 1
                    if run.count == steps[run.step].times and complete_step(run, ti):
                        matched = run
                        break
            alive.append(run)
        if matched is not None:
            runs = alive
            emit(matched)
            continue
        runs = alive
        if flags[0][i]:
            run = _Run(i, steps[0].name)
            if steps[0].times == 1 and complete_step(run, ti):
                runs.append(run)
                emit(run)
                continue
            runs.append(run)
    settle(watermark)
    waiting = [r.deadline for r in runs if r.deadline is not None]
    if waiting:
        pending = min(waiting + ([pending] if pending is not None else []))
    return found, last, pending


def _evaluate(table: pa.Table, condition: pc.Expression) -> pa.Array:
    """A boolean per row of ``table``: ``condition`` evaluated with Acero."""
    import pyarrow.dataset as ds

    return ds.dataset(table).to_table(columns={"c": condition}).column("c").combine_chunks()
