"""Complex event processing against oracles that search for matches
directly (not by running automata; the fraud example's ``direct_matches``):
out-of-order input cut into epochs, events exactly at the bound, late
events, negation, bounded state."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sluiceway.jobs.dataflow import Dataflow
from sluiceway.jobs.examples.fraud import direct_matches
from sluiceway.jobs.testing import CollectSink, run_local
from sluiceway.operators.base import OperatorContext
from sluiceway.operators.cep import Match, Pattern
from sluiceway.operators.errors import FlowDefinitionError
from sluiceway.operators.sources import ListSource

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
FRAUD = (Pattern.begin("declined", pc.field("status") == "declined", times=3)
                .then("approved", pc.field("status") == "approved"))
NO_PAYMENT = Pattern.begin("order", pc.field("kind") == "order").not_followed_by(
    "payment", pc.field("kind") == "payment", within=timedelta(minutes=10))


def payments(seed: int, n: int = 1500) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = i * 6 + rng.choice([0, 0, -20, 15, -40])  # seconds; out of order by up to a minute
        rows.append({"id": i, "card": rng.randrange(8), "ts": T0 + timedelta(seconds=t),
                     "status": rng.choice(["declined", "declined", "approved", "other"])})
    return rows


def matches(rows: list[dict]) -> set[tuple]:
    groups = {}
    for r in rows:
        groups.setdefault((r["card"], r["match_start"], r["match_end"]), []).append(r["id"])
    return {tuple(ids) for ids in groups.values()}


@pytest.mark.parametrize("k,parallelism", [(7, 1), (40, 2), (500, 2)])
def test_fraud_pattern_against_a_direct_search(k, parallelism):
    rows = payments(seed=k)
    flow, out, late = Dataflow("fraud"), CollectSink(), CollectSink()
    found = (flow.source(ListSource(rows)).with_event_time("ts", max_out_of_orderness=timedelta(minutes=1))
             .key_by("card", parallelism=parallelism).match(FRAUD, within=timedelta(minutes=5)))
    found.sink(out)
    found.late().sink(late)
    run_local(flow, max_records_per_epoch=k)
    assert late.rows() == []
    expected = direct_matches(rows, 300)
    assert matches(out.rows()) == expected and len(expected) > 20
    steps = [r["match_step"] for r in out.rows()]
    assert steps.count("approved") == len(expected) and steps.count("declined") == 3 * len(expected)


def test_a_match_exactly_at_the_bound_counts_and_one_past_it_does_not():
    def run(gap_s):
        rows = [{"id": i, "card": 1, "status": s, "ts": T0 + timedelta(seconds=t)}
                for i, (s, t) in enumerate([("declined", 0), ("declined", 1), ("declined", 2), ("approved", gap_s)])]
        flow, out = Dataflow("fraud_bound"), CollectSink()
        flow.source(ListSource(rows)).with_event_time("ts").key_by("card") \
            .match(FRAUD, within=timedelta(minutes=5)).sink(out)
        run_local(flow, max_records_per_epoch=1)
        return matches(out.rows())

    assert run(300) == {(0, 1, 2, 3)}
    assert run(300.000001) == set()


def negation_oracle(rows: list[dict]) -> set[int]:
    """Orders with no payment of their customer within ten minutes after them."""
    out = set()
    for o in rows:
        if o["kind"] != "order":
            continue
        paid = any(p["kind"] == "payment" and p["customer"] == o["customer"]
                   and (p["ts"], p["id"]) > (o["ts"], o["id"]) and (p["ts"] - o["ts"]).total_seconds() <= 600
                   for p in rows)
        if not paid:
            out.add(o["id"])
    return out


@pytest.mark.parametrize("k", [5, 60])
def test_no_payment_within_ten_minutes_of_an_order(k):
    rng = random.Random(k)
    rows = [{"id": i, "customer": rng.randrange(5), "kind": rng.choice(["order", "payment", "payment", "view"]),
             "ts": T0 + timedelta(seconds=i * 40 + rng.choice([0, -30, 30]))} for i in range(600)]
    flow, out = Dataflow("unpaid"), CollectSink()
    flow.source(ListSource(rows)).with_event_time("ts", max_out_of_orderness=timedelta(minutes=1)) \
        .key_by("customer", parallelism=2).match(NO_PAYMENT).sink(out)
    run_local(flow, max_records_per_epoch=k)
    got = [r["id"] for r in out.rows()]
    assert sorted(got) == sorted(negation_oracle(rows)) and len(got) > 10
    assert {r["match_step"] for r in out.rows()} == {"order"}


def test_events_behind_the_watermark_go_to_late():
    rows = [{"id": 0, "card": 1, "status": "declined", "ts": T0 + timedelta(minutes=10)},
            {"id": 1, "card": 1, "status": "declined", "ts": T0}]  # ten minutes behind, after the first
    flow, out, late = Dataflow("fraud_late"), CollectSink(), CollectSink()
    found = flow.source(ListSource(rows)).with_event_time("ts").key_by("card").match(FRAUD, within=timedelta(minutes=5))
    found.sink(out)
    found.late().sink(late)
    run_local(flow, max_records_per_epoch=1)
    assert [r["id"] for r in late.rows()] == [1]


def test_state_stays_bounded_on_a_long_stream():
    logic = Match("card", "ts", FRAUD, timedelta(minutes=5)).build(OperatorContext("m", 0, 1, 128), None)
    sizes = []
    us = lambda moment: int((moment - datetime(1970, 1, 1, tzinfo=timezone.utc)) / timedelta(microseconds=1))
    for epoch in range(300):  # a minute of event time per epoch, 50 cards, never an approved payment
        ts = [T0 + timedelta(minutes=epoch, seconds=s) for s in range(50)]
        logic.process(pa.table({"card": list(range(50)), "ts": ts, "status": ["declined"] * 50}))
        logic.on_epoch_end(epoch, us(T0 + timedelta(minutes=epoch)))
        sizes.append(logic.state_rows())
    assert max(sizes[50:]) == max(sizes[250:]) <= 50 * 8, sizes[-5:]


def test_patterns_are_checked_when_the_flow_is_built():
    with pytest.raises(FlowDefinitionError, match="pyarrow compute expression"):
        Pattern.begin("a", lambda r: True)
    with pytest.raises(FlowDefinitionError, match="used twice"):
        Pattern.begin("a", pc.field("x") == 1).then("a", pc.field("x") == 2)
    flow = Dataflow("cep_checks")
    keyed = flow.source(ListSource([{"k": 1, "ts": T0}])).with_event_time("ts").key_by("k")
    with pytest.raises(FlowDefinitionError, match="needs within"):
        keyed.match(FRAUD)
    untimed = flow.source(ListSource([{"k": 1}])).key_by("k")
    with pytest.raises(FlowDefinitionError, match="match needs event time"):
        untimed.match(FRAUD, within=timedelta(minutes=1))
