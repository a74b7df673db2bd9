"""The examples of tables and joins as one workload, added to a flow that
a chaos test runs through node kills: each writes Parquet under a local
folder and is compared with its answer computed in plain Python or pyarrow
(the examples' own ``expected_*`` functions, computed once)."""

from __future__ import annotations

import functools

from sluiceway.jobs.examples import alerts, fraud, search_clicks, shop, timelines
from sluiceway.operators.sinks import ParquetSink, read_committed
from sluiceway.operators.sources import GeneratorSource

ROWS, RATE, ALERTS = 3000, 200.0, 2000  # per partition: 15 s of input at this rate


def add_to(flow, folder: str) -> None:
    search_clicks.add_to(flow, f"{folder}/sc", ROWS, 2 * RATE, prefix="sc_")
    fraud.add_to(flow, f"{folder}/fraud", ROWS, RATE, prefix="fraud_")
    alerts.add_to(flow, f"{folder}/alerts", ROWS, RATE, alert_count=ALERTS, prefix="alerts_")
    timelines.add_to(flow, f"{folder}/timelines", ROWS, RATE, prefix="tl_")
    shop.add_to(flow, GeneratorSource(shop.commands, 2, RATE, ROWS), ParquetSink(f"{folder}/shop/carts"),
                ParquetSink(f"{folder}/shop/revenue"), prefix="shop_")


@functools.lru_cache(maxsize=None)
def _answers() -> dict:
    return {"search_clicks": search_clicks.expected_ctr(ROWS), "fraud": fraud.expected_matches(ROWS),
            "alerts": alerts.expected_matches(ROWS, ALERTS), "timelines": timelines.expected_timelines(ROWS),
            "shop_carts": shop.expected_carts(ROWS), "shop_revenue": shop.expected_revenue(ROWS)}


def _committed(path: str):
    try:
        table = read_committed(path)
    except (FileNotFoundError, OSError):
        return None
    return table if table.num_columns else None  # nothing committed yet


def verdicts(folder: str) -> dict[str, bool]:
    """Per example, whether its committed output is its answer."""
    want, out = _answers(), {}
    ctr = _committed(f"{folder}/sc/ctr")
    out["search_clicks"] = ctr is not None and ctr.num_rows > 0 and search_clicks.final_ctr(ctr).equals(
        want["search_clicks"])
    matches = _committed(f"{folder}/fraud/fraud")
    out["fraud"] = matches is not None and fraud.found_matches(matches) == want["fraud"]
    found = _committed(f"{folder}/alerts/matches")
    pairs = [] if found is None else alerts.found_matches(found)
    out["alerts"] = len(pairs) == len(set(pairs)) and set(pairs) == want["alerts"]
    changes = _committed(f"{folder}/timelines/timelines")
    out["timelines"] = changes is not None and timelines.final_timelines(changes) == want["timelines"]
    carts, rows = {}, _committed(f"{folder}/shop/carts")
    for row in [] if rows is None else rows.to_pylist():
        if row["_op"] == "delete":
            carts.pop(row["cart"], None)
        else:
            carts[row["cart"]] = (row["cart"], row["items"], row["value"], row["status"])
    out["shop_carts"] = set(carts.values()) == want["shop_carts"]
    revenue = _committed(f"{folder}/shop/revenue")
    out["shop_revenue"] = revenue is not None and shop.revenue_rows(revenue) == want["shop_revenue"]
    return out


def complete(folder: str) -> bool:
    return all(verdicts(folder).values())
