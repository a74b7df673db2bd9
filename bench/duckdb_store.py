"""DuckDB as the keyed store, measured before choosing the store (issue 21): the same work as
``BENCH_ONLY=state`` (sum and count per key, 100,000-row epochs on keys drawn from the whole state), one
thread and a 512 MB memory limit, with an ART primary key and INSERT ... ON CONFLICT DO UPDATE ... RETURNING.
DuckDB is not a dependency: ``pip install duckdb==1.4.2`` in a venv of its own, then
``python bench/duckdb_store.py 1000000 10000000 40000000``."""
import sys, time, tempfile, os
import duckdb, numpy as np, pyarrow as pa

for size in [int(x) for x in sys.argv[1:]]:
    path = os.path.join(tempfile.mkdtemp(), "state.duckdb")
    con = duckdb.connect(path, config={"memory_limit": "512MB", "threads": 1})
    con.execute("CREATE TABLE state (key BIGINT PRIMARY KEY, s BIGINT, n BIGINT)")
    t0 = time.perf_counter()
    for start in range(0, size, 1_000_000):
        batch = pa.table({"key": np.arange(start, min(size, start + 1_000_000), dtype=np.int64)})
        con.execute("INSERT INTO state SELECT key, 1, 1 FROM batch")
    fill = time.perf_counter() - t0
    rng = np.random.default_rng(7)
    times = []
    for epoch in range(10):
        keys = rng.integers(0, size, 100_000)
        batch = pa.table({"key": keys, "v": np.ones(100_000, np.int64)})
        t0 = time.perf_counter()
        out = con.execute("INSERT INTO state SELECT key, sum(v), count(*) FROM batch GROUP BY key "
                          "ON CONFLICT (key) DO UPDATE SET s = s + excluded.s, n = n + excluded.n "
                          "RETURNING key, s, n").arrow()
        if epoch % 5 == 4:
            con.execute("CHECKPOINT")
        times.append(time.perf_counter() - t0)
    times.sort()
    print(f"duckdb {size:>12,} fill {fill:6.1f} s  epoch p50 {1000 * times[5]:7.1f} ms  max {1000 * times[-1]:7.1f} ms "
          f"rows/s {10 * 100_000 / sum(times):>10,.0f}", flush=True)
    con.close()
