"""``make bench``: sluiceway beside a plain single-process pyarrow loop doing
the same work on the same data.

1. **Backlog from Parquet files** (Nexmark query 1, currency conversion, into
   a checksum sink): 20 M bids in 50 Parquet files, all waiting when the job
   starts. Run with the defaults a user gets (trigger 1 s, at most 1 M
   records per epoch, checkpoints every 5 epochs), again with ``trigger_s=0``
   (plan as fast as possible), and as a single-process loop over the same
   files. The default run must reach the ``trigger 0`` throughput, and both
   the loop's (two cores against one).
2. **Keyed state growing to millions of keys**: a running count per auction
   where every epoch brings new auctions. Reported: the time of ordinary and
   of checkpoint epochs as state grows, and what each checkpoint wrote.
3. **Into real systems, exactly-once**: the same click rows into a
   PostgreSQL table (``PostgresSink``, append: COPY into a prepared
   transaction per task and epoch, COMMIT PREPARED) and into a Delta table
   (``DeltaSink``, append: one Delta transaction per epoch), each beside a
   plain single-process loop over the same batches (``COPY`` in one
   transaction per batch; ``write_deltalake`` per batch). Before that, the
   two ways to load Arrow into PostgreSQL are timed on the same rows: COPY of
   CSV written by pyarrow (what ``PostgresSink`` does) and ADBC's ingest.

4. **Nexmark** (``BENCH_ONLY=nexmark``; one query: ``python bench/bench.py
   nexmark --query q5 --events N``): the queries under ``jobs/nexmark/`` as
   a user gets them (defaults: trigger 1 s, 1 M records per epoch,
   checkpoints every 5 epochs, Parquet output) over ``BENCH_NEXMARK_EVENTS``
   generated events, beside a single-process pyarrow loop that generates
   the same events in the same 1 M-event slices and computes the same
   query. Reported: events/s (and per core), and the epochs' latency from
   dispatch to commit, p50 and p99.

0. **The controller at scale** (``BENCH_ONLY=controller``): the job
   controller's CPU time per epoch, driven by the simulation at 10, 100,
   1,000 and 2,000 tasks over 10 to 200 nodes, with acks sent per task and
   gathered per node. Goal: 1 s epochs at 2,000 tasks within 10% of a core.

0b. **Epochs as tasks grow** (``BENCH_ONLY=tasks``): a keyed count at
   parallelism 2 to 32 on Ray at 4,000 rows/s in all: the epoch latency
   that is per-task overhead, not rows.

0e. **Start and recovery** (``BENCH_ONLY=start``): on the running
   embedded cluster, ``run()`` to the first committed epoch of a 10-row job;
   an executor of the clicks example killed after epoch 3: kill to the
   recovery, and to the next completed epoch (processing again); and, as
   subprocesses, ``sluiceway --help``, ``sluiceway run --until-idle`` of a
   10-row job (embedded cluster start and stop included), and on a cluster
   ``sluiceway up`` started: ``submit`` to the first committed epoch, and
   ``run``.

0c. **Keyed state as it grows** (``BENCH_ONLY=state``; sizes in
   ``BENCH_STATE_KEYS``): one task's store in process at 1 M, 10 M and 40 M
   keys, 100,000-row epochs on keys from all of the state, a checkpoint
   every 5 epochs, beside a numpy loop over dense arrays: epoch and
   checkpoint times, rows a checkpoint writes, resident and mapped memory.

0d. **The keyed running aggregate on Ray** (``BENCH_ONLY=state_job``; sizes
   in ``BENCH_STATE_JOB_KEYS``): a backlog of 2 partitions where every key
   comes twice, key_by -> aggregate(sum, count) -> Parquet with the
   defaults, at 1 M, 10 M and 40 M distinct keys: rows/s and epoch times.

5. **Tables and joins** (``BENCH_ONLY=joins``): over ``BENCH_JOIN_EVENTS``
   generated events, all waiting when the job starts, with the defaults a
   user gets, each beside a single-process pyarrow computation of the same
   result: a stream-table join (orders enriched with a table of 100,000
   customers; the loop: a hash join per 1 M-event slice), a window join
   (searches and clicks on session id within an hour; the loop: one hash
   join of everything, then the time filter) and search on streams (listings
   against 10, 10,000 and 1,000,000 standing queries on area, kind, maximum
   price and minimum rooms; the loop: a hash join on area and kind, then the
   range filters). Output goes to a checksum sink; the row counts and sums
   must equal the loop's.

After one discarded warm-up run, the configurations run interleaved,
``BENCH_REPEAT`` (5) times each, and the median is reported. Events/s are measured over the processing window: from the first epoch
being planned to the last one completing. Start-up (creating actors, reading
footers) is reported beside it.
"""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sluiceway.checkpoint import CheckpointHistory, JobStorage
from sluiceway.checkpoint.storage import create_exclusive, open_filesystem
from sluiceway.jobs import Dataflow, run
from sluiceway.operators.sinks import Sink, SinkContext, SinkWriter
from sluiceway.operators.sources import GeneratorSource, ParquetFilesSource, offsets

BIDS = int(os.environ.get("BENCH_BIDS", "20000000"))
FILES = int(os.environ.get("BENCH_FILES", "50"))
KEYED_ROWS = int(os.environ.get("BENCH_KEYED_ROWS_PER_PARTITION", "3000000"))
CORES = os.cpu_count() or 2
REPEAT = int(os.environ.get("BENCH_REPEAT", "5"))  # runs per configuration; the median is reported
EUR_PER_USD = 0.908


