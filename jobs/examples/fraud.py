"""Example job: card fraud as complex event processing.

Card payments (2 partitions, deterministic) come out of order by up to 13
seconds. The pattern: three declined payments of a card, then an approved
one, within five minutes (other payments may come between). Every matched
payment goes to ``<output>/fraud`` with ``match_start``, ``match_end`` and
``match_step``; payments that came behind the watermark would go to
``<output>/late`` (none do with these settings). ``expected_matches``
finds the matches by a direct search over the whole input, sorted by time.

Run it: ``sluiceway run jobs/examples/fraud.py --until-idle``
(``$SLUICEWAY_EXAMPLE_ROWS`` payments per partition, default 20,000;
``$SLUICEWAY_EXAMPLE_OUTPUT``, default ``./.sluiceway-output``).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluiceway.jobs import Dataflow
from sluiceway.operators.cep import Pattern
from sluiceway.operators.sinks import ParquetSink
from sluiceway.operators.sources import GeneratorSource, offsets

PARTITIONS, CARDS = 2, 300
ROWS_PER_PARTITION = int(os.environ.get("SLUICEWAY_EXAMPLE_ROWS", "20000"))
ROWS_PER_SECOND = int(os.environ.get("SLUICEWAY_EXAMPLE_RATE", "20000"))
OUTPUT = os.environ.get("SLUICEWAY_EXAMPLE_OUTPUT", ".sluiceway-output")
T0_US = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp() * 1_000_000)
WITHIN = timedelta(minutes=5)
STATUS = pa.array(["declined"] * 9 + ["approved"] * 9 + ["refunded"] * 2)
FRAUD = (Pattern.begin("declined", pc.field("status") == "declined", times=3)
                .then("approved", pc.field("status") == "approved"))


def payments(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Payment ``id = offset * 2 + partition``: 20 per second of event time;
    a card pays three times in a row, then not for 45 s; each payment is 0
    to 13 s late, so a card's payments come out of order, never at the same
    instant."""
    pid = np.asarray(pc.add(pc.multiply(offsets(start, stop), PARTITIONS), partition))
    jitter = (pid * 104729) % 14 * 1_000_000
    return pa.record_batch({
        "id": pa.array(pid),
        "card": pa.array((pid // 3) % CARDS),
        "status": pc.take(STATUS, pa.array((pid * 31 + pid // 7) % len(STATUS))),
        "ts": pa.array(T0_US + pid * 50_000 - jitter).cast(pa.timestamp("us", tz="UTC")),
    })


def build(output: str = OUTPUT, rows_per_partition: int = ROWS_PER_PARTITION,
          rows_per_second: float = ROWS_PER_SECOND) -> Dataflow:
    flow = Dataflow("fraud")
    add_to(flow, output, rows_per_partition, rows_per_second)
    return flow


def add_to(flow: Dataflow, output: str, rows_per_partition: int, rows_per_second: float, prefix: str = "") -> None:
    matches = (flow.source(GeneratorSource(payments, PARTITIONS, rows_per_second, rows_per_partition),
                           name=f"{prefix}payments")
               .with_event_time("ts", max_out_of_orderness=timedelta(seconds=15))
               .key_by("card", name=f"{prefix}by_card")
               .match(FRAUD, within=WITHIN, name=f"{prefix}fraud"))
    matches.sink(ParquetSink(f"{output}/fraud"), name=f"{prefix}fraud_out")
    matches.late().sink(ParquetSink(f"{output}/late"), name=f"{prefix}late_out")


def expected_matches(rows_per_partition: int = ROWS_PER_PARTITION) -> set[tuple[int, ...]]:
    """The matches as tuples of payment ids, by :func:`direct_matches` over the whole input."""
    events = pa.Table.from_batches([payments(p, 0, rows_per_partition) for p in range(PARTITIONS)])
    return direct_matches(events.to_pylist(), WITHIN.total_seconds())


def direct_matches(events: list[dict], within_s: float) -> set[tuple[int, ...]]:
    """The fraud pattern's matches found by searching, not by running
    automata: per card in time order (ties by ``id``), repeatedly the
    approved payment that ends a match earliest (three declined after the
    previous match, the first at most ``within_s`` before it), with the
    earliest first declined that works; the declined ones are the first
    three from there. Returns tuples of payment ids."""
    out, by_card = set(), {}
    for e in sorted(events, key=lambda e: (e["ts"], e["id"])):
        by_card.setdefault(e["card"], []).append(e)
    for rows in by_card.values():
        begin = 0
        while True:
            match = None
            for a in range(begin, len(rows)):
                if rows[a]["status"] != "approved":
                    continue
                for j in range(begin, a):
                    if rows[j]["status"] == "declined" and (rows[a]["ts"] - rows[j]["ts"]).total_seconds() <= within_s:
                        declined = [k for k in range(j, a) if rows[k]["status"] == "declined"][:3]
                        if len(declined) == 3:
                            match = declined + [a]
                            break
                if match:
                    break
            if not match:
                break
            out.add(tuple(rows[k]["id"] for k in match))
            begin = match[-1] + 1
    return out


def found_matches(committed: pa.Table) -> set[tuple[int, ...]]:
    """The committed matches as tuples of payment ids."""
    groups: dict = {}
    for r in committed.sort_by([("ts", "ascending")]).to_pylist():
        groups.setdefault((r["card"], r["match_start"], r["match_end"]), []).append(r["id"])
    return {tuple(ids) for ids in groups.values()}


flow = build()
