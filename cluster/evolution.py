"""Changing a job between runs: what a checkpoint holds for each step, and
whether a changed flow can restore it.

Each manifest records the steps that own something in it (:func:`signatures`):
sources (read positions), stateful steps (keyed state), event-time steps
(watermark marks) and sinks, with their kind, key and configuration. Before
a run restores a checkpoint, :func:`compare` sets those beside the flow's
own. A change the engine carries (a new step, a new source, an aggregate
pair added at the end, a step renamed with :meth:`Dataflow.renamed
<sluiceway.jobs.dataflow.Dataflow.renamed>`) restores; one that would leave
state without the step that reads it, or hand it to a step that reads it
differently (another key, other pairs, another window), is refused unless
the run allows dropped state, which then starts those steps empty.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from sluiceway.checkpoint.manifest import Manifest
from sluiceway.cluster.epochs import EpochPlan
from sluiceway.cluster.graph import JobGraph, Step
from sluiceway.operators.errors import FlowDefinitionError

# Configuration that changes when state expires or what a step emits, not how its state is laid out.
_TUNABLE = frozenset({"allowed_lateness_s", "within_s", "emit", "updates"})


def signatures(graph: JobGraph) -> dict[str, dict]:
    """What a checkpoint records of each step that owns something in it.

    >>> from sluiceway.jobs.dataflow import Dataflow
    >>> from sluiceway.operators.sources import ListSource
    >>> flow = Dataflow("doc")
    >>> _ = flow.source(ListSource([{"u": 1}]), name="in").key_by("u").aggregate([([], "count_all")], name="n")
    >>> s = signatures(flow.graph)
    >>> s["in"]["role"], s["n"]["role"], s["n"]["key"], s["n"]["config"]["pairs"]
    ('source', 'state', 'u', [[None, 'count_all']])
    """
    out = {}
    for step in graph.steps.values():
        role = _role(step)
        if role is None:
            continue
        part = step.source or step.sink
        sig = {"kind": step.kind, "role": role, "key": _key(step), "at": step.defined_at}
        if part is not None:
            sig["type"] = type(part).__name__
        if role == "state":
            sig["config"] = step.operator.describe()
        out[step.id] = sig
    return out


def _role(step: Step) -> str | None:
    if step.source is not None:
        return "source"
    if step.sink is not None:
        return "sink"
    if step.kind == "event_time":
        return "event_time"
    if step.operator is not None and step.operator.stateful:
        return "state"
    return None


def _key(step: Step) -> str | None:
    key = step.key if step.key is not None else getattr(step.operator, "key", None)
    return key if isinstance(key, str) else None


@dataclass(frozen=True)
class Change:
    """One difference between a checkpoint's steps and the flow's.
    ``loses`` is true when restoring anyway drops something the checkpoint
    holds (state, a read position)."""

    step: str
    what: str  # dropped | changed | added_pairs | renamed | new
    line: str
    loses: bool


def compare(manifest: Manifest, graph: JobGraph, renamed: dict[str, str] | None = None) -> list[Change]:
    """The changes between the steps ``manifest`` was written by and the
    flow's, losing ones first. ``renamed`` maps old step ids to new ones.

    A manifest from before step signatures were recorded still names the
    steps it holds state, marks and read positions for; only their presence
    is checked then.
    """
    renamed = dict(renamed or {})
    new = signatures(graph)
    for old_id, new_id in renamed.items():
        if new_id not in graph.steps:
            raise FlowDefinitionError(f"flow.renamed({old_id!r}, {new_id!r}) names a step this flow does not have; "
                                      f"its steps are {', '.join(graph.steps)}")
    old = dict(manifest.steps)
    for step in (*manifest.state, *manifest.event_time):
        old.setdefault(step, {"kind": _kind_of(step), "role": "state", "known": False})
    for step in manifest.offsets:
        old.setdefault(step, {"kind": "source", "role": "source", "known": False})
    holding = set(manifest.state) | set(manifest.event_time) | set(manifest.offsets)
    changes: list[Change] = []
    matched = set()
    for old_id, sig in old.items():
        new_id = renamed.get(old_id, old_id)
        if new_id not in graph.steps:
            if old_id in holding:
                changes.append(_dropped(old_id, sig, new, old, renamed))
            continue
        matched.add(new_id)
        if new_id != old_id:
            changes.append(Change(new_id, "renamed", f"step {old_id!r} is now {new_id!r}: its state follows it",
                                  False))
        if new_id in new:
            changes.extend(_differences(new_id, sig, new[new_id], old_id in holding))
        elif sig.get("known", True) and old_id in holding:
            kind = graph.steps[new_id].kind
            changes.append(Change(new_id, "changed", f"{_what(sig)} {new_id!r} is now a {kind} step, which keeps "
                                                     "nothing to restore", True))
    for new_id, sig in new.items():
        if new_id not in matched and sig["role"] != "sink":
            start = "reads from its start" if sig["role"] == "source" else "starts with empty state"
            changes.append(Change(new_id, "new", f"{_what(sig)} {new_id!r} is new: it {start}", False))
    return sorted(changes, key=lambda c: not c.loses)


def _kind_of(step_id: str) -> str:
    """The kind in an id of the form sluiceway used before ids were derived (``aggregate_3``)."""
    head, _, tail = step_id.rpartition("_")
    return head if head and tail.isdigit() else "step"


def _what(sig: dict) -> str:
    kind = sig.get("kind", "step")
    if sig.get("role") == "source":
        return f"source ({sig['type']})" if sig.get("type") else "source"
    key = sig.get("key")
    return f"{kind} step (keyed by {key!r})" if key else f"{kind} step"


def _dropped(old_id: str, sig: dict, new: dict, old: dict, renamed: dict) -> Change:
    held = "read position" if sig["role"] == "source" else "state"
    line = f"the checkpoint holds the {held} of {_what(sig)} {old_id!r}{_at(sig)}; no step of this flow has that id"
    targets = set(renamed.values())
    alike = [i for i, s in new.items() if i not in old and i not in targets and s["kind"] == sig["kind"]
             and s["role"] == sig["role"]]
    if len(alike) == 1:
        candidate = new[alike[0]]
        if sig.get("known", True) and candidate.get("key") != sig.get("key"):
            line += (f"; the flow's {_what(candidate)} {alike[0]!r}{_at(candidate)} cannot take it over: state "
                     "keeps the key it was made with")
        else:
            line += (f"; if the flow's {_what(candidate)} {alike[0]!r}{_at(candidate)} is that step, give it "
                     f"name={old_id!r} or declare flow.renamed({old_id!r}, {alike[0]!r})")
    return Change(old_id, "dropped", line, True)


def _at(sig: dict) -> str:
    """Where the user made the step, as ``file:line`` (without the code)."""
    at = sig.get("at")
    if not at:
        return ""
    path, _, line = at.split(": ", 1)[0].rpartition(":")
    relative = os.path.relpath(path) if os.path.isabs(path) else path
    return f" (made at {path if relative.startswith('..') else relative}:{line})"


def _differences(step: str, old: dict, new: dict, holds: bool) -> list[Change]:
    if not old.get("known", True):
        return []  # a manifest from before signatures: only presence is known
    if old["kind"] != new["kind"]:
        return [Change(step, "changed", f"step {step!r} was a {old['kind']} step and is now a {new['kind']} step",
                       holds)]
    if old["role"] == "source" and old.get("type") and new.get("type") and old["type"] != new["type"]:
        return [Change(step, "changed", f"source {step!r} read from a {old['type']} and now reads from a "
                                        f"{new['type']}: its read position means nothing there", holds)]
    if old["role"] != "state":
        return []
    if old.get("key") != new.get("key"):
        return [Change(step, "changed", f"{_what(old)} {step!r} is now keyed by {new.get('key')!r}: its state is "
                                        f"keyed by {old.get('key')!r}", holds)]
    before, after = old.get("config") or {}, new.get("config") or {}
    pairs_before, pairs_after = before.get("pairs"), after.get("pairs")
    if new["kind"] == "aggregate" and pairs_before != pairs_after:
        if pairs_before is not None and pairs_after[:len(pairs_before)] == pairs_before:
            added = ", ".join(f"{f}({c or '*'})" for c, f in pairs_after[len(pairs_before):])
            return [Change(step, "added_pairs", f"aggregate {step!r} has new pairs {added}: they count from this "
                                                f"run on", False)]
        return [Change(step, "changed", f"aggregate {step!r} had pairs {_pairs(pairs_before)} and now has "
                                        f"{_pairs(pairs_after)}: only pairs added at the end carry over", holds)]
    differ = sorted(k for k in set(before) | set(after) if k not in _TUNABLE and before.get(k) != after.get(k))
    if differ:
        shown = "; ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in differ[:3])
        return [Change(step, "changed", f"{_what(old)} {step!r} changed how it keeps state ({shown})", holds)]
    return []


def _pairs(pairs) -> str:
    return "[" + ", ".join(f"{f}({c or '*'})" for c, f in pairs or []) + "]"


def as_restored(manifest: Manifest, changes: list[Change], renamed: dict[str, str] | None = None) -> Manifest:
    """``manifest`` as the flow restores it: renamed steps' state, marks and
    read positions under their new ids; steps that changed how they keep
    state, and steps no longer in the flow, without any (they start empty)."""
    renamed = dict(renamed or {})
    dropped = {c.step for c in changes if c.loses}
    if not renamed and not dropped:
        return manifest

    def moved(d: dict) -> dict:
        return {renamed.get(k, k): v for k, v in d.items() if k not in dropped and renamed.get(k, k) not in dropped}

    return replace(manifest, state=moved(manifest.state), event_time=moved(manifest.event_time),
                   offsets=moved(manifest.offsets), steps={renamed.get(k, k): v for k, v in manifest.steps.items()})


def replayable(plan: EpochPlan, renamed: dict[str, str], dropped: set[str]) -> EpochPlan:
    """A logged epoch with its sources under their new ids, without those
    whose read positions the restore dropped."""
    if not renamed and not dropped:
        return plan

    def moved(d: dict) -> dict:
        return {renamed.get(k, k): v for k, v in d.items() if k not in dropped}

    return replace(plan, ranges=moved(plan.ranges), gaps=moved(plan.gaps), active_at=moved(plan.active_at),
                   ended=moved(plan.ended), lag=moved(plan.lag))