# --------------------------------------------------------------------- data
def write_bids(folder: str) -> None:
    """Nexmark-style bids: auction, bidder, price (cents), channel, date_time."""
    per_file = BIDS // FILES
    channels = pa.array(["Google", "Facebook", "Baidu", "Apple"])
    for f in range(FILES):
        i = pa.array(range(f * per_file, (f + 1) * per_file), pa.int64())
        table = pa.table({
            "auction": pc.remainder(pc.multiply(i, 2654435761), 100_000),
            "bidder": pc.remainder(pc.multiply(i, 40503), 1_000_000),
            "price": pc.add(pc.remainder(pc.multiply(i, 7919), 100_000), 100),
            "channel": pc.take(channels, pc.remainder(i, 4)),
            "date_time": pc.cast(pc.add(pc.multiply(i, 1000), 1_700_000_000_000_000), pa.timestamp("us", "UTC")),
        })
        pq.write_table(table, os.path.join(folder, f"bids-{f:03d}.parquet"), row_group_size=25_000)


def q1(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Nexmark query 1: bid prices from dollars to euros."""
    euros = pc.multiply(pc.cast(batch["price"], pa.float64()), EUR_PER_USD)
    return pa.record_batch([batch["auction"], batch["bidder"], euros, batch["date_time"]],
                           names=["auction", "bidder", "price_eur", "date_time"])


# --------------------------------------------------------------- the sink
class _ChecksumWriter(SinkWriter):
    def __init__(self, context: SinkContext, column: str):
        self.context = context
        self.column = column

    def precommit(self, epoch: int, table: pa.Table | None) -> dict:
        rows = 0 if table is None else table.num_rows
        total = 0.0 if not rows else pc.sum(table[self.column]).as_py()
        return {"subtask": self.context.subtask, "rows": rows, "sum": total}


class ChecksumSink(Sink):
    """Nexmark's blackhole made checkable: each epoch's output reduces to a
    row count and a sum, committed once per epoch as a small JSON file."""

    kind = "checksum"

    def __init__(self, url: str, column: str):
        self.url = url
        self.column = column

    def open(self, context: SinkContext) -> SinkWriter:
        return _ChecksumWriter(context, self.column)

    def commit(self, epoch: int, handles: list[dict]) -> None:
        fs, base = open_filesystem(self.url)
        doc = {"rows": sum(h["rows"] for h in handles), "sum": sum(h["sum"] for h in handles)}
        try:
            create_exclusive(fs, posixpath.join(base, f"{epoch:010d}.json"), json.dumps(doc).encode())
        except FileExistsError:
            pass


def read_checksums(url: str) -> tuple[int, float]:
    fs, base = open_filesystem(url)
    docs = [json.loads(fs.cat_file(p)) for p in fs.ls(base, detail=False)]
    return sum(d["rows"] for d in docs), sum(d["sum"] for d in docs)


# --------------------------------------------------------------- measuring
def engine_run(flow: Dataflow, work: str, **options) -> dict:
    events: list[dict] = []
    t0 = time.perf_counter()
    wall0 = time.time()
    summary = run(flow, os.path.join(work, "ckpt"), on_event=events.append, **options)
    elapsed = time.perf_counter() - t0
    epochs = [e for e in events if e["type"] == "epoch"]
    first_planned = min(e["at"] - e["duration_s"] for e in epochs)
    window = epochs[-1]["at"] - first_planned
    return {
        "summary": summary,
        "epochs": epochs,
        "rate": summary["rows_in"] / window,
        "window_s": window,
        "startup_s": first_planned - wall0,
        "elapsed_s": elapsed,
    }


def loop_q1(folder: str) -> tuple[float, int, float]:
    """The ceiling: the same files, the same work, one process, no engine.
    Arrow's reader decodes on its I/O threads even with ``use_threads=False``
    (about 1.75 cores busy on this machine), so :func:`loop_on_one_core`
    pins it to one CPU for the comparison."""
    t0 = time.perf_counter()
    rows, total = 0, 0.0
    for name in sorted(os.listdir(folder)):
        table = pq.read_table(os.path.join(folder, name), use_threads=False)
        for batch in table.to_batches():
            out = q1(batch)
            rows += out.num_rows
            total += pc.sum(out["price_eur"]).as_py()
    return rows / (time.perf_counter() - t0), rows, total


def loop_on_one_core(folder: str) -> tuple[float, int, float]:
    """:func:`loop_q1` in a child process pinned to one CPU."""
    out = subprocess.run([sys.executable, __file__, "--loop-on-one-core", folder], capture_output=True, text=True,
                         check=True)
    rate, rows, total = json.loads(out.stdout.strip().splitlines()[-1])
    return rate, rows, total


def backlog_bench() -> None:
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "bids")
        os.makedirs(data)
        write_bids(data)
        print(f"\n1. backlog: {BIDS:,} bids in {FILES} Parquet files, Nexmark q1 into a checksum sink, {CORES} cores")
        loop_rate, loop_rows, loop_sum = sorted(loop_on_one_core(data) for _ in range(REPEAT))[REPEAT // 2]
        threaded_rate = sorted(loop_q1(data) for _ in range(REPEAT))[REPEAT // 2][0]
        configurations = {"defaults (trigger 1 s)": {}, "trigger 0": {"trigger_s": 0.0}}
        runs: dict[str, list[dict]] = {label: [] for label in configurations}
        # A warm-up run first (workers import and page in the files), then the
        # configurations interleaved, so neither pays for going first.
        schedule = [("warm-up", {})] + [item for _ in range(REPEAT) for item in configurations.items()]
        for n, (label, options) in enumerate(schedule):
            out = os.path.join(work, f"sums-{n}")
            flow = Dataflow("bench_q1")
            flow.source(ParquetFilesSource(data)).map_batches(q1, name="q1").sink(ChecksumSink(out, "price_eur"))
            r = engine_run(flow, os.path.join(work, f"run-{n}"), **options)
            rows, total = read_checksums(out)
            assert rows == loop_rows and abs(total - loop_sum) < 1e-6 * abs(loop_sum), (rows, total, loop_sum)
            if label in runs:
                runs[label].append(r)
        results = {}
        for label, measured in runs.items():
            r = results[label] = sorted(measured, key=lambda x: x["rate"])[REPEAT // 2]
            each = ", ".join(f"{m['rate'] / 1e6:.2f}" for m in measured)
            print(f"   sluiceway, {label:<22} {r['rate']:>12,.0f} events/s over {r['window_s']:5.2f} s "
                  f"({len(r['epochs'])} epochs, start-up {r['startup_s']:.2f} s, whole run {r['elapsed_s']:.2f} s; "
                  f"runs: {each} M/s)")
        print(f"   single-process pyarrow loop       {loop_rate:>12,.0f} events/s (same files, same work, pinned to one core)")
        print(f"   the same loop, not pinned         {threaded_rate:>12,.0f} events/s (Arrow's reader threads use ~2 cores)")
        default, fast = results["defaults (trigger 1 s)"]["rate"], results["trigger 0"]["rate"]
        print(f"   defaults / trigger 0: {default / fast:.2f}; defaults / loop: {default / loop_rate:.2f} "
              f"(per core {default / loop_rate / CORES:.2f}); output checksums equal the loop's")


def auctions(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Bids on ever newer auctions: two bids per auction, so every epoch
    brings new keys and state grows by a quarter of a million keys per
    million records."""
    i = offsets(start, stop)
    return pa.record_batch({"auction": pc.add(pc.divide(i, 2), partition * 1_000_000_000), "price": pc.remainder(i, 97)})


def keyed_bench() -> None:
    with tempfile.TemporaryDirectory() as work:
        flow = Dataflow("bench_keyed")
        flow.source(GeneratorSource(auctions, 2, 1e12, KEYED_ROWS)).key_by("auction") \
            .aggregate([([], "count_all"), ("price", "sum")], name="per_auction") \
            .sink(ChecksumSink(os.path.join(work, "sums"), "price_sum"))
        print(f"\n2. keyed state: {2 * KEYED_ROWS:,} bids on {KEYED_ROWS:,} auctions (running count and sum per "
              "auction), 500,000 records per epoch, trigger 0, checkpoint every 4 epochs")
        ckpt = os.path.join(work, "run")
        r = engine_run(flow, ckpt, trigger_s=0.0, max_records_per_epoch=500_000, checkpoint_every=4,
                       keep_checkpoints=100)
        history = {c.id: c for c in CheckpointHistory(JobStorage(os.path.join(ckpt, "ckpt"), "bench_keyed")).list()}
        print(f"   {r['rate']:,.0f} events/s over {r['window_s']:.2f} s")
        print(f"   {'epoch':>5} {'keys in state':>14} {'epoch time':>11}  checkpoint (written / total state)")
        keys = 0
        for e in r["epochs"]:
            keys += e["rows_in"] // 2
            c = history.get(e["checkpoint"]) if e["checkpoint"] else None
            ck = f"{c.written_bytes / 1e6:7.1f} MB / {c.size_bytes / 1e6:6.1f} MB, {c.duration_s:.2f} s" if c else ""
            print(f"   {e['epoch']:>5} {keys:>14,} {e['duration_s']:>9.3f} s  {ck}")


SINK_ROWS = int(os.environ.get("BENCH_SINK_ROWS_PER_PARTITION", "1000000"))
SINK_BATCH = 500_000


def clicks(partition: int, start: int, stop: int) -> pa.RecordBatch:
    i = offsets(start, stop)
    return pa.record_batch({"event_id": pc.add(i, partition * 1_000_000_000), "user_id": pc.remainder(i, 500),
                            "cents": pc.remainder(i, 97),
                            "dollars": pc.divide(pc.cast(pc.remainder(i, 97), pa.float64()), 100.0)})


def click_batches():
    """The rows the engine reads, as the loops get them."""
    for p in range(2):
        for start in range(0, SINK_ROWS, SINK_BATCH):
            yield pa.Table.from_batches([clicks(p, start, min(SINK_ROWS, start + SINK_BATCH))])


def postgres_load_paths(dsn: str, port: int) -> None:
    import io

    import psycopg
    import pyarrow.csv as pacsv

    table = next(click_batches())
    columns = "event_id bigint, user_id bigint, cents bigint, dollars double precision"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE load_copy ({columns})")
        conn.execute(f"CREATE TABLE load_adbc ({columns})")

    def copy_csv():
        data = io.BytesIO()
        pacsv.write_csv(table, data, pacsv.WriteOptions(include_header=False))
        with psycopg.connect(dsn) as conn:
            with conn.cursor().copy("COPY load_copy FROM STDIN (FORMAT csv)") as copy:
                copy.write(data.getvalue())

    def adbc_ingest():
        import adbc_driver_postgresql.dbapi as adbc

        with adbc.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres") as conn:
            with conn.cursor() as cursor:
                cursor.adbc_ingest("load_adbc", table, mode="append")
            conn.commit()

    times = {"COPY (CSV by pyarrow)": [], "ADBC adbc_ingest": []}
    for _ in range(3):
        for name, fn in zip(times, (copy_csv, adbc_ingest)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"   loading {table.num_rows:,} rows into PostgreSQL, best of 3:")
    for name, ts in times.items():
        print(f"     {name:<24} {table.num_rows / min(ts):>12,.0f} rows/s")


def sink_bench() -> None:
    import deltalake
    import psycopg

    from sluiceway.jobs.testing import postgres_server
    from sluiceway.operators.sinks import DeltaSink, PostgresSink

    total = 2 * SINK_ROWS
    print(f"\n3. into real systems: {total:,} click rows (2 partitions), exactly-once, defaults (trigger 1 s)")
    with tempfile.TemporaryDirectory() as work, postgres_server() as server:
        postgres_load_paths(server.dsn, server.port)
        results = {}
        flow = Dataflow("bench_postgres")
        flow.source(GeneratorSource(clicks, 2, 1e12, SINK_ROWS)).sink(PostgresSink(server.dsn, "clicks",
                                                                                   create_table=True))
        results["PostgresSink (append)"] = engine_run(flow, os.path.join(work, "pg"), until_idle=True)["rate"]
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE clicks_loop (LIKE clicks)")
            assert conn.execute("SELECT count(*) FROM clicks").fetchone()[0] == total
        t0 = time.perf_counter()
        import io

        import pyarrow.csv as pacsv
        with psycopg.connect(server.dsn) as conn:
            for batch in click_batches():
                data = io.BytesIO()
                pacsv.write_csv(batch, data, pacsv.WriteOptions(include_header=False))
                with conn.cursor().copy("COPY clicks_loop FROM STDIN (FORMAT csv)") as copy:
                    copy.write(data.getvalue())
                conn.commit()
        results["plain COPY loop"] = total / (time.perf_counter() - t0)

        flow = Dataflow("bench_delta")
        flow.source(GeneratorSource(clicks, 2, 1e12, SINK_ROWS)).sink(DeltaSink(os.path.join(work, "delta")))
        results["DeltaSink (append)"] = engine_run(flow, os.path.join(work, "dl"), until_idle=True)["rate"]
        assert deltalake.DeltaTable(os.path.join(work, "delta")).to_pyarrow_dataset().count_rows() == total
        t0 = time.perf_counter()
        for batch in click_batches():
            deltalake.write_deltalake(os.path.join(work, "delta_loop"), batch, mode="append")
        results["plain write_deltalake loop"] = total / (time.perf_counter() - t0)
        for name, rate in results.items():
            print(f"   {name:<28} {rate:>12,.0f} rows/s")


# ------------------------------------------------------------------ nexmark
NEXMARK_EVENTS = int(os.environ.get("BENCH_NEXMARK_EVENTS", "10000000"))
NEXMARK_QUERIES = os.environ.get("BENCH_NEXMARK_QUERIES", "q1,q2,q5,q11").split(",")
SLICE = 1_000_000  # what an epoch reads by default


def nexmark_loop(query: str, events: int) -> tuple[float, int]:
    """The same query, one process, no engine: generate each 1 M-event slice
    of each partition (as the engine's epochs do), compute, merge partial
    window results at the end. Returns (events/s, result rows)."""
    import numpy as np

    from sluiceway.jobs.nexmark.common import DISORDER, Settings
    from sluiceway.operators.connectors.nexmark import bids, events as generate

    settings = Settings(events=events)
    base_ms = int(Settings().source().base_ms)
    disorder_ms = DISORDER // __import__("datetime").timedelta(milliseconds=1)
    parts = settings.partitions
    t0 = time.perf_counter()
    rows, partials = 0, []
    for p in range(parts):
        end = -(-(events - p) // parts)
        for start in range(0, end, SLICE // parts):
            stop = min(end, start + SLICE // parts)
            n = np.arange(start, stop, dtype=np.int64) * parts + p
            b = bids(generate(n, event_rate=settings.event_rate, base_ms=base_ms, disorder_ms=disorder_ms))
            if query == "q1":
                rows += pc.multiply(pc.cast(b["price"], pa.float64()), EUR_PER_USD).length()
            elif query == "q2":
                rows += b.filter(pc.equal(pc.remainder(b["auction"], 123), 0)).num_rows
            elif query == "q5":
                start_us = pc.multiply(pc.divide(pc.cast(pc.cast(b["date_time"], pa.timestamp("us", tz="UTC")),
                                                         pa.int64()), 10_000_000), 10_000_000)
                partials.append(pa.table({"auction": b["auction"], "s": start_us}).group_by(["auction", "s"])
                                .aggregate([([], "count_all")]))
            elif query == "q11":
                partials.append(b.select(["bidder", "date_time"]))
    if query == "q5":
        rows = pa.concat_tables(partials).group_by(["auction", "s"]).aggregate([("count_all", "sum")]).num_rows
    elif query == "q11":  # sessions per bidder, vectorized: sort, split where the gap is 10 s or more
        table = pa.concat_tables(partials).sort_by([("bidder", "ascending"), ("date_time", "ascending")])
        t = pc.cast(pc.cast(table["date_time"], pa.timestamp("us", tz="UTC")), pa.int64()).to_numpy()
        who = table["bidder"].to_numpy()
        rows = int(1 + np.count_nonzero((who[1:] != who[:-1]) | (t[1:] - t[:-1] >= 10_000_000))) if len(t) else 0
    return events / (time.perf_counter() - t0), rows


def nexmark_engine(query: str, events: int, work: str) -> dict:
    import importlib

    from sluiceway.jobs.nexmark.common import Settings

    module = importlib.import_module(f"sluiceway.jobs.nexmark.{query}")
    flow = module.build(Settings(events=events, output=os.path.join(work, "out")))
    r = engine_run(flow, work)
    latencies = sorted(e["duration_s"] for e in r["epochs"])
    r["p50"] = latencies[len(latencies) // 2]
    r["p99"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return r


def nexmark_bench(queries=None, events: int | None = None) -> None:
    events = events or NEXMARK_EVENTS
    queries = queries or NEXMARK_QUERIES
    repeat = max(1, REPEAT // 2 + 1)
    print(f"\n4. Nexmark: {events:,} generated events (2 partitions), each query with the defaults a user gets, "
          f"median of {repeat}")
    with tempfile.TemporaryDirectory() as work:
        nexmark_engine(queries[0], min(events, 2_000_000), os.path.join(work, "warm-up"))
        for query in queries:
            loop = sorted(nexmark_loop(query, events) for _ in range(repeat))[repeat // 2]
            runs = [nexmark_engine(query, events, os.path.join(work, f"{query}-{i}")) for i in range(repeat)]
            r = sorted(runs, key=lambda x: x["rate"])[repeat // 2]
            print(f"   {query:<4} sluiceway {r['rate']:>12,.0f} events/s ({r['rate'] / CORES:>10,.0f} per core), "
                  f"epoch latency p50 {r['p50']:.2f} s p99 {r['p99']:.2f} s, {len(r['epochs'])} epochs, "
                  f"checkpoints {r['summary']['checkpoints']}")
            print(f"   {'':<4} pyarrow loop {loop[0]:>9,.0f} events/s (one process); sluiceway / loop "
                  f"{r['rate'] / loop[0]:.2f}")


# ------------------------------------------------------------ tables, joins
JOIN_EVENTS = int(os.environ.get("BENCH_JOIN_EVENTS", "2000000"))
CUSTOMERS, AREAS = 100_000, 10_000


def orders(partition: int, start: int, stop: int) -> pa.RecordBatch:
    o = pc.add(pc.multiply(offsets(start, stop), 2), partition)
    return pa.record_batch({"order": o, "customer": pc.remainder(pc.multiply(o, 7919), CUSTOMERS),
                            "amount": pc.remainder(pc.multiply(o, 31), 1000)})


def customers(partition: int, start: int, stop: int) -> pa.RecordBatch:
    c = offsets(start, stop)
    return pa.record_batch({"id": c, "segment": pc.remainder(c, 7), "credit": pc.remainder(pc.multiply(c, 13), 5000)})


def listings(partition: int, start: int, stop: int) -> pa.RecordBatch:
    i = pc.add(pc.multiply(offsets(start, stop), 2), partition)
    return pa.record_batch({"listing": i, "area": pc.remainder(pc.multiply(i, 7919), AREAS),
                            "kind": pc.remainder(pc.multiply(i, 31), 3),
                            "price": pc.add(pc.remainder(pc.multiply(i, 104729), 900_000), 100_000),
                            "rooms": pc.add(pc.remainder(pc.multiply(i, 13), 6), 1)})


def standing_queries(partition: int, start: int, stop: int) -> pa.RecordBatch:
    q = offsets(start, stop)
    return pa.record_batch({"query": q, "area": pc.remainder(pc.multiply(q, 37), AREAS),
                            "kind": pc.remainder(pc.multiply(q, 11), 3),
                            "max_price": pc.add(pc.remainder(pc.multiply(q, 7907), 700_000), 150_000),
                            "min_rooms": pc.add(pc.remainder(pc.multiply(q, 17), 5), 1)})


def _slices(fn, total: int, parts: int = 2):
    for p in range(parts):
        end = -(-(total - p) // parts)
        for start in range(0, end, SLICE // parts):
            yield fn(p, start, min(end, start + SLICE // parts))


def _checksum_run(flow_fn, column: str, work: str) -> dict:
    out = os.path.join(work, "out")
    flow = flow_fn(ChecksumSink(out, column))
    r = engine_run(flow, work)
    r["rows"], r["sum"] = read_checksums(out)
    return r


def _report(name: str, r: dict, loop_rate: float, loop_rows: int, loop_sum: float) -> None:
    same = "same rows and sum" if (r["rows"], r["sum"]) == (loop_rows, loop_sum) else \
        f"DIFFERENT: {r['rows']} rows / {r['sum']} vs {loop_rows} / {loop_sum}"
    print(f"   {name:<26} sluiceway {r['rate']:>11,.0f} events/s ({r['rate'] / CORES:>10,.0f} per core); "
          f"pyarrow loop {loop_rate:>11,.0f} events/s; sluiceway / loop {r['rate'] / loop_rate:.2f}; "
          f"{r['rows']:,} rows out ({same})")


def enrich_bench(work: str, events: int) -> None:
    def flow_fn(sink):
        flow = Dataflow("bench_enrich")
        table = flow.source(GeneratorSource(customers, 1, 1e12, CUSTOMERS), name="customers").to_table("id")
        flow.source(GeneratorSource(orders, 2, 1e12, events // 2), name="orders") \
            .enrich(table, on="customer", how="inner").sink(sink)
        return flow

    r = _checksum_run(flow_fn, "credit", work)
    t0 = time.perf_counter()
    table = pa.Table.from_batches(list(_slices(customers, CUSTOMERS, 1)))
    rows, total = 0, 0
    for batch in _slices(orders, events):
        joined = pa.table(batch).join(table, "customer", right_keys="id", join_type="inner")
        rows, total = rows + joined.num_rows, total + pc.sum(joined["credit"]).as_py()
    _report("stream-table join", r, events / (time.perf_counter() - t0), rows, total)


def window_join_bench(work: str, events: int) -> None:
    from sluiceway.jobs.examples import search_clicks as sc

    sessions = events // 3  # a session is a search and two click rows

    def flow_fn(sink):
        flow = Dataflow("bench_window_join")
        searched = flow.source(GeneratorSource(sc.searches, 2, 1e12, sessions // 2), name="searches") \
            .with_event_time("ts", max_out_of_orderness=timedelta(seconds=5))
        clicked = flow.source(GeneratorSource(sc.clicks, 2, 1e12, sessions), name="clicks") \
            .filter(pc.field("kind") == "click").with_event_time("ts", max_out_of_orderness=timedelta(hours=2))
        searched.join(clicked, on="sid", within=sc.WITHIN).sink(sink)
        return flow

    r = _checksum_run(flow_fn, "sid", work)
    t0 = time.perf_counter()
    s = pa.Table.from_batches(list(_slices(sc.searches, sessions)))
    c = pa.Table.from_batches(list(_slices(sc.clicks, 2 * sessions)))
    c = c.filter(pc.equal(c["kind"], "click"))
    j = s.join(c.select(["sid", "ts"]), "sid", join_type="inner", right_suffix="_click")
    gap = pc.abs(pc.subtract(pc.cast(j["ts"], pa.int64()), pc.cast(j["ts_click"], pa.int64())))
    j = j.filter(pc.less_equal(gap, int(sc.WITHIN.total_seconds() * 1_000_000)))
    _report("window join", r, 3 * sessions / (time.perf_counter() - t0), j.num_rows, pc.sum(j["sid"]).as_py())


def search_bench(work: str, events: int, queries: int) -> None:
    def flow_fn(sink):
        flow = Dataflow("bench_search")
        table = flow.source(GeneratorSource(standing_queries, 1, 1e12, queries), name="queries") \
            .to_table("query", updates="retract")
        flow.source(GeneratorSource(listings, 2, 1e12, events // 2), name="listings") \
            .search(table, equal={"area": "area", "kind": "kind"},
                    ranges=[("price", "<=", "max_price"), ("rooms", ">=", "min_rooms")]).sink(sink)
        return flow

    r = _checksum_run(flow_fn, "query", work)
    t0 = time.perf_counter()
    q = pa.Table.from_batches(list(_slices(standing_queries, queries, 1)))
    rows, total = 0, 0
    for batch in _slices(listings, events):
        j = pa.table(batch).join(q, ["area", "kind"], join_type="inner")
        j = j.filter(pc.and_(pc.less_equal(j["price"], j["max_price"]), pc.greater_equal(j["rooms"], j["min_rooms"])))
        rows, total = rows + j.num_rows, total + (pc.sum(j["query"]).as_py() or 0)
    _report(f"search, {queries:,} queries", r, events / (time.perf_counter() - t0), rows, total)


def joins_bench(events: int | None = None) -> None:
    events = events or JOIN_EVENTS
    print(f"\n5. Tables and joins: {events:,} events, all waiting, the defaults a user gets (one run each)")
    with tempfile.TemporaryDirectory() as work:
        enrich_bench(os.path.join(work, "enrich"), events)
        window_join_bench(os.path.join(work, "window"), events)
        for queries in (10, 10_000, 1_000_000):
            search_bench(os.path.join(work, f"search-{queries}"), events, queries)


def sensor_readings(partition: int, start: int, stop: int) -> pa.RecordBatch:
    """Readings of 1,000 sensors, deterministic in their offsets."""
    i = offsets(start, stop)
    return pa.record_batch({"sensor": pc.remainder(pc.add(i, partition * 7), 1000), "value": pc.remainder(i, 97)})


def tasks_bench(sizes=(2, 4, 8, 16, 32), epochs: int = 12) -> None:
    """Epoch latency on Ray as the tasks grow: generator -> key_by -> aggregate -> Parquet, both steps at
    parallelism P, 4,000 rows/s in all, 1 s trigger: what each epoch costs beyond its rows."""
    from sluiceway.operators.sinks import ParquetSink

    print("\n## Epoch latency as tasks grow (4,000 rows/s, trigger 1 s, both steps at parallelism P)", flush=True)
    print(f"{'P':>4} {'tasks':>6} {'epoch p50':>10} {'epoch p90':>10}")
    for size in sizes:
        with tempfile.TemporaryDirectory() as work:
            flow = Dataflow(f"bench_tasks_{size}", parallelism=size)
            flow.source(GeneratorSource(sensor_readings, size, 4000 / size)).key_by("sensor") \
                .aggregate([([], "count_all"), ("value", "sum")]).sink(ParquetSink(os.path.join(work, "out")))
            events: list[dict] = []
            run(flow, os.path.join(work, "ckpt"), epochs=epochs, on_event=events.append)
            durations = sorted(e["duration_s"] for e in events if e["type"] == "epoch" and e["epoch"] > 2)
            p50, p90 = durations[len(durations) // 2], durations[int(len(durations) * 0.9)]
            print(f"{size:>4} {2 * size:>6} {1000 * p50:>8.0f} ms {1000 * p90:>8.0f} ms", flush=True)


STATE_SIZES = [int(x) for x in os.environ.get("BENCH_STATE_KEYS", "1000000,10000000,40000000").split(",")]
STATE_EPOCH = 100_000


def _rss_mib() -> tuple[float, float]:
    """This process's resident memory: anonymous, and file pages mapped in (MiB)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    kib = {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile")}
    return kib["RssAnon"] / 1024, kib["RssFile"] / 1024


def state_bench(sizes=None) -> None:
    """One task's keyed running aggregate (sum and count per key) as its state grows: the store in process,
    epochs of 100,000 rows on keys drawn from the whole state, a checkpoint every 5 epochs (the new run
    encoded as its state file), beside a numpy loop that keeps the same sums in dense arrays."""
    import gc

    from sluiceway.checkpoint.state import encode_key_groups
    from sluiceway.operators.aggregate import Aggregate
    from sluiceway.operators.base import OperatorContext

    print(f"\n## Keyed state as it grows (one task, {STATE_EPOCH:,}-row epochs on keys from all of the state, "
          "checkpoint every 5 epochs, default 512 MiB budget)", flush=True)
    print(f"{'keys':>12} {'fill s':>7} {'epoch p50':>10} {'epoch max':>10} {'ckpt p50':>9} {'ckpt max':>9} "
          f"{'rows/ckpt':>10} {'rows/s':>10} {'loop rows/s':>12} {'anon MiB':>9} {'mapped MiB':>11}")
    for size in sizes or STATE_SIZES:
        gc.collect()
        logic = Aggregate("key", [("v", "sum"), ("v", "count")]).build(OperatorContext("agg", 0, 1, 128), None)
        files = 0

        def checkpoint() -> tuple[float, int]:
            nonlocal files
            t0 = time.perf_counter()
            changes = logic.snapshot_changes()
            rows = 0
            for compacted, tables in ((False, changes.runs), (True, changes.compacted)):
                if tables:
                    data, index = encode_key_groups(tables)
                    logic.state_written(f"f{files}", {str(kg): b for kg, b in index.items()}, compacted)
                    files += 1
                    rows += sum(t.num_rows for t in tables.values())
            return time.perf_counter() - t0, rows

        t0 = time.perf_counter()
        chunk = 1_000_000
        for n, start in enumerate(range(0, size, chunk)):  # every key once, in 1 M-row epochs
            keys = pa.array(np.arange(start, min(size, start + chunk), dtype=np.int64))
            logic.process(pa.table({"key": keys, "v": pa.repeat(pa.scalar(1, pa.int64()), len(keys))}))
            if n % 5 == 4:
                checkpoint()
        checkpoint()
        fill_s = time.perf_counter() - t0
        rng = np.random.default_rng(7)
        epochs, ckpts, written = [], [], []
        sums = np.zeros(size, np.int64)  # the loop: dense arrays indexed by key
        counts = np.zeros(size, np.int64)
        loop_s = 0.0
        for epoch in range(30):
            keys = rng.integers(0, size, STATE_EPOCH)
            batch = pa.table({"key": keys, "v": pa.array(np.ones(STATE_EPOCH, np.int64))})
            t0 = time.perf_counter()
            logic.process(batch)
            epochs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.add.at(sums, keys, 1)
            np.add.at(counts, keys, 1)
            _ = sums[np.unique(keys)]  # the updated rows, as the engine emits them
            loop_s += time.perf_counter() - t0
            if epoch % 5 == 4:
                took, rows = checkpoint()
                ckpts.append(took)
                written.append(rows)
        anon, mapped = _rss_mib()
        epochs.sort()
        ckpts.sort()
        rate = 30 * STATE_EPOCH / (sum(epochs) + sum(ckpts))
        print(f"{size:>12,} {fill_s:>7.1f} {1000 * epochs[15]:>8.1f}ms {1000 * epochs[-1]:>8.1f}ms "
              f"{1000 * ckpts[len(ckpts) // 2]:>7.0f}ms {1000 * ckpts[-1]:>7.0f}ms {max(written):>10,} "
              f"{rate:>10,.0f} {30 * STATE_EPOCH / loop_s:>12,.0f} {anon:>9.0f} {mapped:>11.0f}", flush=True)
        del logic, sums, counts


STATE_JOB_KEYS = [int(x) for x in os.environ.get("BENCH_STATE_JOB_KEYS", "1000000,10000000,40000000").split(",")]


def _twice(keys_per_partition: int):
    def rows(partition: int, start: int, stop: int) -> pa.RecordBatch:
        """Every key of the partition once, then each again: ``K`` keys in ``2K`` offsets."""
        i = offsets(start, stop)
        key = pc.add(pc.multiply(pc.remainder(i, keys_per_partition), 2), partition)
        return pa.record_batch({"key": key, "v": pc.remainder(i, 10)})
    return rows


def state_job_bench(sizes=None) -> None:
    """The issue's keyed running aggregate on Ray with the defaults a user gets: a generated backlog of 2
    partitions, every key seen twice, key_by -> aggregate(sum, count) -> Parquet, 2 tasks."""
    from sluiceway.operators.sinks import ParquetSink

    print("\n## Keyed running aggregate on Ray as keys grow (2 partitions, every key twice, defaults, Parquet)",
          flush=True)
    print(f"{'keys':>12} {'rows':>12} {'rows/s':>10} {'epoch p50':>10} {'epoch max':>10} {'ckpt written max':>17}")
    for keys in sizes or STATE_JOB_KEYS:
        with tempfile.TemporaryDirectory() as work:
            per_partition = keys // 2
            flow = Dataflow(f"bench_state_{keys}")
            flow.source(GeneratorSource(_twice(per_partition), 2, 1e12, 2 * per_partition)).key_by("key") \
                .aggregate([("v", "sum"), ("v", "count")]).sink(ParquetSink(os.path.join(work, "out")))
            events: list[dict] = []
            t0 = time.time()
            run(flow, os.path.join(work, "ckpt"), until_idle=True, on_event=events.append)
            took = time.time() - t0
            epochs = sorted(e["duration_s"] for e in events if e["type"] == "epoch")
            written = [c.written_bytes for c in CheckpointHistory(JobStorage(os.path.join(work, "ckpt"),
                                                                             flow.name)).list()]
            print(f"{keys:>12,} {2 * keys:>12,} {2 * keys / took:>10,.0f} {epochs[len(epochs) // 2]:>8.2f} s "
                  f"{epochs[-1]:>8.2f} s {max(written) / 1e6:>14.1f} MB", flush=True)


def start_bench(runs: int = 3) -> None:
    """Start and recovery times (see module doc, 0e)."""
    import ray

    from sluiceway.jobs.examples import clicks as example
    from sluiceway.operators.sinks import ParquetSink
    from sluiceway.operators.sources import ListSource

    print("\n## Start and recovery (embedded cluster, 2 CPUs: 2 executors)", flush=True)
    firsts = []
    for i in range(runs):
        with tempfile.TemporaryDirectory() as work:
            flow = Dataflow(f"bench_start_{i}")
            flow.source(ListSource([{"x": n} for n in range(10)])).sink(ParquetSink(os.path.join(work, "out")))
            t0, first = time.perf_counter(), []
            run(flow, os.path.join(work, "ckpt"), trigger_s=0.1,
                on_event=lambda e: first.append(time.perf_counter() - t0) if e["type"] == "epoch" else None)
            firsts.append(first[0])
    print(f"run() -> first committed epoch: {', '.join(f'{1000 * s:.0f} ms' for s in firsts)}", flush=True)
    for i in range(runs):
        with tempfile.TemporaryDirectory() as work:
            flow = example.build(output=os.path.join(work, "out"), rows_per_partition=20_000, rows_per_second=4000)
            names, marks = {}, {}

            def on_event(event, names=names, marks=marks):
                now = time.perf_counter()
                if event["type"] == "started":
                    names.update(event["actor_names"])
                elif event["type"] == "recovered":
                    marks["recovered"] = now
                elif event["type"] == "epoch" and "recovered" in marks and "again" not in marks:
                    marks["again"] = now
                elif event["type"] == "epoch" and event["epoch"] >= 3 and "killed" not in marks:
                    marks["killed"] = time.perf_counter()
                    ray.kill(ray.get_actor(names["by_user[1]"]), no_restart=True)

            run(flow, os.path.join(work, "ckpt"), trigger_s=0.5, checkpoint_every=2, epochs=10, on_event=on_event)
            print(f"executor killed -> recovered {1000 * (marks['recovered'] - marks['killed']):.0f} ms, "
                  f"-> next epoch completed {1000 * (marks['again'] - marks['killed']):.0f} ms", flush=True)
    exe = os.path.join(os.path.dirname(sys.executable), "sluiceway")
    t0 = time.perf_counter()
    subprocess.run([exe, "--help"], check=True, capture_output=True)
    print(f"sluiceway --help: {1000 * (time.perf_counter() - t0):.0f} ms", flush=True)
    with tempfile.TemporaryDirectory() as work:
        job = os.path.join(work, "job.py")
        with open(job, "w") as f:
            f.write("from sluiceway.jobs import Dataflow\nfrom sluiceway.operators.sinks import ParquetSink\n"
                    "from sluiceway.operators.sources import ListSource\nflow = Dataflow('ten')\n"
                    f"flow.source(ListSource([{{'x': n}} for n in range(10)])).sink(ParquetSink({work + '/out'!r}))\n")
        env = {**os.environ, "SLUICEWAY_HOME": os.path.join(work, "home")}  # no `up` cluster: an embedded one
        t0 = time.perf_counter()
        subprocess.run([exe, "run", job, "--checkpoint-dir", os.path.join(work, "ckpt"), "--until-idle",
                        "--trigger", "0.1"], check=True, capture_output=True, env=env)
        print(f"sluiceway run --until-idle (10 rows, embedded cluster started and stopped): "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        _submit_to_first_epoch(exe, job, work, env)


def _submit_to_first_epoch(exe: str, job: str, work: str, env: dict, runs: int = 3) -> None:
    """``sluiceway submit`` to the first committed epoch on a cluster ``sluiceway up`` started (and, with the
    cluster there, ``sluiceway run``)."""
    import glob
    import shutil

    subprocess.run([exe, "up", "--workers", "2", "--cpus-per-worker", "1"], check=True, capture_output=True,
                   env=env)
    try:
        took = []
        for i in range(runs):
            shutil.rmtree(os.path.join(work, "out"), ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run([exe, "submit", job, "--checkpoint-dir", os.path.join(work, f"submitted-{i}"),
                            "--until-idle", "--trigger", "0.1"], check=True, capture_output=True, env=env)
            while not glob.glob(os.path.join(work, "out", "_committed", "*.json")):
                time.sleep(0.01)
            took.append(time.perf_counter() - t0)
            subprocess.run([exe, "stop", "ten"], capture_output=True, env=env)
        print(f"sluiceway submit -> first committed epoch (a running `up` cluster, CLI start included): "
              f"{', '.join(f'{s:.2f} s' for s in took)}", flush=True)
        shutil.rmtree(os.path.join(work, "out"), ignore_errors=True)  # owned by the last submitted job
        t0 = time.perf_counter()
        subprocess.run([exe, "run", job, "--checkpoint-dir", os.path.join(work, "ran"), "--until-idle",
                        "--trigger", "0.1"], check=True, capture_output=True, env=env)
        print(f"sluiceway run --until-idle on that cluster: {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        subprocess.run([exe, "down"], capture_output=True, env=env)


def controller_bench() -> None:
    """The job controller's CPU per epoch at 10 to 2,000 simulated tasks (no Ray, no storage: its decisions only)."""
    from sluiceway.cluster.simulation import scale_table

    print("\n## Controller at scale (simulated tasks; 1 s epochs, checkpoints every 5)", flush=True)
    print(f"{'tasks':>6} {'nodes':>6} {'acks':>9} {'CPU ms/epoch':>13} {'share of a core':>16} {'messages/epoch':>15}")
    for r in scale_table():
        print(f"{r['tasks']:>6} {r['nodes']:>6} {'per node' if r['gathered'] else 'per task':>9} "
              f"{r['cpu_ms_per_epoch']:>13.2f} {100 * r['core_share_at_1s']:>15.2f}% {r['messages_per_epoch']:>15}",
              flush=True)


def main() -> int:
    from sluiceway.cluster.local import init_embedded

    print(f"sluiceway bench on {CORES} cores (python {sys.version.split()[0]}, pyarrow {pa.__version__})", flush=True)
    init_embedded(num_cpus=CORES)
    try:
        if os.environ.get("BENCH_ONLY") in (None, "", "controller"):
            controller_bench()
        if os.environ.get("BENCH_ONLY") in (None, "", "tasks"):
            tasks_bench()
        if os.environ.get("BENCH_ONLY") in (None, "", "start"):
            start_bench()
        if os.environ.get("BENCH_ONLY") in (None, "", "state"):
            state_bench()
        if os.environ.get("BENCH_ONLY") in (None, "", "state_job"):
            state_job_bench()
        if os.environ.get("BENCH_ONLY") in (None, "", "backlog"):
            backlog_bench()
        if os.environ.get("BENCH_ONLY") in (None, "", "keyed"):
            keyed_bench()
        if os.environ.get("BENCH_ONLY") in (None, "", "sinks"):
            sink_bench()
        if os.environ.get("BENCH_ONLY") in (None, "", "nexmark"):
            nexmark_bench()
        if os.environ.get("BENCH_ONLY") in (None, "", "joins"):
            joins_bench()
    finally:
        import ray

        ray.shutdown()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loop-on-one-core"]:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        print(json.dumps(loop_q1(sys.argv[2])))
        sys.exit(0)
    if sys.argv[1:2] == ["nexmark"]:
        import argparse

        parser = argparse.ArgumentParser(prog="bench.py nexmark", description="one Nexmark query, engine beside loop")
        parser.add_argument("--query", default="q5", choices=["q0", "q1", "q2", "q5", "q7", "q11"])
        parser.add_argument("--events", type=int, default=NEXMARK_EVENTS)
        args = parser.parse_args(sys.argv[2:])
        from sluiceway.cluster.local import init_embedded

        init_embedded(num_cpus=CORES)
        nexmark_bench([args.query], args.events)
        sys.exit(0)
    sys.exit(main())
