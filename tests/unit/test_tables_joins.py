"""Tables, dedupe and joins, each against an oracle in plain Python over
the whole input, on crafted input: out-of-order events, several changes of
one key in one epoch, events exactly at the bound, late events.

``run_local`` cuts a one-partition ``ListSource`` into epochs of
``max_records_per_epoch`` rows (per source), so the oracles know which rows
share an epoch."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from sluiceway.jobs.dataflow import Dataflow
from sluiceway.jobs.testing import CollectSink, run_local
from sluiceway.operators.base import OperatorContext
from sluiceway.operators.errors import FlowDefinitionError, FlowValidationError
from sluiceway.operators.joins import WindowJoin
from sluiceway.operators.sources import ListSource
from sluiceway.operators.tables import Dedupe

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def epochs_of(rows: list, k: int) -> list[list]:
    return [rows[i:i + k] for i in range(0, len(rows), k)]


def multiset(rows: list[dict], columns: list[str]) -> Counter:
    return Counter(tuple(r.get(c) for c in columns) for r in rows)


# ------------------------------------------------------------------- tables
def random_changelog(n: int, keys: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        op = rng.choice(["insert", "update", "update", "delete", None])
        rows.append({"id": rng.randrange(keys), "v": i if op != "delete" else None, "_op": op})
    return rows


def table_oracle(changes: list[dict], k: int, retract: bool) -> tuple[list[dict], dict]:
    state, out = {}, []
    for epoch in epochs_of(changes, k):
        before = dict(state)
        for r in epoch:
            if r["_op"] == "delete":
                state.pop(r["id"], None)
            else:
                state[r["id"]] = r["v"]
        for key in dict.fromkeys(r["id"] for r in epoch):
            if key in state and key in before and retract:
                out += [{"id": key, "v": before[key], "_op": "delete"}, {"id": key, "v": state[key], "_op": "insert"}]
            elif key in state:
                out.append({"id": key, "v": state[key], "_op": "update" if key in before else "insert"})
            elif key in before:
                out.append({"id": key, "v": before[key], "_op": "delete"})
    return out, state


@pytest.mark.parametrize("k,parallelism,updates", [(7, 1, "upsert"), (25, 2, "upsert"), (13, 2, "retract")])
def test_to_table_emits_each_epochs_changes_and_ends_as_the_latest_row_per_key(k, parallelism, updates):
    changes = random_changelog(400, 30, seed=k)
    flow, out = Dataflow("table"), CollectSink()
    flow.source(ListSource(changes)).to_table("id", updates=updates, parallelism=parallelism).sink(out)
    run_local(flow, max_records_per_epoch=k)
    expected, final = table_oracle(changes, k, updates == "retract")
    assert multiset(out.rows(), ["id", "v", "_op"]) == multiset(expected, ["id", "v", "_op"])
    # Applying the emitted changelog gives the table.
    applied = {}
    for r in out.rows():
        if r["_op"] == "delete":
            applied.pop(r["id"], None)
        else:
            applied[r["id"]] = r["v"]
    assert applied == final


def test_a_key_inserted_and_deleted_in_one_epoch_emits_nothing_and_a_delete_carries_the_last_values():
    rows = [{"id": 1, "v": "a", "_op": "insert"}, {"id": 1, "v": None, "_op": "delete"},
            {"id": 2, "v": "b", "_op": "insert"}, {"id": 2, "v": "c", "_op": "update"},
            {"id": 2, "v": None, "_op": "delete"}, {"id": 3, "v": "x", "_op": "insert"}]
    flow, out = Dataflow("table_one_epoch"), CollectSink()
    flow.source(ListSource(rows)).to_table("id").sink(out)
    run_local(flow, max_records_per_epoch=4)  # epoch 1: 1 in and out, 2 in and changed; epoch 2: 2 out, 3 in
    assert [(r["id"], r["v"], r["_op"]) for r in out.rows()] == [(2, "c", "insert"), (2, "c", "delete"),
                                                                 (3, "x", "insert")]


def test_an_unknown_change_names_the_value_and_the_fix():
    flow, out = Dataflow("table_bad_op"), CollectSink()
    flow.source(ListSource([{"id": 1, "_op": "upsert!"}])).to_table("id").sink(out)
    with pytest.raises(FlowValidationError, match=r"'upsert!'.*'insert', 'update' or 'delete'"):
        run_local(flow)


def test_an_aggregate_is_a_table_to_enrich_with():
    flow, out = Dataflow("agg_table"), CollectSink()
    spend = flow.source(ListSource([{"user": "a", "amount": 5}, {"user": "a", "amount": 7}])).key_by("user") \
        .aggregate([("amount", "sum")])
    visits = flow.source(ListSource([{"user": "a", "page": 1}, {"user": "b", "page": 2}]))
    visits.enrich(spend, on="user").sink(out)
    run_local(flow, max_records_per_epoch=1)
    assert [(r["user"], r["amount_sum"]) for r in out.rows()] == [("a", 5), ("b", None)]


# ------------------------------------------------------------------- dedupe
def dedupe_oracle(rows: list[dict], k: int, within: float, ooo: float) -> tuple[list[dict], list[dict]]:
    remembered, kept, late, wm, high = {}, [], [], None, None
    for epoch in epochs_of(rows, k):
        for r in epoch:
            t = (r["ts"] - T0).total_seconds()
            high = t if high is None else max(high, t)
            if wm is not None and t < wm:
                late.append(r)
                continue
            last = remembered.get(r["id"])
            if last is None or abs(t - last) > within:
                kept.append(r)
                if last is None or t > last:
                    remembered[r["id"]] = t
        wm = high - ooo if wm is None else max(wm, high - ooo)
    return kept, late


def test_dedupe_against_the_oracle_with_out_of_order_repeats_bounds_and_late_events():
    rng = random.Random(3)
    rows = []
    for i in range(600):
        t = i * 0.5 + rng.choice([0, 0, -3, -7, 2])  # out of order by up to 7 s: some late for ooo=5
        rows.append({"id": rng.randrange(40), "ts": at(t), "n": i})
    rows += [{"id": 999, "ts": at(400), "n": -1}, {"id": 999, "ts": at(410), "n": -2},  # exactly at the bound: dropped
             {"id": 999, "ts": at(410.5), "n": -3}]  # just past it: kept
    flow, out, late = Dataflow("dedupe"), CollectSink(), CollectSink()
    deduped = flow.source(ListSource(rows)).with_event_time("ts", max_out_of_orderness=timedelta(seconds=5)) \
        .dedupe("id", within=timedelta(seconds=10), parallelism=2)
    deduped.sink(out)
    deduped.late().sink(late)
    run_local(flow, max_records_per_epoch=9)
    kept, late_expected = dedupe_oracle(rows, 9, 10, 5)
    assert late_expected and len(kept) < len(rows) - len(late_expected)  # the input exercises both
    assert sorted(r["n"] for r in out.rows()) == sorted(r["n"] for r in kept)
    assert sorted(r["n"] for r in late.rows()) == sorted(r["n"] for r in late_expected)
    assert {-1, -3} <= {r["n"] for r in out.rows()} and -2 not in {r["n"] for r in out.rows()}


def test_dedupe_on_several_columns():
    rows = [{"a": 1, "b": "x", "ts": at(0)}, {"a": 1, "b": "y", "ts": at(1)}, {"a": 1, "b": "x", "ts": at(2)}]
    flow, out = Dataflow("dedupe_cols"), CollectSink()
    flow.source(ListSource(rows)).with_event_time("ts").dedupe(["a", "b"], within=timedelta(minutes=1)).sink(out)
    run_local(flow)
    assert [(r["a"], r["b"]) for r in out.rows()] == [(1, "x"), (1, "y")]


def test_dedupe_state_stays_bounded_on_a_long_stream():
    logic = Dedupe("id", "ts", timedelta(seconds=10)).build(OperatorContext("d", 0, 1, 128), None)
    sizes = []
    for epoch in range(300):  # 100 new ids a second, each repeated; the watermark follows one second behind
        ids = [f"{epoch}-{i}" for i in range(100)] * 2
        logic.process(pa.table({"id": ids, "ts": [at(epoch)] * 200}))
        logic.on_epoch_end(epoch, int((at(epoch - 1) - datetime(1970, 1, 1, tzinfo=timezone.utc))
                                      / timedelta(microseconds=1)))
        sizes.append(len(logic.store))
    assert max(sizes[50:]) == max(sizes[200:]) <= 100 * 13, sizes[-5:]


def test_dedupe_needs_event_time():
    flow = Dataflow("dedupe_no_time")
    with pytest.raises(FlowDefinitionError, match="dedupe needs event time"):
        flow.source(ListSource([{"id": 1}])).dedupe("id", within=timedelta(seconds=1))


# ------------------------------------------------------------------- enrich
def enrich_oracle(events: list[dict], changes: list[dict], k: int, how: str) -> list[dict]:
    table, out = {}, []
    for i in range(0, max(len(events), len(changes)), k):
        for c in changes[i:i + k]:
            if c["_op"] == "delete":
                table.pop(c["id"], None)
            else:
                table[c["id"]] = c["v"]
        for e in events[i:i + k]:
            if e["key"] in table:
                out.append({**e, "v": table[e["key"]]})
            elif how == "left":
                out.append({**e, "v": None})
    return out


@pytest.mark.parametrize("how,k", [("left", 5), ("inner", 11)])
def test_enrich_sees_the_table_as_of_each_events_epoch(how, k):
    changes = random_changelog(300, 20, seed=k)
    rng = random.Random(k)
    events = [{"key": rng.randrange(25), "n": i} for i in range(300)]
    flow, out = Dataflow("enrich"), CollectSink()
    table = flow.source(ListSource(changes)).to_table("id")
    flow.source(ListSource(events)).enrich(table, on="key", how=how, parallelism=2).sink(out)
    run_local(flow, max_records_per_epoch=k)
    expected = enrich_oracle(events, changes, k, how)
    assert multiset(out.rows(), ["key", "n", "v"]) == multiset(expected, ["key", "n", "v"])


def test_an_event_and_a_change_of_its_key_in_one_epoch_the_event_sees_the_change():
    flow, out = Dataflow("enrich_same_epoch"), CollectSink()
    table = flow.source(ListSource([{"id": 1, "v": "old", "_op": "insert"}, {"id": 1, "v": "new", "_op": "update"}]))
    events = flow.source(ListSource([{"key": 1, "n": 0}, {"key": 1, "n": 1}]))
    events.enrich(table.to_table("id"), on="key").sink(out)
    run_local(flow, max_records_per_epoch=1)
    assert [(r["n"], r["v"]) for r in out.rows()] == [(0, "old"), (1, "new")]


def test_enrich_takes_only_a_table():
    flow = Dataflow("enrich_bad")
    stream = flow.source(ListSource([{"k": 1}]))
    with pytest.raises(FlowDefinitionError, match="enrich needs a table"):
        stream.enrich(stream, on="k")


# -------------------------------------------------------------- window join
def band_join_oracle(left: list[dict], right: list[dict], within: float, how: str) -> list[tuple]:
    out, paired_r = [], set()
    for i, a in enumerate(left):
        hits = [j for j, b in enumerate(right)
                if a["sid"] == b["sid"] and abs((a["ts"] - b["ts"]).total_seconds()) <= within]
        out += [(a["n"], right[j]["m"]) for j in hits]
        paired_r.update(hits)
        if not hits and how in ("left", "outer"):
            out.append((a["n"], None))
    if how == "outer":
        out += [(None, b["m"]) for j, b in enumerate(right) if j not in paired_r]
    return out


def searches_and_clicks(seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    searches = [{"sid": rng.randrange(50), "ts": at(i * 2 + rng.choice([0, -1, 1])), "n": i} for i in range(300)]
    clicks = [{"sid": rng.randrange(50), "ts": at(i * 2 + rng.choice([0, -2, 3])), "m": i} for i in range(300)]
    clicks.append({"sid": searches[100]["sid"], "ts": searches[100]["ts"] + timedelta(seconds=30), "m": 1000})  # at the bound
    clicks.append({"sid": searches[101]["sid"], "ts": searches[101]["ts"] - timedelta(seconds=30.001), "m": 1001})
    clicks.sort(key=lambda c: c["ts"])
    return searches, clicks


@pytest.mark.parametrize("how", ["inner", "left", "outer"])
def test_window_join_against_a_batch_band_join(how):
    searches, clicks = searches_and_clicks(seed=7)
    flow, out, late = Dataflow("window_join"), CollectSink(), CollectSink()
    s = flow.source(ListSource(searches)).with_event_time("ts", max_out_of_orderness=timedelta(seconds=5))
    c = flow.source(ListSource(clicks)).with_event_time("ts", max_out_of_orderness=timedelta(seconds=5))
    joined = s.join(c, on="sid", within=timedelta(seconds=30), how=how, parallelism=2)
    joined.sink(out)
    joined.late().sink(late)
    run_local(flow, max_records_per_epoch=10)
    assert late.rows() == []
    got = Counter((r["n"], r["m"]) for r in out.rows())
    expected = Counter(band_join_oracle(searches, clicks, 30, how))
    assert got == expected
    assert (100, 1000) in got and (101, 1001) not in got


def test_window_join_sends_events_behind_the_watermark_to_late():
    flow, out, late = Dataflow("window_join_late"), CollectSink(), CollectSink()
    left = [{"sid": 1, "ts": at(s), "n": s} for s in (0, 100, 5)]  # 5 comes after the watermark passed 100
    right = [{"sid": 1, "ts": at(s), "m": s} for s in (3, 101, 102)]
    s = flow.source(ListSource(left)).with_event_time("ts")
    c = flow.source(ListSource(right)).with_event_time("ts")
    joined = s.join(c, on="sid", within=timedelta(seconds=5))
    joined.sink(out)
    joined.late().sink(late)
    run_local(flow, max_records_per_epoch=1)
    assert sorted((r["n"], r["m"]) for r in out.rows()) == [(0, 3), (100, 101), (100, 102)]
    assert [r["n"] for r in late.rows()] == [5]


def test_window_join_state_stays_bounded_on_a_long_stream():
    op = WindowJoin("k", "k", "ts", "ts", timedelta(seconds=5), how="outer")
    logic = op.build(OperatorContext("j", 0, 1, 128), None)
    sizes, emitted = [], 0
    for epoch in range(160):
        rows = pa.table({"k": list(range(50)), "ts": [at(epoch)] * 50})
        out = logic.process_inputs([rows, rows.slice(0, 25)])
        emitted += 0 if out is None else out.num_rows
        fired = logic.on_epoch_end(epoch, int((at(epoch - 1) - datetime(1970, 1, 1, tzinfo=timezone.utc))
                                              / timedelta(microseconds=1)))
        emitted += 0 if fired is None else fired.num_rows
        sizes.append(logic.state_rows())
    assert max(sizes[50:]) == max(sizes[120:]) <= 75 * 8, sizes[-5:]
    assert emitted > 160 * 25


def test_join_needs_event_time_on_both_sides():
    flow = Dataflow("join_no_time")
    a = flow.source(ListSource([{"k": 1, "ts": T0}])).with_event_time("ts")
    b = flow.source(ListSource([{"k": 1}]))
    with pytest.raises(FlowDefinitionError, match="join needs event time"):
        a.join(b, on="k", within=timedelta(seconds=1))
    with pytest.raises(FlowDefinitionError, match="how"):
        a.join(a, on="k", within=timedelta(seconds=1), how="sideways")


# -------------------------------------------------------------- table-table
def timeline_changes(seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    users = [f"u{i}" for i in range(12)]
    tweets, follows, live_tweets, live_follows = [], [], {}, set()
    for i in range(400):
        if rng.random() < 0.5:
            tweet = rng.randrange(60)
            if tweet in live_tweets and rng.random() < 0.3:
                tweets.append({"tweet": tweet, "author": live_tweets.pop(tweet), "text": None, "_op": "delete"})
            else:  # a new tweet, or an edit that may change the author
                live_tweets[tweet] = rng.choice(users)
                tweets.append({"tweet": tweet, "author": live_tweets[tweet], "text": f"t{i}", "_op": "update"})
        else:
            pair = (rng.choice(users), rng.choice(users))
            op = "delete" if pair in live_follows else "insert"
            (live_follows.discard if op == "delete" else live_follows.add)(pair)
            follows.append({"id": f"{pair[0]}>{pair[1]}", "follower": pair[0], "followee": pair[1], "_op": op})
    return tweets, follows


def latest(changes: list[dict], key: str) -> dict:
    table = {}
    for c in changes:
        if c["_op"] == "delete":
            table.pop(c[key], None)
        else:
            table[c[key]] = {k: v for k, v in c.items() if k != "_op"}
    return table


@pytest.mark.parametrize("k,parallelism", [(9, 1), (31, 2)])
def test_table_join_keeps_the_view_exact_with_retractions(k, parallelism):
    tweets, follows = timeline_changes(seed=k)
    flow, out = Dataflow("timeline"), CollectSink()
    t = flow.source(ListSource(tweets)).to_table("tweet", updates="retract")
    f = flow.source(ListSource(follows)).to_table("id", updates="retract")
    t.join(f, on="author", right_on="followee", parallelism=parallelism).sink(out)
    run_local(flow, max_records_per_epoch=k)
    view = {}
    for r in out.rows():  # every change must fit the view as it stands: no spurious insert or delete
        pair, row = (r["tweet"], r["id"]), {c: r[c] for c in ("tweet", "author", "text", "follower")}
        if r["_op"] == "insert":
            assert pair not in view, r
            view[pair] = row
        elif r["_op"] == "delete":
            assert view.pop(pair) == row, r
        else:
            assert pair in view, r
            view[pair] = row
    final_tweets, final_follows = latest(tweets, "tweet"), latest(follows, "id")
    expected = {(tw["tweet"], fo["id"]): {"tweet": tw["tweet"], "author": tw["author"], "text": tw["text"],
                                          "follower": fo["follower"]}
                for tw in final_tweets.values() for fo in final_follows.values() if tw["author"] == fo["followee"]}
    assert view == expected and len(expected) > 20


def test_table_join_on_a_column_other_than_the_key_needs_retractions():
    flow = Dataflow("timeline_upsert")
    t = flow.source(ListSource([{"tweet": 1, "author": "a"}])).to_table("tweet")
    f = flow.source(ListSource([{"id": "b>a", "followee": "a"}])).to_table("id", updates="retract")
    with pytest.raises(FlowDefinitionError, match=r"to_table\('tweet', updates='retract'\)"):
        t.join(f, on="author", right_on="followee")


# ---------------------------------------------------------------- restore
def _restored(op, files, watermark):
    """The operator built from its last checkpoint, fetching state lazily as a restored task does."""
    return op.build(OperatorContext("s", 0, 1, 128, watermark), files.restored())


def _us(seconds: float) -> int:
    return int((at(seconds) - datetime(1970, 1, 1, tzinfo=timezone.utc)) / timedelta(microseconds=1))


@pytest.mark.parametrize("kind", ["dedupe", "to_table", "window_join", "table_join", "enrich", "match", "search",
                                  "versioned"])
def test_state_restored_from_a_base_and_deltas_continues_exactly(kind):
    import pyarrow.compute as pc

    from sluiceway.checkpoint.state import MemoryStateFiles
    from sluiceway.operators.cep import Match, Pattern
    from sluiceway.operators.joins import Enrich, TableJoin, VersionedEnrich
    from sluiceway.operators.search import Range, Search
    from sluiceway.operators.tables import ToTable

    rng = random.Random(5)

    def epoch_input(e):
        ids = [rng.randrange(30) for _ in range(20)]
        events = pa.table({"id": ids, "ts": [at(e * 2 + rng.random()) for _ in ids], "n": list(range(20))})
        changes = pa.table({"id": ids, "v": [f"{e}-{i}" for i in range(20)],
                            "_op": [rng.choice(["insert", "update", "delete"]) for _ in ids]})
        return events, changes

    ops = {"dedupe": Dedupe("id", "ts", timedelta(seconds=3)), "to_table": ToTable("id"),
           "window_join": WindowJoin("id", "id", "ts", "ts", timedelta(seconds=1), how="outer"),
           "table_join": TableJoin("id", "id", "id", "id"), "enrich": Enrich("id", "id"),
           "match": Match("id", "ts", Pattern.begin("low", pc.field("n") < 8, times=2).then("high", pc.field("n") > 12)
                          .not_followed_by("mid", pc.field("n") == 10, within=timedelta(seconds=1)),
                          timedelta(seconds=4)),
           "search": Search("id", {"n": "id"}, [Range("n", ">=", "id")]),
           "versioned": VersionedEnrich("id", "id", "since", "ts")}
    op = ops[kind]
    inputs = [epoch_input(e) for e in range(40)]

    def feed(logic, e):
        events, changes = inputs[e]
        if kind in ("dedupe", "match"):
            out = logic.process(events)
        elif kind == "to_table":
            out = logic.process(changes)
        elif kind == "window_join":
            out = logic.process_inputs([events, events.rename_columns(["id", "ts", "m"])])
        elif kind == "versioned":
            out = logic.process_inputs([events, changes.append_column("since", events.column("ts"))])
        elif kind == "table_join":
            out = logic.process_inputs([changes, changes.rename_columns(["id", "w", "_op"])])
        else:  # enrich, search
            out = logic.process_inputs([events, changes])
        fired = logic.on_epoch_end(e, _us(e * 2 - 2))
        parts = [o.main if hasattr(o, "main") else o for o in (out, fired)]
        return [r for p in parts if p is not None for r in p.to_pylist()]

    straight = op.build(OperatorContext("s", 0, 1, 128), None)
    expected = [feed(straight, e) for e in range(40)]
    logic, files, got = op.build(OperatorContext("s", 0, 1, 128), None), MemoryStateFiles(), []
    for e in range(40):
        got.append(feed(logic, e))
        if e % 3 == 2:  # a checkpoint (through the state file encoding); at every other one, start again from it
            files.checkpoint(logic)
            if e % 6 == 5:
                logic = _restored(op, files, _us(e * 2 - 2))
    assert got == expected


# ------------------------------------------------------ versioned lookups
def versioned_oracle(events: list[dict], changes: list[dict], how: str) -> Counter:
    out = Counter()
    for e in events:
        valid = [(c["since"], i, c) for i, c in enumerate(changes) if c["sku"] == e["sku"] and c["since"] <= e["ts"]]
        row = max(valid, key=lambda v: (v[0], v[1]))[2] if valid else None
        price = None if row is None or row["_op"] == "delete" else row["price"]
        if price is not None or how == "left":
            out[(e["n"], price)] += 1
    return out


@pytest.mark.parametrize("k,parallelism,how", [(5, 1, "left"), (40, 2, "left"), (17, 2, "inner")])
def test_versioned_enrich_gives_the_row_as_it_was_at_each_events_time_whatever_the_epochs(k, parallelism, how):
    rng = random.Random(k)
    changes = []
    for i in range(300):
        op = "delete" if rng.random() < 0.1 else "update"
        changes.append({"sku": rng.randrange(12), "price": None if op == "delete" else i,
                        "since": at(i + rng.choice([0, -3, 2])), "_op": op})
    events = [{"n": i, "sku": rng.randrange(14), "ts": at(i * 0.8 + rng.choice([0, -2, 1]))} for i in range(350)]
    flow, out, late = Dataflow("versioned"), CollectSink(), CollectSink()
    prices = flow.source(ListSource(changes)).with_event_time("since", max_out_of_orderness=timedelta(seconds=5)) \
        .to_table("sku")
    looked_up = flow.source(ListSource(events)).with_event_time("ts", max_out_of_orderness=timedelta(seconds=5)) \
        .enrich(prices, on="sku", version="since", how=how, parallelism=parallelism)
    looked_up.sink(out)
    looked_up.late().sink(late)
    run_local(flow, max_records_per_epoch=k)
    assert late.rows() == []
    expected = versioned_oracle(events, changes, how)
    assert Counter((r["n"], r["price"]) for r in out.rows()) == expected
    assert len(expected) > 200 and (how == "inner" or any(p is None for _, p in expected))


def test_versioned_enrich_needs_a_table_from_to_table_with_event_time():
    flow = Dataflow("versioned_bad")
    events = flow.source(ListSource([{"sku": 1, "ts": T0}])).with_event_time("ts")
    untimed = flow.source(ListSource([{"sku": 1, "since": T0}])).to_table("sku")
    with pytest.raises(FlowDefinitionError, match=r"enrich\(version=...\) needs event time"):
        events.enrich(untimed, on="sku", version="since")
    agg = flow.source(ListSource([{"sku": 1, "n": 1}])).key_by("sku").aggregate([("n", "sum")])
    with pytest.raises(FlowDefinitionError, match="made with stream.to_table"):
        events.enrich(agg, on="sku", version="since")
