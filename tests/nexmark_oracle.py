"""The Nexmark queries computed in batch with plain pyarrow over all the
generated events: the oracle the jobs' committed output must equal. It
shares no code with the engine's operators (only the generator, which is
the input)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs.nexmark.common import DISORDER, Settings
from sluiceway.operators.connectors.nexmark import NexmarkSource

WINDOW_US = 10_000_000


def all_bids(settings: Settings) -> pa.Table:
    source = NexmarkSource(settings.events, partitions=settings.partitions, event_rate=settings.event_rate,
                           disorder=DISORDER)
    events = source.all_events()
    rows = events.filter(pc.equal(events["event_type"], 2))
    bid = rows["bid"].combine_chunks()
    return pa.table({
        "auction": pc.struct_field(bid, "auction"), "bidder": pc.struct_field(bid, "bidder"),
        "price": pc.struct_field(bid, "price"),
        "channel": pc.cast(pc.struct_field(bid, "channel"), pa.string()),
        "url": pc.cast(pc.struct_field(bid, "url"), pa.string()),
        "date_time": rows["date_time"], "extra": pc.cast(pc.struct_field(bid, "extra"), pa.string()),
    })


def _us(column) -> pa.Array:
    return pc.cast(pc.cast(column, pa.timestamp("us", tz="UTC")), pa.int64())


def _ts(values) -> pa.Array:
    return pc.cast(values, pa.timestamp("us", tz="UTC"))


def q0(bids: pa.Table) -> pa.Table:
    return bids


def q1(bids: pa.Table) -> pa.Table:
    return pa.table({"auction": bids["auction"], "bidder": bids["bidder"],
                     "price": pc.multiply(pc.cast(bids["price"], pa.float64()), 0.908),
                     "date_time": bids["date_time"], "extra": bids["extra"]})


def q2(bids: pa.Table) -> pa.Table:
    return bids.filter(pc.equal(pc.remainder(bids["auction"], 123), 0)).select(["auction", "price"])


def q5(bids: pa.Table) -> pa.Table:
    start = pc.multiply(pc.divide(_us(bids["date_time"]), WINDOW_US), WINDOW_US)  # times are positive
    counted = pa.table({"auction": bids["auction"], "s": start}).group_by(["auction", "s"]).aggregate(
        [([], "count_all")])
    return pa.table({"auction": counted["auction"], "window_start": _ts(counted["s"]),
                     "window_end": _ts(pc.add(counted["s"], WINDOW_US)), "count_all": counted["count_all"]})


def q7(bids: pa.Table) -> pa.Table:
    start = pc.multiply(pc.divide(_us(bids["date_time"]), WINDOW_US), WINDOW_US)
    with_window = bids.select(["auction", "price", "bidder", "date_time"]).append_column("s", start)
    top = with_window.group_by("s").aggregate([("price", "max")])
    joined = with_window.join(top, keys=["s", "price"], right_keys=["s", "price_max"], join_type="inner")
    return pa.table({"all": pa.repeat(pa.scalar(0, pa.int8()), joined.num_rows),
                     "window_start": _ts(joined["s"]), "window_end": _ts(pc.add(joined["s"], WINDOW_US)),
                     "auction": joined["auction"], "price": joined["price"], "bidder": joined["bidder"],
                     "date_time": joined["date_time"]})


def q11(bids: pa.Table, gap_us: int = 10_000_000) -> pa.Table:
    """Sessions per bidder: sort each bidder's bids by time; a gap of at
    least ``gap_us`` starts a new session. Written as a plain Python loop
    over sorted rows on purpose: the most obviously right way."""
    rows = sorted(zip(bids["bidder"].to_pylist(), _us(bids["date_time"]).to_pylist()))
    out = {"bidder": [], "window_start": [], "window_end": [], "count_all": []}
    current = None
    for bidder, t in rows:
        if current is not None and current[0] == bidder and t < current[2]:
            current[2] = max(current[2], t + gap_us)
            current[3] += 1
            continue
        if current is not None:
            for name, value in zip(out, current):
                out[name].append(value)
        current = [bidder, t, t + gap_us, 1]
    if current is not None:
        for name, value in zip(out, current):
            out[name].append(value)
    return pa.table({"bidder": pa.array(out["bidder"], pa.int64()), "window_start": _ts(pa.array(out["window_start"], pa.int64())),
                     "window_end": _ts(pa.array(out["window_end"], pa.int64())),
                     "count_all": pa.array(out["count_all"], pa.int64())})


QUERIES = {"q0": q0, "q1": q1, "q2": q2, "q5": q5, "q7": q7, "q11": q11}


# ---------------------------------------------------------------- the joins
def all_events(settings: Settings) -> pa.Table:
    return NexmarkSource(settings.events, partitions=settings.partitions, event_rate=settings.event_rate,
                         disorder=DISORDER).all_events()


def _kind(events: pa.Table, name: str, code: int) -> pa.Table:
    rows = events.filter(pc.equal(events["event_type"], code))
    inner = rows[name].combine_chunks()
    columns = {f.name: pc.struct_field(inner, f.name) for f in inner.type}
    columns = {k: pc.cast(v, pa.string()) if pa.types.is_dictionary(v.type) else v for k, v in columns.items()}
    return pa.table({**columns, "date_time": rows["date_time"]})


def q3(events: pa.Table) -> pa.Table:
    p, a = _kind(events, "person", 0), _kind(events, "auction", 1)
    p = p.filter(pc.is_in(p["state"], value_set=pa.array(["OR", "ID", "CA"])))
    a = a.filter(pc.equal(a["category"], 10))
    j = a.select(["id", "seller"]).rename_columns(["auction", "seller"]).join(
        p.select(["id", "name", "city", "state"]), "seller", right_keys="id", join_type="inner")
    return j.select(["name", "city", "state", "auction"])


def q4(events: pa.Table) -> pa.Table:
    a, b = _kind(events, "auction", 1), _kind(events, "bid", 2)
    j = b.select(["auction", "price", "date_time"]).join(
        a.select(["id", "category", "expires"]), "auction", right_keys="id", join_type="inner")
    j = j.filter(pc.less(j["date_time"], j["expires"]))
    best = j.group_by(["auction", "category"]).aggregate([("price", "max")])
    avg = best.group_by("category").aggregate([("price_max", "mean")])
    return pa.table({"category": avg["category"], "average": avg["price_max_mean"]})


def q8(events: pa.Table) -> pa.Table:
    p, a = _kind(events, "person", 0), _kind(events, "auction", 1)

    def start(t):
        return _ts(pc.multiply(pc.divide(_us(t), WINDOW_US), WINDOW_US))

    persons = pa.table({"id": p["id"], "name": p["name"], "starttime": start(p["date_time"])})
    sellers = pa.table({"seller": a["seller"], "starttime": start(a["date_time"])}).group_by(
        ["seller", "starttime"]).aggregate([])
    return persons.join(sellers, ["id", "starttime"], right_keys=["seller", "starttime"], join_type="inner").select(
        ["id", "name", "starttime"])


def _inserts_only(got: pa.Table) -> pa.Table:
    assert set(got["_op"].to_pylist()) <= {"insert"}, "Q3's view only grows"
    return got.drop_columns(["_op"])


def _last_per_category(got: pa.Table) -> pa.Table:
    indexed = got.append_column("__row", pa.array(range(got.num_rows), pa.int64()))
    last = indexed.group_by("category").aggregate([("__row", "max")])
    return got.take(last["__row_max"])


JOIN_QUERIES = {"q3": q3, "q4": q4, "q8": q8}
COMMITTED = {"q3": _inserts_only, "q4": _last_per_category}  # from the committed changelog to the answer


def same_rows(got: pa.Table, expected: pa.Table) -> tuple[bool, str]:
    """Equal as multisets of rows (committed output comes in epoch order)."""
    columns = expected.column_names
    if sorted(got.column_names) != sorted(columns):
        return False, f"columns {got.column_names} != {columns}"
    got = got.select(columns)
    got = pa.table({c: pc.cast(got[c], pa.string()) if pa.types.is_dictionary(got[c].type) else got[c]
                    for c in columns})
    keys = [(c, "ascending") for c in columns]
    a, b = got.sort_by(keys).to_pylist(), expected.sort_by(keys).to_pylist()
    if a == b:
        return True, ""
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return False, f"{len(a)} rows vs {len(b)} expected; first difference at {first}: " \
                  f"{a[first] if first < len(a) else None} != {b[first] if first < len(b) else None}"
