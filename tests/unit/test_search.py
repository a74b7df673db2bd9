"""Search on streams: standing queries added, changed and removed while
events flow, against an oracle that tests every event against every live
query, epoch by epoch."""

from __future__ import annotations

import operator
import random
from collections import Counter

import pytest

from sluiceway.jobs.dataflow import Dataflow
from sluiceway.jobs.testing import CollectSink, run_local
from sluiceway.operators.errors import FlowDefinitionError
from sluiceway.operators.sources import ListSource

AREAS, KINDS = ["soho", "mitte", "brera", "gracia", "nord"], ["flat", "house"]
RANGES = [("price", "<=", "max_price"), ("rooms", ">=", "min_rooms"), ("sqm", ">", "min_sqm")]
COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


def query_changes(n: int, seed: int) -> list[dict]:
    rng, live, rows = random.Random(seed), set(), []
    for i in range(n):
        alert = rng.randrange(80)
        if alert in live and rng.random() < 0.3:
            live.discard(alert)
            rows.append({"alert": alert, "area": rng.choice(AREAS), "kind": None, "max_price": None,
                         "min_rooms": None, "min_sqm": None, "_op": "delete"})
            continue
        live.add(alert)
        rows.append({"alert": alert, "area": rng.choice(AREAS),  # an update may move it to another area
                     "kind": rng.choice(KINDS + [None]),
                     "max_price": rng.choice([None, rng.randrange(100, 1000)]),
                     "min_rooms": rng.choice([None, rng.randrange(1, 6)]),
                     "min_sqm": rng.choice([None, float(rng.randrange(20, 120))]), "_op": "update"})
    return rows


def listings(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"listing": i, "area": rng.choice(AREAS), "kind": rng.choice(KINDS),
             "price": rng.choice([rng.randrange(50, 1100), None]) if i % 50 == 0 else rng.randrange(50, 1100),
             "rooms": rng.randrange(1, 7), "sqm": float(rng.randrange(15, 150))} for i in range(n)]


def oracle(events: list[dict], changes: list[dict], k: int) -> Counter:
    live, out = {}, Counter()
    for i in range(0, max(len(events), len(changes)), k):
        for c in changes[i:i + k]:
            if c["_op"] == "delete":
                live.pop(c["alert"], None)
            else:
                live[c["alert"]] = c
        for e in events[i:i + k]:
            for q in live.values():
                if q["area"] != e["area"] or (q["kind"] is not None and q["kind"] != e["kind"]):
                    continue
                if all(q[qc] is None or (e[ec] is not None and COMPARE[op](e[ec], q[qc])) for ec, op, qc in RANGES):
                    out[(e["listing"], q["alert"])] += 1
    return out


@pytest.mark.parametrize("k,parallelism", [(13, 1), (60, 2)])
def test_search_matches_what_testing_every_query_matches_while_queries_come_and_go(k, parallelism):
    changes, events = query_changes(600, seed=k), listings(1500, seed=k)
    flow, out = Dataflow("alerts"), CollectSink()
    queries = flow.source(ListSource(changes)).to_table("alert", updates="retract")
    flow.source(ListSource(events)).search(queries, equal={"area": "area", "kind": "kind"}, ranges=RANGES,
                                           parallelism=parallelism).sink(out)
    run_local(flow, max_records_per_epoch=k)
    got = Counter((r["listing"], r["alert"]) for r in out.rows())
    expected = oracle(events, changes, k)
    assert got == expected and sum(expected.values()) > 100


@pytest.mark.parametrize("op", ["<", ">=", ">"])
def test_each_kind_of_first_range(op):
    changes, events = query_changes(200, seed=3), listings(400, seed=4)
    ranges = [("price", op, "max_price")]
    flow, out = Dataflow("alerts_ops"), CollectSink()
    queries = flow.source(ListSource(changes)).to_table("alert", updates="retract")
    flow.source(ListSource(events)).search(queries, equal={"area": "area"}, ranges=ranges).sink(out)
    run_local(flow, max_records_per_epoch=50)
    live, expected = {}, Counter()
    for i in range(0, 400, 50):
        for c in changes[i:i + 50]:
            (live.pop(c["alert"], None) if c["_op"] == "delete" else live.__setitem__(c["alert"], c))
        for e in events[i:i + 50]:
            for q in live.values():
                if q["area"] == e["area"] and (q["max_price"] is None or (
                        e["price"] is not None and COMPARE[op](e["price"], q["max_price"]))):
                    expected[(e["listing"], q["alert"])] += 1
    assert Counter((r["listing"], r["alert"]) for r in out.rows()) == expected


def test_search_refuses_what_it_cannot_partition():
    flow = Dataflow("alerts_bad")
    queries = flow.source(ListSource([{"alert": 1, "area": "x"}])).to_table("alert")
    events = flow.source(ListSource([{"area": "x"}]))
    with pytest.raises(FlowDefinitionError, match="updates='retract'"):
        events.search(queries, equal={"area": "area"})
    retracting = flow.source(ListSource([{"alert": 1, "area": "x"}])).to_table("alert", updates="retract")
    with pytest.raises(FlowDefinitionError, match="at least one equality attribute"):
        events.search(retracting, equal={})
    with pytest.raises(FlowDefinitionError, match="op one of"):
        events.search(retracting, equal={"area": "area"}, ranges=[("price", "~", "max_price")])
